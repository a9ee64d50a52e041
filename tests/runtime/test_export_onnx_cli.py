"""`pbv-onnx export --onnx` and `info --layers` in the torch-free environment: a hand-made ONNX CNN in,
a verified pbv-onnx model out (checked here against a float64 numpy forward pass and central differences),
and one-line refusals with their exit codes and nothing written."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from clirun import pbv, refused

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

SIZE = 32
MEAN, STD = ("0.5", "0.4", "0.3"), ("0.25", "0.2", "0.3")


def small_cnn(path, op: str = "Relu", seed: int = 0, input_shape=("batch", 3, SIZE, SIZE)):
    """Conv(3->8, 3x3) -> `op` -> MaxPool 2x2 -> Conv(8->16, 3x3, stride 2) -> BatchNorm -> Relu, opset 17;
    BatchNorm affines and statistics at order 1 (a wrong BatchNorm adjoint cannot hide); the weights."""
    rng = np.random.default_rng(seed)
    w = {
        "w1": rng.standard_normal((8, 3, 3, 3)) / np.sqrt(27),
        "b1": rng.normal(0, 0.1, 8),
        "w2": rng.standard_normal((16, 8, 3, 3)) / np.sqrt(72),
        "g": rng.uniform(0.5, 1.5, 16),
        "beta": rng.normal(0, 0.2, 16),
        "mu": rng.normal(0, 0.1, 16),
        "var": rng.uniform(0.5, 2, 16),
    }
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["conv1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node(op, ["conv1"], ["act1"], name="act1"),
        helper.make_node("MaxPool", ["act1"], ["pool1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["pool1", "w2"], ["conv2"], name="conv2", strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["conv2", "g", "beta", "mu", "var"], ["bn2"], name="bn2"),
        helper.make_node("Relu", ["bn2"], ["out"], name="relu2"),
    ]
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in w.items()]
    graph = helper.make_graph(
        nodes,
        "small_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return w


def forward64(w: dict, x: np.ndarray, layer: str = "out") -> np.ndarray:
    """The small CNN in float64 numpy (an independent reference: no ONNX evaluator)."""

    def conv(x, k, stride, pad):
        x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        n, c, h, wd = x.shape
        o, _, kh, kw = k.shape
        ho, wo = (h - kh) // stride + 1, (wd - kw) // stride + 1
        out = np.zeros((n, o, ho, wo))
        for i in range(kh):
            for j in range(kw):
                patch = x[:, :, i : i + stride * ho : stride, j : j + stride * wo : stride]
                out += np.einsum("nchw,oc->nohw", patch, k[:, :, i, j])
        return out

    a = conv(x, w["w1"], 1, 1) + w["b1"][None, :, None, None]
    if layer == "conv1":
        return a
    a = np.maximum(a, 0)
    n, c, h, wd = a.shape
    a = a.reshape(n, c, h // 2, 2, wd // 2, 2).max(axis=(3, 5))
    a = conv(a, w["w2"], 2, 1)
    s = w["g"] / np.sqrt(w["var"] + 1e-5)
    a = (a - w["mu"][None, :, None, None]) * s[None, :, None, None] + w["beta"][None, :, None, None]
    return np.maximum(a, 0)


def test_a_network_whose_features_do_not_move_is_refused_in_one_line(tmp_path):
    """BatchNorm's offset at -1000 before the last Relu: the features are 0 for every image, so the
    differences along every direction are exactly 0 and no relative error can judge the gradient (a
    Keras MobileNetV3Small with random weights is such a network: before, 'differs by inf')."""
    src = tmp_path / "dead.onnx"
    small_cnn(src)
    model = onnx.load(str(src))
    (beta,) = [t for t in model.graph.initializer if t.name == "beta"]
    beta.CopyFrom(numpy_helper.from_array(np.full(16, -1000.0, np.float32), "beta"))
    onnx.save(model, str(src))
    out = tmp_path / "m.onnx"
    line = refused(pbv("-q", *export_args(src, out)), 4, "dead.onnx", "do not change with the image", "3 of 3")
    assert "inf" not in line
    assert not out.exists() and not list(tmp_path.glob("m.onnx*"))


def test_a_saturated_network_s_refusal_says_so(tmp_path, exported):
    """Logits scaled by 1e-6 into a Softmax (as random weights ending in a softmax can give): the
    features are uniform to float32 rounding, the gradient for the cotangent `features` is rounding
    noise, and the refusal names the cause with the features' spread across the images."""
    src = tmp_path / "saturated.onnx"
    small_cnn(src)
    model = onnx.load(str(src))
    model.graph.output[0].name = "probs"
    model.graph.initializer.append(numpy_helper.from_array(np.float32(1e-6), "tiny"))
    model.graph.node.extend(
        [
            helper.make_node("Flatten", ["out"], ["flat"], name="flat"),
            helper.make_node("Mul", ["flat", "tiny"], ["logits"], name="logits"),
            helper.make_node("Softmax", ["logits"], ["probs"], name="probs"),
        ]
    )
    onnx.save(model, str(src))
    out = tmp_path / "m.onnx"
    line = refused(pbv("-q", *export_args(src, out)), 4, "export refused", "input_grad", "barely change with the image")
    assert "float32 cannot resolve" in line
    assert not out.exists()
    # the unsaturated model's features spread far beyond that (recorded with its verification)
    from pbv_onnx.export.onnx_route import SATURATED_SPREAD
    from pbv_onnx.runtime.modelfile import read_info

    assert read_info(exported[1]).metadata["verification"]["feature_spread"] > 1000 * SATURATED_SPREAD


