"""Readouts as datasets: fitting a study, writing and reading readouts.nc, prediction."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import xarray as xr

from pbv_onnx import __version__
from pbv_onnx.base.atomic import write_netcdf
from pbv_onnx.base.errors import InputDataError, MismatchError, UsageError
from pbv_onnx.base.netcdf import read_netcdf
from pbv_onnx.data.features import check_model, model_attrs
from pbv_onnx.runtime.modelfile import ModelInfo
from pbv_onnx.data.responses import mean_response, split_halves
from pbv_onnx.method.stats import channel_metrics
from pbv_onnx.method.ridge import DEFAULT_ALPHAS, min_images, ridge_cv

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
    from pbv_onnx.base.atomic import claim_output

    with claim_output(out, force):  # a second fit into the same file is refused at once
        return _fit_files(model, responses, out, images, features, preferred, alphas, folds, seed,
                          device, batch_size, force, progress)


def _fit_files(model, responses, out, images, features, preferred, alphas, folds, seed, device,
               batch_size, force, progress) -> xr.Dataset:
    from pbv_onnx.data.features import load_or_compute_features
    from pbv_onnx.runtime.engine import Engine
    from pbv_onnx.data.responses import image_paths, load_responses, preferred_category

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

    from pbv_onnx.base.atomic import claim_output

    if out is not None and Path(out).suffix.lower() not in (".nc", ".csv"):
        raise UsageError(out, "--out must end in .nc or .csv")
    with claim_output(out, force) if out is not None else contextlib.nullcontext():
        return _predict_files(model, readouts, images, out, device, batch_size, force, progress)


def _predict_files(model, readouts, images, out, device, batch_size, force, progress) -> xr.DataArray:
    from pbv_onnx.base.atomic import atomic_file, write_netcdf
    from pbv_onnx.data.features import load_or_compute_features
    from pbv_onnx.runtime.engine import Engine

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
