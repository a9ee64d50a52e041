"""Fig. 3a statistics: split-half reliability, critical r, Pearson r, and the evaluation folder."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import xarray as xr
from PIL import Image

from pbv_onnx.base.errors import MismatchError, OutputError
from pbv_onnx.data.responses import make_responses, mean_response, split_halves
from pbv_onnx.method.stats import channel_metrics, critical_r, p_value_r, pearson_rows, spearman_brown
from pbv_onnx.workflows.evaluate import evaluate, write_report


def simulated_reliability(signal_sd, noise_sd, reps, n_stim=3000, phases=False, seed=0):
    rng = np.random.default_rng(seed)
    c = len(signal_sd)
    signal = rng.standard_normal((c, n_stim)) * np.asarray(signal_sd)[:, None] + 20
    trials = signal[..., None] + rng.standard_normal((c, n_stim, reps)) * np.asarray(noise_sd)[:, None, None]
    ds = make_responses(
        trials,
        range(c),
        range(n_stim),
        ["body"] * n_stim,
        phase=(["a"] * (reps // 2) + ["b"] * (reps - reps // 2)) if phases else None,
    )
    pred = xr.DataArray(
        np.zeros((c, n_stim)),
        dims=("channel", "stimulus"),
        coords={"channel": ds["channel"], "stimulus": ds["stimulus"]},
    )
    return channel_metrics(pred, np.ones(n_stim, bool), mean_response(ds), split_halves(ds))["reliability"].values


@pytest.mark.parametrize("phases", [False, True])
def test_split_half_reliability_matches_its_analytic_value(phases):
    signal_sd = np.array([1.0, 1.0, 2.0, 0.5])
    noise_sd = np.array([1.0, 3.0, 2.0, 2.0])
    reps = 8
    rel = simulated_reliability(signal_sd, noise_sd, reps, phases=phases)
    # the mean of `reps` trials has noise variance sigma_n^2 / reps
    expected = signal_sd**2 / (signal_sd**2 + noise_sd**2 / reps)
    # sampling sd of a half-correlation over 3000 stimuli is below (1 - r^2) / sqrt(3000) < 0.02
    np.testing.assert_allclose(rel, expected, atol=0.04)
    assert np.abs(rel - expected).mean() < 0.02


def test_spearman_brown_is_the_reliability_of_the_doubled_test():
    # the correlation of two single halves with reliability rho is rho; doubled: 2 rho / (1 + rho)
    rho = np.array([0.1, 0.5, 0.9])
    sb = spearman_brown(rho)
    var_s, var_n = rho, 1 - rho  # half tests with unit variance
    np.testing.assert_allclose(sb, var_s / (var_s + var_n / 2))


def test_critical_r_has_closed_forms_for_small_n():
    # df = 1: P(|T| > t) = 1 - 2 atan(t) / pi, so r = sin(pi (1 - a) / 2); df = 2: r = 1 - a
    for a in (0.05, 0.01):
        assert critical_r(3, a) == pytest.approx(math.sin(math.pi * (1 - a) / 2), abs=1e-9)
        assert critical_r(4, a) == pytest.approx(1 - a, abs=1e-9)
    assert np.isnan(critical_r(2))


def test_critical_r_rejects_five_percent_of_null_correlations():
    rng = np.random.default_rng(0)
    for n in (10, 40):
        a = rng.standard_normal((40000, n))
        b = rng.standard_normal((40000, n))
        r, _ = pearson_rows(a, b)
        rate = np.mean(np.abs(r) >= critical_r(n))
        assert rate == pytest.approx(0.05, abs=0.005)  # binomial sd ~0.0011
        assert p_value_r(float(critical_r(n)), n) == pytest.approx(0.05, rel=1e-6)


def test_critical_r_approaches_the_fisher_approximation_for_large_n():
    n = 2000
    assert critical_r(n) == pytest.approx(math.tanh(1.959964 / math.sqrt(n - 3)), rel=2e-3)


def test_pearson_rows_ignore_missing_values_per_row():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((3, 50))
    b = a + rng.standard_normal((3, 50))
    a[1, :10] = np.nan
    r, n = pearson_rows(a, b)
    assert list(n) == [50, 40, 50]
    assert r[1] == pytest.approx(np.corrcoef(a[1, 10:], b[1, 10:])[0, 1])
    assert r[0] == pytest.approx(np.corrcoef(a[0], b[0])[0, 1])
    r, _ = pearson_rows(np.ones((1, 5)), b[:1, :5])
    assert np.isnan(r[0])


@pytest.fixture()
def readouts_and_responses():
    """Stored predictions plus the recordings they are compared with (no model needed)."""
    rng = np.random.default_rng(2)
    c, nb, no, reps = 3, 30, 20, 4
    signal = rng.standard_normal((c, nb + no))
    trials = signal[..., None] + 0.5 * rng.standard_normal((c, nb + no, reps))
    cats = ["body"] * nb + ["object"] * no
    ds = make_responses(
        trials, ["x", "y", "z"], [f"s{i}" for i in range(nb + no)], cats, region=["a", "a", "b"], preferred="body"
    )
    pred = signal + 0.3 * rng.standard_normal(signal.shape)
    ro = xr.Dataset(
        {"prediction": (("channel", "stimulus"), pred), "alpha": ("channel", [0.1, 1.0, 10.0])},
        coords={
            "channel": ["x", "y", "z"],
            "stimulus": ds["stimulus"].values,
            "heldout": ("stimulus", np.array(cats) == "body"),
            "region": ("channel", ["a", "a", "b"]),
        },
        attrs={"preferred_category": "body", "arch": "tiny", "layer": "l"},
    )
    return ro, ds, pred, trials


def test_evaluate_recomputes_each_r_from_predictions_and_recordings(readouts_and_responses):
    ro, ds, pred, trials = readouts_and_responses
    table = evaluate(ro, ds)
    mean = trials.mean(-1)
    for i in range(3):
        assert table["r_cv_preferred"].values[i] == pytest.approx(np.corrcoef(pred[i, :30], mean[i, :30])[0, 1])
        assert table["r_ooc"].values[i] == pytest.approx(np.corrcoef(pred[i, 30:], mean[i, 30:])[0, 1])
        half = np.corrcoef(trials[i, :, 0::2].mean(-1), trials[i, :, 1::2].mean(-1))[0, 1]
        assert table["reliability"].values[i] == pytest.approx(2 * half / (1 + half))
    assert table["r_critical"].values[0] == pytest.approx(critical_r(30))
    assert table["r_critical_ooc"].values[0] == pytest.approx(critical_r(20))


def test_evaluation_folder_holds_table_netcdf_and_figure(readouts_and_responses, tmp_path):
    ro, ds, _, _ = readouts_and_responses
    table = evaluate(ro, ds)
    out = write_report(table, tmp_path / "eval")
    with open(out / "channels.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["channel"] for r in rows] == ["x", "y", "z"]
    assert float(rows[1]["r_ooc"]) == pytest.approx(float(table["r_ooc"].values[1]), rel=1e-5)
    assert rows[2]["region"] == "b"
    back = xr.open_dataset(out / "channels.nc", engine="h5netcdf").load()
    np.testing.assert_allclose(back["reliability"].values, table["reliability"].values)
    with Image.open(out / "fig3a.png") as im:
        assert im.size[0] > 300 and im.size[1] > 200
    with pytest.raises(OutputError, match="already exists"):
        write_report(table, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]


def test_evaluate_refuses_responses_of_other_stimuli_or_channels(readouts_and_responses):
    ro, ds, _, _ = readouts_and_responses
    with pytest.raises(MismatchError, match="stimuli"):
        evaluate(ro, ds.isel(stimulus=slice(1, None)), responses_path="r.nc")
    with pytest.raises(MismatchError, match="channels"):
        evaluate(ro, ds.isel(channel=[0, 1]), responses_path="r.nc")
    relabelled = ds.assign_coords(category=("stimulus", ["object"] + list(ds["category"].values[1:])))
    with pytest.raises(MismatchError, match="'body' stimuli differ"):
        evaluate(ro, relabelled, responses_path="r.nc")
