"""Where an exported model's time goes: onnxruntime's profiler, summed per operator type.

.venv/runtime/bin/python bench/profile_ops.py MODEL.onnx [--images 8] [--runs 3] [--top 15]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# runs not counted: the first plans memory and page-faults it in; where onnxruntime's memory pattern is
# on, the second allocates the planned block and faults it in again (docs/performance.md)
WARM_UP = 2


def profile(path: str, images: int = 8, runs: int = 3, threads: int | None = None) -> dict:
    """{op_type: microseconds per run}, nodes of the VJP graph (one cotangent per image, as
    Engine.vjp runs it), on random inputs, after WARM_UP runs."""
    import onnxruntime as ort

    from pbv_onnx.runtime.engine import COTANGENT, FEATURES, IMAGE, INPUT_GRAD
    from pbv_onnx.runtime.modelfile import has_split_passes, read_info, read_model, vjp_subgraph
    from pbv_onnx.runtime.sessions import session_options

    data, proto, _ = read_model(path)
    info = read_info(path, data, proto)
    source = vjp_subgraph(proto).SerializeToString() if has_split_passes(proto) else data
    opts = session_options(threads)
    with tempfile.TemporaryDirectory() as tmp:
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "prof")
        sess = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        x = rng.standard_normal((images, *info.input_shape)).astype(np.float32)
        c = rng.standard_normal((images, *info.feature_shape)).astype(np.float32)
        for _ in range(runs + WARM_UP):
            sess.run([FEATURES, INPUT_GRAD], {IMAGE: x, COTANGENT: c})
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    # the first runs pay one-off allocations: count only nodes that start after they end
    warm_up = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[:WARM_UP]
    warm_from = warm_up[-1]["ts"] + warm_up[-1]["dur"]
    per_op: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= warm_from:
            per_op[e["args"]["op_name"]] += e["dur"] / runs
    return dict(sorted(per_op.items(), key=lambda kv: -kv[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    per_op = profile(args.model, args.images, args.runs, args.threads)
    total = sum(per_op.values())
    print(
        f"{args.model}: {total / 1e3:.0f} ms of kernel time per run ({args.images} images, mean of"
        f" {args.runs} warm runs)"
    )
    for op, us in list(per_op.items())[: args.top]:
        print(f"  {op:<24} {us / 1e3:8.1f} ms  {100 * us / total:5.1f} %")


if __name__ == "__main__":
    main()
