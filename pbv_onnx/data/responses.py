"""Recorded responses: the NetCDF format, its validation, split halves and importers (CSV, .npy here;
NWB and BrainIO in data/nwb.py and data/brainio.py, all behind `import_responses`)."""

from __future__ import annotations

import csv
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import xarray as xr

from pbv_onnx.base.errors import InputDataError, UsageError
from pbv_onnx.base.netcdf import read_netcdf

RESPONSE = "response"
CORE_DIMS = ("channel", "stimulus")
REPETITION = "repetition"


def _fmt(values: Sequence, limit: int = 3) -> str:
    values = list(values)
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")


def _duplicates(values: np.ndarray) -> list:
    uniq, counts = np.unique(np.asarray(values).astype(str), return_counts=True)
    return list(uniq[counts > 1])


def check_responses_structure(ds: xr.Dataset, path: str | os.PathLike | None = None) -> tuple[str, ...]:
    """Check a responses Dataset's variables, coordinates and ids without reading `response` (so a
    lazily opened file is checked before its data is read); return the canonical dim order."""
    if RESPONSE not in ds.data_vars:
        raise InputDataError(path, f"no {RESPONSE!r} variable (found: {_fmt(ds.data_vars) or 'none'})")
    da = ds[RESPONSE]
    dims = set(da.dims)
    if dims not in (set(CORE_DIMS), set(CORE_DIMS) | {REPETITION}):
        raise InputDataError(
            path,
            f"{RESPONSE!r} must have dims (channel, stimulus) or (channel, stimulus, repetition), not {tuple(da.dims)}",
        )
    order = CORE_DIMS + ((REPETITION,) if REPETITION in dims else ())
    for dim in CORE_DIMS:
        if dim not in ds.coords:
            raise InputDataError(path, f"no {dim!r} coordinate (ids of each {dim})")
        if ds.sizes[dim] == 0:
            raise InputDataError(path, f"no {dim}s (the {dim!r} dimension is empty)")
        dup = _duplicates(ds[dim].values)
        if dup:
            raise InputDataError(path, f"duplicate {dim} ids: {_fmt(dup)}")
    if "category" not in ds.coords or ds["category"].dims != ("stimulus",):
        raise InputDataError(path, "no 'category' coordinate on the stimulus dimension")
    cats = ds["category"].values.astype(str)
    if np.any(np.char.strip(cats) == ""):
        raise InputDataError(path, "empty 'category' for some stimuli")
    for name, dim in (("file", "stimulus"), ("region", "channel"), ("phase", REPETITION), ("group", "stimulus")):
        if name in ds.coords and ds[name].dims != (dim,):
            raise InputDataError(path, f"coordinate {name!r} must lie on the {dim} dimension, not {ds[name].dims}")
    if "group" in ds.coords and np.any(np.char.strip(ds["group"].values.astype(str)) == ""):
        raise InputDataError(path, "empty 'group' for some stimuli (give every stimulus a group, or none)")
    if not np.issubdtype(da.dtype, np.number) or np.issubdtype(da.dtype, np.complexfloating):
        raise InputDataError(path, f"{RESPONSE!r} must be real numbers, not {da.dtype}")
    return order


def validate_responses(ds: xr.Dataset, path: str | os.PathLike | None = None) -> xr.Dataset:
    """Check a responses Dataset; return it with `response` in canonical dim order, as float64
    (`path` names it in errors)."""
    order = check_responses_structure(ds, path)
    da = ds[RESPONSE]
    values = da.transpose(*order).values.astype(np.float64)
    if np.isinf(values).any():
        raise InputDataError(path, f"{RESPONSE!r} holds infinite values")
    present = ~np.isnan(values)
    other = tuple(range(1, values.ndim))
    empty_channels = ds["channel"].values[~present.any(axis=other)]
    if len(empty_channels):
        raise InputDataError(path, f"channels with no responses (all NaN): {_fmt(empty_channels)}")
    empty_stimuli = ds["stimulus"].values[~present.any(axis=tuple(i for i in range(values.ndim) if i != 1))]
    if len(empty_stimuli):
        raise InputDataError(path, f"stimuli with no responses (all NaN): {_fmt(empty_stimuli)}")
    ds = ds.copy()
    ds[RESPONSE] = (order, values, da.attrs)
    return ds


