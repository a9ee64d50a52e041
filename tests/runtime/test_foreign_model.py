"""A model from another framework: tf2onnx's export of a small Keras CNN, its gradients from the ONNX
adjoint transform against TensorFlow's own (tf.GradientTape in float64).

tests/data/make_keras_model.py made both committed files in a separate TensorFlow environment; this
test needs neither TensorFlow nor torch. The graph is tf2onnx's as written: Conv with TensorFlow's
asymmetric "same" pads, BatchNorm folded into Mul/Add, a depthwise Conv (group 16), a residual Add,
MaxPool with asymmetric pads, LayerNormalization decomposed into ReduceMean/Sub/Mul/Sqrt/Reciprocal/
Neg/Reshape, GlobalAveragePool, Squeeze, MatMul; the output's batch axis has its own symbolic name.

Bounds (relative L2 per image, float32 ONNX against the float64 reference): TensorFlow's own
float32 pass is 1.3e-7 (features) and 1.8e-7 (input_grad) off the reference (recorded in the
reference file as fp32_floor_*); onnxruntime sums in other orders, so the bounds are 1e-5 and 1e-4,
about 80x and 550x that floor (measured on onnxruntime 1.32 CPU: 1.3e-7, and 2.5e-7 to 3.0e-7).
A wrong adjoint of a single op is far beyond them: make_keras_model.py breaks one at a time in
TensorFlow and measures input_grad 1.4 off (BatchNorm scale ignored), 0.21 (residual branch
dropped), 0.88 (max-pool gradient spread over its window), 0.46 (LayerNorm statistics held
constant), 1.7 (LayerNorm scale ignored); here, Relu's mask dropped is 1.3 off (the control test).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from clirun import pbv
from foreignref import rel_per_image, run

from pbv_onnx.export.graph.transform import transform
from pbv_onnx.runtime.engine import Engine
from pbv_onnx.runtime.modelfile import COTANGENT, COTANGENTS, FEATURE_MAP, FEATURES, IMAGE, INPUT_GRAD, INPUT_GRADS

DATA = Path(__file__).resolve().parents[1] / "data"
MODEL = DATA / "keras_small.onnx"
REFERENCE = DATA / "keras_small_reference.npz"
FEATURE_TOL, GRAD_TOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(REFERENCE) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def forward() -> onnx.ModelProto:
    return onnx.load(MODEL)


def empty_cotangents(features: np.ndarray) -> np.ndarray:
    return np.zeros((0, *features.shape[1:]), np.float32)


def test_the_committed_files_are_small_and_tf2onnx_s_opset_17_nchw_graph(ref, forward):
    assert MODEL.stat().st_size < 500_000
    assert sum(p.stat().st_size for p in (MODEL, REFERENCE, DATA / "make_keras_model.py")) < 1_000_000
    assert forward.producer_name == "tf2onnx"
    assert {o.version for o in forward.opset_import if o.domain in ("", "ai.onnx")} == {17}
    (inp,) = forward.graph.input
    dims = [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [3, 64, 64]
    assert "tf2onnx" in str(ref["versions"]) and "tensorflow" in str(ref["versions"])
    # the reference's own float32 floor is what the bounds above are scaled from
    assert ref["fp32_floor_features"] < FEATURE_TOL / 20 and ref["fp32_floor_input_grad"] < GRAD_TOL / 20


def test_tf2onnx_s_forward_graph_matches_tensorflow(ref, forward):
    """The converted graph itself (before any transform) computes TensorFlow's features."""
    (f,) = run(forward, {str(ref["input_name"]): ref["x"]}, [forward.graph.output[0].name])
    assert rel_per_image(f, ref["features"]) < FEATURE_TOL


@pytest.fixture(scope="module")
def at_output(forward) -> onnx.ModelProto:
    return transform(forward)


def test_features_and_input_grad_at_the_output_match_tensorflow_s_gradients(ref, at_output):
    x, c = ref["x"], ref["c"][:, 0]
    f, g = run(at_output, {IMAGE: x, COTANGENT: c, COTANGENTS: empty_cotangents(c)}, [FEATURES, INPUT_GRAD])
    assert f.shape == ref["features"].shape and g.shape == x.shape
    assert rel_per_image(f, ref["features"]) < FEATURE_TOL
    assert rel_per_image(g, ref["input_grad"][:, 0]) < GRAD_TOL


def test_k_cotangents_per_image_match_tensorflow_s_gradients(ref, at_output):
    """The K-per-image pass (image-major [N*K, ...]) against one GradientTape per cotangent."""
    x, c = ref["x"], ref["c"]
    n, k = c.shape[:2]
    (g,) = run(at_output, {IMAGE: x, COTANGENT: c[:, 0], COTANGENTS: c.reshape(n * k, -1)}, [INPUT_GRADS])
    assert g.shape == (n * k, *x.shape[1:])
    assert rel_per_image(g, ref["input_grad"].reshape(n * k, *x.shape[1:])) < GRAD_TOL