def export_args(src, out, *extra):
    return ["export", "--onnx", src, "--resize", f"{SIZE}x{SIZE}", "--mean", *MEAN, "--std", *STD, "--out", out, *extra]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx_route")
    src = root / "small_cnn.onnx"
    w = small_cnn(src)
    out = root / "model.onnx"
    res = pbv(*export_args(src, out))
    assert res.returncode == 0, res.stderr
    return src, out, w, res


def test_export_onnx_writes_a_model_the_engine_runs_with_a_correct_gradient(exported):
    from pbv_onnx.runtime.engine import Engine
    from pbv_onnx.runtime.modelfile import read_info

    src, out, w, _ = exported
    info = read_info(out)
    meta = info.metadata
    assert info.arch == "small_cnn" and info.layer == "" and info.pool == "none"
    assert info.feature_shape == (16, SIZE // 4, SIZE // 4)
    assert meta["weights"] == {
        "source": "onnx",
        "file": "small_cnn.onnx",
        "sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
    }
    assert "torch" not in meta["versions"]
    assert meta["preprocessing"]["mean"] == [float(v) for v in MEAN]
    assert meta["multi_cotangent"] is True and "Conv" in meta["adjoint"]["rules"]
    ver = meta["verification"]
    errors = ver["errors"]["ort_vs_float64"]
    assert errors["features"] <= ver["tolerance"] and errors["input_grad[gaussian]"] <= ver["grad_tolerance"]

    # independent of the export's own check: float64 numpy forward, and central differences of it
    engine = Engine(out, device="cpu")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    feats = engine.feature_maps(x)
    ref = forward64(w, x.astype(np.float64))
    assert np.linalg.norm(feats - ref) / np.linalg.norm(ref) < 1e-5
    c = rng.standard_normal(feats.shape).astype(np.float32)
    _, grad = engine.vjp(x, c)
    for i in range(2):
        for _ in range(3):
            u = rng.standard_normal(x.shape[1:])
            t = 1e-7  # float64: rounding ~1e-9 relative; ReLU kinks and pool ties within reach are rare
            xp, xm = x[i : i + 1].astype(np.float64) + t * u, x[i : i + 1].astype(np.float64) - t * u
            fd = float(((forward64(w, xp) - forward64(w, xm)) * c[i]).sum() / (2 * t))
            assert abs(float((u * grad[i]).sum()) - fd) <= 1e-3 * abs(fd) + 1e-4, (fd, float((u * grad[i]).sum()))


def test_info_names_the_onnx_source_and_its_float64_verification(exported):
    src, out, _, _ = exported
    res = pbv("info", out)
    assert res.returncode == 0, res.stderr
    assert f"the ONNX file small_cnn.onnx (sha256 {hashlib.sha256(src.read_bytes()).hexdigest()})" in res.stdout
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("ort_vs_float64:"))
    assert "features" in line and "input_grad[gaussian]" in line and "None" not in res.stdout


