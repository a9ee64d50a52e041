"""Every registered graph adjoint rule, on each of its examples: the transformed graph (onnxruntime,
float32) against central finite differences of a float64 copy of the forward graph, and the K-per-image
pass against one cotangent at a time. New rules are picked up from the registry."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from pbv_onnx.export.graph import PATTERNS, RULES, UnsupportedOp, build, load_rules, transform
from pbv_onnx.export.graph.axes import turned_perm
from pbv_onnx.export.graph.fd import Forward64, directional_errors, rel_l2
from pbv_onnx.export.graph.rules import example_model, example_weights
from pbv_onnx.runtime.modelfile import (
    COTANGENT,
    COTANGENTS,
    FEATURES,
    IMAGE,
    INPUT_GRAD,
    INPUT_GRADS,
    features_subgraph,
    multi_subgraph,
    vjp_subgraph,
)

load_rules()
CASES = [(op, i) for op in sorted(RULES) for i in range(len(RULES[op].examples()))]
PATTERN_CASES = [(name, i) for name in sorted(PATTERNS) for i in range(len(PATTERNS[name].examples()))]
# float32 graph against float64 central differences (step 1e-6 ||x||): rounding of float32
# activations gives ~1e-6 relative; kinks within the step are rare on random inputs.
FD_TOL = 2e-4
EXACT = 1e-5  # two float32 evaluations of the same arithmetic in another order


def _session(proto):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _x_shape(model) -> tuple[int, ...]:
    return tuple(int(d.dim_value) for d in model.graph.input[0].type.tensor_type.shape.dim[1:])


def _image_model(model):
    """Examples take x [N, ...]; the transform wants an image [N, 3, H, W]: where the example's input
    is not one, an image [N, 3, 1, size] goes through a 1x1 Conv (a weighted sum of the channels) and
    a Reshape into it (the rule still sees its own input)."""
    shape = _x_shape(model)
    if len(shape) == 3 and shape[0] == 3:
        return model, shape
    size = int(np.prod(shape))
    img = (3, 1, size)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    x = m.graph.input[0].name
    m.graph.input[0].name = "image_in"
    m.graph.input[0].type.tensor_type.shape.ClearField("dim")
    for d in ("N", *img):
        dim = m.graph.input[0].type.tensor_type.shape.dim.add()
        if isinstance(d, str):
            dim.dim_param = d
        else:
            dim.dim_value = d
    w = np.array([1.0, 0.5, -0.25], np.float32).reshape(1, 3, 1, 1)
    m.graph.initializer.append(onnx.numpy_helper.from_array(w, "to_x_w"))
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.array([-1, *shape], np.int64), "to_x_shape"))
    m.graph.node.insert(0, helper.make_node("Reshape", ["image_1ch", "to_x_shape"], [x], name="to_x"))
    m.graph.node.insert(0, helper.make_node("Conv", ["image_in", "to_x_w"], ["image_1ch"], name="to_1ch"))
    return m, img


def check_model(model, pool: str = "none", seed: int = 0, n: int = 2, k: int = 3) -> dict:
    """Transform `model` and measure it: features vs float64, input_grad vs central differences,
    K-per-image vs one-at-a-time, the whole graph vs its parts. Returns the errors (and, under
    "patterns", the names of the patterns that matched)."""
    built = build(model, pool=pool)
    proto = built.model
    onnx.checker.check_model(proto)
    rng = np.random.default_rng(seed)
    shape = tuple(int(d.dim_value) for d in model.graph.input[0].type.tensor_type.shape.dim[1:])
    x = rng.standard_normal((n, *shape)).astype(np.float32)
    fs = built.feature_shape
    c = rng.standard_normal((n, *fs)).astype(np.float32)
    vjp = _session(vjp_subgraph(proto))
    feats, grad = vjp.run([FEATURES, INPUT_GRAD], {IMAGE: x, COTANGENT: c})
    f64 = Forward64(model, pool=pool, perm=turned_perm(built.prep.model))  # a cut turned as prepare turned it
    errors = {"features": rel_l2(feats, f64(x))}
    errors.update(directional_errors(f64, x, {"c": c}, {"c": grad}, n_directions=4, seed=seed))
    fwd_only = _session(features_subgraph(proto)).run([FEATURES], {IMAGE: x})[0]
    errors["features_only"] = rel_l2(fwd_only, feats)
    cots = rng.standard_normal((n, k, *fs)).astype(np.float32)
    multi = _session(multi_subgraph(proto)).run([INPUT_GRADS], {IMAGE: x, COTANGENTS: cots.reshape(-1, *fs)})[0]
    multi = multi.reshape(n, k, *shape)
    errors["multi"] = max(
        rel_l2(multi[:, j], vjp.run([INPUT_GRAD], {IMAGE: x, COTANGENT: cots[:, j]})[0]) for j in range(k)
    )
    whole = _session(proto).run([INPUT_GRAD], {IMAGE: x, COTANGENT: c})[0]
    errors["whole"] = rel_l2(whole, grad)
    errors["patterns"] = [p.name for p in built.patterns]
    return errors


@pytest.mark.parametrize("op,i", CASES, ids=[f"{op}-{i}" for op, i in CASES])
def test_rule_against_finite_differences(op, i):
    model, _ = _image_model(RULES[op].examples()[i])
    errors = check_model(model, seed=i)
    assert errors["features"] < EXACT, errors
    assert errors["input_grad[c]"] < FD_TOL, errors
    assert errors["multi"] < EXACT, errors
    assert errors["features_only"] < EXACT and errors["whole"] < EXACT, errors


def test_every_rule_has_examples():
    assert not [op for op in RULES if not RULES[op].examples()]
    assert not [name for name in PATTERNS if not PATTERNS[name].examples()]


@pytest.mark.parametrize("name,i", PATTERN_CASES, ids=[f"{name}-{i}" for name, i in PATTERN_CASES])
def test_pattern_against_finite_differences(name, i):
    """Each pattern on its examples: it matches there, and the graph it emits passes the rules' checks."""
    model, _ = _image_model(PATTERNS[name].examples()[i])
    errors = check_model(model, seed=i)
    assert name in errors["patterns"], errors
    assert errors["features"] < EXACT, errors
    assert errors["input_grad[c]"] < FD_TOL, errors
    assert errors["multi"] < EXACT, errors
    assert errors["features_only"] < EXACT and errors["whole"] < EXACT, errors


