"""Per-channel ridge readouts in the dual (Gram) form: fitting, nested cross-validation, I/O, prediction.

All channels and all penalties share one eigendecomposition of the centred n x n Gram matrix per
training set, so the cost is one Gram matrix (n^2 D) plus small n^3 solves, whatever D is.
Penalties are scale-free: a relative `alpha` means lambda = alpha * (mean eigenvalue of the
centred Gram matrix of the training images), i.e. alpha * trace(K_c) / n.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import xarray as xr

from . import __version__
from .atomic import write_netcdf
from .errors import InputDataError, MismatchError, UsageError
from .netcdf import read_netcdf
from .features import check_model, model_attrs
from .model import ModelInfo
from .responses import mean_response, split_halves
from .sessions import one_blas_thread
from .stats import channel_metrics

DEFAULT_ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
CHUNK = 8192  # feature columns per Gram-matrix block: bounds float64 temporaries to n x 8192


# -- the numerical core (numpy only) -----------------------------------------------------------

def gram(X: np.ndarray, chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """(K, mu): Gram matrix in float64 of the rows of X [n, D] after subtracting their mean mu.

    Centred kernels are invariant to a common shift of all rows, and subtracting the mean first
    keeps the large shared component of non-negative (ReLU) features out of the products.
    """
    n, d = X.shape
    mu = np.zeros(d)
    for j in range(0, d, chunk):
        mu[j:j + chunk] = X[:, j:j + chunk].mean(0, dtype=np.float64)
    K = np.zeros((n, n))
    for j in range(0, d, chunk):
        B = X[:, j:j + chunk] - mu[j:j + chunk]
        K += B @ B.T
    return K, mu


@dataclass
class _Solver:
    """One training set: eigendecomposition of its centred Gram matrix, shared by all channels
    and penalties."""

    K: np.ndarray        # full Gram matrix (any common centring)
    train: np.ndarray    # indices into K
    Y: np.ndarray        # [n_train, C] targets

    def __post_init__(self):
        Ktt = self.K[np.ix_(self.train, self.train)]
        self.a = Ktt.mean(1)
        self.c = self.a.mean()
        Kc = Ktt - self.a[:, None] - self.a[None, :] + self.c
        s, self.V = np.linalg.eigh((Kc + Kc.T) / 2)
        self.s = np.clip(s, 0.0, None)
        self.scale = self.s.sum() / len(self.train)  # mean eigenvalue
        self.ybar = self.Y.mean(0)
        self.Q = self.V.T @ (self.Y - self.ybar)

    def penalties(self, alphas: np.ndarray) -> np.ndarray:
        scale = self.scale if self.scale > 0 else 1.0  # all training features identical
        return np.asarray(alphas, np.float64) * scale

    def coef(self, lam: np.ndarray) -> np.ndarray:
        """Dual coefficients [n_train, C] with one penalty per channel."""
        return self.V @ (self.Q / (self.s[:, None] + lam[None, :]))

    def predict_all(self, test: np.ndarray, alphas: np.ndarray) -> np.ndarray:
        """Predictions [A, n_test, C] on `test` for every relative penalty."""
        Kte = self.K[np.ix_(test, self.train)]
        Kte_c = Kte - Kte.mean(1)[:, None] - self.a[None, :] + self.c
        P = Kte_c @ self.V
        lam = self.penalties(alphas)
        return np.stack([P @ (self.Q / (self.s + l)[:, None]) for l in lam]) + self.ybar


def make_folds(n: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """k disjoint, shuffled, near-equal folds of range(n)."""
    return [np.sort(f) for f in np.array_split(rng.permutation(n), k)]


def select_alphas(K: np.ndarray, Y: np.ndarray, idx: np.ndarray, alphas: np.ndarray, folds: int,
                  rng: np.random.Generator) -> np.ndarray:
    """Per-channel index of the penalty with the smallest k-fold CV squared error on `idx`."""
    preds = np.empty((len(alphas), len(idx), Y.shape[1]))
    for test in make_folds(len(idx), folds, rng):
        train = np.setdiff1d(np.arange(len(idx)), test)
        preds[:, test] = _Solver(K, idx[train], Y[idx[train]]).predict_all(idx[test], alphas)
    mse = ((preds - Y[idx][None]) ** 2).mean(1)  # [A, C]
    return np.argmin(mse, axis=0)


@dataclass
class RidgeFit:
    weight: np.ndarray      # [C, D] in the raw feature space
    bias: np.ndarray        # [C]
    alpha: np.ndarray       # [C] chosen relative penalty
    penalty: np.ndarray     # [C] the absolute lambda it meant on all preferred images
    heldout: np.ndarray     # [n, C] nested-CV predictions, each from a fit that never saw it


def min_images(folds: int) -> int:
    """Fewest images nested k-fold CV can work with: two per outer test fold."""
    return 2 * folds


def ridge_cv(X: np.ndarray, Y: np.ndarray, alphas: Sequence[float], folds: int = 5, seed: int = 0,
             progress: bool = False) -> RidgeFit:
    """Ridge of every column of Y [n, C] on X [n, D], the penalty chosen per channel by k-fold CV.

    Held-out predictions are nested: for each outer fold the penalty is chosen by an inner k-fold
    CV on the outer training images only, then the model is refit on them and predicts the
    outer test fold. The returned weights come from all images with the penalty chosen by a
    plain k-fold CV over all of them.
    """
    from tqdm import tqdm

    X = np.asarray(X)
    Y = np.asarray(Y, np.float64)
    alphas = np.asarray(sorted(float(a) for a in alphas))
    n = X.shape[0]
    if n < min_images(folds):
        raise ValueError(f"{n} images; {folds}-fold nested CV needs at least {min_images(folds)}")
    K, mu = gram(X)
    rng = np.random.default_rng(seed)
    heldout = np.empty_like(Y)
    everything = np.arange(n)
    outer = make_folds(n, folds, rng)
    # many small n x n eigendecompositions: multithreaded LAPACK is slower on them, and
    # pathologically so on a busy machine
    with one_blas_thread():
        for test in tqdm(outer, desc="nested CV", unit="fold", disable=None if progress else True):
            train = np.setdiff1d(everything, test)
            best = select_alphas(K, Y, train, alphas, folds, rng)
            preds = _Solver(K, train, Y[train]).predict_all(test, alphas)
            heldout[test] = preds[best, :, np.arange(Y.shape[1])].T
        best = select_alphas(K, Y, everything, alphas, folds, rng)
        full = _Solver(K, everything, Y)
    lam = full.penalties(alphas[best])
    coef = full.coef(lam)                        # [n, C]
    # w = Xc^T coef with Xc centred by the training mean; computed blockwise in float64.
    weight = np.empty((Y.shape[1], X.shape[1]))
    for j in range(0, X.shape[1], CHUNK):
        weight[:, j:j + CHUNK] = ((X[:, j:j + CHUNK] - mu[j:j + CHUNK]).T @ coef).T
    bias = full.ybar - weight @ mu
    return RidgeFit(weight=weight, bias=bias, alpha=alphas[best], penalty=lam, heldout=heldout)


# -- datasets ----------------------------------------------------------------------------------

def check_folds(n_pref: int, preferred: str, folds: int, responses_path) -> None:
    """UsageError for fewer than 2 folds; InputDataError when the preferred images cannot fill them."""
    if folds < 2:
        raise UsageError(None, f"--folds must be at least 2, not {folds}")
    if n_pref < min_images(folds):
        raise InputDataError(responses_path, f"only {n_pref} preferred-category ({preferred!r}) stimuli; "
                             f"--folds {folds} needs at least {min_images(folds)}")


def fit_readouts(features: xr.DataArray, responses: xr.Dataset, preferred: str, info: ModelInfo,
                 alphas: Sequence[float] = DEFAULT_ALPHAS, folds: int = 5, seed: int = 0,
                 responses_path: str | os.PathLike | None = None, progress: bool = False) -> xr.Dataset:
    """Fit one readout per channel on the preferred-category stimuli and evaluate it (Fig. 3a).

    `features` (stimulus, feature) must cover every stimulus of `responses`.
    """
    alphas = [float(a) for a in alphas]
    if not alphas or any(not np.isfinite(a) or a <= 0 for a in alphas):
        raise UsageError(None, f"--alphas must be positive numbers, got {alphas}")
    stim = responses["stimulus"].values
    missing = np.setdiff1d(stim.astype(str), features["stimulus"].values.astype(str))
    if len(missing):
        raise MismatchError(None, f"features lack stimuli of the responses file: {', '.join(missing[:3])}")
    feats = features.sel(stimulus=stim)
    is_pref = responses["category"].values.astype(str) == preferred
    n_pref = int(is_pref.sum())
    check_folds(n_pref, preferred, folds, responses_path)
    mean = mean_response(responses)
    Y = mean.values[:, is_pref].T  # [n_pref, C]
    if np.isnan(Y).any():
        c, s = np.argwhere(np.isnan(Y.T))[0]
        raise InputDataError(responses_path, f"channel {mean['channel'].values[c]} has no response to "
                             f"preferred stimulus {stim[is_pref][s]} (every preferred stimulus needs a mean response)")
    fit = ridge_cv(feats.values[is_pref], Y, alphas, folds, seed, progress)
    weight = fit.weight.astype(np.float32)
    bias = fit.bias.astype(np.float32)
    # Out-of-category predictions from the stored (float32) readout, as `predict` would give them.
    prediction = np.empty(mean.shape)
    prediction[:, is_pref] = fit.heldout.T
    ooc = feats.values[~is_pref].astype(np.float64)
    prediction[:, ~is_pref] = (ooc @ weight.T.astype(np.float64) + bias).T
    pred = xr.DataArray(prediction, dims=("channel", "stimulus"),
                        coords={"channel": mean["channel"].values, "stimulus": stim})
    metrics = channel_metrics(pred, is_pref, mean, split_halves(responses, responses_path))
    ds = xr.Dataset(
        {"weight": (("channel", "feature"), weight), "bias": ("channel", bias),
         "alpha": ("channel", fit.alpha), "penalty": ("channel", fit.penalty),
         "prediction": (("channel", "stimulus"), prediction.astype(np.float32))},
        coords={"channel": mean["channel"].values, "stimulus": stim,
                "category": ("stimulus", responses["category"].values.astype(str)),
                "heldout": ("stimulus", is_pref)})
    for name in ("r_cv_preferred", "r_ooc", "reliability", "r_critical", "r_critical_ooc",
                 "n_preferred", "n_ooc"):
        ds[name] = metrics[name]
    if "region" in responses.coords:
        ds = ds.assign_coords(region=("channel", responses["region"].values.astype(str)))
    ds.attrs = {**model_attrs(info), "model_file": info.path.name, "preferred_category": preferred,
                "alphas": alphas, "alpha_scale": "relative to the mean eigenvalue of the centred Gram matrix",
                "folds": folds, "seed": seed, "cv": "nested",
                "n_preferred": n_pref, "n_ooc": int((~is_pref).sum()), "pbv_onnx_version": __version__}
    return ds


def write_readouts(ds: xr.Dataset, path: str | os.PathLike, force: bool = False) -> Path:
    return write_netcdf(ds, path, force)


def load_readouts(path: str | os.PathLike, info: ModelInfo | None = None) -> xr.Dataset:
    """Read a readouts file; with `info`, refuse one fitted on another model's features."""
    path = Path(path)
    ds = read_netcdf(path, "readouts")
    for name, dims in (("weight", ("channel", "feature")), ("bias", ("channel",))):
        if name not in ds.data_vars or ds[name].dims != dims:
            raise InputDataError(path, f"not a readouts file (no {name!r} variable with dims {dims})")
    for key in ("model_sha256", "feature_shape", "preferred_category"):
        if key not in ds.attrs:
            raise InputDataError(path, f"readouts file lacks the {key!r} attribute")
    if int(np.prod(np.atleast_1d(ds.attrs["feature_shape"]))) != ds.sizes["feature"]:
        raise InputDataError(path, "feature_shape attribute disagrees with the weight's feature dimension")
    if not (np.isfinite(ds["weight"].values).all() and np.isfinite(ds["bias"].values).all()):
        raise InputDataError(path, "weights or biases hold NaN or infinite values")
    check_model(ds.attrs, ds.sizes["feature"], info, path, "readouts file")
    return ds


