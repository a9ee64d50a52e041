"""Models that fix their batch size at 1 (Reshape shapes and constants with the 1 baked in, as batch-1
exports write them) made batch-free before the adjoint transform (runtime env, no torch): the rewritten
graph against the original run one image at a time, and the transformed model's input_grad against the
same model written batch-free by hand."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from clirun import pbv, refused
from onnx import TensorProto, helper, numpy_helper

from pbv_onnx.base.errors import ModelError
from pbv_onnx.export.graph import build
from pbv_onnx.export.graph import prepare as prepare_mod
from pbv_onnx.export.graph.rebatch import rebatch
from pbv_onnx.export.graph.rules import OPSET, example_weights
from pbv_onnx.method.stats import rel_l2
from pbv_onnx.runtime.modelfile import COTANGENT, IMAGE, INPUT_GRAD

EXACT = 1e-5  # the same float32 arithmetic, batched differently
D, H, T = 4, 2, 5  # token width, heads, tokens (class token + 2x2 patches)


def _model(nodes, inits, x_shape, batch, out="y"):
    """Input "x" [batch, *x_shape] (batch 1: fixed; "N": free), output `out`, opset 17."""
    tensors = [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()]
    for i, node in enumerate(nodes):
        node.name = node.name or f"{node.op_type.lower()}{i}"
    g = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, *x_shape])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
        initializer=tensors,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = 8
    return m


def _i64(*v):
    return np.array(v, np.int64)


def _cnn(batch):
    """conv -> relu -> flatten as Reshape [1, -1] (batch 1) or [-1, C*h*w] (free)."""
    shape = _i64(1, -1) if batch == 1 else _i64(-1, 4 * 3 * 3)
    inits = {"w": example_weights(1, 4, 3, 3, 3, scale=0), "s": shape}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Reshape", ["r", "s"], ["y"]),
    ]
    return _model(nodes, inits, (3, 6, 5), batch)


def _tokens(batch, attention=False):
    """Patches of a 4x4 image as 4 tokens of width D, a class token Expand'ed to [1, 1, D] (batch 1) or
    to [N, 1, D] from the image's shape (free) and Concat'ed first, position embedding, LayerNorm; with
    `attention`, torch's multi-head attention layout: [T, N, D] -> [T, N*heads, d] -> [N*heads, T, d]."""
    fixed = batch == 1
    inits = {
        "w": example_weights(2, D, 3, 2, 2, scale=0),
        "cls": example_weights(3, 1, 1, D),
        "pos": example_weights(4, 1, T, D, scale=0.5),
        "gamma": np.linspace(0.5, 1.5, D).astype(np.float32),
        "beta": np.linspace(-0.2, 0.2, D).astype(np.float32),
        "s_patch": _i64(1, D, 4) if fixed else _i64(-1, D, 4),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Reshape", ["c", "s_patch"], ["p"]),
        helper.make_node("Transpose", ["p"], ["pt"], perm=[0, 2, 1]),
    ]
    if fixed:
        inits["cls_shape"] = _i64(1, 1, D)
        nodes.append(helper.make_node("Expand", ["cls", "cls_shape"], ["cls_e"]))
    else:
        inits["rest"] = _i64(1, D)
        nodes += [
            helper.make_node("Shape", ["x"], ["n"], start=0, end=1),
            helper.make_node("Concat", ["n", "rest"], ["cls_shape"], axis=0),
            helper.make_node("Expand", ["cls", "cls_shape"], ["cls_e"]),
        ]
    out = "y" if not attention else "z"
    nodes += [
        helper.make_node("Concat", ["cls_e", "pt"], ["t"], axis=1),
        helper.make_node("Add", ["t", "pos"], ["tp"]),
        helper.make_node("LayerNormalization", ["tp", "gamma", "beta"], [out], axis=-1),
    ]
    if attention:
        d = D // H
        b = 1 if fixed else -1
        inits.update(
            wq=example_weights(5, D, D, scale=0),
            wk=example_weights(6, D, D, scale=0),
            wv=example_weights(7, D, D, scale=0),
            wo=example_weights(8, D, D, scale=0),
            bo=example_weights(9, D, scale=0.1),
            s_heads=_i64(T, H, d) if fixed else _i64(T, -1, d),  # [T, N*heads, d]
            s_split=_i64(1, H, T, d) if fixed else _i64(-1, H, T, d),
            s_rows=_i64(T, D) if fixed else _i64(-1, D),  # [T*N, D]
            s_back=_i64(T, 1, D) if fixed else _i64(T, b, D),
        )
        nodes.append(helper.make_node("Transpose", ["z"], ["zt"], perm=[1, 0, 2]))  # batch to axis 1
        for name in "qkv":
            nodes += [
                helper.make_node("MatMul", ["zt", f"w{name}"], [f"{name}0"]),
                helper.make_node("Reshape", [f"{name}0", "s_heads"], [f"{name}1"]),
                helper.make_node("Transpose", [f"{name}1"], [f"{name}2"], perm=[1, 0, 2]),  # [N*heads, T, d]
                helper.make_node("Reshape", [f"{name}2", "s_split"], [f"{name}3"]),  # [N, heads, T, d]
            ]
        nodes += [
            helper.make_node("Transpose", ["k3"], ["kt"], perm=[0, 1, 3, 2]),
            helper.make_node("MatMul", ["q3", "kt"], ["sc"]),
            helper.make_node("Softmax", ["sc"], ["a"], axis=-1),
            helper.make_node("MatMul", ["a", "v3"], ["o"]),
            helper.make_node("Transpose", ["o"], ["ot"], perm=[2, 0, 1, 3]),  # [T, N, heads, d]
            helper.make_node("Reshape", ["ot", "s_rows"], ["or"]),
            helper.make_node("Gemm", ["or", "wo", "bo"], ["g"]),
            helper.make_node("Reshape", ["g", "s_back"], ["gb"]),
            helper.make_node("Transpose", ["gb"], ["y0"], perm=[1, 0, 2]),
            helper.make_node("Add", ["y0", "z"], ["y"]),
        ]
    return _model(nodes, inits, (3, 4, 4), batch)