def test_the_bounds_catch_a_wrong_adjoint(ref, forward, monkeypatch):
    """Control: with Relu's adjoint replaced by the identity (masks dropped, forward unchanged), the
    same comparison fails by far, so the bounds above are not loose enough to pass a wrong graph."""
    from pbv_onnx.export.graph import rules

    class MasklessRelu(rules.GraphRule):
        op_type, description = "Relu", "wrong on purpose: the cotangent passes unmasked"

        def vjp(self, ctx, node, grads):
            return [grads[0]]

    rules.load_rules()  # the real rules first, so that none registers over the stand-in
    monkeypatch.setitem(rules.RULES, "Relu", MasklessRelu)
    x, c = ref["x"], ref["c"][:, 0]
    f, g = run(transform(forward), {IMAGE: x, COTANGENT: c, COTANGENTS: empty_cotangents(c)}, [FEATURES, INPUT_GRAD])
    assert rel_per_image(f, ref["features"]) < FEATURE_TOL
    assert rel_per_image(g, ref["input_grad"][:, 0]) > 100 * GRAD_TOL


def test_a_cut_inside_the_graph_averaged_over_space_matches_tensorflow(ref, forward):
    """Cut at the last ReLU's map [N,24,14,14] (tf2onnx's tensor name), pool avg: the model's own
    GlobalAveragePooling output in TensorFlow."""
    x, c = ref["x"], ref["c_avg"]
    model = transform(forward, cut=str(ref["relu_map"]), pool="avg")
    feeds = {IMAGE: x, COTANGENT: c, COTANGENTS: empty_cotangents(c)}
    f, g, fmap = run(model, feeds, [FEATURES, INPUT_GRAD, FEATURE_MAP])
    assert fmap.shape == (len(x), 24, 14, 14)
    np.testing.assert_allclose(fmap.mean(axis=(2, 3)), f, rtol=1e-5, atol=1e-6)
    assert rel_per_image(f, ref["features_avg"]) < FEATURE_TOL
    assert rel_per_image(g, ref["input_grad_avg"]) < GRAD_TOL


def export_cli(out: Path, *args) -> Engine:
    """`pbv-onnx export --onnx` of the committed graph (torch-free: verified against finite differences
    of a float64 copy before writing the model format), opened in the Engine."""
    norm = ["--mean", 0.5, 0.5, 0.5, "--std", 0.25, 0.25, 0.25]
    res = pbv("export", "--onnx", MODEL, "--resize", "64x64", *norm, *args, "--out", out)
    assert res.returncode == 0, res.stderr
    return Engine(out, device="cpu", threads=2)


def test_the_cli_exports_the_keras_model_and_the_engine_reproduces_tensorflow(ref, tmp_path):
    """The exported model's vjp and vjp_multi (K=2 per image) on the reference images."""
    engine = export_cli(tmp_path / "keras_small-pbv.onnx")
    assert engine.info.feature_shape == (10,) and engine.info.metadata["pool"] == "none"
    x, c = ref["x"], ref["c"]
    f, g = engine.vjp(x, c[:, 0])
    assert rel_per_image(f, ref["features"]) < FEATURE_TOL
    assert rel_per_image(g, ref["input_grad"][:, 0]) < GRAD_TOL
    f, g = engine.vjp_multi(x, c)
    assert rel_per_image(f, ref["features"]) < FEATURE_TOL
    assert rel_per_image(g.reshape(-1, *x.shape[1:]), ref["input_grad"].reshape(-1, *x.shape[1:])) < GRAD_TOL


def test_the_cli_lists_the_relu_map_and_exports_it_avg_pooled(ref, tmp_path):
    """`info --layers` offers tf2onnx's tensor with its shape; `--layer` it with `--pool avg`."""
    res = pbv("info", "--layers", MODEL)
    assert res.returncode == 0, res.stderr
    (row,) = [line for line in res.stdout.splitlines() if line.split()[:1] == [str(ref["relu_map"])]]
    assert "Relu" in row and "24, 14, 14" in row
    engine = export_cli(tmp_path / "keras_small-relu-avg.onnx", "--layer", str(ref["relu_map"]), "--pool", "avg")
    assert engine.info.feature_shape == (24,) and engine.map_shape == (24, 14, 14)
    x = ref["x"]
    f, g = engine.vjp(x, ref["c_avg"])
    assert rel_per_image(f, ref["features_avg"]) < FEATURE_TOL
    assert rel_per_image(g, ref["input_grad_avg"]) < GRAD_TOL
    assert rel_per_image(engine.spatial_maps(x).mean(axis=(2, 3)), ref["features_avg"]) < FEATURE_TOL
