"""A strided Conv's adjoint as ConvTranspose or in the sub-pixel form, timed in onnxruntime.

.venv/runtime/bin/python bench/conv_adjoint_forms.py [--images 8] [--rounds 12]

Each case is one dense strided Conv of a backbone (its input made from the image by a 1x1 Conv where it
has more than 3 channels), built by the transform twice, with the sub-pixel form forced on and off
(export/graph/ops_conv.py: subpixel_pays decides it in an export). Prints the forward+VJP time of both
graphs (one cotangent per image), the median over interleaved rounds of their ratio, and whether
subpixel_pays chooses the sub-pixel form there.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# name, C_in, C_out, kernel, stride, pad, input size: the strided dense convs of the benchmarked backbones,
# and others at the edges of the sub-pixel criterion (stems of other kernels, convs of 64 input channels)
CASES = [
    ("alexnet stem 11x11/4", 3, 64, 11, 4, 2, 224),
    ("12x12/4", 3, 64, 12, 4, 4, 224),
    ("8x8/4", 3, 64, 8, 4, 2, 224),
    ("9x9/3", 3, 64, 9, 3, 3, 225),
    ("6x6/3", 3, 64, 6, 3, 2, 224),
    ("6x6/2", 3, 64, 6, 2, 2, 224),
    ("4x4/2", 3, 64, 4, 2, 1, 224),
    ("11x11/4 of 64 channels", 64, 96, 11, 4, 2, 112),
    ("6x6/2 of 64 channels", 64, 128, 6, 2, 2, 56),
    ("4x4/2 of 64 channels", 64, 128, 4, 2, 1, 56),
    ("resnet/densenet stem 7x7/2", 3, 64, 7, 2, 3, 224),
    ("efficientnet/mobilenet stem 3x3/2", 3, 32, 3, 2, 1, 224),
    ("convnext/swin stem 4x4/4", 3, 96, 4, 4, 0, 224),
    ("convnext downsampling 2x2/2", 96, 192, 2, 2, 0, 56),
    ("vit_b_16 patches 16x16/16", 3, 768, 16, 16, 0, 224),
]


def case_model(cin: int, cout: int, k: int, s: int, p: int, size: int):
    """[N, 3, size, size] -> (1x1 Conv to cin channels where cin > 3) -> the strided Conv."""
    from onnx import helper

    from pbv_onnx.export.graph.rules import example_model, example_weights

    nodes, inits, x = [], {}, "x"
    if cin != 3:
        nodes.append(helper.make_node("Conv", ["x", "w_in"], ["h"], kernel_shape=[1, 1]))
        inits["w_in"] = example_weights(1, cin, 3, 1, 1, scale=0)
        x = "h"
    nodes.append(helper.make_node("Conv", [x, "w"], ["y"], kernel_shape=[k, k], strides=[s, s], pads=[p] * 4))
    inits["w"] = example_weights(2, cout, cin, k, k, scale=0)
    return example_model(nodes, (3, size, size), inits, name="strided_conv")


def built_session(model, subpixel: bool, threads: int):
    import onnxruntime as ort

    from pbv_onnx.export.graph import build, ops_conv
    from pbv_onnx.runtime.modelfile import vjp_subgraph
    from pbv_onnx.runtime.sessions import session_options

    with mock.patch.object(ops_conv, "subpixel_pays", lambda *a: subpixel):
        built = build(model)
    ops = {n.op_type for n in built.model.graph.node}
    assert ("DepthToSpace" in ops) == subpixel, ops
    source = vjp_subgraph(built.model).SerializeToString()
    return ort.InferenceSession(source, session_options(threads), providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from pbv_onnx.export.graph import load_rules
    from pbv_onnx.export.graph.ops_conv import subpixel_pays
    from pbv_onnx.runtime.engine import COTANGENT, FEATURES, IMAGE, INPUT_GRAD

    load_rules()
    print(f"fwd+VJP of one strided Conv, {args.images} images, {args.threads} threads, {args.rounds} rounds")
    print("| conv | C_in -> C_out at input size | ConvTranspose (ms) | sub-pixel (ms) | sub-pixel / ConvTranspose |"
          " max abs diff / max abs | chosen |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, cin, cout, k, s, p, size in CASES:
        model = case_model(cin, cout, k, s, p, size)
        sessions = [built_session(model, sub, args.threads) for sub in (False, True)]
        rng = np.random.default_rng(0)
        x = rng.standard_normal((args.images, 3, size, size)).astype(np.float32)
        y = (size + 2 * p - k) // s + 1
        c = rng.standard_normal((args.images, cout, y, y)).astype(np.float32)
        feeds = {IMAGE: x, COTANGENT: c}
        grads = [sess.run([FEATURES, INPUT_GRAD], feeds)[1] for sess in sessions]
        diff = float(np.abs(grads[0] - grads[1]).max() / np.abs(grads[0]).max())
        times: list[list[float]] = [[], []]
        for r in range(args.rounds + 2):
            for i in (0, 1) if r % 2 == 0 else (1, 0):
                t0 = time.perf_counter()
                sessions[i].run([FEATURES, INPUT_GRAD], feeds)
                if r >= 2:  # two warm-up rounds
                    times[i].append(time.perf_counter() - t0)
        ratio = float(np.median(np.array(times[1]) / np.array(times[0])))
        chosen = "yes" if subpixel_pays((k, k), (s, s), (1, 1), cin) else "no"
        print(f"| {name} | {cin} -> {cout} at {size} | {1e3 * np.median(times[0]):.2f} | "
              f"{1e3 * np.median(times[1]):.2f} | **{ratio:.2f}** | {diff:.1e} | {chosen} |")  # fmt: skip


if __name__ == "__main__":
    main()
