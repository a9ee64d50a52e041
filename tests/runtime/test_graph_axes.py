"""Channels-last layers (tf2onnx and jax2onnx compute [N, h, w, C] between their Convs): which axes hold
channels and space, followed from the image; a channels-last cut turned to [N, C, h, w], so that
`--pool avg` averages over space and the feature map is [C, h, w] (before: over w and C, silently)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from clirun import pbv
from onnx import helper

from pbv_onnx.export.graph import build
from pbv_onnx.export.graph.axes import NCHW, layouts
from pbv_onnx.export.graph.rules import example_model, example_weights
from pbv_onnx.runtime.modelfile import COTANGENT, FEATURE_MAP, FEATURES, IMAGE, INPUT_GRAD

C, H, W = 8, 6, 5


def channels_last(group_norm: bool = False) -> onnx.ModelProto:
    """x [N, 3, 12, 10] -> Conv (8, stride 2) -> Transpose to [N, h, w, C] -> Mul by a per-channel
    [C] constant (broadcast on the last axis) -> Relu -> "y"; with `group_norm`, jax2onnx's GroupNorm
    between the Mul and the Relu: a Reshape to [N, h, w, 2, C/2], statistics over (1, 2, 4), and a
    Reshape back to Shape(its input)."""
    inits = {"w": example_weights(1, C, 3, 3, 3, scale=0), "s": np.linspace(0.5, 1.5, C)}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Transpose", ["c"], ["t"], perm=[0, 2, 3, 1]),
        helper.make_node("Mul", ["t", "s"], ["m"]),
    ]
    last = "m"
    if group_norm:
        inits["grouped"] = np.array([0, H, W, 2, C // 2], np.int64)
        inits["eps"] = np.float32(1e-5)
        nodes += [
            helper.make_node("Shape", ["m"], ["m_shape"]),
            helper.make_node("Reshape", ["m", "grouped"], ["g"]),
            helper.make_node("ReduceMean", ["g"], ["mu"], axes=[1, 2, 4], keepdims=1),
            helper.make_node("Sub", ["g", "mu"], ["d"]),
            helper.make_node("Mul", ["d", "d"], ["d2"]),
            helper.make_node("ReduceMean", ["d2"], ["var"], axes=[1, 2, 4], keepdims=1),
            helper.make_node("Add", ["var", "eps"], ["ve"]),
            helper.make_node("Sqrt", ["ve"], ["sd"]),
            helper.make_node("Div", ["d", "sd"], ["gn"]),
            helper.make_node("Reshape", ["gn", "m_shape"], ["n"]),
        ]
        last = "n"
    nodes.append(helper.make_node("Relu", [last], ["y"]))
    return example_model(nodes, (3, 12, 10), inits)


def run(model, feeds, outputs):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(outputs, feeds)


@pytest.mark.parametrize("group_norm", [False, True], ids=["plain", "group norm"])
def test_layouts_follow_transposes_broadcasts_and_a_reshape_back(group_norm):
    model = channels_last(group_norm)
    found = layouts(model, "x")
    assert found["c"] == NCHW and found["t"] == ("N", "H", "W", "C") and found["y"] == ("N", "H", "W", "C")
    if group_norm:
        assert "g" not in found and "gn" not in found  # a 5-D view, then unknown until the Reshape back
        assert found["n"] == ("N", "H", "W", "C")


def test_a_linear_layer_on_the_channels_and_a_residual_sum_keep_the_layout():
    """Swin's blocks: a MatMul on the last axis keeps [N, h, w, C] when that axis is the channels (not
    when it is W), and a sum with a tensor whose layout was lost in window Reshapes takes the known one's."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]),
        helper.make_node("Transpose", ["c"], ["t"], perm=[0, 2, 3, 1]),
        helper.make_node("MatMul", ["t", "lin"], ["m"]),
        helper.make_node("Reshape", ["m", "flat"], ["r"]),
        helper.make_node("Reshape", ["r", "back"], ["u"]),
        helper.make_node("Add", ["m", "u"], ["y"]),
        helper.make_node("MatMul", ["c", "on_w"], ["mixed_w"]),
    ]
    inits = {
        "w": example_weights(1, 4, 3, 1, 1),
        "lin": example_weights(2, 4, 4),
        "on_w": example_weights(3, 5, 5),
        "flat": np.array([0, 3, 2, 5, 4]),  # a window view (5-D): the layout is lost
        "back": np.array([0, 6, 5, 4]),
    }
    found = layouts(example_model(nodes, (3, 6, 5), inits), "x")
    assert found["m"] == found["y"] == ("N", "H", "W", "C")
    assert "u" not in found and "mixed_w" not in found


def test_a_reshape_that_mixes_channels_and_space_leaves_the_layout_unknown():
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]),
        helper.make_node("Reshape", ["c", "s"], ["y"]),
    ]
    model = example_model(nodes, (3, 4, 4), {"w": example_weights(1, 4, 3, 1, 1), "s": np.array([0, 8, 2, 4])})
    assert "y" not in layouts(model, "x") and build(model).prep.cut == "y"


