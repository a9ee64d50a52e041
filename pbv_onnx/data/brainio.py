"""BrainIO (Brain-Score) neuroid assemblies: NetCDF `presentation x neuroid [x time_bin]` with a stimulus
set CSV in, as the responses format; readout predictions out as an assembly with the same names."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import xarray as xr

from pbv_onnx.base.errors import InputDataError, UsageError
from pbv_onnx.base.netcdf import read_netcdf
from pbv_onnx.data.presentations import (
    ID_COLUMNS,
    as_strings,
    by_stimulus,
    per_stimulus,
    read_stimulus_table,
    relative_files,
    require_all,
)
from pbv_onnx.data.responses import _fmt, make_responses, preferred_category, validate_responses

PRESENTATION, NEUROID, TIME_BIN = "presentation", "neuroid", "time_bin"
# BrainIO's write_netcdf stores the assembly as `data`; xarray names an unnamed DataArray this way
DATA_NAMES = ("data", "__xarray_dataarray_variable__")


def _on(ds: xr.Dataset, names: Sequence[str], dim: str) -> str | None:
    """The first of `names` that is a variable on `dim` alone."""
    return next((n for n in names if n in ds.variables and ds[n].dims == (dim,)), None)


def _data_variable(ds: xr.Dataset, path: Path) -> str:
    """The assembly's variable (dims presentation x neuroid [x time_bin]), checked without reading it."""
    found = [n for n, v in ds.data_vars.items() if {PRESENTATION, NEUROID} <= set(v.dims)]
    if not found:
        dims = ", ".join(map(str, ds.sizes)) or "none"
        raise InputDataError(
            path, f"not a BrainIO neuroid assembly: no variable with dims presentation and neuroid (dims: {dims})"
        )
    if len(found) > 1:
        named = [n for n in DATA_NAMES if n in found]
        if not named:
            raise InputDataError(path, f"several variables with dims presentation and neuroid: {_fmt(found)}")
        found = named
    name = found[0]
    extra = set(ds[name].dims) - {PRESENTATION, NEUROID, TIME_BIN}
    if extra:
        raise InputDataError(
            path,
            f"{name!r} has dims {tuple(ds[name].dims)}; a neuroid assembly has "
            "presentation, neuroid and optionally time_bin",
        )
    dtype = ds[name].dtype
    if not np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.complexfloating):
        raise InputDataError(path, f"{name!r} must be real numbers, not {dtype}")
    if _on(ds, ID_COLUMNS, PRESENTATION) is None:
        raise InputDataError(path, "no 'stimulus_id' coordinate on the presentation dimension")
    if _on(ds, ("neuroid_id",), NEUROID) is None:
        raise InputDataError(path, "no 'neuroid_id' coordinate on the neuroid dimension")
    return name


def check_assembly_structure(ds: xr.Dataset, path: str | os.PathLike) -> None:
    """Refuse a Dataset that is not a neuroid assembly, reading none of its data."""
    _data_variable(ds, Path(path))


def _time_window(da: xr.DataArray, ds: xr.Dataset, time_bins: tuple[float, float] | None, path: Path) -> np.ndarray:
    """[neuroid, presentation]: the mean over the time bins inside `time_bins` (default all)."""
    if TIME_BIN not in da.dims:
        if time_bins is not None:
            raise UsageError(path, "time_bins given, but the assembly has no time_bin dimension", param="time_bins")
        return da.transpose(NEUROID, PRESENTATION).values.astype(np.float64)
    keep = np.ones(da.sizes[TIME_BIN], bool)
    if time_bins is not None:
        t0, t1 = time_bins
        if not t1 > t0:
            raise UsageError(None, f"time_bins must be START END with END > START, not {t0} {t1}", param="time_bins")
        start, end = _on(ds, ("time_bin_start",), TIME_BIN), _on(ds, ("time_bin_end",), TIME_BIN)
        if start is None or end is None:
            raise InputDataError(path, "no time_bin_start and time_bin_end coordinates to select time bins by")
        starts, ends = ds[start].values.astype(float), ds[end].values.astype(float)
        keep = (starts >= t0) & (ends <= t1)
        if not keep.any():
            bins = [f"{a:g}-{b:g}" for a, b in zip(starts, ends)]
            raise UsageError(
                path, f"no time bin lies within time_bins {t0:g} {t1:g} (bins: {_fmt(bins, 6)})", param="time_bins"
            )
    values = da.transpose(NEUROID, PRESENTATION, TIME_BIN).values[..., keep].astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a presentation missing in every bin stays NaN
        return np.nanmean(values, axis=2)


