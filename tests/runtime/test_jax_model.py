"""A transformer from another framework: jax2onnx's export of a small Flax (nnx) vision transformer, its
gradients from the ONNX adjoint transform against JAX's own (jax.vjp in float64).

tests/data/make_jax_model.py made the committed files in a separate JAX environment; this test needs
neither JAX nor torch. The graphs are jax2onnx's as written: a channels-last image input [N,32,32,3]
(the transform puts a Transpose first), a patch Conv between Transposes, the class token broadcast by
Expand and concatenated, Flax's LayerNorm decomposed with its variance clamped by Max, attention as
MatMuls and a Softmax over Reshaped and Transposed heads, GELU in the erf form (first block) and the
tanh form (second), Gemm heads; jax_vit_b1.onnx is the same model exported at batch size 1.

Bounds (relative L2 per image, float32 ONNX against the float64 reference): the exported float32
modules are 3.3e-7 (features) and 1.1e-6 (input_grad) off the reference (recorded in the reference file
as fp32_floor_*); the bounds are 1e-5 and 1e-4, as for the Keras model. A wrong gradient is far beyond
them: make_jax_model.py breaks one piece at a time in JAX and measures input_grad 0.88 off (attention
probabilities held constant), 30 (softmax gradient without its mean term), 1.05 (LayerNorm statistics
held constant), 1.36 (GELU derivative taken as 1), 0.99 (the first block's attention branch dropped);
here, the softmax rule without its mean term is the control test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from clirun import pbv
from foreignref import rel_per_image, run

from pbv_onnx.export.graph.prepare import channels_first
from pbv_onnx.export.graph.transform import transform
from pbv_onnx.runtime.engine import Engine
from pbv_onnx.runtime.modelfile import COTANGENT, COTANGENTS, FEATURES, IMAGE, INPUT_GRAD, INPUT_GRADS

DATA = Path(__file__).resolve().parents[1] / "data"
MODEL = DATA / "jax_vit.onnx"
FIXED = DATA / "jax_vit_b1.onnx"
REFERENCE = DATA / "jax_vit_reference.npz"
FEATURE_TOL, GRAD_TOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(REFERENCE) as z:
        out = {k: z[k] for k in z.files}
    # the ONNX models the transform builds take [N, 3, H, W]; JAX's x and gradients are [N, H, W, 3]
    out["x_nchw"] = out["x"].transpose(0, 3, 1, 2)
    out["input_grad_nchw"] = out["input_grad"].transpose(0, 1, 4, 2, 3)
    out["input_grad_tokens_nchw"] = out["input_grad_tokens"].transpose(0, 3, 1, 2)
    return out


@pytest.fixture(scope="module")
def forward() -> onnx.ModelProto:
    model = onnx.load(MODEL)
    assert channels_first(model)  # the file's own [N, H, W, 3] input, now behind a Transpose
    return model


def feeds(x: np.ndarray, c: np.ndarray, multi: np.ndarray | None = None) -> dict[str, np.ndarray]:
    return {IMAGE: x, COTANGENT: c, COTANGENTS: np.zeros((0, *c.shape[1:]), np.float32) if multi is None else multi}


def test_the_committed_files_are_small_and_jax2onnx_s_channels_last_graphs(ref):
    assert sum(p.stat().st_size for p in (MODEL, FIXED, REFERENCE)) < 500_000
    for path, batch in ((MODEL, str), (FIXED, int)):
        model = onnx.load(path)
        assert model.producer_name == "jax2onnx"
        assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {17}
        (inp,) = model.graph.input
        dims = [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim]
        assert isinstance(dims[0], batch) and dims[1:] == [32, 32, 3]
        assert "Max" in {n.op_type for n in model.graph.node}  # Flax's LayerNorm clamps its variance
    assert "jax2onnx" in str(ref["versions"]) and "flax" in str(ref["versions"])
    assert ref["fp32_floor_features"] < FEATURE_TOL / 20 and ref["fp32_floor_input_grad"] < GRAD_TOL / 20


def test_jax2onnx_s_forward_graphs_match_jax(ref):
    """The converted graphs themselves (before any transform) compute JAX's logits and tokens; the
    batch-1 file one image at a time."""
    model = onnx.load(MODEL)
    f, t = run(model, {"image": ref["x"]}, ["logits", "tokens"])
    assert rel_per_image(f, ref["features"]) < FEATURE_TOL
    assert rel_per_image(t, ref["tokens"]) < FEATURE_TOL
    fixed = onnx.load(FIXED)
    f1 = np.concatenate([run(fixed, {"image": x[None]}, ["logits"])[0] for x in ref["x"]])
    assert rel_per_image(f1, ref["features"]) < FEATURE_TOL


@pytest.fixture(scope="module")
def at_output(forward) -> onnx.ModelProto:
    return transform(forward)


def test_logits_and_input_grad_match_jax_s_gradients(ref, at_output):
    x, c = ref["x_nchw"], ref["c"][:, 0]
    f, g = run(at_output, feeds(x, c), [FEATURES, INPUT_GRAD])
    assert f.shape == ref["features"].shape and g.shape == x.shape
    assert rel_per_image(f, ref["features"]) < FEATURE_TOL
    assert rel_per_image(g, ref["input_grad_nchw"][:, 0]) < GRAD_TOL


def test_k_cotangents_per_image_match_jax_s_gradients(ref, at_output):
    """The K-per-image pass (image-major [N*K, ...]) against one jax.vjp pullback per cotangent."""
    x, c = ref["x_nchw"], ref["c"]
    n, k = c.shape[:2]
    (g,) = run(at_output, feeds(x, c[:, 0], c.reshape(n * k, -1)), [INPUT_GRADS])
    assert rel_per_image(g, ref["input_grad_nchw"].reshape(n * k, *x.shape[1:])) < GRAD_TOL


def test_the_bounds_catch_a_wrong_adjoint(ref, forward, monkeypatch):
    """Control: with Softmax's adjoint missing its mean term (g * y, forward unchanged), the same
    comparison fails by far, so the bounds above are not loose enough to pass a wrong graph."""
    from pbv_onnx.export.graph import rules

    class MeanlessSoftmax(rules.GraphRule):
        op_type, description = "Softmax", "wrong on purpose: g * y, without - y (g . y)"

        def vjp(self, ctx, node, grads):
            return [ctx.mul(grads[0], node.output[0])]

    rules.load_rules()  # the real rules first, so that none registers over the stand-in
    monkeypatch.setitem(rules.RULES, "Softmax", MeanlessSoftmax)
    x, c = ref["x_nchw"], ref["c"][:, 0]
    f, g = run(transform(forward), feeds(x, c), [FEATURES, INPUT_GRAD])
    assert rel_per_image(f, ref["features"]) < FEATURE_TOL
    assert rel_per_image(g, ref["input_grad_nchw"][:, 0]) > 100 * GRAD_TOL


@pytest.mark.parametrize("pool", ["none", "cls", "avg"])
def test_a_cut_at_the_tokens_matches_jax(ref, forward, pool):
    """Cut at the final LayerNorm's tokens [N, 65, 32] (a graph output of the file): all tokens, the
    class token, or their mean; the gradient of the whole tokens against jax.vjp's."""
    x = ref["x_nchw"]
    model = transform(forward, cut="tokens", pool=pool)
    expected = {"none": ref["tokens"], "cls": ref["tokens"][:, 0], "avg": ref["tokens"].mean(axis=1)}[pool]
    c = ref["c_tokens"] if pool == "none" else ref["c_tokens"][:, 0]
    f, g = run(model, feeds(x, c), [FEATURES, INPUT_GRAD])
    assert f.shape == expected.shape
    assert rel_per_image(f, expected) < FEATURE_TOL
    if pool == "none":
        assert rel_per_image(g, ref["input_grad_tokens_nchw"]) < GRAD_TOL


