"""bench/profile_ops.py's split of a VJP graph's time: forward, forward-side adjoint and backward parts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from onnx import helper

ROOT = Path(__file__).resolve().parents[2]


def _profile_ops():
    spec = importlib.util.spec_from_file_location("profile_ops", ROOT / "bench" / "profile_ops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nodes_are_split_by_whether_the_cotangent_reaches_them():
    nodes = [
        helper.make_node("Relu", ["image"], ["r"], name="relu"),  # the model's own
        helper.make_node("HardSigmoid", ["r"], ["adj/step_1"], name="adj/step_1"),  # a mask, once per image
        helper.make_node("Mul", ["cotangent", "adj/step_1"], ["adj/mul_2"], name="adj/mul_2"),
        helper.make_node("Identity", ["adj/mul_2"], ["input_grad"], name="ReorderOutput_token_3"),  # inserted
        helper.make_node("Identity", ["r"], ["features"], name="features_copy"),
    ]
    graph = helper.make_graph(nodes, "g", [], [])
    parts = _profile_ops().part_of_nodes(graph, "cotangent")
    assert parts == {
        "relu": "forward",
        "adj/step_1": "forward-side adjoint",
        "adj/mul_2": "backward",
        "ReorderOutput_token_3": "backward",
        "features_copy": "forward",
    }
