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
from pbv_onnx.export.graph.axes import NCHW, cut_channels_first, layouts
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
    when it is W), and a sum with a tensor whose layout was lost in Reshapes takes the known one's."""
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
        "flat": np.array([0, 30, 4]),
        "back": np.array([0, 6, 5, 4]),
    }
    found = layouts(example_model(nodes, (3, 6, 5), inits), "x")
    assert found["m"] == found["y"] == ("N", "H", "W", "C")
    assert "u" not in found and "mixed_w" not in found


def test_a_reshape_elsewhere_leaves_the_layout_unknown():
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]),
        helper.make_node("Reshape", ["c", "s"], ["y"]),
    ]
    model = example_model(nodes, (3, 4, 4), {"w": example_weights(1, 4, 3, 1, 1), "s": np.array([0, 4, 2, 8])})
    assert "y" not in layouts(model, "x") and cut_channels_first(model, "y") is None


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
    assert "channels-last layer, turned to [N, C, h, w]" in text and "cut at y," in text
