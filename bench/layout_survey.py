"""How the export reads the layers of real converted models: the layouts `info --layers` gives every
3-D and 4-D tensor of the survey files, and one turned layer per file exported with `--pool avg` and
checked against the file's own tensor averaged per channel.

Runs in the runtime environment over the files the surveys made (bench/hf_survey.py,
bench/timm_survey.py and bench/keras_survey.py, their `make` steps):

    .venv/runtime/bin/python bench/layout_survey.py [--out bench/results/layout_survey.md]

A file whose layers are all channels first has nothing to turn and gets counts only. The layer tested is
the middle one (in graph order) of those read as NHWC or NCT; its features are compared, on 2 random
images, with the file's own tensor (onnxruntime, the tensor added as an output) averaged over its
positions, per channel; the export's own check (finite differences of a float64 copy) must accept it.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
SURVEYS = ("hf_survey", "timm_survey", "keras_survey")
KINDS = ("NCHW", "NHWC", "NTC", "NCT", "?")


def sources(build: Path) -> list[Path]:
    """The survey's forward files (not the exports it wrote beside them)."""
    return [p for s in SURVEYS for p in sorted((build / s).glob("*.onnx")) if not p.stem.endswith("-pbv")]


def own_tensor(path: Path, name: str, x: np.ndarray) -> np.ndarray:
    """The file's tensor `name` on images x [N, 3, H, W] (channels-last files get x turned)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    model = onnx.load(str(path))
    model.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    feed = x.transpose(0, 2, 3, 1) if inp.shape[-1] == 3 and inp.shape[1] != 3 else x
    return sess.run([name], {inp.name: feed})[0]


def survey_file(path: Path) -> dict:
    """Layout counts of one file, and its turned layer's check."""
    import onnx
    import onnxruntime as ort

    from pbv_onnx.base.errors import PbvError
    from pbv_onnx.export.graph.layers import list_layers
    from pbv_onnx.export.onnx_route import export_onnx
    from pbv_onnx.runtime.modelfile import COTANGENT, FEATURES, IMAGE, vjp_subgraph

    row: dict = {"file": f"{path.parent.name}/{path.name}"}
    try:
        rows = list_layers(onnx.load(str(path)), with_layout=True)
    except PbvError as exc:
        return {**row, "error": str(exc).split(": ", 1)[-1]}
    counts = collections.Counter((len(shape), lay) for _, _, shape, lay in rows if len(shape) in (3, 4))
    row["counts"] = {f"{r}-D {k}": n for (r, k), n in sorted(counts.items())}
    turned = [(name, shape, lay) for name, _, shape, lay in rows if lay in ("NHWC", "NCT")]
    if not turned:
        return row
    name, shape, lay = turned[len(turned) // 2]
    row.update(layer=name, layout=lay, shape=[str(d) for d in shape])
    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    hw = [d.dim_value for d in dims[1:]]
    size = [h for h in hw if h not in (0, 3)][:2] or [64, 64]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "m.onnx"
        try:
            res = export_onnx(
                path, out, layer=name, pool="avg", resize=f"{size[0]}x{size[1]}",
                mean=(0.5,) * 3, std=(0.25,) * 3, force=True, progress=None,
            )  # fmt: skip
        except PbvError as exc:
            return {**row, "export": str(exc).split(": ", 1)[-1]}
        errs = res.verification["errors"]["ort_vs_float64"]
        row["export"] = "accepted: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items() if k.startswith("input"))
        proto = onnx.load(str(out))
    x = np.random.default_rng(0).standard_normal((2, 3, *size)).astype(np.float32)
    y = own_tensor(path, name, x)
    per_channel = y.mean(axis=(1, 2)) if lay == "NHWC" else y.mean(axis=2)
    sess = ort.InferenceSession(vjp_subgraph(proto).SerializeToString(), providers=["CPUExecutionProvider"])
    n = sess.get_inputs()[1].shape[1]
    f = sess.run([FEATURES], {IMAGE: x, COTANGENT: np.zeros((2, n), np.float32)})[0]
    row["features"] = int(f.shape[1])
    row["channels"] = int(per_channel.shape[1])
    row["rel_err"] = float(np.linalg.norm(f - per_channel) / np.linalg.norm(per_channel))
    return row


def render(rows: list[dict]) -> str:
    lines = [
        "# Layouts of real converted models, as the export reads them",
        "",
        "Made by `bench/layout_survey.py` (its docstring: how) over the files of the Hugging Face, timm and",
        "Keras surveys. Counts: the 3-D and 4-D tensors `pbv-onnx info --layers` lists, by layout. Tested",
        "layer: the middle one of those read NHWC or NCT, exported with `--pool avg`; its features against",
        "the file's own tensor averaged over positions per channel (relative L2, 2 random images).",
        "",
        "| file | 4-D NCHW / NHWC / ? | 3-D NTC / NCT / ? | tested layer | layout, shape | features / channels"
        " | vs per-channel mean | export --onnx |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['file']} | - | - | - | - | - | - | {r['error']} |")
            continue
        c = r["counts"]
        four = " / ".join(str(c.get(f"4-D {k}", 0)) for k in ("NCHW", "NHWC", "?"))
        three = " / ".join(str(c.get(f"3-D {k}", 0)) for k in ("NTC", "NCT", "?"))
        if "layer" not in r:
            lines.append(f"| {r['file']} | {four} | {three} | none turned | - | - | - | - |")
            continue
        shape = "[" + ", ".join(r["shape"]) + "]"
        got = f"{r['features']} / {r['channels']}" if "features" in r else "-"
        err = f"{r['rel_err']:.1e}" if "rel_err" in r else "-"
        lines.append(
            f"| {r['file']} | {four} | {three} | `{r['layer']}` | {r['layout']}, {shape} | {got} | {err} "
            f"| {r['export']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", type=Path, default=ROOT / "build")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "layout_survey.md")
    args = ap.parse_args()
    rows = []
    for path in sources(args.build):
        rows.append(survey_file(path))
        print(json.dumps(rows[-1]), flush=True)
    args.out.write_text(render(rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
