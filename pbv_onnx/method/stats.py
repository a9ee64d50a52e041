"""Per-channel statistics: NaN-aware Pearson r, critical r under rho = 0 (with an effective n of
groups), split-half reliability per category and the noise ceiling; relative L2 distance (parity checks)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import xarray as xr

# Fig. 3a's per-channel results, in the order the readouts file and the evaluation table have always had them.
METRICS = ("r_cv_preferred", "r_ooc", "reliability", "r_critical", "r_critical_ooc", "n_preferred", "n_ooc")
# Per-channel results beyond Fig. 3a's (see docs/formats.md); present where their inputs are.
STATS = (
    "reliability_preferred",
    "reliability_ooc",
    "ceiling_preferred",
    "r_cv_preferred_ceiled",
    "n_groups_preferred",
    "n_groups_ooc",
    "r_by_category",
    "n_by_category",
    "r_critical_by_category",
)


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| (0 when both are zero)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    nb = np.linalg.norm(b)
    na = np.linalg.norm(a - b)
    return float(na / nb) if nb > 0 else float(na)


def pearson_rows(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pearson r between matching rows of `a` and `b` [C, S] over the columns where both are
    finite, and the number of such columns per row. Rows with fewer than 3 pairs or zero
    variance give NaN."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    n = ok.sum(axis=1)
    a0, b0 = np.where(ok, a, 0.0), np.where(ok, b, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ma = a0.sum(1) / n
        mb = b0.sum(1) / n
        da = np.where(ok, a0 - ma[:, None], 0.0)
        db = np.where(ok, b0 - mb[:, None], 0.0)
        r = (da * db).sum(1) / np.sqrt((da * da).sum(1) * (db * db).sum(1))
    r = np.where((n >= 3) & np.isfinite(r), np.clip(r, -1.0, 1.0), np.nan)
    return r, n


def spearman_brown(r: np.ndarray | float) -> np.ndarray:
    """Reliability of the full mean from the correlation of two halves: 2r / (1 + r)."""
    r = np.asarray(r, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 2.0 * r / (1.0 + r)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 3e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(lbeta + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def p_value_r(r: float, n: int) -> float:
    """Two-sided p of a Pearson r from n pairs under rho = 0: P(|T| >= t), T ~ t(n - 2)."""
    df = n - 2
    if df < 1 or not math.isfinite(r):
        return math.nan
    # t^2 = df r^2 / (1 - r^2), and P(|T| >= t) = I_{df/(df+t^2)}(df/2, 1/2) = I_{1-r^2}(df/2, 1/2)
    return betainc(df / 2.0, 0.5, 1.0 - min(r * r, 1.0))


def _critical_r_scalar(n: int, alpha: float) -> float:
    df = n - 2
    if df < 1:
        return math.nan
    # Solve I_x(df/2, 1/2) = alpha for x = 1 - r^2; I is increasing in x, so bisect.
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if betainc(df / 2.0, 0.5, mid) < alpha:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-15:
            break
    return math.sqrt(1.0 - 0.5 * (lo + hi))


def critical_r(n: np.ndarray | int, alpha: float = 0.05) -> np.ndarray:
    """Smallest |r| significant at two-sided level `alpha` under rho = 0, for n pairs (NaN if n < 3)."""
    n_arr = np.asarray(n)
    out = np.full(n_arr.shape, np.nan)
    cache: dict[int, float] = {}
    for idx, v in np.ndenumerate(n_arr):
        v = int(v)
        if v not in cache:
            cache[v] = _critical_r_scalar(v, alpha)
        out[idx] = cache[v]
    return out if out.ndim else float(out)


def split_half_reliability(halves: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Spearman-Brown corrected correlation of the two half means [C, S] per row, and its n."""
    r_half, n_half = pearson_rows(halves[0], halves[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return spearman_brown(r_half), n_half


def noise_ceiling(reliability: np.ndarray) -> np.ndarray:
    """sqrt(reliability): the r a perfect model reaches against noisy means; NaN where reliability <= 0."""
    rel = np.asarray(reliability, np.float64)
    with np.errstate(invalid="ignore"):
        return np.where(rel > 0, np.sqrt(np.where(rel > 0, rel, 1.0)), np.nan)


def count_groups(ok: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Per row of the mask `ok` [C, S]: the number of distinct `groups` [S] among its True columns."""
    g = np.unique(np.asarray(groups).astype(str), return_inverse=True)[1].ravel()
    onehot = np.zeros((len(g), int(g.max()) + 1 if len(g) else 0), bool)
    onehot[np.arange(len(g)), g] = True
    return ((ok.astype(np.int64) @ onehot) > 0).sum(1)


def channel_metrics(
    prediction: xr.DataArray,
    heldout: np.ndarray,
    mean: xr.DataArray,
    halves: tuple[xr.DataArray, xr.DataArray] | None,
    alpha: float = 0.05,
    category: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> xr.Dataset:
    """Per-channel Fig. 3a metrics.

    `prediction` (channel, stimulus): held-out predictions for preferred stimuli (`heldout` True)
    and full-fit predictions for out-of-category stimuli (`heldout` False). `mean` (channel,
    stimulus): recorded mean responses on the same stimuli. `halves`: mean responses of the two
    halves over the same stimuli, or None. `category` [S]: stimulus categories, for the r of each
    non-preferred category. `groups` [S]: labels of related stimuli; when given, critical r uses
    the number of groups, not of stimuli, as the effective n.
    """
    heldout = np.asarray(heldout, bool)
    p = prediction.transpose("channel", "stimulus").values
    y = mean.transpose("channel", "stimulus").values
    n_ch = p.shape[0]
    r_pref, n_pref = pearson_rows(p[:, heldout], y[:, heldout])
    r_ooc, n_ooc = pearson_rows(p[:, ~heldout], y[:, ~heldout])
    nan = np.full(n_ch, np.nan)
    if halves is not None:
        h = [x.transpose("channel", "stimulus").values for x in halves]
        reliability, n_half = split_half_reliability(h)
        # within one category: the body/object difference in mean response no longer counts as signal
        rel_pref, n_half_pref = split_half_reliability([x[:, heldout] for x in h])
        rel_ooc, n_half_ooc = split_half_reliability([x[:, ~heldout] for x in h])
    else:
        reliability, rel_pref, rel_ooc = nan, nan, nan
        n_half = n_half_pref = n_half_ooc = np.zeros(n_ch, int)
    ceiling = noise_ceiling(rel_pref)
    with np.errstate(invalid="ignore", divide="ignore"):
        ceiled = r_pref / ceiling
    ok_pair = np.isfinite(p) & np.isfinite(y)
    if groups is not None:
        eff_pref = count_groups(ok_pair[:, heldout], np.asarray(groups)[heldout])
        eff_ooc = count_groups(ok_pair[:, ~heldout], np.asarray(groups)[~heldout])
    else:
        eff_pref, eff_ooc = n_pref, n_ooc
    ch = prediction["channel"].values
    ds = xr.Dataset(
        {
            "r_cv_preferred": ("channel", r_pref),
            "r_ooc": ("channel", r_ooc),
            "reliability": ("channel", reliability),
            "reliability_preferred": ("channel", rel_pref),
            "reliability_ooc": ("channel", rel_ooc),
            "ceiling_preferred": ("channel", ceiling),
            "r_cv_preferred_ceiled": ("channel", ceiled),
            "r_critical": ("channel", critical_r(eff_pref, alpha)),
            "r_critical_ooc": ("channel", critical_r(eff_ooc, alpha)),
            "n_preferred": ("channel", n_pref.astype(np.int64)),
            "n_ooc": ("channel", n_ooc.astype(np.int64)),
            "n_reliability": ("channel", np.asarray(n_half, np.int64)),
            "n_reliability_preferred": ("channel", np.asarray(n_half_pref, np.int64)),
            "n_reliability_ooc": ("channel", np.asarray(n_half_ooc, np.int64)),
        },
        coords={"channel": ch},
        attrs={"r_critical_n": "groups" if groups is not None else "stimuli"},
    )
    if groups is not None:
        ds["n_groups_preferred"] = ("channel", np.asarray(eff_pref, np.int64))
        ds["n_groups_ooc"] = ("channel", np.asarray(eff_ooc, np.int64))
    if category is not None:
        cats = np.asarray(category).astype(str)
        others = list(dict.fromkeys(cats[~heldout]))  # in order of first appearance
        r_cat = np.full((n_ch, len(others)), np.nan)
        n_cat = np.zeros((n_ch, len(others)), np.int64)
        crit_cat = np.full((n_ch, len(others)), np.nan)
        for j, c in enumerate(others):
            m = cats == c
            r_cat[:, j], n_cat[:, j] = pearson_rows(p[:, m], y[:, m])
            eff = count_groups(ok_pair[:, m], np.asarray(groups)[m]) if groups is not None else n_cat[:, j]
            crit_cat[:, j] = critical_r(eff, alpha)
        dims = ("channel", "ooc_category")
        ds = ds.assign_coords(ooc_category=("ooc_category", np.asarray(others, dtype=str)))
        ds["r_by_category"] = (dims, r_cat)
        ds["n_by_category"] = (dims, n_cat)
        ds["r_critical_by_category"] = (dims, crit_cat)
    return ds


def clustered_bootstrap(
    values: np.ndarray,
    groups: np.ndarray,
    rng: np.random.Generator,
    samples: int = 2000,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean of the finite `values` and its percentile interval from a bootstrap that
    resamples whole `groups` (e.g. source photos) with replacement, so related values move together.

    Each resample's statistic is the mean over every value of the drawn groups (a group drawn twice
    counts twice). NaN values are dropped first; (NaN, NaN, NaN) if none is left."""
    v = np.asarray(values, np.float64).ravel()
    g = np.asarray(groups).astype(str).ravel()
    if v.shape != g.shape:
        raise ValueError(f"values and groups differ in length ({v.size} vs {g.size})")
    ok = np.isfinite(v)
    v, g = v[ok], g[ok]
    if v.size == 0:
        return math.nan, math.nan, math.nan
    ids = np.unique(g, return_inverse=True)[1].ravel()
    n_g = int(ids.max()) + 1
    sums = np.bincount(ids, weights=v, minlength=n_g)
    counts = np.bincount(ids, minlength=n_g).astype(np.float64)
    draws = rng.integers(0, n_g, (samples, n_g))
    # times[s, g]: how often resample s drew group g
    times = np.bincount((draws + n_g * np.arange(samples)[:, None]).ravel(), minlength=samples * n_g)
    times = times.reshape(samples, n_g).astype(np.float64)
    stat = (times @ sums) / (times @ counts)
    tail = 100 * (1 - level) / 2
    return float(v.mean()), float(np.percentile(stat, tail)), float(np.percentile(stat, 100 - tail))


def binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided p of k successes in n trials at p = 1/2: min(1, 2 P(X <= min(k, n - k)))."""
    if n <= 0:
        return 1.0
    m = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(m + 1)) / 2.0**n
    return float(min(1.0, 2.0 * tail))


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """McNemar's test of two paired binary outcomes (e.g. two methods' pointing hits on the same pairs):
    the exact binomial test on the discordant pairs. Returns {"a_only", "b_only", "n", "p"}."""
    a, b = np.asarray(a, bool).ravel(), np.asarray(b, bool).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes differ in length ({a.size} vs {b.size})")
    a_only, b_only = int((a & ~b).sum()), int((b & ~a).sum())
    return {"a_only": a_only, "b_only": b_only, "n": int(a.size), "p": binomial_two_sided(a_only, a_only + b_only)}