def predict(readouts: xr.Dataset, features: xr.DataArray) -> xr.DataArray:
    """Predicted responses (channel, stimulus) = features @ weight.T + bias."""
    if features.sizes["feature"] != readouts.sizes["feature"]:
        raise MismatchError(None, f"features have {features.sizes['feature']} values per stimulus, "
                            f"readouts expect {readouts.sizes['feature']}")
    w = readouts["weight"].values.astype(np.float64)
    out = features.transpose("stimulus", "feature").values.astype(np.float64) @ w.T + readouts["bias"].values
    return xr.DataArray(out.T, dims=("channel", "stimulus"), name="prediction",
                        coords={"channel": readouts["channel"].values, "stimulus": features["stimulus"].values})


# -- commands --------------------------------------------------------------------------------

def parse_alphas(values: Sequence[str] | None) -> list[float]:
    """`--alphas 1e-3,1e-2 --alphas 0.1` -> [0.001, 0.01, 0.1]; the default grid when empty."""
    if not values:
        return list(DEFAULT_ALPHAS)
    out = []
    for v in values:
        for tok in str(v).replace(",", " ").split():
            try:
                a = float(tok)
            except ValueError:
                raise UsageError(None, f"--alphas: {tok!r} is not a number") from None
            if not np.isfinite(a) or a <= 0:
                raise UsageError(None, f"--alphas must be positive, got {tok}")
            out.append(a)
    if not out:
        raise UsageError(None, "--alphas is empty")
    return sorted(set(out))