def from_brainio(
    path: str | os.PathLike,
    stimuli: str | os.PathLike,
    images: str | os.PathLike | None = None,
    time_bins: tuple[float, float] | None = None,
    category_column: str = "category",
    preferred: str | None = None,
    units: str = "",
    out_dir: str | os.PathLike | None = None,
    memory: int | None = None,
) -> xr.Dataset:
    """A BrainIO neuroid assembly (NetCDF) and its stimulus set CSV -> responses Dataset.

    `neuroid_id` -> channel, `region` kept; `stimulus_id` -> stimulus, `repetition` kept (else the
    running count of each stimulus' presentations); time bins averaged over `time_bins` (START, END
    in the file's time_bin_start/end units) or all. The stimulus set gives each stimulus its
    category (`category_column`), image file (`filename` or `file`, found in `images` if given,
    written relative to `out_dir`) and `group` when it has one.
    """
    path = Path(path)
    ds = read_netcdf(path, "BrainIO assembly", lambda d: check_assembly_structure(d, path), memory)
    name = _data_variable(ds, path)
    values = _time_window(ds[name], ds, time_bins, path)
    if np.isinf(values).any():
        raise InputDataError(path, f"{name!r} holds infinite values")
    sid = _on(ds, ID_COLUMNS, PRESENTATION)
    rep = _on(ds, ("repetition",), PRESENTATION)
    trials = by_stimulus(values, ds[sid].values, path, None if rep is None else ds[rep].values)
    table = read_stimulus_table(stimuli)
    table.require(trials.stimuli, path)
    if table.has(category_column):
        category = table.column(category_column, trials.stimuli)
        where: Path = table.path
    elif _on(ds, (category_column,), PRESENTATION) is not None:
        category = per_stimulus(ds[category_column].values, trials, category_column, path)
        where = path
    else:
        raise InputDataError(
            table.path,
            f"no {category_column!r} column (has: {', '.join(table.columns)}) "
            f"and no {category_column!r} coordinate on the assembly's presentations",
            param="category_column",
        )
    require_all(category, trials.stimuli, "category", where)
    file_col = table.file_column()
    files = None if file_col is None else relative_files(table.column(file_col, trials.stimuli), images, out_dir)
    group = table.column("group", trials.stimuli) if table.has("group") else None
    region = ds["region"].values if _on(ds, ("region",), NEUROID) else None
    out = make_responses(
        trials.values,
        as_strings(ds["neuroid_id"].values),
        trials.stimuli,
        category,
        file=files,
        region=None if region is None else as_strings(region),
        repetition=trials.repetitions,
        preferred=preferred,
        units=units or str(ds[name].attrs.get("units", "")),
        group=group,
    )
    out = validate_responses(out, path)
    if preferred is not None:
        preferred_category(out, preferred, path)
    return out


def prediction_assembly(
    pred: xr.DataArray,
    region: Sequence[str] | None = None,
    attrs: dict | None = None,
    files: Sequence[str] | None = None,
) -> xr.Dataset:
    """Predictions (channel, stimulus) as a BrainIO neuroid assembly: `data (presentation, neuroid)`
    with `stimulus_id` (and `filename`) on presentations and `neuroid_id`, `region` on neuroids, no
    MultiIndex (as BrainIO's write_netcdf stores it)."""
    pred = pred.transpose("channel", "stimulus")
    n = pred.sizes["channel"]
    coords = {
        "stimulus_id": (PRESENTATION, pred["stimulus"].values),
        "neuroid_id": (NEUROID, pred["channel"].values),
        "region": (NEUROID, np.asarray(region if region is not None else [""] * n, dtype=str)),
    }
    if files is not None:
        coords["filename"] = (PRESENTATION, np.asarray(files, dtype=str))
    return xr.Dataset(
        {"data": ((PRESENTATION, NEUROID), pred.values.T.astype(np.float64))}, coords=coords, attrs=dict(attrs or {})
    )
