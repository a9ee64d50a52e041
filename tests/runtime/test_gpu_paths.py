"""What of the CUDA paths a CPU machine can check: provider options, a CUDA provider that does not
load, and the float16 copy of a graph (run here on the CPU provider, against float32)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto
from tinymodel import FEATURE_SHAPE, SIZE, tiny_batch

import pbv_onnx.runtime.engine as model_mod
from pbv_onnx.base.errors import DependencyError
from pbv_onnx.method.stats import rel_l2
from pbv_onnx.runtime.engine import Engine
from pbv_onnx.runtime.fp16 import FP32_ONLY, to_fp16
from pbv_onnx.runtime.sessions import CUDA_OPTIONS, with_cuda_options

ROOT = Path(__file__).resolve().parents[2]
RESNET18 = ROOT / "build" / "models" / "resnet18_avg.onnx"  # has an overlapping stem max-pool


def run_half(engine: Engine, x: np.ndarray, cot: np.ndarray):
    sess = ort.InferenceSession(to_fp16(engine._proto).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["features", "input_grad"], {"image": x, "cotangent": cot})


def test_cuda_options_go_to_the_cuda_provider_only():
    out = with_cuda_options(["CUDAExecutionProvider", "CPUExecutionProvider"], {"use_tf32": 1})
    assert out[0] == ("CUDAExecutionProvider", {**CUDA_OPTIONS, "use_tf32": "1"})
    assert out[1] == "CPUExecutionProvider"
    assert with_cuda_options(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert CUDA_OPTIONS["use_tf32"] == "0"  # float32 parity with the CPU provider by default


def test_device_cuda_whose_provider_does_not_load_is_an_error_naming_the_model(tiny_model, monkeypatch):
    # onnxruntime runs on the CPU when the CUDA provider cannot load; --device cuda must not.
    monkeypatch.setattr(model_mod, "choose_providers", lambda device: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with warnings.catch_warnings():  # onnxruntime warns that the provider is not available here
        warnings.simplefilter("ignore")
        x = np.zeros((1, 3, SIZE, SIZE), np.float32)
        eng = Engine(tiny_model, device="cuda")  # sessions are made on first use
        with pytest.raises(DependencyError, match=r"tiny\.onnx.*CUDA provider did not load"):
            eng.features(x)
        with pytest.raises(DependencyError, match=r"tiny\.onnx.*CUDA provider did not load"):
            eng.vjp(x, np.zeros((1, *FEATURE_SHAPE), np.float32))
        assert Engine(tiny_model, device="auto").provider == "CPUExecutionProvider"


def test_fp16_graph_of_the_tiny_model_tracks_float32(tiny_model):
    eng = Engine(tiny_model, device="cpu")
    x, cot = tiny_batch(np.random.default_rng(5), 3)
    f32, g32 = eng.vjp(x, cot)
    f16, g16 = run_half(eng, x, cot)
    assert f16.dtype == g16.dtype == np.float32  # float32 in and out
    assert rel_l2(f16, f32) < 5e-3
    assert rel_l2(g16, g32) < 2e-2


@pytest.mark.skipif(not RESNET18.is_file(), reason="build/models/resnet18_avg.onnx not exported (make models)")
def test_fp16_copy_keeps_scatter_and_steps_in_float32_and_leaves_the_model_alone(shared_images):
    eng = Engine(RESNET18, device="cpu")
    before = eng._proto.SerializeToString()
    half = to_fp16(eng._proto)
    assert eng._proto.SerializeToString() == before
    producers = {o: n for n in half.graph.node for o in n.output}
    consumers = {}
    for n in half.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    kept = [n for n in half.graph.node if n.op_type in FP32_ONLY]
    assert {n.op_type for n in kept} == {"ScatterElements", "HardSigmoid"}  # stem max-pool, ReLU masks
    to = {n.name: next(a.i for a in n.attribute if a.name == "to") for n in half.graph.node if n.op_type == "Cast"}
    for n in kept:
        assert all(to.get(producers[n.input[i]].name) == TensorProto.FLOAT for i in FP32_ONLY[n.op_type])
        assert [to.get(c.name) for c in consumers[n.output[0]]] == [TensorProto.FLOAT16]
    # and it runs (the CPU provider has no float16 scatter-add) close to float32
    x = np.stack([np.asarray(a) for a in _photos(eng, shared_images[:4])])
    cot = np.random.default_rng(6).standard_normal((len(x), *eng.info.feature_shape)).astype(np.float32)
    f32, g32 = eng.vjp(x, cot)
    f16, g16 = run_half(eng, x, cot)
    assert rel_l2(f16, f32) < 1e-2
    corr = np.corrcoef(np.abs(g16).sum(1).ravel(), np.abs(g32).sum(1).ravel())[0, 1]
    assert corr > 0.98  # the saliency maps users look at


def _photos(eng: Engine, files):
    from pbv_onnx.runtime.images import load_batch

    return load_batch(files, eng.info.preprocessing)


def test_cuda_request_without_a_cuda_build_names_the_fix(monkeypatch):
    from pbv_onnx.runtime import sessions

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider")
    with pytest.raises(DependencyError, match="pip uninstall -y onnxruntime onnxruntime-gpu"):
        sessions.choose_providers("cuda")
    # both builds installed: the CPU-only one's files replaced the GPU build's
    monkeypatch.setattr(sessions, "_installed", lambda dist: True)
    with pytest.raises(DependencyError, match="replaced its files; keep only the GPU build"):
        sessions.choose_providers("cuda")
    assert sessions.choose_providers("auto") == ["CPUExecutionProvider"]


def test_io_binding_gives_the_plain_runs_results(tiny_model):
    # The default on CUDA only; on the CPU provider the binding path runs too when asked for, so its
    # feeds and fetches are checked here against plain runs.
    x, cot = tiny_batch(np.random.default_rng(7), 3)
    plain, bound = Engine(tiny_model, device="cpu"), Engine(tiny_model, device="cpu", io_binding=True)
    plain.features(x)  # the first session decides where the default binds
    assert not plain.binds and bound.binds
    for a, b in zip(plain.vjp(x, cot), bound.vjp(x, cot)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(plain.features(x), bound.features(x))
    cots = np.stack([cot, 2 * cot[::-1]], axis=1)  # two cotangents per image
    for a, b in zip(plain.vjp_multi(x, cots), bound.vjp_multi(x, cots)):
        np.testing.assert_array_equal(a, b)
