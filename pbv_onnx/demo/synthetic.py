"""Synthetic body-selective channels with a known answer, on the readout's own feature space.

The ground truth reads the unpooled feature map phi [F, h, w] of the model the readouts are fitted on
(the demo: MobileNetV2 features.18, [1280, 7, 7]) through a sparse linear map w* that is the same at
every position, followed by a rectifying nonlinearity:

    u_n(x)    = sum_c a_(n,c) sum_p phi_(c,p)(x)          w*_(n,c,p) = a_(n,c) for every position p
    r_GT,n(x) = base_n + gain_n * (tau_n * softplus((u_n(x) - theta_n) / tau_n)) ** RATE_EXPONENT

so a part drives a channel wherever it is pasted, and a linear readout on phi can represent w*
exactly (cos(w_hat, w*) separates readout error from method error). Each channel reads
FEATURES_PER_CHANNEL features of EACH of two part families ("face": human faces and heads;
"animal": animal and bird heads), drawn from per-family pools of (up to) POOL features chosen by
spatial selectivity: the smallest of three d' of the feature's activation in part cells (cells at
least half inside the part box) of that family's body stimuli, against the non-part cells (no
overlap with the box) of every body stimulus, against every cell of plain object stimuli, and
against the part cells of the other family's bodies; it must be positive. A feature active (above
ACTIVE_FRACTION of its mean part-cell activation) in more than OBJECT_ACTIVE_MAX of plain objects'
cells is not eligible. Planted, swap, decoy and reference stimuli are never used to choose
features, so they stay a test. Each family's coefficients are scaled so that its drive averages 1
over that family's bodies (both families drive every channel alike); theta_n is the
THRESHOLD_QUANTILE-th percentile of u_n over plain objects (so 10% of plain objects are above it);
tau_n half the SD of u_n over bodies; the exponent RATE_EXPONENT < 1 compresses strong responses, as
firing rates saturate. Trials add Gaussian noise (sd grows with the rate); the second recording
phase has its own gain and offset.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import xarray as xr

from pbv_onnx.base.errors import InputDataError, UsageError
from pbv_onnx.demo.sources import FAMILIES
from pbv_onnx.demo.stimuli import Stimulus

REGIONS = ("MSB", "ASB")
REGION_NOISE = {"MSB": 1.5, "ASB": 2.0}  # trial-noise scale per region
POOL = 8  # features per family eligible for the channels
FEATURES_PER_CHANNEL = 4  # per family
OBJECT_ACTIVE_MAX = 0.05  # sparsity gate: at most this fraction of plain objects' cells active
ACTIVE_FRACTION = 0.5  # "active": above this fraction of the feature's mean part-cell activation
THRESHOLD_QUANTILE = 90  # theta: this percentile of the drive over plain objects
RATE_EXPONENT = 0.5  # compressive above threshold, as firing rates saturate: strong bodies differ less
N_REPETITIONS = 6  # three per recording phase
GATE_RISE_SD = 2.0  # a planted part must raise r_GT by this many SD of body responses
GATE_LOST = 0.7  # and deleting it must remove this fraction of the rise
GROUND_TRUTH = "ground_truth.nc"
GATE = "gate.csv"


@dataclass(frozen=True)
class GroundTruth:
    """The generative model of every channel (arrays over channel, and channel x term)."""

    channel: np.ndarray  # ids
    region: np.ndarray
    feature: np.ndarray  # [C, K] feature-map channel indices c of w* (K = 2 * FEATURES_PER_CHANNEL)
    coef: np.ndarray  # [C, K] a_(n,c), the same at every position
    family: np.ndarray  # [C, K] the family each term was chosen for
    theta: np.ndarray  # [C]
    tau: np.ndarray
    gain: np.ndarray
    base: np.ndarray
    noise: np.ndarray
    phase_gain: np.ndarray  # second phase: rate * phase_gain + phase_offset
    phase_offset: np.ndarray
    feature_shape: tuple[int, int, int]  # (F, h, w) of phi
    selectivity: np.ndarray  # [family, F] d' of every feature for every family
    object_active: np.ndarray  # [family, F] fraction of plain objects' cells where it is active
    pool: np.ndarray  # [family, POOL] the eligible features of each family (-1: fewer)

    def to_dataset(self, attrs: dict | None = None) -> xr.Dataset:
        c = ("channel",)
        return xr.Dataset(
            {
                "feature": (("channel", "term"), self.feature),
                "coef": (("channel", "term"), self.coef),
                "term_family": (("channel", "term"), self.family.astype(str)),
                "theta": (c, self.theta),
                "tau": (c, self.tau),
                "gain": (c, self.gain),
                "base": (c, self.base),
                "noise": (c, self.noise),
                "phase_gain": (c, self.phase_gain),
                "phase_offset": (c, self.phase_offset),
                "selectivity": (("family", "gt_feature"), self.selectivity),
                "object_active": (("family", "gt_feature"), self.object_active),
                "pool": (("family", "pool_rank"), self.pool),
            },
            coords={"channel": self.channel, "region": (c, self.region), "family": list(FAMILIES)},
            attrs={**(attrs or {}), "gt_feature_shape": list(self.feature_shape)},
        )

    @classmethod
    def from_dataset(cls, ds: xr.Dataset) -> "GroundTruth":
        v = {
            k: ds[k].values
            for k in ("feature", "coef", "theta", "tau", "gain", "base", "noise", "phase_gain", "phase_offset")
        }
        v.update({k: ds[k].values for k in ("selectivity", "object_active", "pool")})
        return cls(
            channel=ds["channel"].values,
            region=ds["region"].values.astype(str),
            family=ds["term_family"].values.astype(str),
            feature_shape=tuple(int(s) for s in np.atleast_1d(ds.attrs["gt_feature_shape"])),
            **v,
        )

    def family_features(self, family: str) -> np.ndarray:
        """The pool of features chosen for `family`."""
        p = self.pool[list(FAMILIES).index(family)]
        return p[p >= 0]

    def w_star(self) -> np.ndarray:
        """w* [C, F*h*w] (float64), flattened like the readouts' feature dimension (c major, then y, x)."""
        F, h, w = self.feature_shape
        out = np.zeros((len(self.channel), F, h * w))
        for n in range(len(self.channel)):
            for c, a in zip(self.feature[n], self.coef[n]):
                if c >= 0:
                    out[n, c] += a
        return out.reshape(len(self.channel), -1)


