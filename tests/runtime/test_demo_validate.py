"""Validation metrics on hand-built maps with a known answer, and the demo end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pbv_onnx.demo import validate as v
from pbv_onnx.runtime.images import Preprocessing

ROOT = Path(__file__).resolve().parents[2]
PBV = Path(sys.executable).parent / "pbv-onnx"


def square_mask(size=20, box=(5, 5, 10, 10)):
    m = np.zeros((size, size), bool)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = True
    return m


def test_pointing_game_hits_only_when_the_peak_is_inside():
    mask = square_mask()
    smap = np.random.default_rng(0).uniform(0, 1, mask.shape)
    smap[7, 7] = 5.0
    assert v.pointing_hit(smap, mask)
    smap[15, 2] = 6.0
    assert not v.pointing_hit(smap, mask)
    assert not v.pointing_hit(np.ones(mask.shape), mask)  # a flat map points nowhere


def test_energy_share_is_the_mass_inside():
    mask = square_mask()
    smap = np.ones(mask.shape)
    assert v.energy_share(smap, mask) == pytest.approx(mask.mean())
    smap[mask] = 3.0  # 25 px at 3 vs 375 px at 1
    assert v.energy_share(smap, mask) == pytest.approx(75 / (75 + 375))
    assert np.isnan(v.energy_share(np.zeros(mask.shape), mask))


def test_deleted_images_fill_exactly_the_first_pixels_of_the_order():
    img = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5) + 1
    order = np.arange(20)[::-1]
    out = v.deleted_images(img, order, [0.0, 0.25, 1.0], np.zeros((3, 4, 5), np.float32))
    np.testing.assert_array_equal(out[0], img)
    gone = out[1].reshape(3, -1) == 0
    assert gone.all(axis=0).sum() == 5 and gone[:, 15:].all()
    assert (out[2] == 0).all()


def test_deleted_images_remove_whole_blocks_in_order():
    img = np.ones((3, 8, 12), np.float32)
    # 4 x 4 blocks: a 2 x 3 grid; delete block 5 (bottom right) then block 0 (top left)
    out = v.deleted_images(img, np.array([5, 0, 1, 2, 3, 4]), [1 / 6, 2 / 6], np.zeros_like(img), patch=4)
    expected = np.ones((8, 12))
    expected[4:8, 8:12] = 0
    np.testing.assert_array_equal(out[0, 1], expected)
    expected[0:4, 0:4] = 0
    np.testing.assert_array_equal(out[1, 2], expected)


def test_patch_scores_sum_absolute_saliency_per_block():
    rng = np.random.default_rng(0)
    smap = rng.normal(size=(10, 7))  # not a multiple of the block: edge blocks are smaller
    scores = v.patch_scores(smap, 4)
    assert scores.shape == (3, 2)
    for by in range(3):
        for bx in range(2):
            assert scores[by, bx] == pytest.approx(np.abs(smap[4 * by : 4 * by + 4, 4 * bx : 4 * bx + 4]).sum())


def test_deletion_order_ranks_blocks_by_score_and_breaks_ties_at_random():
    rng = np.random.default_rng(0)
    scores = np.array([[1.0, 5.0], [3.0, 1.0]])
    order = v.deletion_order(scores, rng)
    assert list(order[:2]) == [1, 2] and set(order[2:]) == {0, 3}
    tails = {tuple(v.deletion_order(scores, rng)[2:]) for _ in range(30)}
    assert tails == {(0, 3), (3, 0)}


def test_area_between_curves_matches_the_integral():
    f = np.linspace(0, 1, 11)
    # salient drops linearly to 0, random stays at 1: area 1/2; scale divides
    assert v.area_between(f, 1 - f, np.ones_like(f)) == pytest.approx(0.5)
    assert v.area_between(f, 1 - f, np.ones_like(f), scale=2.0) == pytest.approx(0.25)
    assert v.area_between(f, np.ones_like(f), np.ones_like(f)) == 0.0


def test_bootstrap_interval_brackets_the_mean_and_shrinks_with_more_pairs():
    rng = np.random.default_rng(0)
    few = rng.normal(1.0, 1.0, 10)
    many = rng.normal(1.0, 1.0, 1000)
    lo, hi = v.bootstrap_ci(few, np.random.default_rng(1))
    assert lo < few.mean() < hi
    lo2, hi2 = v.bootstrap_ci(many, np.random.default_rng(1))
    assert lo2 < 1.0 < hi2 and hi2 - lo2 < (hi - lo) / 3
    assert np.isnan(v.bootstrap_ci([np.nan], rng)[0])


def region_model(region):
    """A 'channel' that sums the pixels of `region` plus a constant: the known answer is the region."""

    def read(x):
        r = x[:, :, region].sum(axis=(1, 2)) + 10.0
        return {"readout": r, "ground truth": 2 * r}

    return read


def test_deletion_areas_reward_the_true_map_and_punish_its_opposite():
    rng = np.random.default_rng(1)
    img = rng.uniform(0.5, 1.0, (3, 32, 32)).astype(np.float32)
    region = square_mask(32, (4, 8, 16, 20))
    fill = np.zeros_like(img)
    maps = {"true": region.astype(float), "opposite": (~region).astype(float), "flat": np.ones(region.shape)}
    areas, drop = v.deletion_areas(region_model(region), img, maps, rng, scale=1.0, fill=fill, patch=4, n_random=4)
    for measure in ("readout", "ground truth"):
        assert areas["true"][measure] > 0 > areas["opposite"][measure]
        assert abs(areas["flat"][measure]) < areas["true"][measure]
    # the ground truth here is twice the readout: twice the area, twice the drop
    assert areas["true"]["ground truth"] == pytest.approx(2 * areas["true"]["readout"])
    assert drop["readout"] == pytest.approx(float(img[:, region].sum()), rel=1e-5)
    assert drop["ground truth"] == pytest.approx(2 * drop["readout"])


def test_deletion_areas_are_zero_for_a_response_that_ignores_the_image():
    rng = np.random.default_rng(2)
    img = rng.uniform(0, 1, (3, 16, 16)).astype(np.float32)
    areas, drop = v.deletion_areas(
        lambda x: {"readout": np.full(len(x), 5.0)},
        img,
        {"m": rng.uniform(size=(16, 16))},
        rng,
        1.0,
        np.zeros_like(img),
        patch=4,
    )
    assert areas["m"]["readout"] == 0.0 and drop["readout"] == 0.0


def test_upsampled_cells_and_cell_pointing_follow_the_grid():
    cells = np.arange(4.0).reshape(2, 2)
    up = v.upsample_cells(cells, (4, 6))
    np.testing.assert_array_equal(up, np.kron(cells, np.ones((2, 3))))
    mask = square_mask(8, (4, 4, 8, 8))  # the bottom-right quarter
    assert v.cell_pointing_hit(cells, mask)  # peak cell (1, 1): centre (6, 6)
    assert not v.cell_pointing_hit(cells[::-1], mask)  # peak cell (0, 1): centre (2, 6)


def test_mask_follows_the_model_resize():
    mask = square_mask(40, (10, 20, 30, 40))
    spec = Preprocessing(resize=(20, 20), crop=None, mean=(0.5,) * 3, std=(0.5,) * 3)
    np.testing.assert_array_equal(v.mask_to_input(mask, spec), square_mask(20, (5, 10, 15, 20)))


# -- end to end on a reduced stimulus set, through the installed CLI ------------------------------


def _demo_model():
    """The exported demo model: the readouts are fitted on it and, with a sparse, pooled,
    nonlinear map of its own features, it generates the ground truth too (as `make demo` does)."""
    for folder in (ROOT / "build" / "demo", ROOT / "build" / "models"):
        model = folder / "mobilenet_v2-features.18.onnx"
        if model.is_file():
            return model
    return None


def pbv(*args):
    return subprocess.run([str(PBV), *map(str, args)], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_reduced_demo_runs_through_the_cli_and_finds_the_planted_parts(tmp_path):
    fit_model = gt_model = _demo_model()
    if fit_model is None:
        pytest.skip(
            "no exported demo model (mobilenet_v2-features.18.onnx) in build/demo or "
            "build/models; run `make demo` first"
        )
    exp = tmp_path / "exp"
    r = pbv(
        "demo",
        "build",
        "--gt-model",
        gt_model,
        "--out",
        exp,
        "--bodies",
        40,
        "--objects",
        12,
        "--planted",
        16,
        "--channels",
        4,
        "--device",
        "cpu",
    )
    assert r.returncode == 0, r.stderr
    r = pbv(
        "fit", "--model", fit_model, "--responses", exp / "responses.nc", "--out", tmp_path / "ro.nc", "--device", "cpu"
    )
    assert r.returncode == 0, r.stderr
    import xarray as xr

    ds = xr.open_dataset(exp / "responses.nc", engine="h5netcdf")
    mean = ds["response"].mean("repetition").values
    body = ds["category"].values.astype(str) == "body"
    # body-selective against plain objects (planted ones carry a body part by design)
    plain = ~body & ~np.char.startswith(ds["stimulus"].values.astype(str), "planted")
    assert (mean[:, body].mean(1) > 1.5 * mean[:, plain].mean(1)).all()
    r = pbv(
        "demo",
        "validate",
        "--model",
        fit_model,
        "--readouts",
        tmp_path / "ro.nc",
        "--experiment",
        exp,
        "--out",
        tmp_path / "validation.md",
        "--method",
        "parallel",
        "--device",
        "cpu",
    )
    assert r.returncode == 0, r.stderr
    assert "| parallel |" in r.stdout
    import json

    res = json.loads((tmp_path / "validation.json").read_text())
    assert res["n_pairs"] == 16
    assert res["readouts"]["r_cv_preferred"] > res["readouts"]["r_critical"]
    # parallel backprop points into the pasted part above chance (mask share ~ 0.1); on this
    # reduced set (4 channels, 16 pairs) the margins are small, the full demo's table is larger
    assert res["methods"]["parallel"]["pointing"] > res["chance_pointing"]
    assert res["methods"]["parallel"]["energy"] > res["chance_pointing"]
    # the deletion test detects the known answer: removing the pasted part first lowers the
    # ground truth faster than removing random blocks
    known = res["methods"]["planted mask (known answer)"]["deletion"]["ground truth"]
    assert known["area"] > 0 and known["positive"] > 0.5
    assert set(res["methods"]["parallel"]["deletion"]) == {"readout", "ground truth"}
