"""The shared map: the similarity decomposed over latent positions, its upsampling, the guided map,
the pre-pool output of pooled models, `--map`, and older models without it."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from test_explain import make_study_files
from tinymodel import build_tiny_model, build_tiny_pooled_model, tiny_batch, tiny_forward, tiny_weights

import pbv_onnx
from pbv_onnx.base.errors import ModelError, UsageError
from pbv_onnx.method.shared import (
    channels_first,
    guided_map,
    latent_grid,
    on_grid,
    shared_maps,
    upsample_map,
)
from pbv_onnx.report import html as report
from pbv_onnx.runtime.engine import Engine
from pbv_onnx.runtime.images import load_batch

PBV = Path(sys.executable).parent / "pbv-onnx"


def cosine(w: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """s_n(o, b) from its definition, float64 (docs/method.md section 2)."""
    u, z = w * a, w * b
    return float((u * z).sum() / np.sqrt((u * u).sum() * (z * z).sum()))


# -- the decomposition itself ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_pooled_maps_sum_to_the_similarity_of_the_pooled_features(seed):
    rng = np.random.default_rng(seed)
    a_o, a_b = np.maximum(rng.standard_normal((2, 7, 5, 6)), 0)
    w = rng.standard_normal(7)
    m_o, m_b = shared_maps(w, a_o, a_b, pooled=True)
    s = cosine(w, a_o.mean((1, 2)), a_b.mean((1, 2)))
    assert m_o.shape == m_b.shape == (5, 6)
    assert m_o.sum() == pytest.approx(s, rel=1e-12)
    assert m_b.sum() == pytest.approx(s, rel=1e-12)
    # each position's term, written out: sum_c w_c^2 A_c(o, p) phibar_c(b) / (P ||w phibar(o)|| ||w phibar(b)||)
    bo, bb = a_o.mean((1, 2)), a_b.mean((1, 2))
    den = 30 * np.linalg.norm(w * bo) * np.linalg.norm(w * bb)
    p = (3, 4)
    assert m_o[p] == pytest.approx(sum(w[c] ** 2 * a_o[c][p] * bb[c] for c in range(7)) / den, rel=1e-12)
    assert m_b[p] == pytest.approx(sum(w[c] ** 2 * a_b[c][p] * bo[c] for c in range(7)) / den, rel=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_unpooled_map_is_the_cotangent_summed_over_channels(seed):
    rng = np.random.default_rng(seed)
    a_o, a_b = np.maximum(rng.standard_normal((2, 4, 3, 5)), 0)
    w = rng.standard_normal((4, 3, 5))
    m_o, m_b = shared_maps(w, a_o, a_b, pooled=False)
    assert m_o.sum() == pytest.approx(cosine(w, a_o, a_b), rel=1e-12)
    np.testing.assert_array_equal(m_o, m_b)
    v = w**2 * a_o * a_b / (np.linalg.norm(w * a_o) * np.linalg.norm(w * a_b))
    np.testing.assert_allclose(m_o, v.sum(0), rtol=1e-12)


def test_a_part_shared_only_at_one_place_lights_only_that_place():
    """A known answer: the one weighted channel is active in the object at one position only."""
    a_o = np.zeros((3, 4, 4))
    a_o[1, 2, 3] = 5.0
    a_o[0] = 1.0  # active everywhere, but the readout ignores channel 0
    a_b = np.ones((3, 4, 4))
    w = np.array([0.0, 1.0, 0.0])
    m_o, m_b = shared_maps(w, a_o, a_b, pooled=True)
    assert m_o[2, 3] == pytest.approx(1.0) and np.count_nonzero(m_o) == 1
    np.testing.assert_allclose(m_b, np.full((4, 4), 1 / 16))  # the reference's channel 1 is everywhere


def test_no_shared_weighted_feature_gives_zero_maps():
    a = np.ones((2, 3, 3))
    for pooled, w in ((True, np.zeros(2)), (False, np.zeros((2, 3, 3)))):
        m_o, m_b = shared_maps(w, a, a, pooled)
        assert not m_o.any() and not m_b.any()


def test_token_features_lie_on_the_patch_grid():
    assert latent_grid((768, 14, 14)) == (14, 14, 0)
    assert latent_grid((196, 768)) == (14, 14, 0)
    assert latent_grid((197, 768)) == (14, 14, 1)  # a class token first: not on the image
    assert latent_grid((512,)) is None and latent_grid((7, 3)) is None
    rng = np.random.default_rng(0)
    tokens_o, tokens_b = np.maximum(rng.standard_normal((2, 10, 6)), 0)  # [T, D], T = 3*3 + 1
    w = rng.standard_normal((10, 6))
    shape = (10, 6)
    m_o, _ = shared_maps(
        channels_first(w.ravel(), shape), channels_first(tokens_o, shape), channels_first(tokens_b, shape), False
    )
    grid = on_grid(m_o, shape)
    v = w**2 * tokens_o * tokens_b / (np.linalg.norm(w * tokens_o) * np.linalg.norm(w * tokens_b))
    np.testing.assert_allclose(grid, v[1:].sum(1).reshape(3, 3), rtol=1e-12)  # token 1 + 3i + j at (i, j)
    with pytest.raises(ValueError, match="no spatial grid"):
        on_grid(np.zeros(14), (7, 2))


# -- upsampling and the guided map -----------------------------------------------------------------


def test_upsampling_is_bilinear_with_half_pixel_centres_and_clamped_edges():
    m = np.array([[0.0, 1.0]])
    up = upsample_map(m, (1, 4))
    # sample positions -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1); scale h*w/(H*W) = 1/2
    np.testing.assert_allclose(up, [[0.0, 0.25, 0.75, 1.0]] / np.float64(2))
    const = upsample_map(np.full((7, 7), 3.0), (224, 224))
    np.testing.assert_allclose(const, 3.0 * 49 / 224**2)


@pytest.mark.parametrize("size", [(224, 224), (14, 7), (21, 35)])
def test_upsampled_map_keeps_the_sum_at_whole_scale_factors(size):
    m = np.random.default_rng(1).random((2, 7, 7))
    up = upsample_map(m, size)
    assert up.shape == (2, *size)
    np.testing.assert_allclose(up.sum((-2, -1)), m.sum((-2, -1)), rtol=1e-12)


def test_upsampled_map_sum_is_close_at_other_scale_factors():
    m = np.random.default_rng(2).random((7, 7))
    assert upsample_map(m, (100, 90)).sum() == pytest.approx(m.sum(), rel=0.03)


def test_guided_map_is_the_product():
    rng = np.random.default_rng(3)
    s, m = rng.random((2, 5, 5))
    np.testing.assert_array_equal(guided_map(s, m), s * m)


# -- the engine's pre-pool map -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("shared_models")
    return {
        "unpooled": build_tiny_model(d / "tiny.onnx"),
        "pooled": build_tiny_pooled_model(d / "tiny_avg.onnx"),
        "old": build_tiny_pooled_model(d / "tiny_avg_old.onnx", feature_map=False),
    }


def test_spatial_maps_are_the_pre_pool_map_or_the_features(models):
    x, _ = tiny_batch(np.random.default_rng(0), 3)
    ref = tiny_forward(x, tiny_weights(0))
    pooled = Engine(models["pooled"], device="cpu", batch_size=2)
    assert pooled.pooled and pooled.has_spatial_maps and pooled.map_shape == (6, 8, 8)
    np.testing.assert_allclose(pooled.spatial_maps(x), ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(pooled.features(x), ref.mean((2, 3)), rtol=1e-4, atol=1e-5)
    flat = Engine(models["unpooled"], device="cpu")
    assert not flat.pooled and flat.map_shape == (6, 8, 8)
    np.testing.assert_array_equal(flat.spatial_maps(x), flat.feature_maps(x))


def test_an_older_pooled_model_has_no_spatial_maps(models):
    old = Engine(models["old"], device="cpu")
    assert not old.has_spatial_maps
    with pytest.raises(ModelError, match="without the pre-pool output 'feature_map'") as err:
        old.spatial_maps(np.zeros((1, 3, 16, 16), np.float32))
    assert err.value.path == str(models["old"])


# -- explanations.nc ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def studies(models, tmp_path_factory) -> dict:
    return {k: make_study_files(tmp_path_factory.mktemp(k), m) for k, m in models.items()}


@pytest.mark.parametrize("kind", ["unpooled", "pooled"])
def test_explanations_hold_shared_maps_that_sum_to_the_similarity(kind, studies):
    """Against float64 numpy: the tiny model's forward pass and the definition of M."""
    f = studies[kind]
    eng = Engine(f["model"], device="cpu")
    ds = pbv_onnx.explain(eng, f["readouts"], f["responses"], channels=["3", "7"], top_objects=2)
    latent = ds["shared_map_latent"].transpose("pair", "role", "latent_y", "latent_x").values
    assert latent.shape == (4, 2, 8, 8) and "M_o" in ds["shared_map"].attrs["roles"]
    np.testing.assert_allclose(latent.sum((-2, -1)), np.repeat(ds["similarity"].values[:, None], 2, 1), rtol=1e-6)
    up = ds["shared_map"].transpose("pair", "role", "y", "x").values
    np.testing.assert_allclose(up.sum((-2, -1)), latent.sum((-2, -1)), rtol=1e-5)  # 16 / 8 is whole
    for i in range(ds.sizes["pair"]):
        files = [f["folder"] / str(ds[f"{r}_file"].values[i]) for r in ("ooc", "reference")]
        a_o, a_b = tiny_forward(load_batch(files, eng.info.preprocessing), tiny_weights(0))
        c = [3, 7].index(int(ds["channel"].values[i]))
        if kind == "pooled":
            w = f["weight"][c].astype(np.float64)
            bo, bb = a_o.mean((1, 2)), a_b.mean((1, 2))
            assert float(ds["similarity"].values[i]) == pytest.approx(cosine(w, bo, bb), rel=1e-5)
            den = 64 * np.linalg.norm(w * bo) * np.linalg.norm(w * bb)
            want_o = np.einsum("c,chw->hw", w**2 * bb, a_o) / den
            want_b = np.einsum("c,chw->hw", w**2 * bo, a_b) / den
        else:
            w = f["weight"][c].astype(np.float64).reshape(6, 8, 8)
            assert float(ds["similarity"].values[i]) == pytest.approx(cosine(w, a_o, a_b), rel=1e-5)
            want_o = want_b = (w**2 * a_o * a_b).sum(0) / (np.linalg.norm(w * a_o) * np.linalg.norm(w * a_b))
        np.testing.assert_allclose(latent[i, 0], want_o, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(latent[i, 1], want_b, rtol=1e-4, atol=1e-7)


def test_an_older_pooled_model_explains_without_shared_maps(studies, caplog):
    f = studies["old"]
    eng = Engine(f["model"], device="cpu")
    with caplog.at_level(logging.INFO, logger="pbv_onnx"):
        ds = pbv_onnx.explain(eng, f["readouts"], f["responses"], channels=["3"], top_objects=2)
    assert "shared_map" not in ds and "shared_map_latent" not in ds
    assert "not computed" in ds.attrs["shared_map"] and str(f["model"]) in ds.attrs["shared_map"]
    notes = [r.getMessage() for r in caplog.records if "no shared maps" in r.getMessage()]
    assert len(notes) == 1 and "feature_map" in notes[0]
    with pytest.raises(ModelError, match="needs shared maps") as err:
        pbv_onnx.explain(eng, f["readouts"], f["responses"], channels=["3"], map="shared")
    assert str(f["model"]) in str(err.value)


def test_explain_pair_gives_the_same_maps_and_the_chosen_one(studies):
    f = studies["pooled"]
    eng = Engine(f["model"], device="cpu")
    ds = pbv_onnx.explain(eng, f["readouts"], f["responses"], channels=["7"], top_objects=1)
    files = [f["folder"] / str(ds[f"{r}_file"].values[0]) for r in ("ooc", "reference")]
    x = load_batch(files, eng.info.preprocessing)
    for choice in ("pixel", "shared", "guided"):
        one = pbv_onnx.explain_pair(eng, f["weight"][1], x[0], x[1], map=choice)
        np.testing.assert_allclose(one["shared_map_latent"].values, ds["shared_map_latent"].values[0], rtol=1e-6)
        want = {
            "pixel": one["saliency"].values,
            "shared": one["shared_map"].values,
            "guided": one["saliency"].values * one["shared_map"].values,
        }[choice]
        np.testing.assert_array_equal(one["map"].values, want)
        assert one.attrs["map"] == choice
    with pytest.raises(UsageError, match="map must be one of"):
        pbv_onnx.explain_pair(eng, f["weight"][1], x[0], x[1], map="fancy")


# -- what --map changes -----------------------------------------------------------------------------------


def test_the_map_choice_changes_the_figures_not_the_stored_maps(studies, tmp_path):
    f = studies["unpooled"]
    eng = Engine(f["model"], device="cpu")
    ds = pbv_onnx.explain(eng, f["readouts"], f["responses"], channels=["3"], top_objects=2)
    sal = ds["saliency"].transpose("pair", "role", "y", "x").values
    shared = ds["shared_map"].transpose("pair", "role", "y", "x").values
    np.testing.assert_array_equal(report.display_maps(ds, 0.0, "shared"), shared)
    np.testing.assert_allclose(report.display_maps(ds, 0.0, "guided"), sal.astype(np.float64) * shared)
    outs = {}
    for choice in ("pixel", "shared", "guided"):
        outs[choice] = pbv_onnx.write_report(ds, tmp_path / choice, map=choice)
    stored = {k: xr.open_dataset(v / report.NETCDF, engine="h5netcdf").load() for k, v in outs.items()}
    for k in ("shared", "guided"):
        assert set(stored[k].data_vars) == set(stored["pixel"].data_vars)
        for name in stored["pixel"].data_vars:
            np.testing.assert_array_equal(stored[k][name].values, stored["pixel"][name].values)
        assert stored[k].attrs["map"] == k
        figs = sorted((outs[k] / "pairs").glob("*.png"))
        assert len(figs) == 2
        assert all(a.read_bytes() != b.read_bytes() for a, b in zip(figs, sorted((outs["pixel"] / "pairs").glob("*"))))
    assert "guided: the saliency times" in (outs["guided"] / "index.html").read_text()
    with pytest.raises(UsageError, match="map must be one of"):
        pbv_onnx.write_report(ds, tmp_path / "bad", map="fancy")
    with pytest.raises(UsageError, match="needs the shared maps"):
        pbv_onnx.write_report(ds.drop_vars(["shared_map", "shared_map_latent"]), tmp_path / "none", map="shared")


def _cli(f: dict, *args) -> subprocess.CompletedProcess:
    common = ["--model", f["model"], "--readouts", f["readouts"], "--responses", f["responses"], "--device", "cpu"]
    cmd = [str(PBV), "explain", *map(str, common), "--channel", "3", "--top-objects", "1", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_cli_map_option(studies, tmp_path):
    res = _cli(studies["pooled"], "--map", "guided", "--out", tmp_path / "g")
    assert res.returncode == 0, res.stderr
    ds = xr.open_dataset(tmp_path / "g" / "explanations.nc", engine="h5netcdf")
    assert ds.attrs["map"] == "guided" and "shared_map" in ds
    old = studies["old"]
    res = _cli(old, "--map", "shared", "--out", tmp_path / "o")
    assert res.returncode == 4, res.stderr
    line = res.stderr.strip().splitlines()
    assert len(line) == 1 and "--map 'shared' needs shared maps" in line[0] and str(old["model"]) in line[0]
    assert not (tmp_path / "o").exists()
    res = _cli(studies["pooled"], "--map", "fancy", "--out", tmp_path / "f")
    assert res.returncode == 2 and "--map must be one of pixel, shared, guided" in res.stderr