def _shapes(batch):
    """conv -> Reshape [1, 4, 9] (batch 1) or [-1, 4, 9] -> Unsqueeze -> Slice -> Squeeze -> Flatten -> Gemm."""
    inits = {
        "w": example_weights(1, 4, 3, 3, 3, scale=0),
        "s": _i64(batch if batch == 1 else -1, 4, 9),
        "ax1": _i64(1),
        "st": _i64(0),
        "en": _i64(6),
        "ax3": _i64(3),
        "wg": example_weights(2, 24, 5, scale=0),
        "bg": example_weights(3, 5, scale=0.1),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Reshape", ["c", "s"], ["r"]),
        helper.make_node("Unsqueeze", ["r", "ax1"], ["u"]),
        helper.make_node("Slice", ["u", "st", "en", "ax3"], ["sl"]),
        helper.make_node("Squeeze", ["sl", "ax1"], ["sq"]),
        helper.make_node("Flatten", ["sq"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["y"]),
    ]
    return _model(nodes, inits, (3, 6, 5), batch)


def _class_token(batch):
    """The attention model's class token taken as jax2onnx writes x[:, 0]: a Slice over every axis whose
    batch entry ends at the fixed batch size (1), or past any (free), then a Squeeze."""
    model = _tokens(batch, attention=True)  # attention mixes the patches into the class token
    end = 1 if batch == 1 else np.iinfo(np.int64).max
    inits = {"cls_st": _i64(0, 0, 0), "cls_en": _i64(end, 1, D), "cls_ax": _i64(0, 1, 2), "cls_sq": _i64(1)}
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in inits.items())
    model.graph.node.extend(
        [
            helper.make_node("Slice", ["y", "cls_st", "cls_en", "cls_ax"], ["y_cls"], name="class_token"),
            helper.make_node("Squeeze", ["y_cls", "cls_sq"], ["y_out"]),
        ]
    )
    model.graph.output[0].name = "y_out"
    return model


