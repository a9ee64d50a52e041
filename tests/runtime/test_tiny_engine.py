"""The engine on a tiny hand-built model: VJP against finite differences, batching, errors."""

from __future__ import annotations

import numpy as np
import pytest
from tinymodel import FEATURE_SHAPE, SIZE, tiny_batch, tiny_forward, tiny_weights

from pbv_onnx.base.errors import ModelError, UsageError
from pbv_onnx.runtime.engine import Engine


def test_vjp_matches_finite_differences(tiny_model):
    eng = Engine(tiny_model, device="cpu")
    rng = np.random.default_rng(1)
    x, ct = tiny_batch(rng, 2)
    feats, grad = eng.vjp(x, ct)
    w = tiny_weights()
    np.testing.assert_allclose(feats, tiny_forward(x, w), rtol=1e-4, atol=1e-5)
    d = rng.standard_normal(x.shape)
    eps = 1e-4
    fd = ((tiny_forward(x + eps * d, w) - tiny_forward(x - eps * d, w)) * ct).sum() / (2 * eps)
    assert np.sum(grad * d) == pytest.approx(fd, rel=1e-3)


def test_features_equal_vjp_features_and_batch_size_does_not_matter(tiny_model):
    x = np.random.default_rng(2).standard_normal((5, 3, SIZE, SIZE)).astype(np.float32)
    f1 = Engine(tiny_model, device="cpu", batch_size=2).feature_maps(x)
    f2, _ = Engine(tiny_model, device="cpu", batch_size=5).vjp(x, np.zeros((5, *FEATURE_SHAPE), np.float32))
    np.testing.assert_allclose(f1, f2, rtol=1e-6, atol=1e-6)


def test_wrong_shapes_and_files_are_refused(tiny_model, tmp_path):
    eng = Engine(tiny_model, device="cpu")
    with pytest.raises(UsageError):
        eng.features(np.zeros((1, 3, SIZE + 1, SIZE), np.float32))
    with pytest.raises(UsageError):
        eng.vjp(np.zeros((1, 3, SIZE, SIZE), np.float32), np.zeros((2, *FEATURE_SHAPE), np.float32))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="bad.onnx"):
        Engine(bad)
    with pytest.raises(ModelError, match="not found"):
        Engine(tmp_path / "missing.onnx")


def test_model_with_external_data_in_its_folder_runs_like_the_inline_one(tiny_model, tmp_path):
    import onnx

    model = onnx.load(str(tiny_model))
    ext = tmp_path / "ext.onnx"
    onnx.save(
        model,
        str(ext),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.weights",
        size_threshold=0,
    )
    assert (tmp_path / "ext.weights").is_file()
    x = np.random.default_rng(3).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    ct = np.random.default_rng(4).standard_normal((2, *FEATURE_SHAPE)).astype(np.float32)
    inline, external = Engine(tiny_model, device="cpu"), Engine(ext, device="cpu")
    for a, b in zip(inline.vjp(x, ct), external.vjp(x, ct)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(inline.features(x), external.features(x))


def test_model_sha256_is_the_hash_of_the_file(tiny_model):
    import hashlib

    assert Engine(tiny_model, device="cpu").info.sha256 == hashlib.sha256(tiny_model.read_bytes()).hexdigest()


def test_features_never_build_the_gradient_session(tiny_model):
    eng = Engine(tiny_model, device="cpu")
    x = np.random.default_rng(7).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    eng.features(x)
    assert eng._vjp_sess is None  # fit, predict and features use the forward-only graph
    eng.vjp(x, np.zeros((2, *FEATURE_SHAPE), np.float32))
    assert eng._vjp_sess is not None


def test_graph_errors_name_the_model_at_open_or_first_use(tiny_model, tmp_path):
    import onnx

    model = onnx.load(str(tiny_model))
    model.graph.output[1].name = "something_else"
    renamed = tmp_path / "renamed.onnx"
    onnx.save(model, str(renamed))
    with pytest.raises(ModelError, match=r"renamed\.onnx.*lacks the image/cotangent"):
        Engine(renamed, device="cpu")

    model = onnx.load(str(tiny_model))
    model.graph.node[0].op_type = "NoSuchOp"
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    eng = Engine(broken, device="cpu")
    with pytest.raises(ModelError, match=r"broken\.onnx.*onnxruntime cannot load the model"):
        eng.features(np.zeros((1, 3, SIZE, SIZE), np.float32))


def test_sessions_let_idle_worker_threads_sleep(tiny_model):
    # Spinning workers ran on after a call and slowed the next one (another session of the model,
    # or other processes) while gaining nothing on a quiet machine: never spin.
    eng = Engine(tiny_model, device="cpu")
    for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
        assert eng._options.get_session_config_entry(key) == "0"
