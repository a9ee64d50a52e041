"""export/graph/fuse_strided.py: where the strided depthwise phase pattern declines (the graph then
stays correct through the node rules), and that it changes the K-per-image pass only. Its
examples run in test_graph_rules.py (finite differences, K-per-image against one at a time)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper
from test_graph_rules import EXACT, FD_TOL, check_model

from pbv_onnx.export.graph import PATTERNS, build
from pbv_onnx.export.graph.rules import example_model, example_weights
from pbv_onnx.runtime.modelfile import multi_subgraph, vjp_subgraph

NAME = "strided_depthwise_phases"
DW = dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])


def _chain(size=(8, 8), cin: int = 3, c: int = 8, extra_reader: bool = False, dw: dict | None = None):
    """1x1 conv cin -> c, ReLU6, depthwise 3x3 conv (stride 2 by default); optionally the ReLU6 output
    also read by a second branch (pooled and added to the result)."""
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["e"], kernel_shape=[1, 1]),
        helper.make_node("Clip", ["e", "lo", "hi"], ["r"]),
        helper.make_node("Conv", ["r", "dw"], ["d" if extra_reader else "y"], group=c, **(dw or DW)),
    ]
    if extra_reader:
        nodes += [
            helper.make_node("AveragePool", ["r"], ["rp"], kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node("Add", ["d", "rp"], ["y"]),
        ]
    inits = {"w1": example_weights(1, c, cin, 1, 1, scale=3.0), "dw": example_weights(2, c, 1, 3, 3, scale=0),
             "lo": np.float32(0), "hi": np.float32(6)}  # fmt: skip
    return example_model(nodes, (cin, *size), inits, name="chain")


@pytest.mark.parametrize(
    "model",
    [
        # an inner tensor with a second reader: matching would still be right (that reader's cotangent
        # goes through the node rules and is summed), but the 1x1 adjoint would run twice
        _chain(extra_reader=True),
        _chain(size=(7, 8)),  # odd height: the phases would not tile the input
        _chain(c=2),  # a narrowing 1x1 conv (3 -> 2): the phases would pass on more channels
        _chain(dw=dict(kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1])),  # other padding
    ],
    ids=["second-reader", "odd-size", "narrowing-1x1", "pads"],
)
def test_no_match_stays_correct(model):
    errors = check_model(model)
    assert NAME not in errors["patterns"], errors
    assert errors["input_grad[c]"] < FD_TOL and errors["multi"] < EXACT, errors


def test_k_pass_only():
    """The one-per-image pass keeps the zero-upsampled adjoint; the K-per-image pass interleaves phases."""
    built = build(PATTERNS[NAME].examples()[0])
    assert [p.name for p in built.patterns] == [NAME]

    def interleaves(proto):
        return [n for n in proto.graph.node if n.op_type == "ConvTranspose" and "interleave" in n.input[1]]

    one, multi = vjp_subgraph(built.model), multi_subgraph(built.model)
    assert not interleaves(one) and len(interleaves(multi)) == 1
    # the pattern's 2x2 interleave has no 1x1 zero-insertion beside it in the K pass
    kinds = [n.op_type for n in multi.graph.node]
    assert kinds.count("ConvTranspose") == 1, kinds