def _cnn(pool_last: bool = False):
    """conv -> bn -> relu -> maxpool -> conv (fan-out into a residual add) -> relu."""
    inits = {
        "w1": example_weights(1, 4, 3, 3, 3, scale=0),
        "w2": example_weights(2, 4, 4, 3, 3, scale=0),
        "gamma": np.linspace(0.5, 1.5, 4),
        "beta": np.linspace(-0.2, 0.2, 4),
        "mean": np.linspace(-0.1, 0.1, 4),
        "var": np.linspace(0.5, 2, 4),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["b1"]),
        helper.make_node("Relu", ["b1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["p1", "w2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "p1"], ["s"]),
        helper.make_node("Relu", ["s"], ["y"]),
    ]
    return example_model(nodes, (3, 12, 10), inits, name="cnn")


@pytest.mark.parametrize("pool", ["none", "avg"])
def test_small_cnn(pool):
    errors = check_model(_cnn(), pool=pool)
    assert errors["input_grad[c]"] < FD_TOL and errors["multi"] < EXACT, errors


def test_pooled_model_outputs_the_map():
    built = build(_cnn(), pool="avg")
    names = [o.name for o in built.model.graph.output]
    assert "feature_map" in names and built.feature_shape == (4,) and built.map_shape == (4, 6, 5)
    x = np.random.default_rng(0).standard_normal((2, 3, 12, 10)).astype(np.float32)
    fmap, feats = _session(built.model).run(
        ["feature_map", FEATURES], {IMAGE: x, COTANGENT: np.zeros((2, 4), np.float32)}
    )
    np.testing.assert_allclose(feats, fmap.mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k_read", [True, False], ids=["whole", "k's shape only"])
def test_a_tensor_split_by_gathers_gets_one_concat(k_read):
    """q, k, v = t[0], t[1], t[2] (attention's split of one [3, ...] tensor): their cotangents join by one
    Concat, not three full-size Pads and a Sum; a part no gradient reaches (k read only for its shape) is
    zeros. Against finite differences, K per image against one at a time."""
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2, 3]),  # [3, N, 5, 4]
        *[helper.make_node("Gather", ["t", f"i{j}"], [f"p{j}"], axis=0) for j in range(3)],
    ]
    if k_read:
        nodes.append(helper.make_node("Mul", ["p0", "p1"], ["qk"]))
    else:
        nodes += [helper.make_node("Shape", ["p1"], ["s1"]), helper.make_node("Reshape", ["p0", "s1"], ["qk"])]
    nodes.append(helper.make_node("Add", ["qk", "p2"], ["y"]))
    model = example_model(nodes, (3, 5, 4), {f"i{j}": np.int64(j) for j in range(3)}, name="split")
    errors = check_model(model)
    assert errors["input_grad[c]"] < FD_TOL and errors["multi"] < EXACT and errors["whole"] < EXACT, errors
    adj = [n for n in build(model).model.graph.node if n.name.startswith("adj/")]
    made = {o: n.op_type for n in adj for o in n.output}
    joins = [n for n in adj if n.op_type == "Concat" and all(made.get(i) == "Unsqueeze" for i in n.input)]
    assert "Pad" not in made.values() and len(joins) == 2  # one per backward pass


def test_unsupported_op_on_the_path_is_named():
    nodes = [helper.make_node("Softsign", ["x"], ["s"], name="the_softsign"), helper.make_node("Relu", ["s"], ["y"])]
    with pytest.raises(UnsupportedOp) as err:
        transform(example_model(nodes, (3, 4, 4)))
    msg = str(err.value)
    assert "Softsign" in msg and "the_softsign" in msg and "\n" not in msg
    assert err.value.exit_code == 4