def load_ground_truth(folder: str | os.PathLike) -> GroundTruth:
    """The ground truth of an experiment folder built by `pbv-onnx demo build`."""
    path = Path(folder) / GROUND_TRUTH
    if not path.is_file():
        raise InputDataError(path, "ground truth not found (build the demo first: pbv-onnx demo build)")
    with xr.open_dataset(path, engine="h5netcdf") as ds:
        try:
            return GroundTruth.from_dataset(ds.load())
        except KeyError as exc:
            raise InputDataError(path, f"not a ground truth of this version (missing {exc})") from None


# -- feature choice -------------------------------------------------------------------------------


def box_overlap(box: tuple[int, int, int, int], size: int, grid: tuple[int, int]) -> np.ndarray:
    """[h, w] fraction of each feature-map cell's area that lies inside `box` (image of side `size`)."""
    h, w = grid
    x0, y0, x1, y1 = box
    ys = np.clip(
        (np.minimum((np.arange(h) + 1) * size / h, y1) - np.maximum(np.arange(h) * size / h, y0)) / (size / h), 0, 1
    )
    xs = np.clip(
        (np.minimum((np.arange(w) + 1) * size / w, x1) - np.maximum(np.arange(w) * size / w, x0)) / (size / w), 0, 1
    )
    return np.outer(ys, xs)


def box_cells(box: tuple[int, int, int, int], size: int, grid: tuple[int, int]) -> np.ndarray:
    """Boolean [h, w] of the feature-map cells whose area lies at least half inside `box`."""
    return box_overlap(box, size, grid) >= 0.5


