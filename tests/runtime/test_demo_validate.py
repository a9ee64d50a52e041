"""Validation metrics on hand-built maps with a known answer, and the demo end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pbv_onnx.demo import validate as v
from pbv_onnx.images import Preprocessing

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


def test_area_between_curves_matches_the_integral():
    f = np.linspace(0, 1, 11)
    # salient drops linearly to 0, random stays at 1: area 1/2; scale divides
    assert v.area_between(f, 1 - f, np.ones_like(f)) == pytest.approx(0.5)
    assert v.area_between(f, 1 - f, np.ones_like(f), scale=2.0) == pytest.approx(0.25)
    assert v.area_between(f, np.ones_like(f), np.ones_like(f)) == 0.0


def test_deletion_by_the_true_map_beats_random_on_a_known_model():
    """A 'model' that sums the pixels of region A: deleting A first drops it fastest."""
    rng = np.random.default_rng(1)
    img = rng.uniform(0.5, 1.0, (3, 16, 16)).astype(np.float32)
    region = square_mask(16, (2, 3, 8, 9))
    predict = lambda x: (x[:, :, region]).sum(axis=(1, 2))  # noqa: E731
    fr = np.asarray(v.DELETION_FRACTIONS)
    fill = np.zeros_like(img)
    good, rand = v.deletion_orders(region.astype(float), rng)
    bad, _ = v.deletion_orders((~region).astype(float), rng)
    r_good = predict(v.deleted_images(img, good, fr, fill))
    r_rand = predict(v.deleted_images(img, rand, fr, fill))
    r_bad = predict(v.deleted_images(img, bad, fr, fill))
    assert v.area_between(fr, r_good, r_rand) > 0 > v.area_between(fr, r_bad, r_rand)


def test_mask_follows_the_model_resize():
    mask = square_mask(40, (10, 20, 30, 40))
    spec = Preprocessing(resize=(20, 20), crop=None, mean=(0.5,) * 3, std=(0.5,) * 3)
    np.testing.assert_array_equal(v.mask_to_input(mask, spec), square_mask(20, (5, 10, 15, 20)))


# -- end to end on a reduced stimulus set, through the installed CLI ------------------------------

def _demo_models():
    for folder in (ROOT / "build" / "demo", ROOT / "build" / "models"):
        fit = folder / "mobilenet_v2-features.18.onnx"
        gt = folder / "mobilenet_v2-features.14.onnx"
        if fit.is_file() and gt.is_file():
            return fit, gt
    return None


def pbv(*args):
    return subprocess.run([str(PBV), *map(str, args)], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_reduced_demo_runs_through_the_cli_and_finds_the_planted_parts(tmp_path):
    models = _demo_models()
    if models is None:
        pytest.skip("no exported demo models (mobilenet_v2-features.18/14.onnx) in build/demo or "
                    "build/models; run `make demo` first")
    fit_model, gt_model = models
    exp = tmp_path / "exp"
    # the gt model must sit beside the experiment for the ceiling row; link it
    (tmp_path / gt_model.name).symlink_to(gt_model)
    r = pbv("demo", "build", "--gt-model", gt_model, "--out", exp, "--bodies", 40, "--objects", 12,
            "--planted", 16, "--channels", 4, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    r = pbv("fit", "--model", fit_model, "--responses", exp / "responses.nc", "--out", tmp_path / "ro.nc",
            "--device", "cpu")
    assert r.returncode == 0, r.stderr
    import xarray as xr
    ds = xr.open_dataset(exp / "responses.nc", engine="h5netcdf")
    mean = ds["response"].mean("repetition").values
    body = ds["category"].values.astype(str) == "body"
    assert (mean[:, body].mean(1) > 1.5 * mean[:, ~body].mean(1)).all()  # body-selective
    r = pbv("demo", "validate", "--model", fit_model, "--readouts", tmp_path / "ro.nc", "--experiment", exp,
            "--out", tmp_path / "validation.md", "--method", "parallel", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "| parallel |" in r.stdout
    import json
    res = json.loads((tmp_path / "validation.json").read_text())
    assert res["n_pairs"] == 16
    assert res["readouts"]["r_cv_preferred"] > res["readouts"]["r_critical"]
    # parallel backprop points into the pasted part well above chance (mask share ~ 0.1)
    assert res["methods"]["parallel"]["pointing"] > 2 * res["chance_pointing"]
    assert res["methods"]["parallel"]["energy"] > res["chance_pointing"]
    assert res["similarity"]["all"]["hit_rate"] > res["similarity"]["all"]["chance"]
