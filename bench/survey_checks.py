"""What the foreign-model surveys (bench/keras_survey.py, bench/hf_survey.py) check of each file, in the
runtime environment: the transform's gradient against the framework's own, and the export's verdict."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def rel(a, b) -> float:
    """The worst image's relative L2 difference."""
    a = np.asarray(a, np.float64).reshape(len(b), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    return float(np.max(np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)))


def against_reference(model, size: int, x, c, features, grad) -> dict:
    """The transformed `model` (a ModelProto, [N, 3, H, W] input) run on x [N, 3, H, W] with cotangent c:
    {"features", "input_grad"} relative to the reference's, or {"transform_error"} with the one-line
    refusal."""
    import onnxruntime as ort

    from pbv_onnx.base.errors import PbvError
    from pbv_onnx.export.graph.transform import build
    from pbv_onnx.runtime.modelfile import COTANGENT, FEATURES, IMAGE, INPUT_GRAD, vjp_subgraph

    try:
        built = build(model, input_size=(size, size))
    except PbvError as exc:
        return {"transform_error": str(exc)}
    sess = ort.InferenceSession(vjp_subgraph(built.model).SerializeToString(), providers=["CPUExecutionProvider"])
    f, g = sess.run([FEATURES, INPUT_GRAD], {IMAGE: x, COTANGENT: c})
    return {"features": rel(f, features), "input_grad": rel(g, grad)}


def export_verdict(src: Path, mean: tuple, std: tuple) -> str:
    """`export --onnx` of the file (its own finite-difference check on photographs): "accepted: ..." with
    the input gradients' errors, or the refusal's text."""
    from pbv_onnx.base.errors import PbvError
    from pbv_onnx.export.onnx_route import export_onnx

    out = src.with_name(src.stem + "-pbv.onnx")
    try:
        res = export_onnx(src, out, mean=mean, std=std, force=True, progress=None)
    except PbvError as exc:
        return str(exc).split(": ", 1)[-1]  # "export refused: ..." or another refusal
    errs = res.verification["errors"]["ort_vs_float64"]
    return "accepted: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items() if k.startswith("input"))


def table_head(title: str, made_by: str, versions: str, columns: list[str]) -> list[str]:
    """The first lines of a survey's results page: title, how it was made, versions, table header."""
    return [
        f"# {title}",
        "",
        made_by,
        "",
        f"Versions: {versions}.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]


def two_steps(doc: str, name: str, make, check) -> None:
    """The command line of a survey run in two environments: `make --dir D` (the framework's), then
    `check --dir D [--out MD]` (the runtime's)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("step", choices=["make", "check"])
    ap.add_argument("--dir", type=Path, default=ROOT / "build" / name)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / f"{name}.md")
    args = ap.parse_args()
    if args.step == "make":
        make(args.dir)
    else:
        check(args.dir, args.out)