def load_responses(path: str | os.PathLike) -> xr.Dataset:
    """Read and validate a responses NetCDF file, fully loaded into memory."""
    path = Path(path)
    return validate_responses(read_netcdf(path, "responses", lambda ds: check_responses_structure(ds, path)), path)


def mean_response(ds: xr.Dataset) -> xr.DataArray:
    """Mean response (channel, stimulus), averaging repetitions and ignoring missing (NaN) trials."""
    da = ds[RESPONSE]
    if REPETITION in da.dims:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices -> NaN, on purpose
            da = da.mean(REPETITION, skipna=True)
    return da.transpose(*CORE_DIMS)


def categories(ds: xr.Dataset) -> list[str]:
    """The distinct categories, in order of first appearance."""
    return categories_of(ds["category"].values)


def preferred_category(ds: xr.Dataset, override: str | None = None, path: str | os.PathLike | None = None) -> str:
    """The preferred category: `override` if given, else the file's `preferred_category` attribute."""
    known = categories(ds)
    cat = override if override is not None else ds.attrs.get("preferred_category")
    if cat is None or str(cat) == "":
        raise UsageError(
            path,
            "no preferred category: the file has no 'preferred_category' "
            f"attribute; pass preferred (one of: {_fmt(known, 8)})",
            param="preferred",
        )
    cat = str(cat)
    if cat not in known:
        # a bad --preferred is a usage error; a bad attribute, a data error
        err = UsageError if override is not None else InputDataError
        raise err(path, f"unknown preferred category {cat!r} (categories: {_fmt(known, 8)})")
    return cat


def image_paths(
    ds: xr.Dataset, path: str | os.PathLike | None, images_root: str | os.PathLike | None = None
) -> list[Path]:
    """Image file of each stimulus, in stimulus order: absolute paths kept, relative ones resolved
    against `images_root` if given, else against the responses file's folder (`path`)."""
    if "file" not in ds.coords:
        raise InputDataError(path, "no 'file' coordinate on the stimulus dimension (image paths)")
    if images_root is None and path is None and not all(Path(f).is_absolute() for f in ds["file"].values.astype(str)):
        raise UsageError(
            None,
            "the responses name image files relative to a folder they do not know: pass images_root",
            param="images_root",
        )
    root = Path(images_root) if images_root is not None else Path(path).parent
    out = []
    for f in ds["file"].values.astype(str):
        if f.strip() == "":
            raise InputDataError(path, "empty 'file' for some stimuli")
        p = Path(f)
        out.append(p if p.is_absolute() else root / p)
    return out


def split_halves(ds: xr.Dataset, path: str | os.PathLike | None = None) -> tuple[xr.DataArray, xr.DataArray] | None:
    """Mean responses (channel, stimulus) of the two halves of the repetitions, or None if there
    are no repetitions. Halves are the two values of the `phase` coordinate when present, else the
    odd and even repetitions."""
    if REPETITION not in ds[RESPONSE].dims or ds.sizes[REPETITION] < 2:
        return None
    resp = ds[RESPONSE]
    if "phase" in ds.coords:
        phases = categories_of(ds["phase"].values)
        if len(phases) != 2:
            raise InputDataError(
                path,
                f"'phase' must have exactly two values for split-half reliability, found {len(phases)}: {_fmt(phases)}",
            )
        labels = ds["phase"].values.astype(str)
        masks = [labels == p for p in phases]
    else:
        idx = np.arange(ds.sizes[REPETITION])
        masks = [idx % 2 == 0, idx % 2 == 1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        halves = tuple(
            resp.isel({REPETITION: np.flatnonzero(m)}).mean(REPETITION, skipna=True).transpose(*CORE_DIMS)
            for m in masks
        )
    return halves


def categories_of(values: np.ndarray) -> list[str]:
    """Distinct values as str, in order of first appearance."""
    seen: dict[str, None] = {}
    for v in np.asarray(values).astype(str):
        seen.setdefault(v, None)
    return list(seen)


# -- building a responses Dataset ------------------------------------------------------------


def make_responses(
    response: np.ndarray,
    channel: Sequence,
    stimulus: Sequence,
    category: Sequence[str],
    file: Sequence[str] | None = None,
    region: Sequence[str] | None = None,
    repetition: Sequence | None = None,
    phase: Sequence | None = None,
    preferred: str | None = None,
    units: str = "",
    group: Sequence | None = None,
) -> xr.Dataset:
    """Assemble a responses Dataset in the on-disk format (see docs/formats.md)."""
    response = np.asarray(response, np.float64)
    dims = CORE_DIMS + ((REPETITION,) if response.ndim == 3 else ())
    coords: dict = {
        "channel": ("channel", _id_array(channel)),
        "stimulus": ("stimulus", _id_array(stimulus)),
        "category": ("stimulus", np.asarray(category, dtype=str)),
    }
    if file is not None:
        coords["file"] = ("stimulus", np.asarray(file, dtype=str))
    if group is not None:  # related stimuli (e.g. crops of one photo): never split by cross-validation
        coords["group"] = ("stimulus", _id_array(group))
    if region is not None:
        coords["region"] = ("channel", np.asarray(region, dtype=str))
    if response.ndim == 3:
        coords[REPETITION] = (
            REPETITION,
            _id_array(repetition if repetition is not None else np.arange(response.shape[2])),
        )
        if phase is not None:
            coords["phase"] = (REPETITION, np.asarray(phase, dtype=str))
    attrs = {"units": units}
    if preferred is not None:
        attrs["preferred_category"] = preferred
    return xr.Dataset({RESPONSE: (dims, response)}, coords=coords, attrs=attrs)


def _id_array(values: Sequence) -> np.ndarray:
    """Ids as int64 when every one is an integer, else as str."""
    arr = np.asarray(values)
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.int64)
    strs = [str(v).strip() for v in arr]
    try:
        ints = [int(s) for s in strs]
    except ValueError:
        return np.asarray(strs, dtype=str)
    return np.asarray(ints, dtype=np.int64)


