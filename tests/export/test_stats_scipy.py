"""The runtime's numpy/math statistics against scipy's (scipy lives in the export environment only)."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from pbv_onnx.method.stats import betainc, channel_metrics, critical_r, p_value_r

stats = pytest.importorskip("scipy.stats")
special = pytest.importorskip("scipy.special")


@pytest.mark.parametrize("n", [3, 4, 5, 8, 12, 30, 100, 500, 5000])
@pytest.mark.parametrize("alpha", [0.05, 0.01])
def test_critical_r_equals_the_t_quantile_transform(n, alpha):
    df = n - 2
    t = stats.t.ppf(1 - alpha / 2, df)
    assert critical_r(n, alpha) == pytest.approx(t / np.sqrt(df + t * t), rel=1e-9)


@pytest.mark.parametrize("n", [5, 20, 200])
def test_p_value_of_r_equals_scipy_pearsonr(n):
    rng = np.random.default_rng(n)
    a = rng.standard_normal(n)
    b = 0.2 * a + rng.standard_normal(n)
    res = stats.pearsonr(a, b)
    assert p_value_r(float(res.statistic), n) == pytest.approx(res.pvalue, rel=1e-8)


def test_incomplete_beta_equals_scipy():
    for a, b, x in [(0.5, 0.5, 0.3), (2.0, 0.5, 0.9), (50.0, 0.5, 0.95), (1.5, 3.0, 0.01)]:
        assert betainc(a, b, x) == pytest.approx(special.betainc(a, b, x), rel=1e-10)


def test_critical_r_with_groups_uses_the_number_of_groups_as_n():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 6, 17)  # 17 groups of 1-5 stimuli
    groups = np.repeat([f"g{i}" for i in range(17)], sizes)
    n = len(groups)
    coords = {"channel": ["a"], "stimulus": np.arange(n)}
    pred = xr.DataArray(rng.standard_normal((1, n)), dims=("channel", "stimulus"), coords=coords)
    mean = xr.DataArray(rng.standard_normal((1, n)), dims=("channel", "stimulus"), coords=coords)
    m = channel_metrics(pred, np.ones(n, bool), mean, None, groups=groups)
    t = stats.t.ppf(0.975, 17 - 2)
    assert float(m["r_critical"].values[0]) == pytest.approx(t / np.sqrt(17 - 2 + t * t), rel=1e-9)
    t = stats.t.ppf(0.975, n - 2)
    plain = channel_metrics(pred, np.ones(n, bool), mean, None)
    assert float(plain["r_critical"].values[0]) == pytest.approx(t / np.sqrt(n - 2 + t * t), rel=1e-9)


@pytest.mark.parametrize("a_only,b_only", [(0, 0), (0, 7), (3, 9), (12, 12), (20, 45), (1, 120)])
def test_mcnemar_equals_scipy_exact_binomial_test(a_only, b_only):
    from pbv_onnx.method.stats import mcnemar_exact

    both = 5
    a = np.array([True] * a_only + [False] * b_only + [True] * both + [False] * 4)
    b = np.array([False] * a_only + [True] * b_only + [True] * both + [False] * 4)
    t = mcnemar_exact(a, b)
    n = a_only + b_only
    ref = 1.0 if n == 0 else stats.binomtest(a_only, n, 0.5, alternative="two-sided").pvalue
    assert (t["a_only"], t["b_only"]) == (a_only, b_only)
    assert t["p"] == pytest.approx(ref, rel=1e-10)


def test_clustered_bootstrap_matches_scipy_resampling_whole_groups():
    """scipy.stats.bootstrap with paired (group sum, group size) arrays resamples groups: the same interval
    of the pooled mean, up to Monte Carlo error."""
    from pbv_onnx.method.stats import clustered_bootstrap

    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 8, 25)
    effects = rng.normal(0, 1, 25)
    groups = np.repeat(np.arange(25), sizes)
    values = effects[groups] + 0.3 * rng.normal(size=groups.size)
    mean, lo, hi = clustered_bootstrap(values, groups, np.random.default_rng(1), 20000)
    sums = np.bincount(groups, weights=values)
    counts = np.bincount(groups).astype(float)
    ref = stats.bootstrap(
        (sums, counts),
        lambda s, c, axis=-1: s.sum(axis=axis) / c.sum(axis=axis),
        paired=True,
        vectorized=True,
        n_resamples=20000,
        method="percentile",
        random_state=2,
    ).confidence_interval
    width = ref.high - ref.low
    assert mean == pytest.approx(values.mean())
    assert lo == pytest.approx(ref.low, abs=0.03 * width) and hi == pytest.approx(ref.high, abs=0.03 * width)