def test_export_onnx_at_a_layer_with_pooling(tmp_path, exported):
    from pbv_onnx.runtime.engine import Engine
    from pbv_onnx.runtime.modelfile import read_info

    src, _, w, _ = exported
    out = tmp_path / "conv1_avg.onnx"
    res = pbv(*export_args(src, out, "--layer", "conv1", "--pool", "avg", "--arch-name", "tiny"))
    assert res.returncode == 0, res.stderr
    info = read_info(out)
    assert info.arch == "tiny" and info.layer == "conv1" and info.pool == "avg" and info.feature_shape == (8,)
    x = np.random.default_rng(1).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    ref = forward64(w, x.astype(np.float64), "conv1").mean(axis=(2, 3))
    got = Engine(out, device="cpu").features(x)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-5


def test_info_layers_lists_the_tensors_one_can_cut_at(exported):
    src = exported[0]
    res = pbv("info", "--layers", src)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    rows = {line.split()[0]: line.split()[1] for line in lines[1:-1]}
    for name, op in (("conv1", "Conv"), ("act1", "Relu"), ("pool1", "MaxPool"), ("bn2", "BatchNormalization")):
        assert rows.get(name) == op, res.stdout
    assert "out" in rows and "w1" not in rows  # weights are not cut points
    js = json.loads(pbv("info", "--layers", "--json", src).stdout)
    assert {"name", "op", "shape"} <= set(js[0])


def test_refusals_are_one_line_with_their_exit_codes_and_write_nothing(tmp_path, exported):
    src = exported[0]
    out = tmp_path / "m.onnx"

    def quiet(*args):  # progress lines off: the error is the only line
        return pbv("-q", *args)

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not an onnx file\xff" * 10)
    refused(quiet(*export_args(garbage, out)), 4, "garbage.onnx")
    refused(quiet(*export_args(tmp_path / "missing.onnx", out)), 4, "missing.onnx", "not found")
    two_d = tmp_path / "vector.onnx"
    small_cnn(two_d, input_shape=("batch", 5, SIZE, SIZE))
    refused(quiet(*export_args(two_d, out)), 4, "vector.onnx", "[N, 3, H, W]")
    line = refused(quiet(*export_args(src, out, "--layer", "conv9")), 2, "small_cnn.onnx", "conv9", "info --layers")
    assert "conv1" in line or "act1" in line  # a few valid names
    bad = tmp_path / "selu.onnx"
    small_cnn(bad, op="Selu")
    refused(quiet(*export_args(bad, out)), 4, "selu.onnx", "Selu", "act1")
    no_norm = ["export", "--onnx", src, "--resize", f"{SIZE}x{SIZE}", "--out", out]
    refused(quiet(*no_norm), 2, "--mean", "--std")
    byte_mean = [*no_norm, "--mean", "123.7", "116.3", "103.5"]
    refused(quiet(*byte_mean, "--std", *STD), 2, "--mean 123.7 116.3 103.5", "not a pixel value", "1/255")
    refused(quiet(*export_args(src, out, "--weights", "none")), 2, "--weights")
    refused(quiet(*export_args(src, out, "--exporter", "dynamo")), 2, "--exporter")
    assert not out.exists() and not list(tmp_path.glob("m.onnx*"))
    out.write_bytes(b"keep")
    refused(quiet(*export_args(src, out)), 6)
    assert out.read_bytes() == b"keep"


def test_a_wrong_adjoint_is_refused_by_the_finite_difference_check(tmp_path, exported, monkeypatch):
    """A Relu adjoint that forgets its mask passes the gradient through unchanged: off by order 1."""
    from pbv_onnx.base.errors import ModelError
    from pbv_onnx.export.graph.rules import RULES, load_rules
    from pbv_onnx.export.onnx_route import export_onnx

    load_rules()
    monkeypatch.setattr(RULES["Relu"], "vjp", lambda self, ctx, node, grads: [grads[0]])
    out = tmp_path / "wrong.onnx"
    with pytest.raises(ModelError, match="refused.*input_grad"):
        export_onnx(exported[0], out, mean=(0.5,) * 3, std=(0.25,) * 3, n_images=2, progress=None)
    assert not out.exists()