def fit_files(model: str | os.PathLike, responses: str | os.PathLike, out: str | os.PathLike,
              images: str | os.PathLike | None = None, features: str | os.PathLike | None = None,
              preferred: str | None = None, alphas: Sequence[float] = DEFAULT_ALPHAS, folds: int = 5,
              seed: int = 0, device: str = "auto", batch_size: int = 16, force: bool = False,
              progress: bool = True) -> xr.Dataset:
    """`pbv-onnx fit`: features (cached in `features` if given), readouts, evaluation -> `out`."""
    from .atomic import claim_output

    with claim_output(out, force):  # a second fit into the same file is refused at once
        return _fit_files(model, responses, out, images, features, preferred, alphas, folds, seed,
                          device, batch_size, force, progress)


def _fit_files(model, responses, out, images, features, preferred, alphas, folds, seed, device,
               batch_size, force, progress) -> xr.Dataset:
    from .features import load_or_compute_features
    from .model import Engine
    from .responses import image_paths, load_responses, preferred_category

    ds = load_responses(responses)
    pref = preferred_category(ds, preferred, responses)
    check_folds(int((ds["category"].values.astype(str) == pref).sum()), pref, folds, responses)
    paths = image_paths(ds, responses, images)
    engine = Engine(model, device=device, batch_size=batch_size)
    feats = load_or_compute_features(engine, paths, ds["stimulus"].values,
                                     cache=None if features is None else Path(features), progress=progress)
    result = fit_readouts(feats, ds, pref, engine.info, alphas, folds, seed, responses, progress)
    write_readouts(result, out, force)
    return result