def test_unsupported_op_off_the_path_is_fine():
    """An op without a rule that only computes a constant (folded) is not refused."""
    nodes = [
        helper.make_node("Softsign", ["c"], ["sc"], name="const_softsign"),
        helper.make_node("Mul", ["x", "sc"], ["y"]),
    ]
    model = example_model(nodes, (3, 4, 4), {"c": np.linspace(-1, 1, 3).reshape(3, 1, 1)})
    errors = check_model(model)
    assert errors["input_grad[c]"] < FD_TOL


def test_shape_subgraphs_are_folded_not_refused():
    """Shape -> Gather -> Concat -> Reshape (with the batch entry) and Shape -> Mod/Equal/Where/Range on
    batch-free entries: the batch-free ones fold to constants, the batch one stays in the forward graph."""
    if "Reshape" not in RULES:
        pytest.skip("the Reshape rule (ops_shape) is not registered yet")
    i64 = lambda v: np.array(v, np.int64)  # noqa: E731
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Shape", ["r"], ["s"]),
        helper.make_node("Gather", ["s", "i0"], ["n"], axis=0),  # the batch: left in the forward graph
        helper.make_node("Gather", ["s", "i1"], ["c"], axis=0),  # 3: folded
        helper.make_node("Mod", ["c", "two"], ["m"]),
        helper.make_node("Equal", ["m", "one"], ["odd"]),
        helper.make_node("Where", ["odd", "c", "two"], ["cc"]),
        helper.make_node("Range", ["zero", "cc", "one"], ["rg"]),
        helper.make_node("Size", ["rg"], ["sz"]),
        helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"]),
        helper.make_node("Unsqueeze", ["sz", "ax0"], ["sz1"]),
        helper.make_node("Concat", ["n1", "sz1", "minus1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["r", "shape"], ["y"]),
    ]
    inits = {
        "i0": i64(0), "i1": i64(1), "two": i64(2), "one": i64(1), "zero": i64(0), "ax0": i64([0]),
        "minus1": i64([-1]),
    }  # fmt: skip
    model = example_model(nodes, (3, 4, 4), inits)
    built = build(model)
    ops = [n.op_type for n in built.prep.model.graph.node]
    assert "Mod" not in ops and "Range" not in ops and "Where" not in ops  # folded
    assert "Shape" in ops  # the batch entry stays
    assert built.feature_shape == (16, 3)  # [N, 3, 16] is channels before tokens: turned to [N, T, C]
    errors = check_model(model)
    assert errors["input_grad[c]"] < FD_TOL and errors["multi"] < EXACT, errors


def test_describe_and_fp32_table():
    built = build(_cnn())
    meta = {p.key: p.value for p in built.model.metadata_props}
    assert set(json.loads(meta["fp32_only"])) == {"HardSigmoid", "ScatterElements"}
    ops = {r.op_type for r in built.rules}
    assert ops == {"Conv", "BatchNormalization", "Relu", "MaxPool", "Add"}
    # one weight copy: the adjoint's transposed weights are ops on the forward initializers
    sizes = [int(np.prod(t.dims)) for t in built.model.graph.initializer]
    assert sum(s for s in sizes if s >= 100) == 4 * 3 * 9 + 4 * 4 * 9


def test_image_stem_conv_adjoint_is_sub_pixel_where_it_measured_faster():
    """The sub-pixel adjoint (a Conv to one channel per phase and a DepthToSpace) for the strided convs
    reading the image where it measured faster than ConvTranspose (bench/conv_adjoint_forms.py: 11x11/4,
    12x12/4, 8x8/4, 9x9/3, 6x6/3, 6x6/2, 4x4/2); ConvTranspose for 7x7/2 and 3x3/2 (zero taps), windows
    that do not overlap (4x4/4, 16x16/16), and convs of 64 input channels (no faster)."""
    from pbv_onnx.export.graph.ops_conv import subpixel_pays

    chosen = [(11, 4), (12, 4), (8, 4), (9, 3), (6, 3), (6, 2), (4, 2)]
    not_chosen = [(7, 2), (3, 2), (4, 4), (16, 16), (5, 3), (13, 4), (2, 2)]
    assert all(subpixel_pays((k, k), (s, s), (1, 1), 3) for k, s in chosen)
    assert not any(subpixel_pays((k, k), (s, s), (1, 1), 3) for k, s in not_chosen)
    assert not subpixel_pays((11, 11), (4, 4), (1, 1), 64) and not subpixel_pays((11, 11), (4, 4), (2, 2), 3)
    assert not subpixel_pays((11, 11), (4, 3), (1, 1), 3)
    for k, s, pads, form in [(8, 4, [2, 2, 2, 2], "DepthToSpace"), (5, 3, [2, 2, 2, 2], "ConvTranspose")]:
        w = example_weights(3, 4, 3, k, k, scale=0)
        node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[k, k], strides=[s, s], pads=pads)
        ops = {n.op_type for n in build(example_model([node], (3, 13, 11), {"w": w})).model.graph.node}
        assert form in ops and ({"DepthToSpace", "ConvTranspose"} - {form}).isdisjoint(ops), (k, s, ops)