def _einsum(batch):
    """Patch tokens [N, D, T] through attention written as Einsums ("bdt,bds->bts", softmax,
    "bts,bds->bdt"), a linear layer "bdt,de->bte", and a gate: batch 1 holds it as a [1, D] constant
    read by "bte,be->bte" (its batch index must be expanded), the free model as [D] by "bte,e->bte"."""
    fixed = batch == 1
    inits = {
        "w": example_weights(1, D, 3, 2, 2, scale=0),
        "s_tok": _i64(1 if fixed else -1, D, 4),
        "lin": example_weights(2, D, D, scale=0),
        "gate": np.linspace(0.5, 1.5, D).astype(np.float32).reshape((1, D) if fixed else (D,)),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Reshape", ["c", "s_tok"], ["p"]),
        helper.make_node("Einsum", ["p", "p"], ["sc"], equation="bdt,bds->bts"),
        helper.make_node("Softmax", ["sc"], ["a"], axis=-1),
        helper.make_node("Einsum", ["a", "p"], ["o"], equation="bts,bds->bdt"),
        helper.make_node("Einsum", ["o", "lin"], ["l"], equation="bdt,de->bte"),
        helper.make_node("Einsum", ["l", "gate"], ["y"], equation="bte,be->bte" if fixed else "bte,e->bte"),
    ]
    return _model(nodes, inits, (3, 4, 4), batch)


def _resize(batch):
    """conv -> Resize to 6 x 6 (linear) by sizes: [1, 4, 6, 6] as a constant (batch 1), or the image's
    batch size concatenated with [4, 6, 6] (free)."""
    inits = {"w": example_weights(1, 4, 3, 1, 1, scale=0)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1])]
    if batch == 1:
        inits["sizes"] = _i64(1, 4, 6, 6)
    else:
        inits["rest"] = _i64(4, 6, 6)
        nodes += [
            helper.make_node("Shape", ["x"], ["n"], start=0, end=1),
            helper.make_node("Concat", ["n", "rest"], ["sizes"], axis=0),
        ]
    nodes.append(helper.make_node("Resize", ["c", "", "", "sizes"], ["y"], mode="linear"))
    return _model(nodes, inits, (3, 4, 4), batch)


MODELS = {
    "cnn": _cnn,
    "tokens": _tokens,
    "attention": lambda b: _tokens(b, attention=True),
    "shapes": _shapes,
    "class_token": _class_token,
    "einsum": _einsum,
    "resize": _resize,
}


def _run(model, x):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def _images(model, n, seed=0):
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


@pytest.mark.parametrize("name", list(MODELS))
def test_rebatched_graph_at_batch_3_is_the_original_image_by_image(name):
    fixed = MODELS[name](1)
    x = _images(fixed, 3)
    with pytest.raises(Exception):  # as exported, the model does not run (or mixes images) at batch 3
        got = _run(fixed, x)
        assert got.shape[0] == 3
    model, notes = rebatch(fixed, tuple(x.shape[2:]), "m.onnx")
    assert notes, "nothing was rewritten"
    got = _run(model, x)
    want = np.concatenate([_run(fixed, x[i : i + 1]) for i in range(3)])
    assert got.shape == want.shape
    assert rel_l2(got, want) < EXACT
    # the hand-written batch-free model agrees (the reference is right, too)
    assert rel_l2(_run(MODELS[name]("N"), x), want) < EXACT


@pytest.mark.parametrize("name", list(MODELS))
def test_build_of_the_fixed_model_gives_the_gradient_of_the_free_one(name):
    fixed, free = MODELS[name](1), MODELS[name]("N")
    x = _images(fixed, 3, seed=1)
    b_fixed, b_free = build(fixed), build(free)
    assert b_fixed.feature_shape == b_free.feature_shape
    c = np.random.default_rng(2).standard_normal((3, *b_free.feature_shape)).astype(np.float32)
    grads = []
    for b in (b_fixed, b_free):
        s = ort.InferenceSession(b.model.SerializeToString(), providers=["CPUExecutionProvider"])
        grads.append(s.run([INPUT_GRAD], {IMAGE: x, COTANGENT: c})[0])
    assert np.linalg.norm(grads[1]) > 0
    assert rel_l2(grads[0], grads[1]) < EXACT


def test_a_model_that_runs_at_batch_2_is_not_touched(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("rebatch called")

    monkeypatch.setattr("pbv_onnx.export.graph.rebatch.rebatch_graph", refuse)
    for name in MODELS:
        prep = prepare_mod.prepare(MODELS[name]("N"))
        assert prep.shapes[prep.cut][0] == "N"


def _mixing(batch_reduce: bool = True):
    """Reshape [1, C*h*w] (fails at batch 2), then a sum over the batch axis: cannot be made batch-free."""
    inits = {"w": example_weights(1, 4, 3, 3, 3, scale=0), "s": _i64(1, 4 * 3 * 3), "axes": _i64(0)}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Reshape", ["c", "s"], ["f"]),
        helper.make_node("ReduceSum", ["f", "axes"], ["y"], keepdims=1, name="sum_over_batch"),
    ]
    return _model(nodes, inits, (3, 6, 5), 1)


