"""The cache of optimised onnxruntime graphs: a later session loads it and computes the same numbers;
a damaged, unusable or disabled cache changes nothing but speed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pbv_onnx.runtime import sessions
from pbv_onnx.runtime.engine import Engine

ROOT = Path(__file__).resolve().parents[2]
RESNET = ROOT / "build" / "models" / "resnet18_avg.onnx"  # convolutions: NCHWc rewrites apply


@pytest.fixture(params=["tiny", "resnet18_avg"])
def model(request, tiny_model) -> Path:
    if request.param == "tiny":
        return tiny_model
    if not RESNET.is_file():
        pytest.skip(f"{RESNET} not built (make models)")
    return RESNET


def run_both(eng: Engine, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, *eng.info.input_shape)).astype(np.float32)
    c = rng.standard_normal((3, *eng.info.feature_shape)).astype(np.float32)
    return eng.features(x), *eng.vjp(x, c)


def entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.onnx"))


def test_second_engine_loads_the_cached_graph_and_computes_identical_results(model, tmp_path, monkeypatch):
    monkeypatch.setenv(sessions.CACHE_ENV, str(tmp_path / "cache"))
    first = Engine(model, device="cpu")
    want = run_both(first)
    assert first.cache == "stored"
    assert len(entries(tmp_path / "cache")) == 2  # the VJP graph and the features-only graph
    second = Engine(model, device="cpu")
    assert second.cache == "hit"
    for a, b in zip(want, run_both(second)):
        np.testing.assert_array_equal(a, b)
    assert not list((tmp_path / "cache").glob(".*"))  # no temporary files left behind


def test_a_damaged_entry_is_detected_and_replaced(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv(sessions.CACHE_ENV, str(tmp_path))
    want = run_both(Engine(tiny_model, device="cpu"))
    for entry in entries(tmp_path):
        data = entry.read_bytes()
        entry.write_bytes(data[: len(data) // 2])  # truncated, as by a full disk
    eng = Engine(tiny_model, device="cpu")
    assert eng.cache == "stored"
    for a, b in zip(want, run_both(eng)):
        np.testing.assert_array_equal(a, b)
    assert Engine(tiny_model, device="cpu").cache == "hit"


def test_an_entry_for_another_model_is_never_used(tiny_model, tmp_path, monkeypatch):
    import onnx

    monkeypatch.setenv(sessions.CACHE_ENV, str(tmp_path / "cache"))
    Engine(tiny_model, device="cpu")
    other = onnx.load(str(tiny_model))
    for init in other.graph.initializer:
        if init.name == "W1":
            w = onnx.numpy_helper.to_array(init) * 2
            init.CopyFrom(onnx.numpy_helper.from_array(w, "W1"))
    path = tmp_path / "other.onnx"
    onnx.save(other, str(path))
    eng = Engine(path, device="cpu")
    assert eng.cache == "stored"
    ref = Engine(path, device="cpu")
    assert ref.cache == "hit"
    with monkeypatch.context() as m:
        m.setenv(sessions.CACHE_ENV, "off")
        plain = Engine(path, device="cpu")
    for a, b in zip(run_both(eng), run_both(plain)):
        np.testing.assert_array_equal(a, b)


def test_cache_off_writes_nothing(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv(sessions.CACHE_ENV, "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    eng = Engine(tiny_model, device="cpu")
    run_both(eng)
    assert eng.cache == "off"
    assert not any(tmp_path.iterdir())


def test_unwritable_cache_folder_still_runs(tiny_model, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(sessions.CACHE_ENV, str(blocker / "cache"))
    eng = Engine(tiny_model, device="cpu")
    assert eng.cache == "off"
    monkeypatch.setenv(sessions.CACHE_ENV, "off")
    for a, b in zip(run_both(eng), run_both(Engine(tiny_model, device="cpu"))):
        np.testing.assert_array_equal(a, b)


def test_default_folder_follows_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.delenv(sessions.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert sessions.cache_dir() == tmp_path / "pbv-onnx"
