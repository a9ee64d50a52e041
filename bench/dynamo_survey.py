"""Survey: the benchmarked backbones as torch's default exporter writes them (torch.onnx.export with
dynamo=True), with a dynamic batch axis and with the batch fixed at 1, through the ONNX-graph transform;
features and input_grad against torch autograd in float64.

Run in the export environment:
    .venv/export/bin/python bench/dynamo_survey.py [--only vit_b_16 ...] [--batch dynamic fixed]
Writes bench/results/dynamo_survey.md. Random weights with small parameters redrawn at order 1
(backbone.load_backbone), cut at the layer bench/run.py uses as `export --arch --exporter dynamo` cuts.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.run import BACKBONES  # noqa: E402

SIZE = 224


def cut_module(arch: str, layer: str, seed: int = 0):
    """(the backbone up to `layer` as `export --arch --exporter dynamo` exports it: the whole model runs,
    the layer's output returned; the same cut for torch autograd, which stops at the layer)."""
    from pbv_onnx.export.backbone import load_backbone, run_to_end, truncate_for_graph

    model = load_backbone(arch, "none", seed).model.eval()
    cut, net = truncate_for_graph(model, layer, "none")
    return run_to_end(cut), net


def dynamo_export(net, path: Path, batch: str) -> None:
    import torch

    x = torch.randn(2 if batch == "dynamic" else 1, 3, SIZE, SIZE)
    kw = {"dynamic_shapes": ({0: torch.export.Dim("batch", min=1, max=64)},)} if batch == "dynamic" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), str(path), dynamo=True, input_names=["x"], **kw)


def survey_one(name: str, arch: str, layer: str, batch: str, workdir: Path) -> dict:
    """One backbone, one batch form: export, transform, errors against torch float64."""
    import onnx
    import onnxruntime as ort
    import torch

    from pbv_onnx.export.graph.transform import build

    row = {"backbone": name, "layer": layer, "batch": batch}
    exported, net = cut_module(arch, layer)
    src = workdir / f"{name}-{batch}.onnx"
    try:
        dynamo_export(exported, src, batch)
    except Exception as exc:  # report, do not stop the survey
        row["result"] = f"torch.onnx.export failed: {str(exc).splitlines()[0][:80]}"
        return row
    t0 = time.perf_counter()
    try:
        built = build(onnx.load(str(src)), input_size=(SIZE, SIZE))
    except Exception as exc:
        row["result"] = f"refused: {str(exc).splitlines()[0][:160]}"
        return row
    row["transform_s"] = time.perf_counter() - t0
    row["patterns"] = ", ".join(sorted({p.name for p in built.patterns})) or "-"
    row["rebatched"] = bool(built.prep.rebatched)
    sess = ort.InferenceSession(built.model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 3, SIZE, SIZE))
    net64 = copy.deepcopy(net).double().eval()
    xt = torch.from_numpy(x).requires_grad_(True)
    y = net64(xt)
    c = rng.standard_normal(tuple(y.shape))
    (g,) = torch.autograd.grad(y, xt, torch.from_numpy(c))
    feats, grad = sess.run(
        ["features", "input_grad"], {"image": x.astype(np.float32), "cotangent": c.astype(np.float32)}
    )

    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    row["features_err"] = rel(feats, y.detach().numpy())
    row["input_grad_err"] = rel(grad, g.numpy())
    # the export's own default limits (features 1e-4, input_grad 5e-2): beyond them the export would refuse
    agree = row["features_err"] <= 1e-4 and row["input_grad_err"] <= 5e-2
    row["result"] = "ok" if agree else "DIFFERS from torch"
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| backbone (layer) | batch | result | features err | input_grad err | transform s | patterns |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ok = "features_err" in r
        batch = r["batch"] + (" (made batch-free)" if r.get("rebatched") else "")
        lines.append(
            f"| {r['backbone']} ({r['layer']}) | {batch} | {r['result']} | "
            + (
                f"{r['features_err']:.1e} | {r['input_grad_err']:.1e} | {r['transform_s']:.1f} | {r['patterns']} |"
                if ok
                else "| | | |"
            )  # fmt: skip
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None, help="backbone names (bench/run.py's BACKBONES)")
    ap.add_argument("--batch", nargs="*", default=["dynamic", "fixed"], choices=["dynamic", "fixed"])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "dynamo_survey.md")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, arch, layer, _, _ in BACKBONES:
            if args.only and name not in args.only:
                continue
            for batch in args.batch:
                row = survey_one(name, arch, layer, batch, Path(tmp))
                print(row, flush=True)
                rows.append(row)
    text = (
        "# torch.onnx dynamo exports through the transform\n\n"
        f"torch {torch.__version__}; input {SIZE}x{SIZE}; 3 random images, one random cotangent each; "
        "errors: relative L2 of onnxruntime float32 against torch autograd float64; ok: both within the export's "
        "default limits (features 1e-4, input_grad 5e-2).\n\n" + table(rows) + "\n"
    )
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