def dprime(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """(mean_pos - mean_neg) / pooled sd, per column."""
    var = 0.5 * (pos.var(0) + neg.var(0))
    return (pos.mean(0) - neg.mean(0)) / np.sqrt(var + 1e-12)


def cell_sets(feats: np.ndarray, table: Sequence[Stimulus], size: int) -> dict[str, np.ndarray]:
    """Activations [cells, F] of: each family's part cells ("part:FAMILY"), body non-part cells
    ("body_background") and plain objects' cells ("object")."""
    F, h, w = feats.shape[1:]
    sets: dict[str, list[np.ndarray]] = {f"part:{f}": [] for f in FAMILIES}
    sets.update(body_background=[], object=[])
    for i, s in enumerate(table):
        cells = feats[i].reshape(F, -1).T
        if s.role == "body" and s.body_box is not None:
            ov = box_overlap(s.body_box, size, (h, w)).ravel()
            sets["body_background"].append(cells[ov == 0])
            if s.family in FAMILIES:
                sets[f"part:{s.family}"].append(cells[ov >= 0.5])
        elif s.role == "object":
            sets["object"].append(cells)
    out = {k: np.concatenate(v) if v else np.zeros((0, F)) for k, v in sets.items()}
    for k, v in out.items():
        if not len(v):
            raise InputDataError(
                None,
                f"the ground truth needs stimuli for {k} (body photos of both part families "
                "with part boxes, and plain objects)",
            )
    return out


def select_features(
    feats: np.ndarray, table: Sequence[Stimulus], size: int, pool: int = POOL
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(selectivity [family, F], object_active [family, F], pool [family, pool]) of the feature map.

    Selectivity is the smallest of three d': part cells against body non-part cells (spatial), against
    plain objects' cells (category) and against the other family's part cells (family), so a feature
    active all over bodies, or on every head, scores <= 0 however rare it is on objects. A feature is
    eligible when that is positive and it passes the sparsity gate on objects; it may serve one family
    only: the one where its selectivity is higher."""
    sets = cell_sets(feats, table, size)
    sel = np.empty((len(FAMILIES), feats.shape[1]))
    active = np.empty_like(sel)
    for j, f in enumerate(FAMILIES):
        pos = sets[f"part:{f}"]
        negs = [sets["body_background"], sets["object"], *(sets[f"part:{g}"] for g in FAMILIES if g != f)]
        sel[j] = np.min([dprime(pos, neg) for neg in negs], axis=0)
        level = ACTIVE_FRACTION * pos.mean(0)
        active[j] = np.where(level > 0, (sets["object"] > level).mean(0), 1.0)
    chosen = np.full((len(FAMILIES), pool), -1, np.int64)
    for j in range(len(FAMILIES)):
        ok = (active[j] <= OBJECT_ACTIVE_MAX) & (sel[j] > 0) & (sel[j] >= sel.max(0))
        idx = np.flatnonzero(ok)
        idx = idx[np.argsort(-sel[j, idx], kind="stable")][:pool]
        chosen[j, : len(idx)] = idx
    return sel, active, chosen


# -- the response and its gradient ----------------------------------------------------------------


def softplus(z: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, z)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _check_phi(gt: GroundTruth, phi: np.ndarray) -> np.ndarray:
    phi = np.asarray(phi)
    if phi.ndim != 4 or tuple(phi.shape[1:]) != tuple(gt.feature_shape):
        raise UsageError(
            None,
            f"features must be [N, {', '.join(map(str, gt.feature_shape))}] (the unpooled map the ground truth "
            f"reads), not {list(phi.shape)}",
            param="phi",
        )
    return phi


def drive(gt: GroundTruth, phi: np.ndarray) -> np.ndarray:
    """u_n(x) = w*_n . phi(x): [C, N] (float64)."""
    s = _check_phi(gt, phi).sum(axis=(2, 3), dtype=np.float64)  # [N, F]: each feature summed over positions
    use = gt.feature >= 0
    out = np.zeros((len(gt.channel), s.shape[0]))
    for n in range(len(gt.channel)):
        out[n] = s[:, gt.feature[n][use[n]]] @ gt.coef[n][use[n]]
    return out


def _lift(u: np.ndarray, theta: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """(tau * softplus((u - theta) / tau)) ** RATE_EXPONENT: rectified, then compressed."""
    return (tau * softplus((u - theta) / tau)) ** RATE_EXPONENT


def _lift_slope(u: np.ndarray, theta: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """d _lift / d u, computed so that it goes to 0 (not 0/0) far below threshold."""
    z = (u - theta) / tau
    sp = np.maximum(tau * softplus(z), np.finfo(float).tiny)
    return RATE_EXPONENT * sp ** (RATE_EXPONENT - 1.0) * _sigmoid(z)


def _rate_of_drive(gt: GroundTruth, u: np.ndarray) -> np.ndarray:
    return gt.base[:, None] + gt.gain[:, None] * _lift(u, gt.theta[:, None], gt.tau[:, None])


def gt_response(gt: GroundTruth, phi: np.ndarray) -> np.ndarray:
    """r_GT: the noiseless first-phase rate [C, N] of every channel for feature maps phi [N, F, h, w]."""
    return _rate_of_drive(gt, drive(gt, phi))


mean_rate = gt_response  # the name earlier code used


def _channel_index(gt: GroundTruth, channel) -> int:
    ids = [str(c) for c in gt.channel]
    if isinstance(channel, (int, np.integer)) and not isinstance(channel, bool) and str(channel) not in ids:
        if not 0 <= int(channel) < len(ids):
            raise UsageError(None, f"channel index {channel} out of range (0..{len(ids) - 1})", param="channel")
        return int(channel)
    if str(channel) not in ids:
        raise UsageError(None, f"unknown channel {channel!r} (the ground truth has {', '.join(ids)})", param="channel")
    return ids.index(str(channel))


def gt_cotangent(gt: GroundTruth, phi: np.ndarray, channel) -> np.ndarray:
    """d r_GT[channel] / d phi: [N, F, h, w] float32; the engine's VJP with it is the GT pixel map."""
    phi = _check_phi(gt, phi)
    n = _channel_index(gt, channel)
    u = drive(gt, phi)[n]
    slope = gt.gain[n] * _lift_slope(u, gt.theta[n], gt.tau[n])  # [N]
    w = gt.w_star()[n].reshape(gt.feature_shape)
    return (slope[:, None, None, None] * w[None]).astype(np.float32)


def local_maps(gt: GroundTruth, phi: np.ndarray) -> np.ndarray:
    """Each position's share of the drive, sum_c a_(n,c) phi_(c,p)(x): [C, N, h, w]."""
    phi = _check_phi(gt, phi)
    out = np.zeros((len(gt.channel), phi.shape[0], *phi.shape[2:]))
    for n in range(len(gt.channel)):
        for c, a in zip(gt.feature[n], gt.coef[n]):
            if c >= 0:
                out[n] += a * phi[:, c]
    return out


def cos_w_star(gt: GroundTruth, readouts) -> np.ndarray:
    """cos(w_hat_n, w*_n) per ground-truth channel: `readouts` a readouts Dataset (channels matched by
    id; NaN where missing) or a [C, D] weight array in the ground truth's channel order."""
    ws = gt.w_star()
    if isinstance(readouts, xr.Dataset):
        ids = [str(c) for c in readouts["channel"].values]
        weight = readouts["weight"].values.astype(np.float64)
        rows = [ids.index(str(c)) if str(c) in ids else -1 for c in gt.channel]
        what = np.full_like(ws, np.nan)
        for n, r in enumerate(rows):
            if r >= 0:
                what[n] = weight[r]
    else:
        what = np.asarray(readouts, np.float64)
    if what.shape != ws.shape:
        raise UsageError(None, f"readout weights are {list(what.shape)}, w* is {list(ws.shape)}", param="readouts")
    num = (what * ws).sum(1)
    return num / (np.linalg.norm(what, axis=1) * np.linalg.norm(ws, axis=1))


# -- channels, trials and the gate ----------------------------------------------------------------


def design_channels(
    feats: np.ndarray,
    table: Sequence[Stimulus],
    size: int,
    n_channels: int = 16,
    seed: int = 0,
    target_rate: tuple[float, float] = (25.0, 50.0),
    k: int = FEATURES_PER_CHANNEL,
    pool_size: int = POOL,
) -> GroundTruth:
    """Draw `n_channels` channels (half per region), each reading `k` features of each family's pool
    of `pool_size`, and calibrate threshold and gain on this stimulus set (a mean body response of
    `target_rate` spikes/s)."""
    if feats.ndim != 4:
        raise UsageError(
            None, "the ground-truth model must keep its spatial map (export it with pool=none)", param="pool"
        )
    if n_channels < 2:
        raise UsageError(None, f"n_channels must be at least 2, not {n_channels}", param="n_channels")
    rng = np.random.default_rng(seed)
    if not 1 <= k <= pool_size:
        raise UsageError(None, f"features per channel must be 1..{pool_size}, not {k}", param="k")
    sel, active, pool = select_features(feats, table, size, pool_size)
    for j, f in enumerate(FAMILIES):
        if (pool[j] >= 0).sum() < k:
            raise InputDataError(
                None,
                f"only {(pool[j] >= 0).sum()} features pass the selectivity and sparsity tests for part family "
                f"{f}; the ground truth needs {k}",
            )
    C = n_channels
    region = np.array([REGIONS[0] if n < (C + 1) // 2 else REGIONS[1] for n in range(C)])
    feature = np.full((C, 2 * k), -1, np.int64)
    coef = np.zeros((C, 2 * k))
    family = np.empty((C, 2 * k), dtype=object)
    s = feats.sum(axis=(2, 3), dtype=np.float64)  # [N, F]
    for j, f in enumerate(FAMILIES):
        bodies = np.array([t.role == "body" and t.family == f for t in table])
        cand = pool[j][pool[j] >= 0]
        for n in range(C):
            idx = rng.choice(cand, k, replace=False)
            a = rng.uniform(0.5, 1.5, k)
            a /= max(float((s[bodies][:, idx] @ a).mean()), 1e-12)  # the family's drive averages 1 on its bodies
            feature[n, j * k : (j + 1) * k], coef[n, j * k : (j + 1) * k], family[n, j * k : (j + 1) * k] = idx, a, f
    ids = np.array([f"{region[n]}{(n if n < (C + 1) // 2 else n - (C + 1) // 2) + 1:02d}" for n in range(C)])
    ones, zeros = np.ones(C), np.zeros(C)
    noise = np.array([REGION_NOISE[r] for r in region])
    shape = tuple(int(v) for v in feats.shape[1:])
    gt = GroundTruth(
        ids, region, feature, coef, family.astype(str), zeros, ones, ones, zeros, noise, ones, zeros, shape,
        sel, active, pool,
    )  # fmt: skip
    u = drive(gt, feats)
    body = np.array([t.role == "body" for t in table])
    obj = np.array([t.role == "object" for t in table])
    theta = np.percentile(u[:, obj], THRESHOLD_QUANTILE, axis=1)
    tau = np.maximum(u[:, body].std(1) / 2, 1e-6)
    base = rng.uniform(3.0, 8.0, C)
    lifted = _lift(u, theta[:, None], tau[:, None])
    gain = rng.uniform(*target_rate, C) / np.maximum(lifted[:, body].mean(1), 1e-9)
    return GroundTruth(
        ids, region, feature, coef, family.astype(str), theta, tau, gain, base, noise,
        rng.uniform(0.8, 1.0, C), rng.uniform(0.0, 3.0, C), shape, sel, active, pool,
    )  # fmt: skip


def simulate(
    gt: GroundTruth, feats: np.ndarray, n_repetitions: int = N_REPETITIONS, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Trial responses [C, N, R] (non-negative) and the phase label of each repetition."""
    if n_repetitions < 2:
        raise UsageError(None, "at least two repetitions (one per recording phase)")
    rng = np.random.default_rng(seed + 1)
    rate = gt_response(gt, feats)
    phase = np.array(["1" if r < n_repetitions // 2 else "2" for r in range(n_repetitions)])
    out = np.empty((*rate.shape, n_repetitions))
    for r in range(n_repetitions):
        mu = rate if phase[r] == "1" else rate * gt.phase_gain[:, None] + gt.phase_offset[:, None]
        sd = gt.noise[:, None] * np.sqrt(mu) + 1.0
        out[..., r] = np.maximum(mu + sd * rng.standard_normal(mu.shape), 0.0)
    return out, phase


def gate(
    r_with: np.ndarray, r_without: np.ndarray, r_deleted: np.ndarray, body_sd: np.ndarray
) -> dict[str, np.ndarray]:
    """The planted-pair gate on noiseless responses [C, P] (with the part, part-free copy, part box
    deleted) and the SD of body responses [C]: pass when the rise is at least GATE_RISE_SD body SDs and
    deletion removes at least GATE_LOST of it."""
    rise = r_with - r_without
    rise_sd = rise / np.maximum(body_sd, 1e-12)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        lost = np.where(rise > 0, (r_with - r_deleted) / rise, np.nan)
    pass_rise = rise_sd >= GATE_RISE_SD
    pass_delete = np.nan_to_num(lost, nan=-np.inf) >= GATE_LOST
    return dict(
        rise=rise, rise_sd=rise_sd, lost=lost, pass_rise=pass_rise, pass_delete=pass_delete,
        passed=pass_rise & pass_delete,
    )  # fmt: skip


GATE_COLUMNS = (
    "stimulus", "role", "part", "partfree", "channel", "r_with", "r_partfree", "r_deleted", "rise", "body_sd",
    "rise_sd", "lost", "pass_rise", "pass_delete", "pass",
)  # fmt: skip


def read_gate(folder: str | os.PathLike) -> list[dict]:
    """gate.csv as dicts (numbers as float, pass columns as bool)."""
    path = Path(folder) / GATE
    if not path.is_file():
        raise InputDataError(path, "gate table not found (build the demo first: pbv-onnx demo build)")
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            out: dict = dict(row)
            for k in ("r_with", "r_partfree", "r_deleted", "rise", "body_sd", "rise_sd", "lost"):
                out[k] = float(row[k]) if row[k] not in ("", "nan") else float("nan")
            for k in ("pass_rise", "pass_delete", "pass"):
                out[k] = row[k] == "1"
            out["part"] = int(row["part"])
            rows.append(out)
    return rows


def gated_pairs(folder: str | os.PathLike) -> list[tuple[str, str, str]]:
    """(planted id, part-free id, channel) of every planted pair that passes the gate for that channel."""
    return [
        (r["stimulus"], r["partfree"], r["channel"]) for r in read_gate(folder) if r["role"] == "planted" and r["pass"]
    ]
