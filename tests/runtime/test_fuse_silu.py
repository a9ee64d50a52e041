"""export/graph/fuse_silu.py: where the SiLU and squeeze-excitation patterns decline (the graph then stays
correct through the node rules), and what they emit where they match. Their examples run in
test_graph_rules.py (finite differences, K-per-image against one at a time)."""

from __future__ import annotations

from onnx import helper
from test_graph_rules import EXACT, FD_TOL, _image_model, check_model

from pbv_onnx.export.graph import build
from pbv_onnx.export.graph.fuse_silu import SiluPattern, SqueezeExcitationPattern
from pbv_onnx.export.graph.rules import example_model, example_weights
from pbv_onnx.runtime.modelfile import vjp_subgraph

X = (16, 5, 4)


def _se(reads_x_directly: bool = False, scale_read_twice: bool = False):
    """x -> GlobalAveragePool -> 1x1 conv -> Sigmoid = e; y = x * e; variants where the excitation also reads
    x itself (a ReduceMax of x added to the pooled map), or where e is read by a second node."""
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["p"])]
    if reads_x_directly:
        nodes += [helper.make_node("ReduceMax", ["x"], ["mx"], axes=[2, 3], keepdims=1),
                  helper.make_node("Add", ["p", "mx"], ["pm"])]  # fmt: skip
    nodes += [
        helper.make_node("Conv", ["pm" if reads_x_directly else "p", "w"], ["q"], kernel_shape=[1, 1]),
        helper.make_node("Sigmoid", ["q"], ["e"]),
        helper.make_node("Mul", ["x", "e"], ["m" if scale_read_twice else "y"]),
    ]
    if scale_read_twice:
        nodes.append(helper.make_node("Add", ["m", "e"], ["y"]))
    return example_model(nodes, X, {"w": example_weights(3, 16, 16, 1, 1, scale=0) * 2})


def _check(model, matched: bool, name: str) -> None:
    errors = check_model(_image_model(model)[0])
    assert (name in errors["patterns"]) == matched, errors
    assert errors["input_grad[c]"] < FD_TOL and errors["multi"] < EXACT, errors


def test_squeeze_excitation_declines_where_the_excitation_reads_x_itself():
    _check(_se(reads_x_directly=True), False, SqueezeExcitationPattern.name)


def test_squeeze_excitation_declines_where_the_scale_has_another_reader():
    _check(_se(scale_read_twice=True), False, SqueezeExcitationPattern.name)


def test_squeeze_excitation_matches_the_plain_block():
    _check(_se(), True, SqueezeExcitationPattern.name)


def test_silu_declines_a_sigmoid_of_another_tensor():
    nodes = [helper.make_node("Neg", ["x"], ["n"]), helper.make_node("Sigmoid", ["n"], ["s"]),
             helper.make_node("Mul", ["x", "s"], ["y"])]  # fmt: skip
    _check(example_model(nodes, X), False, SiluPattern.name)


def test_silu_backward_is_one_product_with_a_forward_side_derivative():
    """One cotangent per image: the SiLU's adjoint is one Mul of the cotangent (no Sigmoid rule's Sub, no
    product-rule Add), its derivative made in the forward part from the Sigmoid and Mul outputs."""
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["x", "s"], ["y"])]
    graph = vjp_subgraph(build(_image_model(example_model(nodes, X))[0]).model).graph
    ops = [n.op_type for n in graph.node]
    # forward Sigmoid and Mul; derivative HardSigmoid (1 - s), Mul, Add; the backward's one Mul (the image's
    # 1x1 Conv into x and its adjoint add no Mul or Add)
    assert "Sub" not in ops and ops.count("HardSigmoid") == 1, ops
    assert ops.count("Mul") == 3 and ops.count("Add") == 1, ops
