"""The runtime's numpy/math statistics against scipy's (scipy lives in the export environment only)."""

from __future__ import annotations

import numpy as np
import pytest

from pbv_onnx.method.stats import betainc, critical_r, p_value_r

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
