"""Readouts as datasets: fitting a study, writing and reading readouts.nc, prediction."""

from __future__ import annotations

import logging
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
from pbv_onnx.data.responses import mean_response, preferred_category, split_halves
from pbv_onnx.method.ridge import DEFAULT_ALPHAS, min_images, ridge_cv
from pbv_onnx.method.stats import METRICS, STATS, channel_metrics
from pbv_onnx.runtime.modelfile import ModelInfo

_log = logging.getLogger(__name__)

# -- datasets ----------------------------------------------------------------------------------


def check_folds(n_pref: int, preferred: str, folds: int, responses_path) -> None:
    """UsageError for fewer than 2 folds; InputDataError when the preferred images cannot fill them."""
    if folds < 2:
        raise UsageError(None, f"folds must be at least 2, not {folds}", param="folds")
    if n_pref < min_images(folds):
        raise InputDataError(
            responses_path,
            f"only {n_pref} preferred-category ({preferred!r}) stimuli; "
            f"folds={folds} needs at least {min_images(folds)}",
            param="folds",
        )


def fit_readouts(
    features: xr.DataArray,
    responses: xr.Dataset,
    preferred: str | None = None,
    info: ModelInfo | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    folds: int = 5,
    seed: int = 0,
    responses_path: str | os.PathLike | None = None,
    progress: bool = False,
) -> xr.Dataset:
    """Fit one readout per channel on the preferred-category stimuli and evaluate it (Fig. 3a).

    `features` (stimulus, feature) must cover every stimulus of `responses`. `preferred`: default
    the responses' preferred_category. The model attributes come from `info`, else from the
    features' own attributes (as `load_or_compute_features` sets them), where present.
    """
    preferred = preferred_category(responses, preferred, responses_path)
    alphas = [float(a) for a in alphas]
    if not alphas or any(not np.isfinite(a) or a <= 0 for a in alphas):
        raise UsageError(None, f"alphas must be positive numbers, got {alphas}", param="alphas")
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
        raise InputDataError(
            responses_path,
            f"channel {mean['channel'].values[c]} has no response to "
            f"preferred stimulus {stim[is_pref][s]} (every preferred stimulus needs a mean response)",
        )
    groups = responses["group"].values.astype(str) if "group" in responses.coords else None
    if groups is not None:
        n_groups = len(set(groups[is_pref]))
        if n_groups < min_images(folds):
            raise InputDataError(
                responses_path,
                f"only {n_groups} groups among the {n_pref} preferred-category "
                f"({preferred!r}) stimuli; folds={folds} needs at least {min_images(folds)} "
                "(a group is never split between training and test)",
                param="folds",
            )
    fit = ridge_cv(
        feats.values[is_pref], Y, alphas, folds, seed, progress, groups=None if groups is None else groups[is_pref]
    )
    warn_alpha_edge(fit.alpha, fit.at_edge, alphas)
    weight = fit.weight.astype(np.float32)
    bias = fit.bias.astype(np.float32)
    # Out-of-category predictions from the stored (float32) readout, as `predict` would give them.
    prediction = np.empty(mean.shape)
    prediction[:, is_pref] = fit.heldout.T
    ooc = feats.values[~is_pref].astype(np.float64)
    prediction[:, ~is_pref] = (ooc @ weight.T.astype(np.float64) + bias).T
    pred = xr.DataArray(
        prediction, dims=("channel", "stimulus"), coords={"channel": mean["channel"].values, "stimulus": stim}
    )
    metrics = channel_metrics(
        pred,
        is_pref,
        mean,
        split_halves(responses, responses_path),
        category=responses["category"].values,
        groups=groups,
    )
    ds = xr.Dataset(
        {
            "weight": (("channel", "feature"), weight),
            "bias": ("channel", bias),
            "alpha": ("channel", fit.alpha),
            "penalty": ("channel", fit.penalty),
            "alpha_at_edge": ("channel", fit.at_edge),
            "prediction": (("channel", "stimulus"), prediction.astype(np.float32)),
        },
        coords={
            "channel": mean["channel"].values,
            "stimulus": stim,
            "category": ("stimulus", responses["category"].values.astype(str)),
            "heldout": ("stimulus", is_pref),
        },
    )
    for name in (*METRICS, *STATS):
        if name in metrics:
            ds[name] = metrics[name]
    if groups is not None:
        ds = ds.assign_coords(group=("stimulus", groups))
    if "region" in responses.coords:
        ds = ds.assign_coords(region=("channel", responses["region"].values.astype(str)))
    ds.attrs = {
        **_model_attrs(features, info),
        "preferred_category": preferred,
        "alphas": alphas,
        "alpha_scale": "relative to the mean eigenvalue of the centred Gram matrix",
        "folds": folds,
        "seed": seed,
        "cv": "nested",
        "cv_folds_by": "stimulus" if groups is None else "group",
        "r_critical_n": metrics.attrs["r_critical_n"],
        "n_preferred": n_pref,
        "n_ooc": int((~is_pref).sum()),
        "pbv_onnx_version": __version__,
    }
    return ds


