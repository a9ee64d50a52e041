"""Latent features of stimulus images, cached in NetCDF and keyed by model and image content hashes."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import xarray as xr

from pbv_onnx import __version__
from pbv_onnx.base.atomic import write_netcdf
from pbv_onnx.base.errors import InputDataError, MismatchError, OutputLockedError, UsageError
from pbv_onnx.base.netcdf import read_netcdf
from pbv_onnx.runtime.images import load_batch
from pbv_onnx.runtime.modelfile import ModelInfo, file_sha256

FEATURES = "features"
_log = logging.getLogger(__name__)


def content_hash(path: str | os.PathLike) -> str:
    """sha256 of an image file's bytes: a cache entry is valid while this is unchanged."""
    path = Path(path)
    if not path.is_file():
        raise InputDataError(path, "image file not found")
    try:
        return file_sha256(path)
    except OSError as exc:
        raise InputDataError(path, f"cannot read image file ({exc.strerror})") from None


def compute_features(engine, paths: Sequence[str | os.PathLike], progress: bool = True) -> np.ndarray:
    """Flattened features [N, D] float32 of image files, in batches of the engine's batch size."""
    from tqdm import tqdm

    info = engine.info
    out = np.empty((len(paths), info.n_features), np.float32)
    step = engine.batch_size
    with tqdm(total=len(paths), desc="features", unit="img", disable=None if progress else True) as bar:
        for i in range(0, len(paths), step):
            batch = load_batch(paths[i : i + step], info.preprocessing)
            out[i : i + len(batch)] = engine.features(batch).reshape(len(batch), -1)
            bar.update(len(batch))
    return out


def make_features(
    values: np.ndarray, stimulus_ids: Sequence, info: ModelInfo, hashes: Sequence[str], files: Sequence[str]
) -> xr.DataArray:
    """A features DataArray (stimulus, feature) in the cache format (docs/formats.md)."""
    values = np.asarray(values, np.float32).reshape(len(stimulus_ids), -1)
    if values.shape[1] != info.n_features:
        raise ValueError(f"{values.shape[1]} features per stimulus, model has {info.n_features}")
    return xr.DataArray(
        values,
        dims=("stimulus", "feature"),
        name=FEATURES,
        coords={
            "stimulus": np.asarray(stimulus_ids),
            "content_sha256": ("stimulus", np.asarray(hashes, str)),
            "file": ("stimulus", np.asarray([str(f) for f in files], str)),
        },
        attrs=model_attrs(info),
    )


def model_attrs(info: ModelInfo) -> dict:
    """The attributes that tie a features or readouts file to one model."""
    return {
        "model_sha256": info.sha256,
        "arch": info.arch,
        "layer": info.layer,
        "feature_shape": list(info.feature_shape),
        "pbv_onnx_version": __version__,
    }


def check_model(attrs: dict, n_features: int, info: ModelInfo | None, path: str | os.PathLike, what: str) -> None:
    """MismatchError when a file's model hash or feature size differs from `info`."""
    if info is None:
        return
    if n_features != info.n_features:
        raise MismatchError(
            path,
            f"{what} has {n_features} features per stimulus, but model "
            f"{info.path.name} has {info.n_features} ({'x'.join(map(str, info.feature_shape))})",
        )
    shape = tuple(int(v) for v in np.atleast_1d(attrs.get("feature_shape", ())))
    if shape and shape != tuple(info.feature_shape):
        raise MismatchError(
            path,
            f"{what} has feature shape {'x'.join(map(str, shape))}, but model "
            f"{info.path.name} has {'x'.join(map(str, info.feature_shape))}",
        )
    if attrs.get("model_sha256") != info.sha256:
        raise MismatchError(
            path,
            f"{what} was made with another model (sha256 {str(attrs.get('model_sha256'))[:12]}..., "
            f"{info.path.name} is {info.sha256[:12]}...)",
        )


def _check_structure(ds: xr.Dataset, path: Path) -> None:
    # names and attributes only: a lazily opened file is checked before its features are read
    if FEATURES not in ds.data_vars or ds[FEATURES].dims != ("stimulus", "feature"):
        raise InputDataError(path, "not a features file (no 'features' variable with dims (stimulus, feature))")
    for key in ("model_sha256", "feature_shape"):
        if key not in ds.attrs:
            raise InputDataError(path, f"features file lacks the {key!r} attribute")
    if "content_sha256" not in ds.coords:
        raise InputDataError(path, "features file lacks the 'content_sha256' coordinate")