@pytest.mark.parametrize("group_norm", [False, True], ids=["plain", "group norm"])
def test_a_channels_last_cut_is_pooled_over_space(group_norm):
    """pool avg: the mean over h and w of each channel of the file's own [N, h, w, C] tensor; the map
    is that tensor turned to [N, C, h, w]; the gradient is the mean's, per channel (checked against
    the same model cut at its NCHW tensor before the Transpose where there is no group norm)."""
    model = channels_last(group_norm)
    x = np.random.default_rng(0).standard_normal((2, 3, 12, 10)).astype(np.float32)
    (y,) = run(model, {"x": x}, ["y"])
    assert y.shape == (2, H, W, C)
    built = build(model, pool="avg")
    assert built.feature_shape == (C,) and built.map_shape == (C, H, W)
    c = np.random.default_rng(1).standard_normal((2, C)).astype(np.float32)
    f, fmap, g = run(built.model, {IMAGE: x, COTANGENT: c}, [FEATURES, FEATURE_MAP, INPUT_GRAD])
    np.testing.assert_allclose(fmap, y.transpose(0, 3, 1, 2), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(f, y.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    assert json.loads(next(p.value for p in built.model.metadata_props if p.key == "layer")) == "y"
    if not group_norm:
        nchw = example_model(
            [
                helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
                helper.make_node("Mul", ["c", "s"], ["m"]),
                helper.make_node("Relu", ["m"], ["y"]),
            ],
            (3, 12, 10),
            {"w": example_weights(1, C, 3, 3, 3, scale=0), "s": np.linspace(0.5, 1.5, C).reshape(C, 1, 1)},
        )
        (g_ref,) = run(build(nchw, pool="avg").model, {IMAGE: x, COTANGENT: c}, [INPUT_GRAD])
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)


def test_the_cli_exports_a_channels_last_layer_and_lists_its_layout(tmp_path):
    """`info --layers` marks the channels-last tensors; `export --onnx --pool avg` at one says it turns
    it, gives one feature per channel, and `info` shows the conversion."""
    src = tmp_path / "nhwc.onnx"
    onnx.save(channels_last(), str(src))
    listing = pbv("info", "--layers", src)
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line for line in listing.stdout.splitlines()[1:] if line.strip()}
    assert rows["c"].rstrip().endswith("NCHW") and rows["y"].rstrip().endswith("NHWC")
    assert "channels last" in listing.stdout
    out = tmp_path / "m.onnx"
    norm = ["--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25"]
    res = pbv("export", "--onnx", src, "--layer", "y", "--pool", "avg", "--resize", "12x10", *norm, "--out", out)
    assert res.returncode == 0, res.stderr
    assert "channels-last" in res.stderr
    info = json.loads(pbv("info", "--json", out).stdout)
    assert info["n_features"] == C
    text = pbv("info", out).stdout
    assert "layer channels-last (NHWC); a Transpose to [N, C, h, w] after the cut" in text and "cut at y," in text


# -- tokens and Reshapes: [N, C, h, w] <-> [N, C, T] <-> [N, T, C] <-> [N, h, w, C] --

_DIMS = {"N": 2, "C": 6, "H": 2, "W": 3, "T": 6}  # C equal to T and to H * W: coincidences must not fool it