def warn_alpha_edge(alpha: np.ndarray, at_edge: np.ndarray, alphas: Sequence[float]) -> None:
    """One warning when channels chose the smallest or largest penalty of the grid."""
    if not at_edge.any():
        return
    lo, hi = min(alphas), max(alphas)
    n_lo, n_hi = int((at_edge & (alpha == lo)).sum()), int((at_edge & (alpha == hi)).sum())
    _log.warning(
        f"{n_lo + n_hi} of {len(alpha)} channels chose a penalty at the edge of the grid "
        f"({n_lo} at the smallest, {lo:g}; {n_hi} at the largest, {hi:g}); widen alphas",
        extra={"params": ("alphas",)},
    )


def _model_attrs(features: xr.DataArray, info: ModelInfo | None) -> dict:
    """The attributes tying readouts to their model: of `info`, else those the features carry."""
    if info is not None:
        return {**model_attrs(info), "model_file": info.path.name}
    keys = ("model_sha256", "arch", "layer", "feature_shape", "model_file")
    attrs = {k: features.attrs[k] for k in keys if k in features.attrs}
    attrs.setdefault("feature_shape", [int(features.sizes["feature"])])
    return attrs


def write_readouts(ds: xr.Dataset, path: str | os.PathLike, force: bool = False) -> Path:
    return write_netcdf(ds, path, force)


def load_readouts(path: str | os.PathLike, info: ModelInfo | None = None) -> xr.Dataset:
    """Read a readouts file; with `info`, refuse one fitted on another model's features."""
    path = Path(path)
    return check_readouts(read_netcdf(path, "readouts", lambda ds: check_readouts_structure(ds, path)), path, info)


def check_readouts_structure(ds: xr.Dataset, path: str | os.PathLike | None = None) -> None:
    """Check the variables and attributes of a readouts dataset without reading its arrays (so a
    lazily opened file is checked before its data is read)."""
    for name, dims in (("weight", ("channel", "feature")), ("bias", ("channel",))):
        if name not in ds.data_vars or ds[name].dims != dims:
            raise InputDataError(path, f"not a readouts file (no {name!r} variable with dims {dims})")
    for key in ("model_sha256", "feature_shape", "preferred_category"):
        if key not in ds.attrs:
            raise InputDataError(path, f"readouts file lacks the {key!r} attribute")
    if int(np.prod(np.atleast_1d(ds.attrs["feature_shape"]))) != ds.sizes["feature"]:
        raise InputDataError(path, "feature_shape attribute disagrees with the weight's feature dimension")


def check_readouts(ds: xr.Dataset, path: str | os.PathLike | None = None, info: ModelInfo | None = None) -> xr.Dataset:
    """The readouts dataset, checked (`path` names it in errors); with `info`, refuse one fitted on
    another model's features."""
    check_readouts_structure(ds, path)
    if not (np.isfinite(ds["weight"].values).all() and np.isfinite(ds["bias"].values).all()):
        raise InputDataError(path, "weights or biases hold NaN or infinite values")
    check_model(ds.attrs, ds.sizes["feature"], info, path, "readouts file")
    return ds


def predict(readouts: xr.Dataset, features: xr.DataArray) -> xr.DataArray:
    """Predicted responses (channel, stimulus) = features @ weight.T + bias."""
    if features.sizes["feature"] != readouts.sizes["feature"]:
        raise MismatchError(
            None,
            f"features have {features.sizes['feature']} values per stimulus, "
            f"readouts expect {readouts.sizes['feature']}",
        )
    w = readouts["weight"].values.astype(np.float64)
    out = features.transpose("stimulus", "feature").values.astype(np.float64) @ w.T + readouts["bias"].values
    return xr.DataArray(
        out.T,
        dims=("channel", "stimulus"),
        name="prediction",
        coords={"channel": readouts["channel"].values, "stimulus": features["stimulus"].values},
    )


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
                raise UsageError(None, f"alphas: {tok!r} is not a number", param="alphas") from None
            if not np.isfinite(a) or a <= 0:
                raise UsageError(None, f"alphas must be positive, got {tok}", param="alphas")
            out.append(a)
    if not out:
        raise UsageError(None, "alphas is empty", param="alphas")
    return sorted(set(out))


