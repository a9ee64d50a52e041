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


def variant(tiny_model: Path, folder: Path, scale: float) -> Path:
    """The tiny model with its first weight scaled: another sha256, so entries of its own."""
    import onnx

    model = onnx.load(str(tiny_model))
    for init in model.graph.initializer:
        if init.name == "W1":
            init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) * scale, "W1"))
    path = folder / f"tiny-{scale}.onnx"
    onnx.save(model, str(path))
    return path


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def test_the_cache_keeps_to_its_size_limit_dropping_the_least_recently_used_model(tiny_model, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv(sessions.CACHE_ENV, str(cache))
    a, b, c = (variant(tiny_model, tmp_path, s) for s in (1.0, 2.0, 3.0))
    want_b = run_both(Engine(b, device="cpu"))
    files_b = set(cache.iterdir())
    one_model = folder_bytes(cache)
    limit = 2 * one_model + one_model // 2  # room for two models' entries, not three
    monkeypatch.setenv(sessions.CACHE_MAX_ENV, str(limit))
    run_both(Engine(a, device="cpu"))
    files_a = set(cache.iterdir()) - files_b
    eng = Engine(b, device="cpu")
    run_both(eng)
    assert eng.cache == "hit"  # b is now the more recently used of the two
    run_both(Engine(c, device="cpu"))
    left = set(cache.iterdir())
    assert files_b <= left
    assert not files_a & left
    assert folder_bytes(cache) <= limit
    again = Engine(a, device="cpu")
    assert again.cache == "stored"
    assert Engine(b, device="cpu").cache == "hit"
    with monkeypatch.context() as m:
        m.setenv(sessions.CACHE_ENV, "off")
        plain = Engine(a, device="cpu")
    for x, y in zip(run_both(again), run_both(plain)):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(want_b, run_both(Engine(b, device="cpu"))):
        np.testing.assert_array_equal(x, y)


def test_an_entry_larger_than_the_limit_is_still_stored_and_used(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv(sessions.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(sessions.CACHE_MAX_ENV, "1")
    run_both(Engine(tiny_model, device="cpu"))
    assert entries(tmp_path / "cache")  # the newest entry is kept, whatever its size
    assert Engine(tiny_model, device="cpu").cache == "hit"


def test_temporary_files_of_a_killed_writer_go_and_a_writer_in_progress_keeps_its_own(tmp_path):
    import os
    import time

    old, fresh = tmp_path / ".abc.1.tmp.onnx", tmp_path / ".abc.2.tmp.onnx"
    for p in (old, fresh):
        p.write_bytes(b"partial")
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(old, (two_days_ago, two_days_ago))
    assert sessions.prune_cache(tmp_path, limit=1 << 30) == [old]
    assert fresh.exists() and not old.exists()


@pytest.mark.parametrize(
    "text,size",
    [("500M", 500 << 20), ("4G", 4 << 30), ("64k", 64 << 10), ("1.5G", 3 << 29), ("2GiB", 2 << 30), ("123", 123)],
)
def test_cache_size_limits_read_as_binary_units(text, size):
    assert sessions.parse_bytes(text) == size


@pytest.mark.parametrize("text", ["lots", "-1", "4X", "", "G"])
def test_a_limit_that_is_not_a_size_is_reported_and_the_default_kept(text, monkeypatch, caplog):
    monkeypatch.setenv(sessions.CACHE_MAX_ENV, text)
    sessions._warn_bad_limit.cache_clear()
    with caplog.at_level("WARNING", logger=sessions.__name__):
        assert sessions.cache_limit() == 4 << 30
    assert sessions.CACHE_MAX_ENV in caplog.text and repr(text) in caplog.text
