"""Keras applications through tf2onnx and the ONNX adjoint transform, against TensorFlow's own gradients.

Two steps, two environments (TensorFlow is too heavy for the project's):

    # 1. in a TensorFlow environment (tensorflow-cpu, tf2onnx, onnx): convert each application with
    #    seeded weights, and write TensorFlow's float64 features and input gradients beside it
    python3 -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu tf2onnx onnxruntime
    /tmp/tfenv/bin/python bench/keras_survey.py make --dir build/keras_survey
    # 2. in the runtime environment: transform each file, compare, run the export's own check
    .venv/runtime/bin/python bench/keras_survey.py check --dir build/keras_survey

Each application is built with `weights=None`, `include_top=False, pooling="avg"` (the features a
readout would use, [N, C]) at 96 x 96 (Xception and InceptionV3 at their least, 75 and 71 and up),
channels last as Keras writes images: the transform puts its Transpose first. Its weights are
redrawn, seeded: kernels He-scaled, BatchNorm affines and statistics at order 1 (Keras' fresh init
leaves BatchNorm the identity and saturates some networks: MobileNetV3Small's features then do not
move with the image at all). The reference is a float64 build of the same application with the same
weights (keras dtype policy float64) and tf.GradientTape. Step 2 reports, per model, the relative L2 of
onnxruntime's float32 features and input gradient against it (worst of 3 images), TensorFlow's own
float32 pass against it (the floor), and whether `pbv-onnx export --onnx` (finite differences of a
float64 copy of the file) accepts the file. Results: bench/results/keras_survey.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SEED = 0
N_IMAGES = 3
# name: (keras.applications constructor, input size)
APPS = {
    "ResNet50": ("ResNet50", 96),
    "DenseNet121": ("DenseNet121", 96),
    "InceptionV3": ("InceptionV3", 96),
    "Xception": ("Xception", 96),
    "VGG16": ("VGG16", 96),
    "MobileNetV2": ("MobileNetV2", 96),
    "MobileNetV3Small": ("MobileNetV3Small", 96),
    "EfficientNetB0": ("EfficientNetB0", 96),
    "EfficientNetV2B0": ("EfficientNetV2B0", 96),
    "ConvNeXtTiny": ("ConvNeXtTiny", 96),
}


# -- step 1: TensorFlow ---------------------------------------------------------------------------
def seeded(model, rng: np.random.Generator) -> list[np.ndarray]:
    """Every weight of `model` redrawn from `rng` by its kind; others (normalisation layers' stored
    mean and variance, layer scales) kept."""
    out = []
    for w in model.weights:
        value = np.asarray(w.numpy(), np.float64)
        name, shape = w.path.split("/")[-1], tuple(w.shape)
        if name in ("kernel", "depthwise_kernel", "pointwise_kernel") and len(shape) >= 2:
            if name == "depthwise_kernel":
                fan_in = int(np.prod(shape[:2]))
            else:
                fan_in = int(np.prod(shape[:-1]))
            value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        elif name == "gamma":
            value = rng.uniform(0.5, 1.5, shape)
        elif name in ("beta", "bias"):
            value = rng.standard_normal(shape) * 0.1
        elif name == "moving_mean":
            value = rng.standard_normal(shape) * 0.1
        elif name == "moving_variance":
            value = rng.uniform(0.5, 2.0, shape)
        out.append(value)
    return out


def make(folder: Path, names: list[str]) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    import keras
    import onnx
    import tensorflow as tf
    import tf2onnx

    folder.mkdir(parents=True, exist_ok=True)
    versions = f"tensorflow {tf.__version__}; keras {keras.__version__}; tf2onnx {tf2onnx.__version__}"
    for name in names:
        ctor, size = APPS[name]
        row: dict = {"model": name, "size": size, "versions": versions}
        t0 = time.perf_counter()
        try:
            keras.config.set_dtype_policy("float32")
            m32 = getattr(keras.applications, ctor)(
                weights=None, include_top=False, pooling="avg", input_shape=(size, size, 3)
            )
            keras.config.set_dtype_policy("float64")
            m64 = getattr(keras.applications, ctor)(
                weights=None, include_top=False, pooling="avg", input_shape=(size, size, 3)
            )
            keras.config.set_dtype_policy("float32")
            weights = seeded(m32, np.random.default_rng(SEED))
            m32.set_weights([w.astype(np.float32) for w in weights])
            m64.set_weights(weights)
            rng = np.random.default_rng(SEED + 1)
            x = rng.uniform(0, 255, (N_IMAGES, size, size, 3)).astype(np.float32)
            refs = {}
            for tag, model, dtype in (("64", m64, np.float64), ("32", m32, np.float32)):
                xt = tf.constant(x.astype(dtype))
                with tf.GradientTape() as tape:
                    tape.watch(xt)
                    f = model(xt, training=False)
                    if tag == "64":
                        c = np.random.default_rng(SEED + 2).standard_normal(f.shape)
                    y = tf.reduce_sum(f * tf.constant(c.astype(dtype)))
                refs[f"features{tag}"] = f.numpy()
                refs[f"grad{tag}"] = tape.gradient(y, xt).numpy()
            spec = (tf.TensorSpec((None, size, size, 3), tf.float32, name="image"),)
            proto, _ = tf2onnx.convert.from_keras(m32, input_signature=spec, opset=17)
            onnx.save(proto, folder / f"{name}.onnx")
            np.savez(folder / f"{name}.npz", x=x, c=c.astype(np.float32), **refs)
            row["ops"] = sorted({n.op_type for n in proto.graph.node})
            row["converted"] = True
        except Exception as exc:  # noqa: BLE001 -- a row per model, whatever fails
            row["converted"] = False
            row["error"] = f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:300]}" if str(exc) else repr(exc)
        row["make_s"] = round(time.perf_counter() - t0, 1)
        (folder / f"{name}.json").write_text(json.dumps(row, indent=1))
        print(json.dumps({k: v for k, v in row.items() if k != "ops"}), flush=True)


# -- step 2: the runtime environment ---------------------------------------------------------------
def check(folder: Path, names: list[str], out_md: Path) -> None:
    import onnx
    from survey_checks import against_reference, export_verdict, rel

    from pbv_onnx.export.graph.prepare import channels_first

    for name in names:
        row = json.loads((folder / f"{name}.json").read_text())
        for key in ("features", "input_grad", "export", "transform_error"):
            row.pop(key, None)
        if not row.get("converted"):
            continue
        ref = dict(np.load(folder / f"{name}.npz"))
        model = onnx.load(folder / f"{name}.onnx")
        # tf2onnx writes what it cannot convert as TensorFlow's own ops and carries on
        foreign = sorted({n.op_type for n in model.graph.node if not onnx.defs.has(n.op_type, n.domain)})
        if foreign:
            row["converted"] = False
            row["error"] = f"tf2onnx left ops that are not ONNX ({', '.join(foreign)})"
            (folder / f"{name}.json").write_text(json.dumps(row, indent=1))
            continue
        channels_first(model)
        x, g64 = ref["x"].transpose(0, 3, 1, 2), ref["grad64"].transpose(0, 3, 1, 2)
        row.update(against_reference(model, row["size"], x, ref["c"], ref["features64"], g64))
        row["tf32_features"] = rel(ref["features32"], ref["features64"])
        row["tf32_input_grad"] = rel(ref["grad32"], ref["grad64"])
        # photos' [0, 1] pixels to Keras' [0, 255], as the reference's x
        row["export"] = export_verdict(folder / f"{name}.onnx", (0.0,) * 3, (1 / 255,) * 3)
        (folder / f"{name}.json").write_text(json.dumps(row, indent=1))
        print(json.dumps({k: row.get(k) for k in ("model", "features", "input_grad", "export")}), flush=True)
    # the table: every model checked so far in this folder, in APPS order
    rows = [json.loads((folder / f"{n}.json").read_text()) for n in APPS if (folder / f"{n}.json").exists()]
    out_md.write_text(render(rows))
    (folder / "survey.json").write_text(json.dumps(rows, indent=1))
    print(f"wrote {out_md}")


def render(rows: list[dict]) -> str:
    from survey_checks import table_head

    made_by = (
        "Made by `bench/keras_survey.py` (its docstring: how). Each application with seeded weights, "
        '`include_top=False, pooling="avg"`, channels-last input; features and input gradients of '
        "onnxruntime float32 against TensorFlow's own in float64 (tf.GradientTape; relative L2, worst of "
        f"{N_IMAGES} images); TensorFlow's float32 pass against the same reference is the floor. "
        "`export --onnx`: the export's own check (finite differences of a float64 copy of the file)."
    )
    lines = table_head(
        "Keras applications through tf2onnx and the ONNX adjoint transform",
        made_by,
        rows[0].get("versions", "?") if rows else "?",
        ["model", "input", "features", "input_grad", "TF float32 (features, input_grad)", "export --onnx"],
    )
    for r in rows:
        if not r.get("converted"):
            lines.append(f"| {r['model']} | {r['size']} | - | - | - | tf2onnx failed: {r.get('error', '?')} |")
            continue
        if "transform_error" in r:
            lines.append(f"| {r['model']} | {r['size']} | - | - | - | {r['transform_error']} |")
            continue
        lines.append(
            f"| {r['model']} | {r['size']} | {r['features']:.1e} | {r['input_grad']:.1e} | "
            f"{r['tf32_features']:.1e}, {r['tf32_input_grad']:.1e} | {r.get('export', '-')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=["make", "check"])
    ap.add_argument("--dir", type=Path, default=ROOT / "build" / "keras_survey")
    ap.add_argument("--models", nargs="*", default=list(APPS))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "keras_survey.md")
    args = ap.parse_args()
    if args.step == "make":
        make(args.dir, args.models)
    else:
        check(args.dir, args.models, args.out)


if __name__ == "__main__":
    main()