def fit_files(
    model: str | os.PathLike,
    responses: str | os.PathLike,
    out: str | os.PathLike,
    images: str | os.PathLike | None = None,
    features: str | os.PathLike | None = None,
    preferred: str | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    folds: int = 5,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 16,
    force: bool = False,
    progress: bool = True,
) -> xr.Dataset:
    """`pbv-onnx fit`: features (cached in `features` if given), readouts, evaluation -> `out`."""
    from pbv_onnx.base.atomic import claim_output

    with claim_output(out, force):  # a second fit into the same file is refused at once
        return _fit_files(
            model, responses, out, images, features, preferred, alphas, folds, seed, device, batch_size, force, progress
        )


def _fit_files(
    model, responses, out, images, features, preferred, alphas, folds, seed, device, batch_size, force, progress
) -> xr.Dataset:
    from pbv_onnx.data.features import load_or_compute_features
    from pbv_onnx.data.responses import image_paths, load_responses
    from pbv_onnx.runtime.engine import Engine

    ds = load_responses(responses)
    pref = preferred_category(ds, preferred, responses)
    check_folds(int((ds["category"].values.astype(str) == pref).sum()), pref, folds, responses)
    paths = image_paths(ds, responses, images)
    engine = Engine(model, device=device, batch_size=batch_size)
    feats = load_or_compute_features(
        engine, paths, ds["stimulus"].values, cache=None if features is None else Path(features), progress=progress
    )
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
        raise UsageError(None, "no image given (images is empty)", param="images")
    return out


def predict_files(
    model: str | os.PathLike,
    readouts: str | os.PathLike,
    images: Sequence[str | os.PathLike],
    out: str | os.PathLike | None = None,
    device: str = "auto",
    batch_size: int = 16,
    force: bool = False,
    progress: bool = True,
    format: str | None = None,
) -> xr.DataArray:
    """`pbv-onnx predict`: predicted responses (channel, stimulus) of image files; the stimulus ids
    are the paths as given. Saved as NetCDF (.nc), a CSV table (one row per image) or, with
    `format="brainio"`, a BrainIO neuroid assembly (.nc); `format` defaults to the suffix of `out`."""
    import contextlib

    from pbv_onnx.base.atomic import claim_output

    format = _output_format(out, format)
    with claim_output(out, force) if out is not None else contextlib.nullcontext():
        return _predict_files(model, readouts, images, out, device, batch_size, force, progress, format)


PREDICTION_FORMATS = {"netcdf": ".nc", "csv": ".csv", "brainio": ".nc"}


def _output_format(out: str | os.PathLike | None, format: str | None) -> str:
    """The format predictions are written in, checked against the suffix of `out`."""
    if format is not None and format not in PREDICTION_FORMATS:
        raise UsageError(None, f"format must be one of {', '.join(PREDICTION_FORMATS)}, not {format!r}", param="format")
    if out is None:
        if format not in (None, "csv"):  # only the CSV table is printed
            raise UsageError(None, f"format {format} needs out (a .nc file)", param=("format", "out"))
        return "csv"
    suffix = Path(out).suffix.lower()
    if format is None:
        if suffix not in (".nc", ".csv"):
            raise UsageError(out, "out must end in .nc or .csv", param="out")
        return "netcdf" if suffix == ".nc" else "csv"
    if suffix != PREDICTION_FORMATS[format]:
        raise UsageError(out, f"out must end in {PREDICTION_FORMATS[format]} for format {format}", param="out")
    return format


def _predict_files(model, readouts, images, out, device, batch_size, force, progress, format) -> xr.DataArray:
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
        attrs = {k: ro.attrs[k] for k in ("model_sha256", "arch", "layer", "preferred_category") if k in ro.attrs}
        if format == "brainio":
            from pbv_onnx.data.brainio import prediction_assembly

            region = ro["region"].values if "region" in ro.coords else None
            write_netcdf(prediction_assembly(pred, region, attrs, files=[p.name for p in paths]), out, force)
        elif format == "netcdf":
            ds = pred.to_dataset()
            ds.attrs = attrs
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
