"""Synthetic body-selective channels with a known answer, from a spatial feature map of the backbone.

The ground truth is deliberately not the readout a user fits: it reads the spatial map
`phi_gt` [F, h, w] of a block of the backbone (by default the very layer the readouts are fitted
on, so that the features that drive a channel are in the model's reach, as the paper's object
correlations, Fig. 3a, suggest they are for real neurons), but uses a sparse set of K features,
pools over space and is nonlinear, where the readout is a dense, position-specific linear map
fitted on noisy responses to bodies only. For channel n, with feature indices k_1..k_K and
positive coefficients a:

    m_n(x)[y, x'] = relu(sum_j a_j phi_gt_kj(x)[y, x'])              a local body-part detector map
    g_n(x)        = (mean_yx m_n(x)^p)^(1/p)                          a soft-max spatial pool
    rate_n(x)     = base_n + gain_n * softplus_tau(g_n(x) - theta_n)  a rectifying nonlinearity

Trials add Gaussian noise (sd grows with the rate) and the second recording phase has its own gain
and offset. The K features are drawn from those that best separate body-part locations in body
photos (the hand-drawn part boxes) from all locations in object photos, so a body part pasted into
an object drives the channel where it is pasted: the local map `m_n` is the known answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import xarray as xr

from pbv_onnx.base.errors import UsageError
from pbv_onnx.demo.stimuli import Stimulus

REGIONS = ("MSB", "ASB")
# Per region: features per channel, size of the feature pool they are drawn from, pooling
# exponent p, trial-noise scale. Two regions, two kinds of neuron.
REGION_PARAMS = {"MSB": dict(k=6, pool=12, power=4.0, noise=1.5), "ASB": dict(k=4, pool=16, power=2.0, noise=2.0)}
N_REPETITIONS = 6  # three per recording phase
THRESHOLD_QUANTILE = 40  # theta: this percentile of the drive over plain object photos


@dataclass(frozen=True)
class GroundTruth:
    """The generative model of every channel (arrays over channel, and channel x term)."""

    channel: np.ndarray  # ids
    region: np.ndarray
    feature: np.ndarray  # [C, K] indices into the ground-truth layer's channels (-1: unused)
    coef: np.ndarray  # [C, K]
    power: np.ndarray  # [C]
    theta: np.ndarray
    tau: np.ndarray
    gain: np.ndarray
    base: np.ndarray
    noise: np.ndarray
    phase_gain: np.ndarray  # second phase: rate * phase_gain + phase_offset
    phase_offset: np.ndarray
    scores: np.ndarray  # [F] body-part selectivity of every ground-truth feature

    def to_dataset(self, attrs: dict | None = None) -> xr.Dataset:
        c = ("channel",)
        return xr.Dataset(
            {
                "feature": (("channel", "term"), self.feature),
                "coef": (("channel", "term"), self.coef),
                "power": (c, self.power),
                "theta": (c, self.theta),
                "tau": (c, self.tau),
                "gain": (c, self.gain),
                "base": (c, self.base),
                "noise": (c, self.noise),
                "phase_gain": (c, self.phase_gain),
                "phase_offset": (c, self.phase_offset),
                "part_score": (("gt_feature",), self.scores),
            },
            coords={"channel": self.channel, "region": (c, self.region)},
            attrs=attrs or {},
        )

    @classmethod
    def from_dataset(cls, ds: xr.Dataset) -> "GroundTruth":
        v = {
            k: ds[k].values
            for k in ("feature", "coef", "power", "theta", "tau", "gain", "base", "noise", "phase_gain", "phase_offset")
        }
        return cls(
            channel=ds["channel"].values, region=ds["region"].values.astype(str), scores=ds["part_score"].values, **v
        )


def box_cells(box: tuple[int, int, int, int], size: int, grid: tuple[int, int]) -> np.ndarray:
    """Boolean [h, w] of the feature-map cells whose area lies at least half inside `box`."""
    h, w = grid
    x0, y0, x1, y1 = box
    ys = np.clip(
        (np.minimum((np.arange(h) + 1) * size / h, y1) - np.maximum(np.arange(h) * size / h, y0)) / (size / h), 0, 1
    )
    xs = np.clip(
        (np.minimum((np.arange(w) + 1) * size / w, x1) - np.maximum(np.arange(w) * size / w, x0)) / (size / w), 0, 1
    )
    return np.outer(ys, xs) >= 0.5


def dprime(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """(mean_pos - mean_neg) / pooled sd, per column."""
    var = 0.5 * (pos.var(0) + neg.var(0))
    return (pos.mean(0) - neg.mean(0)) / np.sqrt(var + 1e-12)


def part_scores(feats: np.ndarray, table: Sequence[Stimulus], size: int) -> np.ndarray:
    """Body-part selectivity of each ground-truth feature: d' of its activation at body-part
    locations of body photos against all locations of plain object photos. Planted objects are
    not used, so they stay a test."""
    F, h, w = feats.shape[1:]
    pos, neg = [], []
    for i, s in enumerate(table):
        if s.category == "body" and s.body_box is not None:
            cells = box_cells(s.body_box, size, (h, w))
            if cells.any():
                pos.append(feats[i][:, cells].T)
        elif s.kind == "object":
            neg.append(feats[i].reshape(F, -1).T)
    if not pos or not neg:
        raise UsageError(None, "ground truth needs body photos with part boxes and plain object photos")
    return dprime(np.concatenate(pos), np.concatenate(neg))


def local_maps(gt: GroundTruth, feats: np.ndarray) -> np.ndarray:
    """m_n(x): [C, N, h, w], each channel's rectified body-part detector map."""
    out = np.empty((len(gt.channel), feats.shape[0], *feats.shape[2:]))
    for n in range(len(gt.channel)):
        use = gt.feature[n] >= 0
        out[n] = np.maximum(np.einsum("k,nkyx->nyx", gt.coef[n][use], feats[:, gt.feature[n][use]]), 0)
    return out