def export_cli(src: Path, out: Path, *args) -> tuple[Engine, str]:
    """`pbv-onnx export --onnx` of a committed graph (torch-free: verified against finite differences
    of a float64 copy before writing the model format), opened in the Engine; and its messages."""
    norm = ["--mean", 0.5, 0.5, 0.5, "--std", 0.25, 0.25, 0.25]
    res = pbv("export", "--onnx", src, "--resize", "32x32", *norm, *args, "--out", out)
    assert res.returncode == 0, res.stderr
    return Engine(out, device="cpu", threads=2), res.stderr


@pytest.mark.parametrize("src", [MODEL, FIXED], ids=["dynamic batch", "batch fixed at 1"])
def test_the_cli_exports_the_jax_model_and_the_engine_reproduces_jax(ref, tmp_path, src):
    """Both files through the command line: the channels-last input turned, the batch-1 file made
    batch-free (its Reshape shapes, the class token's broadcast and the Slice of x[:, 0] rewritten);
    the Engine's vjp and vjp_multi (K=2 per image) on the three reference images at once."""
    engine, messages = export_cli(src, tmp_path / f"{src.stem}-pbv.onnx")
    assert "channels-last" in messages
    assert ("made batch-free" in messages) == (src == FIXED)
    if src == FIXED:
        assert any("the whole batch axis" in note for note in engine.info.metadata["batch_free"]["notes"])
    assert engine.info.feature_shape == (10,)
    x, c = ref["x_nchw"], ref["c"]
    f, g = engine.vjp(x, c[:, 0])
    assert rel_per_image(f, ref["features"]) < FEATURE_TOL
    assert rel_per_image(g, ref["input_grad_nchw"][:, 0]) < GRAD_TOL
    f, g = engine.vjp_multi(x, c)
    assert rel_per_image(g.reshape(-1, *x.shape[1:]), ref["input_grad_nchw"].reshape(-1, *x.shape[1:])) < GRAD_TOL


def test_the_channels_last_patch_embedding_is_pooled_over_space(forward, ref):
    """jax2onnx keeps the patch Conv's output channels last ([N, 8, 8, 32], listed as NHWC): cut there
    with pool avg, the features are its 32 channels averaged over the 8 x 8 patches, as in JAX's
    layout (before the turn to [N, C, h, w], the mean ran over a patch row and the channels: 8 values)."""
    from pbv_onnx.export.graph.layers import list_layers

    (name,) = [n for n, _, shape, layout in list_layers(onnx.load(MODEL), with_layout=True) if layout == "NHWC"]
    whole = onnx.load(MODEL)
    whole.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    (patches,) = run(whole, {"image": ref["x"]}, [name])
    assert patches.shape == (len(ref["x"]), 8, 8, 32)
    model = transform(forward, cut=name, pool="avg")
    c = np.ones((len(ref["x"]), 32), np.float32)
    (f,) = run(model, feeds(ref["x_nchw"], c), [FEATURES])
    np.testing.assert_allclose(f, patches.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
