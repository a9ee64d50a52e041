"""Where an exported model's time goes: onnxruntime's profiler, summed per operator type.

.venv/runtime/bin/python bench/profile_ops.py MODEL.onnx [--images 8] [--runs 3] [--top 15] [--split]
    [--forward]

--split: the VJP graph's kernel time in three parts, by the node's place in the graph onnxruntime ran:
the forward pass (the model's own nodes), the forward-side adjoint nodes (masks and derivatives made
once per image from forward tensors) and the backward pass (nodes the cotangent reaches).
--forward: the features-only graph instead of the VJP graph.
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
PARTS = ("forward", "forward-side adjoint", "backward")


def part_of_nodes(graph, cotangent: str) -> dict[str, str]:
    """{node name: part} of an onnxruntime-optimised graph (nodes in execution order): "backward" where
    the cotangent reaches the node, "forward-side adjoint" for other nodes the transform added (their
    outputs named adj/...), "forward" for the rest."""
    reached = {cotangent}
    parts = {}
    for node in graph.node:
        if any(i in reached for i in node.input):
            reached.update(node.output)
            parts[node.name] = "backward"
        elif any(o.startswith("adj/") for o in node.output) or node.name.startswith("adj/"):
            parts[node.name] = "forward-side adjoint"
        else:
            parts[node.name] = "forward"
    return parts


def profile(
    path: str, images: int = 8, runs: int = 3, threads: int | None = None, split: bool = False, forward: bool = False
) -> dict:
    """{op_type: microseconds per run}, nodes of the VJP graph (one cotangent per image, as
    Engine.vjp runs it) or of the features-only graph (`forward`), on random inputs, after WARM_UP
    runs. With `split`, {part: {op_type: microseconds per run}} (see part_of_nodes)."""
    import onnx
    import onnxruntime as ort

    from pbv_onnx.runtime.engine import COTANGENT, FEATURES, IMAGE, INPUT_GRAD
    from pbv_onnx.runtime.modelfile import features_subgraph, has_split_passes, read_info, read_model, vjp_subgraph
    from pbv_onnx.runtime.sessions import session_options

    data, proto, _ = read_model(path)
    info = read_info(path, data, proto)
    if forward:
        source = features_subgraph(proto).SerializeToString()
    else:
        source = vjp_subgraph(proto).SerializeToString() if has_split_passes(proto) else data
    opts = session_options(threads)
    with tempfile.TemporaryDirectory() as tmp:
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "prof")
        if split:
            opts.optimized_model_filepath = os.path.join(tmp, "optimised.onnx")
        sess = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        x = rng.standard_normal((images, *info.input_shape)).astype(np.float32)
        c = rng.standard_normal((images, *info.feature_shape)).astype(np.float32)
        outputs, feeds = ([FEATURES], {IMAGE: x}) if forward else ([FEATURES, INPUT_GRAD], {IMAGE: x, COTANGENT: c})
        for _ in range(runs + WARM_UP):
            sess.run(outputs, feeds)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
        parts = {}
        if split:
            graph = onnx.load(os.path.join(tmp, "optimised.onnx"), load_external_data=False).graph
            parts = part_of_nodes(graph, COTANGENT)
    # the first runs pay one-off allocations: count only nodes that start after they end
    warm_up = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[:WARM_UP]
    warm_from = warm_up[-1]["ts"] + warm_up[-1]["dur"]
    per_op: dict[str, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= warm_from:
            part = parts.get(e["name"][: -len("_kernel_time")], "forward") if split else "all"
            per_op[part][e["args"]["op_name"]] += e["dur"] / runs
    ordered = {p: dict(sorted(ops.items(), key=lambda kv: -kv[1])) for p, ops in per_op.items()}
    if split:
        return {p: ordered.get(p, {}) for p in PARTS}
    return ordered.get("all", {})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--split", action="store_true", help="forward, forward-side adjoint and backward parts")
    ap.add_argument("--forward", action="store_true", help="the features-only graph")
    args = ap.parse_args()
    if args.split and args.forward:
        ap.error("--split and --forward: the features-only graph has no adjoint parts")
    result = profile(args.model, args.images, args.runs, args.threads, args.split, args.forward)
    groups = result if args.split else {"all": result}
    total = sum(sum(ops.values()) for ops in groups.values())
    graph = "features-only graph" if args.forward else "VJP graph"
    print(
        f"{args.model}: {total / 1e3:.0f} ms of kernel time per run of the {graph} ({args.images} images,"
        f" mean of {args.runs} warm runs)"
    )
    for part, ops in groups.items():
        if args.split:
            print(f" {part}: {sum(ops.values()) / 1e3:.1f} ms")
        for op, us in list(ops.items())[: args.top]:
            print(f"  {op:<24} {us / 1e3:8.1f} ms  {100 * us / total:5.1f} %")


if __name__ == "__main__":
    main()