def drive(gt: GroundTruth, feats: np.ndarray) -> np.ndarray:
    """g_n(x): [C, N], the soft-max pooled local map."""
    m = local_maps(gt, feats)
    p = gt.power[:, None, None, None]
    return np.mean(m**p, axis=(2, 3)) ** (1.0 / gt.power[:, None])


def softplus(z: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, z)


def mean_rate(gt: GroundTruth, feats: np.ndarray) -> np.ndarray:
    """The noiseless first-phase rate [C, N]."""
    g = drive(gt, feats)
    tau = gt.tau[:, None]
    return gt.base[:, None] + gt.gain[:, None] * tau * softplus((g - gt.theta[:, None]) / tau)


def design_channels(
    feats: np.ndarray,
    table: Sequence[Stimulus],
    size: int,
    n_channels: int = 16,
    seed: int = 0,
    target_rate: tuple[float, float] = (25.0, 50.0),
) -> GroundTruth:
    """Draw `n_channels` channels, half per region, from the body-part-selective features, and
    calibrate threshold and gain on this stimulus set (objects mostly below threshold, a mean
    body response of `target_rate` spikes/s)."""
    if feats.ndim != 4:
        raise UsageError(
            None, "the ground-truth model must keep its spatial map (export it with pool=none)", param="pool"
        )
    if n_channels < 2:
        raise UsageError(None, f"n_channels must be at least 2, not {n_channels}", param="n_channels")
    rng = np.random.default_rng(seed)
    scores = part_scores(feats, table, size)
    order = np.argsort(-scores, kind="stable")
    C = n_channels
    region = np.array([REGIONS[0] if n < (C + 1) // 2 else REGIONS[1] for n in range(C)])
    K = max(p["k"] for p in REGION_PARAMS.values())
    feature = np.full((C, K), -1, np.int64)
    coef = np.zeros((C, K))
    power = np.empty(C)
    noise = np.empty(C)
    for n in range(C):
        prm = REGION_PARAMS[region[n]]
        pool = order[: min(prm["pool"], len(order))]
        k = min(prm["k"], len(pool))
        feature[n, :k] = rng.choice(pool, k, replace=False)
        coef[n, :k] = rng.uniform(0.5, 1.5, k)
        power[n] = prm["power"]
        noise[n] = prm["noise"]
    ids = np.array([f"{region[n]}{(n if n < (C + 1) // 2 else n - (C + 1) // 2) + 1:02d}" for n in range(C)])
    zeros = np.zeros(C)
    gt = GroundTruth(
        ids, region, feature, coef, power, zeros, np.ones(C), np.ones(C), zeros, noise, np.ones(C), zeros, scores
    )
    g = drive(gt, feats)
    body = np.array([s.category == "body" for s in table])
    obj = np.array([s.kind == "object" for s in table])
    theta = np.percentile(g[:, obj], THRESHOLD_QUANTILE, axis=1)
    tau = np.maximum(g[:, body].std(1) / 2, 1e-6)
    base = rng.uniform(3.0, 8.0, C)
    lifted = tau[:, None] * softplus((g - theta[:, None]) / tau[:, None])
    gain = rng.uniform(*target_rate, C) / np.maximum(lifted[:, body].mean(1), 1e-9)
    return GroundTruth(
        ids,
        region,
        feature,
        coef,
        power,
        theta,
        tau,
        gain,
        base,
        noise,
        rng.uniform(0.8, 1.0, C),
        rng.uniform(0.0, 3.0, C),
        scores,
    )


def simulate(
    gt: GroundTruth, feats: np.ndarray, n_repetitions: int = N_REPETITIONS, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Trial responses [C, N, R] (non-negative) and the phase label of each repetition."""
    if n_repetitions < 2:
        raise UsageError(None, "at least two repetitions (one per recording phase)")
    rng = np.random.default_rng(seed + 1)
    rate = mean_rate(gt, feats)
    phase = np.array(["1" if r < n_repetitions // 2 else "2" for r in range(n_repetitions)])
    out = np.empty((*rate.shape, n_repetitions))
    for r in range(n_repetitions):
        mu = rate if phase[r] == "1" else rate * gt.phase_gain[:, None] + gt.phase_offset[:, None]
        sd = gt.noise[:, None] * np.sqrt(mu) + 1.0
        out[..., r] = np.maximum(mu + sd * rng.standard_normal(mu.shape), 0.0)
    return out, phase