def _read_csv(path: Path, required: Sequence[str], what: str) -> list[dict[str, str]]:
    if not path.is_file():
        raise InputDataError(path, f"{what} file not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            reader.fieldnames = header
            rows = [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputDataError(path, f"not a readable CSV file ({exc.__class__.__name__})") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise InputDataError(path, f"missing column(s) {', '.join(missing)} (has: {', '.join(header) or 'none'})")
    if not rows:
        raise InputDataError(path, "no data rows")
    return rows


def _number(text: str, path: Path, line: int) -> float:
    if text == "" or text.lower() in {"nan", "na"}:
        return np.nan
    try:
        value = float(text)
    except ValueError:
        raise InputDataError(path, f"line {line}: response {text!r} is not a number") from None
    if np.isinf(value):
        raise InputDataError(path, f"line {line}: response is infinite")
    return value


def _one_per_key(rows, key: str, col: str, path: Path) -> dict[str, str]:
    """The value of `col` for each `key`, refusing conflicting values."""
    out: dict[str, str] = {}
    for i, row in enumerate(rows, start=2):
        k, v = row[key], row.get(col, "")
        if out.setdefault(k, v) != v:
            raise InputDataError(path, f"line {i}: {key} {k!r} has two different {col} values ({out[k]!r}, {v!r})")
    return out


def from_long_csv(path: str | os.PathLike, preferred: str | None = None, units: str = "") -> xr.Dataset:
    """Long-format CSV (one row per channel, stimulus, repetition) -> responses Dataset."""
    path = Path(path)
    rows = _read_csv(path, ("channel", "stimulus", "category", "file", "response"), "responses CSV")
    has_rep = "repetition" in rows[0]
    for i, row in enumerate(rows, start=2):
        for col in ("channel", "stimulus", "category"):
            if row[col] == "":
                raise InputDataError(path, f"line {i}: empty {col}")
    chans = list(dict.fromkeys(r["channel"] for r in rows))
    stims = list(dict.fromkeys(r["stimulus"] for r in rows))
    reps = list(dict.fromkeys(r["repetition"] for r in rows)) if has_rep else [""]
    ci = {c: i for i, c in enumerate(chans)}
    si = {s: i for i, s in enumerate(stims)}
    ri = {r: i for i, r in enumerate(reps)}
    values = np.full((len(chans), len(stims), len(reps)), np.nan)
    seen = np.zeros(values.shape, bool)
    for i, row in enumerate(rows, start=2):
        key = (ci[row["channel"]], si[row["stimulus"]], ri[row["repetition"] if has_rep else ""])
        if seen[key]:
            raise InputDataError(
                path,
                f"line {i}: a second row for channel {row['channel']!r}, "
                f"stimulus {row['stimulus']!r}" + (f", repetition {row['repetition']!r}" if has_rep else ""),
            )
        seen[key] = True
        values[key] = _number(row["response"], path, i)
    cat = _one_per_key(rows, "stimulus", "category", path)
    fil = _one_per_key(rows, "stimulus", "file", path)
    grp = _one_per_key(rows, "stimulus", "group", path) if "group" in rows[0] else None
    region = _one_per_key(rows, "channel", "region", path) if "region" in rows[0] else None
    phase = _one_per_key(rows, "repetition", "phase", path) if has_rep and "phase" in rows[0] else None
    ds = make_responses(
        values if has_rep else values[..., 0],
        chans,
        stims,
        [cat[s] for s in stims],
        file=[fil[s] for s in stims],
        group=None if grp is None else [grp[s] for s in stims],
        region=None if region is None else [region[c] for c in chans],
        repetition=reps if has_rep else None,
        phase=None if phase is None else [phase[r] for r in reps],
        preferred=preferred,
        units=units,
    )
    return _checked(ds, path, preferred)


def from_npy(
    array_path: str | os.PathLike,
    stimuli_csv: str | os.PathLike,
    channels_csv: str | os.PathLike | None = None,
    preferred: str | None = None,
    units: str = "",
) -> xr.Dataset:
    """A .npy array (channel, stimulus[, repetition]) plus a stimulus table (stimulus, category,
    file) and an optional channel table (channel[, region]) -> responses Dataset."""
    array_path = Path(array_path)
    if not array_path.is_file():
        raise InputDataError(array_path, "responses array file not found")
    try:
        values = np.load(array_path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputDataError(array_path, f"not a readable .npy array ({exc.__class__.__name__})") from None
    if values.ndim not in (2, 3):
        raise InputDataError(array_path, f"array must be (channel, stimulus[, repetition]), got shape {values.shape}")
    if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
        raise InputDataError(array_path, f"array must hold real numbers, not {values.dtype}")
    stimuli_csv = Path(stimuli_csv)
    srows = _read_csv(stimuli_csv, ("stimulus", "category", "file"), "stimulus table")
    if len(srows) != values.shape[1]:
        raise InputDataError(
            stimuli_csv, f"{len(srows)} stimuli, but the array has {values.shape[1]} along its stimulus axis"
        )
    if channels_csv is not None:
        channels_csv = Path(channels_csv)
        crows = _read_csv(channels_csv, ("channel",), "channel table")
        if len(crows) != values.shape[0]:
            raise InputDataError(
                channels_csv, f"{len(crows)} channels, but the array has {values.shape[0]} along its channel axis"
            )
        chans = [r["channel"] for r in crows]
        region = [r["region"] for r in crows] if "region" in crows[0] else None
    else:
        chans, region = list(range(values.shape[0])), None
    ds = make_responses(
        values,
        chans,
        [r["stimulus"] for r in srows],
        [r["category"] for r in srows],
        file=[r["file"] for r in srows],
        region=region,
        preferred=preferred,
        units=units,
        group=[r["group"] for r in srows] if "group" in srows[0] else None,
    )
    return _checked(ds, array_path, preferred)


def _checked(ds: xr.Dataset, path: Path, preferred: str | None) -> xr.Dataset:
    ds = validate_responses(ds, path)
    if preferred is not None:
        preferred_category(ds, preferred, path)
    return ds


# -- import-responses: one reader per kind of source -------------------------------------------

Pixels = dict  # image file (relative to the responses file's folder) -> uint8 pixels to write there


def _images_folder(out: Path) -> str:
    return f"{out.stem}_images"


def _import_csv(source: Path, out: Path, o: dict) -> tuple[xr.Dataset, Pixels]:
    return from_long_csv(source, o["preferred"], o["units"]), {}


def _import_npy(source: Path, out: Path, o: dict) -> tuple[xr.Dataset, Pixels]:
    return from_npy(source, o["stimuli"], o["channels"], o["preferred"], o["units"]), {}


def _import_nwb(source: Path, out: Path, o: dict) -> tuple[xr.Dataset, Pixels]:
    from pbv_onnx.data.nwb import from_nwb

    return from_nwb(
        source,
        o["window"],
        o["intervals"],
        o["stimulus_column"],
        o["category_column"] or "category",
        o["categories"],
        o["unit_ids"],
        o["preferred"],
        o["units"],
        image_folder=_images_folder(out),
    )


def _import_brainio(source: Path, out: Path, o: dict) -> tuple[xr.Dataset, Pixels]:
    from pbv_onnx.data.brainio import from_brainio

    return from_brainio(
        source,
        o["stimuli"],
        o["images"],
        o["time_bins"],
        o["category_column"] or "category",
        o["preferred"],
        o["units"],
        out_dir=out.parent,
    ), {}


@dataclass(frozen=True)
class Source:
    """How `import_responses` reads one kind of source, and which of its options go with it."""

    read: Callable[[Path, Path, dict], tuple[xr.Dataset, Pixels]]
    options: tuple[str, ...] = ()
    needs: tuple[tuple[str, str], ...] = ()  # (option, what it is) that must be given


# the source parameter of import_responses -> its reader; exactly one source is given
SOURCES: dict[str, Source] = {
    "csv_path": Source(_import_csv),
    "npy_path": Source(
        _import_npy, ("stimuli", "channels"), (("stimuli", "a CSV with columns stimulus, category, file"),)
    ),
    "nwb": Source(
        _import_nwb,
        ("window", "intervals", "stimulus_column", "category_column", "categories", "unit_ids"),
        (("window", "T0 T1, seconds after each onset to count spikes in"),),
    ),
    "brainio": Source(
        _import_brainio,
        ("stimuli", "images", "time_bins", "category_column"),
        (("stimuli", "the stimulus set CSV: stimulus_id, category, filename"),),
    ),
}


def import_responses(
    out: str | os.PathLike,
    csv_path: str | os.PathLike | None = None,
    npy_path: str | os.PathLike | None = None,
    stimuli: str | os.PathLike | None = None,
    channels: str | os.PathLike | None = None,
    preferred: str | None = None,
    units: str = "",
    force: bool = False,
    nwb: str | os.PathLike | None = None,
    brainio: str | os.PathLike | None = None,
    window: tuple[float, float] | None = None,
    intervals: str | None = None,
    stimulus_column: str | None = None,
    category_column: str | None = None,
    categories: str | os.PathLike | None = None,
    unit_ids: Sequence | None = None,
    time_bins: tuple[float, float] | None = None,
    images: str | os.PathLike | None = None,
) -> xr.Dataset:
    """`pbv-onnx import-responses`: build a responses file from one source (a long CSV, a .npy array,
    an NWB session or a BrainIO assembly; see SOURCES for the options each takes). An NWB session's
    presented images are written beside the output, in the folder `<out stem>_images`."""
    from pbv_onnx.base.atomic import claim_output, write_netcdf

    given = {
        k: v
        for k, v in (("csv_path", csv_path), ("npy_path", npy_path), ("nwb", nwb), ("brainio", brainio))
        if v is not None
    }
    if len(given) != 1:
        raise UsageError(
            None,
            "give one of csv_path, npy_path (with stimuli), nwb (with window) or brainio (with stimuli)",
            param=(*SOURCES, "stimuli", "window"),
        )
    ((kind, source_path),) = given.items()
    source = SOURCES[kind]
    options = {
        "stimuli": stimuli,
        "channels": channels,
        "window": window,
        "intervals": intervals,
        "stimulus_column": stimulus_column,
        "category_column": category_column,
        "categories": categories,
        "unit_ids": unit_ids,
        "time_bins": time_bins,
        "images": images,
    }
    for name, value in options.items():
        if value is not None and name not in source.options:
            owners = [k for k, s in SOURCES.items() if name in s.options]
            raise UsageError(None, f"{name} goes with {' or '.join(owners)}, not {kind}", param=(name, *owners, kind))
    for name, what in source.needs:
        if options[name] is None:
            raise UsageError(None, f"{kind} needs {name} ({what})", param=(kind, name))
    out = Path(out)
    with claim_output(out, force):
        ds, pixels = source.read(Path(source_path), out, {**options, "preferred": preferred, "units": units})
        if pixels:
            _write_with_images(ds, pixels, out, force)
        else:
            write_netcdf(ds, out, force)
    return ds


def _write_with_images(ds: xr.Dataset, pixels: Pixels, out: Path, force: bool) -> None:
    """The responses file and, beside it, the images it names: both written, or neither."""
    from PIL import Image

    from pbv_onnx.base.atomic import atomic_dir, write_netcdf

    with atomic_dir(out.parent / _images_folder(out), force) as tmp:
        for file, values in pixels.items():
            Image.fromarray(values).save(tmp / Path(file).name)
        write_netcdf(ds, out, force)  # inside: a failed write leaves no image folder behind
