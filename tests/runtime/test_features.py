"""Feature extraction and its cache: values, reuse by content hash, invalidation, refusals."""

from __future__ import annotations

import numpy as np
import pytest
from simresponses import stimulus_images, write_images
from tinymodel import build_tiny_model

import pbv_onnx.data.features as features_mod
from pbv_onnx.base.errors import InputDataError, MismatchError
from pbv_onnx.data.features import load_features, load_or_compute_features
from pbv_onnx.runtime.engine import Engine
from pbv_onnx.runtime.images import load_batch


@pytest.fixture()
def images(tmp_path):
    rng = np.random.default_rng(0)
    names = write_images(tmp_path / "img", stimulus_images(rng, 5, "body"), "b")
    return [tmp_path / "img" / n for n in names]


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine(tiny_model, device="cpu", batch_size=2)


@pytest.fixture()
def counting(monkeypatch):
    """Count the images whose features are actually computed."""
    calls = []
    real = features_mod.compute_features

    def spy(engine, paths, progress=True):
        calls.append(len(paths))
        return real(engine, paths, progress)

    monkeypatch.setattr(features_mod, "compute_features", spy)
    return calls


def test_features_are_the_flattened_model_features_in_stimulus_order(engine, images):
    da = load_or_compute_features(engine, images, ["s0", "s1", "s2", "s3", "s4"], progress=False)
    assert da.dims == ("stimulus", "feature") and da.dtype == np.float32
    expected = engine.features(load_batch(images, engine.info.preprocessing)).reshape(5, -1)
    np.testing.assert_array_equal(da.values, expected)
    assert list(da["stimulus"].values) == ["s0", "s1", "s2", "s3", "s4"]
    assert da.attrs["model_sha256"] == engine.info.sha256


def test_cache_is_reused_and_only_changed_images_are_recomputed(engine, images, tmp_path, counting):
    cache = tmp_path / "features.nc"
    ids = list(range(5))
    first = load_or_compute_features(engine, images, ids, cache=cache, progress=False)
    assert counting == [5] and cache.is_file()
    again = load_or_compute_features(engine, images[::-1], ids[::-1], cache=cache, progress=False)
    assert counting == [5]  # nothing recomputed, order follows the request
    np.testing.assert_array_equal(again.values, first.values[::-1])
    write_images(images[2].parent, stimulus_images(np.random.default_rng(9), 1, "object"), "b0002_")
    (images[2].parent / "b0002_0000.png").replace(images[2])  # new content under the same name
    changed = load_or_compute_features(engine, images, ids, cache=cache, progress=False)
    assert counting == [5, 1]
    fresh = engine.features(load_batch([images[2]], engine.info.preprocessing)).reshape(-1)
    np.testing.assert_array_equal(changed.values[2], fresh)
    assert not np.array_equal(changed.values[2], first.values[2])
    stored = load_features(cache, engine.info)
    assert stored.sizes["stimulus"] == 5


def test_cache_keeps_older_entries(engine, images, tmp_path, counting):
    cache = tmp_path / "features.nc"
    load_or_compute_features(engine, images[:3], ["a", "b", "c"], cache=cache, progress=False)
    load_or_compute_features(engine, images[3:], ["d", "e"], cache=cache, progress=False)
    assert sorted(load_features(cache)["stimulus"].values) == ["a", "b", "c", "d", "e"]
    load_or_compute_features(engine, images, list("abcde"), cache=cache, progress=False)
    assert counting == [3, 2]


def test_a_cache_from_another_model_is_refused_unless_forced(engine, images, tmp_path, counting):
    other = Engine(build_tiny_model(tmp_path / "other.onnx", seed=1), device="cpu")
    cache = tmp_path / "features.nc"
    load_or_compute_features(other, images, list(range(5)), cache=cache, progress=False)
    with pytest.raises(MismatchError, match="features.nc: .*another model"):
        load_or_compute_features(engine, images, list(range(5)), cache=cache, progress=False)
    da = load_or_compute_features(engine, images, list(range(5)), cache=cache, force=True, progress=False)
    assert load_features(cache, engine.info).attrs["model_sha256"] == engine.info.sha256
    np.testing.assert_array_equal(load_features(cache).values, da.values)


def test_missing_and_unreadable_images_are_refused_and_nothing_is_cached(engine, images, tmp_path):
    cache = tmp_path / "features.nc"
    with pytest.raises(InputDataError, match="missing.png: image file not found"):
        load_or_compute_features(engine, images + [tmp_path / "missing.png"], list(range(6)), cache=cache)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(InputDataError, match="broken.png"):
        load_or_compute_features(engine, [broken], [0], cache=cache, progress=False)
    assert not cache.exists()


def test_a_file_that_is_not_a_features_file_is_refused(engine, images, tmp_path):
    junk = tmp_path / "junk.nc"
    junk.write_text("hello")
    with pytest.raises(InputDataError, match="junk.nc: not a readable NetCDF features file"):
        load_or_compute_features(engine, images, list(range(5)), cache=junk, progress=False)
    assert junk.read_text() == "hello"