def load_features(path: str | os.PathLike, info: ModelInfo | None = None) -> xr.DataArray:
    """Read a features file; with `info`, refuse one made by another model."""
    path = Path(path)
    ds = read_netcdf(path, "features", lambda ds: _check_structure(ds, path))
    da = ds[FEATURES]
    da.attrs = dict(ds.attrs)
    if int(np.prod(np.atleast_1d(da.attrs["feature_shape"]))) != da.sizes["feature"]:
        raise InputDataError(path, "feature_shape attribute disagrees with the feature dimension")
    if not np.isfinite(da.values).all():
        raise InputDataError(path, "features hold NaN or infinite values")
    check_model(da.attrs, da.sizes["feature"], info, path, "features file")
    return da


def write_features(da: xr.DataArray, path: str | os.PathLike, force: bool = False) -> Path:
    ds = da.to_dataset(name=FEATURES)
    ds.attrs = dict(da.attrs)
    ds[FEATURES].attrs = {}
    return write_netcdf(ds, path, force)


def load_or_compute_features(
    engine, paths: list[Path], stimulus_ids, cache: Path | None = None, force: bool = False, progress: bool = True
) -> xr.DataArray:
    """Features (stimulus, feature) float32 of `paths`, labelled by `stimulus_ids`.

    With a `cache` file, images whose content hash is already in it (for this model) are not
    recomputed, and the cache is updated with the new ones (older entries are kept). A cache made
    by another model is refused unless `force`, which recomputes everything and replaces it.
    """
    info: ModelInfo = engine.info
    ids = list(stimulus_ids)
    if len(ids) != len(paths):
        raise ValueError("one stimulus id per image path")
    if len({str(i) for i in ids}) != len(ids):
        raise UsageError(None, "duplicate stimulus ids among the requested images")
    hashes = [content_hash(p) for p in paths]  # also fails early on missing images
    cached = None
    if cache is not None and Path(cache).exists() and not force:
        cached = load_features(cache, info)
    values = np.empty((len(ids), info.n_features), np.float32)
    todo = list(range(len(ids)))
    if cached is not None:
        where = {h: i for i, h in enumerate(cached["content_sha256"].values.astype(str))}
        hits = [(k, where[h]) for k, h in enumerate(hashes) if h in where]
        if hits:
            values[[k for k, _ in hits]] = cached.values[[j for _, j in hits]]
        todo = [k for k, h in enumerate(hashes) if h not in where]
    if todo:
        values[todo] = compute_features(engine, [paths[k] for k in todo], progress)
    out = make_features(values, ids, info, hashes, [str(p) for p in paths])
    if cache is not None and (todo or cached is None):
        merged = out
        if cached is not None:
            keep = ~(
                np.isin(cached["content_sha256"].values.astype(str), hashes)
                | np.isin(cached["stimulus"].values.astype(str), [str(i) for i in ids])
            )
            if keep.any():
                old = cached.isel(stimulus=np.flatnonzero(keep))
                if old["stimulus"].dtype == out["stimulus"].dtype:
                    merged = xr.concat([out, old], dim="stimulus")
                    merged.attrs = out.attrs
        try:
            write_features(merged, cache, force=True)
        except OutputLockedError:  # another run is updating the shared cache: ours is not needed
            _log.info(f"note: {cache} is being updated by another run; not adding to it")
    return out


def features_for_responses(
    model: str | os.PathLike,
    responses: str | os.PathLike,
    out: str | os.PathLike,
    images: str | os.PathLike | None = None,
    device: str = "auto",
    batch_size: int = 16,
    force: bool = False,
    progress: bool = True,
) -> xr.DataArray:
    """`pbv-onnx features`: features of every stimulus of a responses file, cached in `out`."""
    from pbv_onnx.base.atomic import claim_output
    from pbv_onnx.data.responses import image_paths, load_responses
    from pbv_onnx.runtime.engine import Engine

    # The cache is this command's output: held for the whole run (an existing one is updated).
    with claim_output(out, force=True):
        ds = load_responses(responses)
        paths = image_paths(ds, responses, images)
        engine = Engine(model, device=device, batch_size=batch_size)
        return load_or_compute_features(
            engine, paths, ds["stimulus"].values, cache=Path(out), force=force, progress=progress
        )