def test_the_float64_copy_computes_in_float64():
    """Erf (GELU's core) included: onnx's reference Erf rounds to float32, the copy's must not; a
    ConstantOfShape without a value (float32 zeros) added to it becomes float64 zeros."""
    from scipy.special import erf

    from pbv_onnx.export.graph.fd import Forward64

    nodes = [
        helper.make_node("Mul", ["input", "k"], ["m"]),
        helper.make_node("Erf", ["m"], ["e0"]),
        helper.make_node("Shape", ["e0"], ["s"]),
        helper.make_node("ConstantOfShape", ["s"], ["zeros"]),
        helper.make_node("Add", ["e0", "zeros"], ["e"]),
        helper.make_node("Cast", ["e"], ["out"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes,
        "erf",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array(0.7, np.float32), "k")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4))
    y = Forward64(model)(x)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, erf(np.float64(np.float32(0.7)) * x), rtol=1e-14, atol=1e-15)


def test_the_directional_probe_estimates_the_gradients_relative_error():
    """For f(x) = A x (gradient of c . f exactly A^T c): a gradient 10% too large reads about 0.1."""
    from pbv_onnx.export.graph.fd import directional_errors

    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 48))
    x = rng.standard_normal((3, 3, 4, 4))
    c = rng.standard_normal((3, 5))
    grad = (c @ a).reshape(3, 3, 4, 4)

    def forward(z):
        return z.reshape(len(z), -1) @ a.T

    exact = directional_errors(forward, x, {"c": c}, {"c": grad}, n_directions=16)
    scaled = directional_errors(forward, x, {"c": c}, {"c": 1.1 * grad}, n_directions=16)
    assert exact["input_grad[c]"] < 1e-6
    assert 0.09 < scaled["input_grad[c]"] < 0.12  # exact: a scaled gradient is off by 1.1/1 along every u