def _factorisations(total: int, rank: int):
    if rank == 1:
        yield (total,)
        return
    for d in range(1, total + 1):
        if total % d == 0:
            for rest in _factorisations(total // d, rank - 1):
                yield (d, *rest)


def _coordinates(order: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Each element's batch index, channel and position (row-major over the spatial axes in order), as
    arrays of the tensor's shape."""
    shape = tuple(_DIMS[a] for a in order)
    grids = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    space = [i for i, a in enumerate(order) if a in ("H", "W", "T")]
    position = np.zeros(shape, np.int64)
    for i in space:
        position = position * shape[i] + grids[i]
    return {"N": grids[order.index("N")], "C": grids[order.index("C")], "P": position}


@pytest.mark.parametrize("order", [NCHW, ("N", "H", "W", "C"), ("N", "T", "C"), ("N", "C", "T")], ids="".join)
def test_a_reshape_layout_is_what_the_reshape_does(order):
    """Every Reshape of a small tensor to rank 3 or 4 (batch first): where reshaped() names a layout,
    numpy's reshape of each element's coordinates agrees with it (its N and C axes index batch and
    channel, its spatial axes enumerate the positions in order); the merges and splits of space are
    named, and attention's split of the channels into heads is not."""
    from pbv_onnx.export.graph.axes import reshaped

    coords = _coordinates(order)
    src = tuple("N" if a == "N" else _DIMS[a] for a in order)
    named = {}
    for rank in (3, 4):
        for rest in _factorisations(int(np.prod(src[1:])), rank - 1):
            found = reshaped(order, src, ("N", *rest))
            if found is None:
                continue
            named[rest] = "".join(found)
            dst = (_DIMS["N"], *rest)
            grids = np.meshgrid(*(np.arange(n) for n in dst), indexing="ij")
            assert (coords["N"].reshape(dst) == grids[found.index("N")]).all(), (order, rest, found)
            assert (coords["C"].reshape(dst) == grids[found.index("C")]).all(), (order, rest, found)
            position = np.zeros(dst, np.int64)
            for i in [i for i, a in enumerate(found) if a in ("H", "W", "T")]:
                position = position * dst[i] + grids[i]
            assert (coords["P"].reshape(dst) == position).all(), (order, rest, found)
    expected = {  # the forms models write
        NCHW: {(6, 6): "NCT"},
        ("N", "H", "W", "C"): {(6, 6): "NTC"},
        ("N", "T", "C"): {(2, 3, 6): "NHWC", (6, 6): "NTC"},
        ("N", "C", "T"): {(6, 2, 3): "NCHW"},
    }[order]
    assert {k: named.get(k) for k in expected} == expected
    if order == ("N", "T", "C"):
        assert (6, 2, 3) not in named  # [N, T, heads, d]


def token_model() -> onnx.ModelProto:
    """x [N, 3, 8, 8] -> a 4x4 patchify Conv (C channels) -> "r" [N, C, T] -> "tok" [N, T, C] -> a
    linear layer -> "grid" [N, 2, 2, C] (tokens back on their grid, channels last) -> Relu -> "y";
    beside it "heads" [N, T, 2, C/2], attention's view, and its Relu "h", a second output."""
    c = 6
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["conv"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Reshape", ["conv", "to_ct"], ["r"]),
        helper.make_node("Transpose", ["r"], ["tok"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["tok", "lin"], ["m"]),
        helper.make_node("Reshape", ["m", "to_grid"], ["grid"]),
        helper.make_node("Relu", ["grid"], ["y"]),
        helper.make_node("Reshape", ["m", "to_heads"], ["heads"]),
        helper.make_node("Relu", ["heads"], ["h"]),
    ]
    inits = {
        "w": example_weights(4, c, 3, 4, 4, scale=0),
        "lin": example_weights(5, c, c),
        "to_ct": np.array([0, c, 4]),
        "to_grid": np.array([0, 2, 2, c]),
        "to_heads": np.array([0, 4, 2, c // 2]),
    }
    model = example_model(nodes, (3, 8, 8), inits)
    model.graph.output.append(helper.make_tensor_value_info("h", onnx.TensorProto.FLOAT, None))
    return model


def test_token_layouts_follow_reshapes_into_and_out_of_the_grid():
    found = layouts(token_model(), "x")
    assert found["r"] == ("N", "C", "T") and found["tok"] == found["m"] == ("N", "T", "C")
    assert found["grid"] == found["y"] == ("N", "H", "W", "C")
    assert "heads" not in found and "h" not in found


def test_tokens_back_on_their_grid_are_pooled_per_channel_and_channels_first_tokens_turned():
    """pool avg at "y" ([N, 2, 2, C]): one mean over the 4 positions per channel (before: means over w
    and C, 2 values); pool cls at "r" ([N, C, T]): token 0's C channels (before: channel 0's T values)."""
    model = token_model()
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    both = token_model()
    both.graph.output.append(helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, None))
    y, r = run(both, {"x": x}, ["y", "r"])
    grid = build(model, cut="y", pool="avg")
    assert grid.feature_shape == (6,) and grid.map_shape == (6, 2, 2)
    f, fmap = run(grid.model, {IMAGE: x, COTANGENT: np.zeros((2, 6), np.float32)}, [FEATURES, FEATURE_MAP])
    np.testing.assert_allclose(f, y.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fmap, y.transpose(0, 3, 1, 2), rtol=1e-6, atol=1e-7)
    tokens = build(model, cut="r", pool="cls")
    assert tokens.feature_shape == (6,) and tokens.map_shape == (4, 6)
    (f,) = run(tokens.model, {IMAGE: x, COTANGENT: np.zeros((2, 6), np.float32)}, [FEATURES])
    np.testing.assert_allclose(f, r[:, :, 0], rtol=1e-6, atol=1e-7)


def test_the_cli_says_how_it_reads_a_layer_whose_layout_it_turns_or_cannot_follow(tmp_path):
    """`info --layers` lists token layouts and "?" with what they mean; `export --onnx` at the grid of
    tokens (channels last) passes its finite-difference check and says it turns it; at attention's
    heads view it says the layout is not followed and how it reads it, and `info` shows both."""
    src = tmp_path / "tokens.onnx"
    onnx.save(token_model(), str(src))
    listing = pbv("info", "--layers", src)
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line.rstrip() for line in listing.stdout.splitlines()[1:] if line.strip()}
    assert rows["r"].endswith("NCT") and rows["tok"].endswith("NTC") and rows["y"].endswith("NHWC")
    assert rows["h"].endswith("?") and "?: " in listing.stdout
    norm = ["--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25", "--resize", "8x8"]
    for layer, said in (("y", "channels-last (NHWC); a Transpose to [N, C, h, w]"), ("h", "not followed")):
        out = tmp_path / f"{layer}.onnx"
        res = pbv("export", "--onnx", src, "--layer", layer, "--pool", "avg", *norm, "--out", out)
        assert res.returncode == 0, res.stderr
        assert said in res.stderr
        assert said in pbv("info", out).stdout