def image_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files named directly or found (non-recursively, sorted) in named folders."""
    exts = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in exts)
            if not found:
                raise InputDataError(p, "folder holds no image files")
            out.extend(found)
        else:
            out.append(p)
    if not out:
        raise UsageError(None, "no images given (--images)")
    return out


def predict_files(model: str | os.PathLike, readouts: str | os.PathLike, images: Sequence[str | os.PathLike],
                  out: str | os.PathLike | None = None, device: str = "auto", batch_size: int = 16,
                  force: bool = False, progress: bool = True) -> xr.DataArray:
    """`pbv-onnx predict`: predicted responses (channel, stimulus) of image files; the stimulus ids
    are the paths as given. Saved as NetCDF (.nc) or a CSV table (one row per image)."""
    import contextlib

    from .atomic import claim_output

    if out is not None and Path(out).suffix.lower() not in (".nc", ".csv"):
        raise UsageError(out, "--out must end in .nc or .csv")
    with claim_output(out, force) if out is not None else contextlib.nullcontext():
        return _predict_files(model, readouts, images, out, device, batch_size, force, progress)


def _predict_files(model, readouts, images, out, device, batch_size, force, progress) -> xr.DataArray:
    from .atomic import atomic_file, write_netcdf
    from .features import load_or_compute_features
    from .model import Engine

    paths = image_files(images)
    engine = Engine(model, device=device, batch_size=batch_size)
    ro = load_readouts(readouts, engine.info)
    ids = [str(p) for p in paths]
    if len(set(ids)) != len(ids):
        raise UsageError(None, "an image is named twice")
    feats = load_or_compute_features(engine, paths, ids, progress=progress)
    pred = predict(ro, feats)
    if out is not None:
        if Path(out).suffix.lower() == ".nc":
            ds = pred.to_dataset()
            ds.attrs = {k: ro.attrs[k] for k in ("model_sha256", "arch", "layer", "preferred_category") if k in ro.attrs}
            write_netcdf(ds, out, force)
        else:
            with atomic_file(out, force) as tmp:
                tmp.write_text(prediction_table(pred))
    return pred


def prediction_table(pred: xr.DataArray) -> str:
    """CSV text: one row per image, one column per channel."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["image"] + [str(c) for c in pred["channel"].values])
    for j, s in enumerate(pred["stimulus"].values):
        w.writerow([s] + [f"{v:.6g}" for v in pred.values[:, j]])
    return buf.getvalue()