def normalised_tokens(path, scale: float = 1.0, seed: int = 0) -> None:
    """Conv 4x4/4 (3->D) -> tokens [N, 16, D] -> LayerNormalization, scale `scale` and offset 0 (as a
    fresh init leaves it): each token's features then have norm sqrt(D) whatever the image."""
    d = 64
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["patches"], strides=[4, 4], kernel_shape=[4, 4]),
        helper.make_node("Reshape", ["patches", "flat"], ["flat_patches"]),
        helper.make_node("Transpose", ["flat_patches"], ["tokens"], perm=[0, 2, 1]),
        helper.make_node("LayerNormalization", ["tokens", "s", "b"], ["out"], axis=-1, epsilon=1e-5),
    ]
    inits = {
        "w": rng.standard_normal((d, 3, 4, 4)) * 4,
        "flat": np.array([0, d, -1], np.int64),
        "s": np.full(d, scale),
        "b": np.zeros(d),
    }
    tensors = [numpy_helper.from_array(v if v.dtype == np.int64 else v.astype(np.float32), k) for k, v in inits.items()]
    graph = helper.make_graph(
        nodes,
        "normalised_tokens",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        tensors,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_a_normalised_output_is_verified_at_the_scale_of_a_gaussian_cotangent(tmp_path, monkeypatch):
    """With unit scale and zero offset, c = features is orthogonal to every change the image can make
    (||LayerNorm(x)|| is constant): its directional derivatives are float32 rounding, which a relative
    error alone would refuse. Judged at a tenth of a Gaussian cotangent's, the right adjoint passes and
    an adjoint without LayerNorm's mean terms is still refused."""
    from pbv_onnx.base.errors import ModelError
    from pbv_onnx.export.graph.rules import RULES, load_rules
    from pbv_onnx.export.onnx_route import export_onnx

    src = tmp_path / "tokens.onnx"
    normalised_tokens(src)
    kw = dict(resize="16x16", mean=(0.5,) * 3, std=(0.25,) * 3, n_images=2, progress=None)
    res = export_onnx(src, tmp_path / "ok.onnx", **kw)
    errors = res.verification["errors"]["ort_vs_float64"]
    assert errors["input_grad[features]"] < 1e-3 and errors["input_grad[gaussian]"] < 1e-3
    assert res.verification["floored"] == ["features"]

    from pbv_onnx.export.graph import ops_tokens

    load_rules()
    assert "LayerNormalization" in RULES
    right_sum = ops_tokens._sum

    def no_mean(ctx, t, axes):  # both means zero: the adjoint becomes g / sigma, neither centred nor projected
        return ctx.emit("Mul", [right_sum(ctx, t, axes), ctx.const(np.float32(0.0), "zero")])

    monkeypatch.setattr(ops_tokens, "_sum", no_mean)
    with pytest.raises(ModelError, match="refused.*input_grad"):
        export_onnx(src, tmp_path / "wrong.onnx", **kw)
    assert not (tmp_path / "wrong.onnx").exists()


def test_a_channels_last_model_takes_channels_first_images(tmp_path, exported):
    """The small CNN behind a Transpose from [N, H, W, 3] (a Keras model as tf2onnx writes it by default):
    the export puts the inverse Transpose first, and the model computes what the NCHW one does."""
    from pbv_onnx.runtime.engine import Engine
    from pbv_onnx.runtime.modelfile import read_info

    nchw = tmp_path / "nchw.onnx"
    small_cnn(nchw)
    model = onnx.load(str(nchw))
    model.graph.input[0].name = "input_nhwc"
    dims = model.graph.input[0].type.tensor_type.shape.dim
    order = [onnx.TensorShapeProto.Dimension(), *(onnx.TensorShapeProto.Dimension() for _ in range(3))]
    order[0].dim_param, order[1].dim_value, order[2].dim_value, order[3].dim_value = "batch", SIZE, SIZE, 3
    del dims[:]
    dims.extend(order)
    model.graph.node.insert(0, helper.make_node("Transpose", ["input_nhwc"], ["input"], perm=[0, 3, 1, 2]))
    src, out = tmp_path / "nhwc.onnx", tmp_path / "m.onnx"
    onnx.save(model, str(src))
    res = pbv(*export_args(src, out))
    assert res.returncode == 0, res.stderr
    assert "channels-last" in res.stderr
    assert "NHWC" in read_info(out).metadata["weights"]["input_layout"]
    assert "channels-last input, a Transpose put first" in pbv("info", out).stdout
    layers = pbv("info", "--layers", src)
    assert layers.returncode == 0 and "conv1" in layers.stdout and "input_nhwc" not in layers.stdout

    x = np.random.default_rng(7).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    mine, theirs = Engine(out, device="cpu"), Engine(exported[1], device="cpu")
    c = np.random.default_rng(8).standard_normal((2, *mine.info.feature_shape)).astype(np.float32)
    (f1, g1), (f2, g2) = mine.vjp(x, c), theirs.vjp(x, c)
    np.testing.assert_allclose(f1, f2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-6)


def test_a_float16_model_is_converted_to_float32_from_the_same_weights(tmp_path):
    """The small CNN in half precision (float16 weights, input and output, as `model.half()` exports):
    the model computes what the float32 CNN with those same (rounded) weights computes."""
    from pbv_onnx.runtime.engine import Engine
    from pbv_onnx.runtime.modelfile import read_info

    src32 = tmp_path / "cnn32.onnx"
    small_cnn(src32)
    model = onnx.load(str(src32))
    rounded = onnx.load(str(src32))
    for t, r in zip(model.graph.initializer, rounded.graph.initializer):
        w16 = numpy_helper.to_array(t).astype(np.float16)
        t.CopyFrom(numpy_helper.from_array(w16, t.name))
        r.CopyFrom(numpy_helper.from_array(w16.astype(np.float32), r.name))
    for v in (*model.graph.input, *model.graph.output):
        v.type.tensor_type.elem_type = TensorProto.FLOAT16
    src16, ref = tmp_path / "cnn16.onnx", tmp_path / "cnn_rounded.onnx"
    onnx.save(model, str(src16))
    onnx.save(rounded, str(ref))
    out16, out32 = tmp_path / "m16.onnx", tmp_path / "m32.onnx"
    res = pbv(*export_args(src16, out16))
    assert res.returncode == 0, res.stderr
    assert "float16" in res.stderr and "float16" in read_info(out16).metadata["weights"]["precision"]
    assert "float16 computed in float32" in pbv("info", out16).stdout
    assert pbv(*export_args(ref, out32)).returncode == 0

    x = np.random.default_rng(9).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    half, full = Engine(out16, device="cpu"), Engine(out32, device="cpu")
    c = np.random.default_rng(10).standard_normal((2, *half.info.feature_shape)).astype(np.float32)
    (f1, g1), (f2, g2) = half.vjp(x, c), full.vjp(x, c)
    np.testing.assert_allclose(f1, f2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-6)