def test_a_batch_that_cannot_be_followed_is_one_line():
    with pytest.raises(ModelError) as err:
        build(_mixing())
    msg = str(err.value)
    assert "fixes its batch size at 1 and cannot be made batch-free" in msg
    assert "sum_over_batch" in msg and "reduces over the batch axis" in msg
    assert "\n" not in msg


def test_an_einsum_that_sums_over_the_batch_is_refused_in_one_line():
    model = _einsum(1)
    (last,) = [n for n in model.graph.node if n.output[0] == "y"]
    last.CopyFrom(helper.make_node("Einsum", ["l", "gate"], ["y"], equation="bte,be->te", name="over_images"))
    with pytest.raises(ModelError) as err:
        build(model)
    msg = str(err.value)
    assert "cannot be made batch-free" in msg and "over_images" in msg and "sums over the batch axis" in msg


@pytest.mark.parametrize(
    "name,drop,why", [("cnn", "reshape", "is [1, 72] at batch 2"), ("tokens", "tile", "does not run")]
)
def test_the_check_refuses_a_wrong_rewrite(monkeypatch, name, drop, why):
    """A rewrite left out (the Reshape kept at [1, -1]; the class token not expanded) is caught by the
    run at batch 2 and 3 against the original one image at a time."""
    from pbv_onnx.export.graph import rebatch as rb

    real = rb._propagate

    def partial(*args):
        infos, actions = real(*args)
        return infos, [a for a in actions if a[0] != drop]

    monkeypatch.setattr(rb, "_propagate", partial)
    fixed = MODELS[name](1)
    with pytest.raises(ModelError, match="cannot be made batch-free") as err:
        rebatch(fixed, tuple(_images(fixed, 1).shape[2:]), "m.onnx")
    assert why in str(err.value), str(err.value)


def test_cli_refuses_with_the_model_error_code(tmp_path):
    src = tmp_path / "mixing.onnx"
    onnx.save(_mixing(), str(src))
    out = tmp_path / "out.onnx"
    norm = ["--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25"]
    res = pbv("-q", "export", "--onnx", src, "--resize", "6x5", *norm, "--out", out)  # -q: the error alone
    refused(res, ModelError.exit_code, "mixing.onnx", "cannot be made batch-free", "sum_over_batch")
    assert not out.exists()


@pytest.mark.parametrize("b0", [1, 2])
def test_export_of_a_fixed_batch_file_is_verified_against_the_file_itself(tmp_path, b0):
    """The whole `export --onnx` route: the finite-difference reference runs the original file at its
    own batch size (chunks filled up to it), and the model records what was rewritten."""
    from pbv_onnx.export.onnx_route import export_onnx
    from pbv_onnx.runtime.modelfile import read_info

    model = _cnn(1)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = b0
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(_i64(b0, -1), "s"))
    src, out = tmp_path / f"b{b0}.onnx", tmp_path / "m.onnx"
    onnx.save(model, str(src))
    res = export_onnx(src, out, resize="6x5", mean=(0.5,) * 3, std=(0.25,) * 3, n_images=3, progress=None)
    errors = res.verification["errors"]["ort_vs_float64"]
    assert max(errors.values()) < 1e-3, errors
    meta = read_info(out).metadata
    assert meta["batch_free"]["rewrites"] == 1 and "Reshape" in meta["batch_free"]["notes"][0]
    shown = pbv("info", out)
    assert shown.returncode == 0 and "fixed batch size freed (1 rewrite, checked)" in shown.stdout


def test_a_slice_of_part_of_the_batch_is_refused():
    """At batch size 2, a Slice [0, 1) of the batch axis takes the first image, not every image: that
    cannot be made batch-free (at batch 1 the same Slice is the whole axis, and the check confirms it)."""
    inits = {"w": example_weights(1, 4, 3, 3, 3, scale=0), "st": _i64(0), "en": _i64(1), "ax": _i64(0)}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Slice", ["c", "st", "en", "ax"], ["y"], name="first_image"),
    ]
    model = _model(nodes, inits, (3, 6, 5), 2)
    with pytest.raises(ModelError) as err:
        rebatch(model, (6, 5), "m.onnx")
    assert "first_image" in str(err.value) and "slices along the batch axis" in str(err.value)
