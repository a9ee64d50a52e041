"""NWB sessions into the responses format: units (spike times) as channels, and each presentation's
spike rate in a window after its onset. Presentations come from a TimeIntervals table (`trials` by
default) or from an IndexSeries over an Images container (whose images are returned to be written).
pynwb is an optional extra, imported only here and only when an NWB file is read."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import xarray as xr

from pbv_onnx.base.errors import DependencyError, InputDataError, PbvError, UsageError
from pbv_onnx.base.netcdf import check_memory, human_bytes
from pbv_onnx.data.presentations import as_strings, by_stimulus, per_stimulus, read_stimulus_table, require_all
from pbv_onnx.data.responses import _fmt, make_responses, preferred_category, validate_responses

INSTALL = "pip install 'pbv-onnx[nwb]'"
STIMULUS_COLUMNS = ("stimulus_id", "image_id")  # tried in this order when no column is named
_log = logging.getLogger(__name__)


def _pynwb():
    try:
        import pynwb
    except ImportError:
        raise DependencyError(None, f"reading NWB files needs pynwb, an optional extra: {INSTALL}") from None
    return pynwb


def spike_counts(spike_times: Sequence[np.ndarray], starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """[unit, window] number of spikes of each unit in each window [start, stop): exact, two binary
    searches per unit over all windows at once."""
    starts, stops = np.asarray(starts, np.float64), np.asarray(stops, np.float64)
    out = np.empty((len(spike_times), len(starts)), np.int64)
    for i, times in enumerate(spike_times):
        times = np.sort(np.asarray(times, np.float64))
        out[i] = np.searchsorted(times, stops, side="left") - np.searchsorted(times, starts, side="left")
    return out


def observed(intervals: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """[window] whether each window [start, stop) lies inside one of the observation intervals [k, 2]."""
    intervals = np.asarray(intervals, np.float64).reshape(-1, 2)
    intervals = intervals[np.argsort(intervals[:, 0], kind="stable")]
    # the last interval starting at or before each window's start; overlapping intervals are merged first
    merged: list[list[float]] = []
    for a, b in intervals:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    if not merged:
        return np.zeros(len(starts), bool)
    m = np.asarray(merged)
    k = np.searchsorted(m[:, 0], starts, side="right") - 1
    return (k >= 0) & (stops <= m[np.maximum(k, 0), 1])


@dataclass
class Presentations:
    """What was shown when: one entry per presentation, in time order."""

    source: str  # e.g. "trials table 'trials'", for messages
    onset: np.ndarray  # [P] seconds
    stimulus: np.ndarray  # [P] stimulus ids (str)
    columns: dict[str, np.ndarray] = field(default_factory=dict)  # per-presentation labels (category, group, file)
    images: dict[str, object] = field(default_factory=dict)  # stimulus id -> pynwb Image (IndexSeries form)


def _ragged(table, name: str) -> tuple[np.ndarray, object]:
    """(ends, target) of a ragged column: the values of row i are target.data[ends[i-1]:ends[i]]."""
    col = table[name]
    return np.asarray(col.data[:], np.int64), col.target


def _rows(ends: np.ndarray) -> list[slice]:
    starts = np.concatenate([[0], ends[:-1]])
    return [slice(int(a), int(b)) for a, b in zip(starts, ends)]


def _regions(units, path: Path) -> list[str] | None:
    """Each unit's recording region: the location of its electrodes (or electrode group)."""
    cols = list(units.colnames)
    if "electrodes" in cols:
        ends, region = _ragged(units, "electrodes")
        table = region.table
        if "location" not in table.colnames:
            return None
        rows = np.asarray(region.data[:], np.int64)
        locations = as_strings(table["location"].data[:])
        return ["/".join(dict.fromkeys(locations[rows[s]])) for s in _rows(ends)]
    if "electrode_group" in cols:
        return [str(getattr(g, "location", "") or "") for g in units["electrode_group"].data[:]]
    return None


def _table_column(table, name: str, path: Path, source: str) -> np.ndarray:
    col = table[name]
    if type(col).__name__ in ("VectorIndex", "DynamicTableRegion"):
        raise InputDataError(path, f"column {name!r} of the {source} must hold one value per presentation")
    return np.asarray(col.data[:])


def _from_table(table, path: Path, stimulus_column: str | None, wanted: Sequence[str]) -> Presentations:
    source = f"intervals table {table.name!r}"
    cols = list(table.colnames)
    if stimulus_column is not None and stimulus_column not in cols:
        raise InputDataError(
            path, f"the {source} has no stimulus column {stimulus_column!r} (columns: {', '.join(cols)})"
        )
    name = stimulus_column or next((c for c in STIMULUS_COLUMNS if c in cols), None)
    if name is None:
        raise InputDataError(
            path,
            f"the {source} has no stimulus column ({' or '.join(STIMULUS_COLUMNS)}; "
            f"columns: {', '.join(cols)}); name one with stimulus_column",
            param="stimulus_column",
        )
    onset = np.asarray(table["start_time"].data[:], np.float64)
    stim = as_strings(_table_column(table, name, path, source))
    extra = {c: _table_column(table, c, path, source) for c in wanted if c in cols and c != name}
    return Presentations(source, onset, stim, extra)


def _image_order(series, path: Path) -> list:
    images = series.indexed_images
    order = getattr(images, "order_of_images", None)
    if order is not None:
        return list(order.data[:])
    return list(images.images.values())


def _from_index_series(series, path: Path) -> Presentations:
    source = f"IndexSeries {series.name!r}"
    if series.indexed_images is None:
        raise InputDataError(path, f"the {source} indexes no Images container (an ImageSeries is not supported)")
    order = _image_order(series, path)
    index = np.asarray(series.data[:])
    if index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
        raise InputDataError(path, f"the {source} data must be integer image indices, not {index.dtype} {index.shape}")
    bad = index[(index < 0) | (index >= len(order))]
    if len(bad):
        raise InputDataError(
            path, f"the {source} indexes image {int(bad[0])}, but its Images container holds {len(order)}"
        )
    onset = np.asarray(series.get_timestamps(), np.float64)
    if len(onset) != len(index):
        raise InputDataError(path, f"the {source} has {len(index)} indices but {len(onset)} timestamps")
    names = np.array([img.name for img in order], dtype=str)
    used = {names[i]: order[i] for i in np.unique(index)}
    return Presentations(source, onset, names[index], {}, used)


def _presentations(
    nwbfile, path: Path, intervals: str | None, stimulus_column: str | None, wanted: Sequence[str]
) -> Presentations:
    from pynwb.image import IndexSeries

    tables = dict(nwbfile.intervals or {})
    series = {o.name: o for o in nwbfile.objects.values() if isinstance(o, IndexSeries)}
    listing = f"TimeIntervals tables: {', '.join(tables) or 'none'}; IndexSeries: {', '.join(series) or 'none'}"
    if intervals is not None:
        if intervals in tables:
            return _from_table(tables[intervals], path, stimulus_column, wanted)
        if intervals in series:
            return _from_index_series(series[intervals], path)
        raise InputDataError(path, f"no intervals table or IndexSeries named {intervals!r} ({listing})")
    if "trials" in tables:
        return _from_table(tables["trials"], path, stimulus_column, wanted)
    if len(series) == 1:
        return _from_index_series(next(iter(series.values())), path)
    what = "several IndexSeries" if series else "no IndexSeries over Images"
    raise InputDataError(
        path, f"no 'trials' table and {what} ({listing}); name the presentations with intervals", param="intervals"
    )


def _pixels(image, path: Path) -> np.ndarray:
    """An NWB Image as uint8 pixels (rows first, as PIL writes them): grey, RGB or RGBA."""
    data = np.asarray(image.data[:])
    if not (data.ndim == 2 or (data.ndim == 3 and data.shape[2] in (3, 4))):
        raise InputDataError(path, f"image {image.name!r} has shape {data.shape}, not (rows, columns[, 3 or 4])")
    if data.dtype == np.uint8:
        return data
    if data.dtype == bool:
        return data.astype(np.uint8) * 255
    if not np.issubdtype(data.dtype, np.number) or not np.isfinite(data).all():
        raise InputDataError(path, f"image {image.name!r} holds {data.dtype} values that are not finite numbers")
    if np.issubdtype(data.dtype, np.floating) and data.max(initial=0) <= 1.0:
        data = data * 255.0  # intensities in [0, 1]
    return np.clip(np.round(data), 0, 255).astype(np.uint8)


def _file_names(stimuli: Sequence[str], folder: str) -> list[str]:
    """One PNG name per stimulus id, safe on every file system and unique."""
    out, taken = [], set()
    for s in stimuli:
        base = re.sub(r"[^A-Za-z0-9._-]", "_", s).strip(".") or "image"
        name, k = base, 1
        while name.lower() in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name.lower())
        out.append(f"{folder}/{name}.png")
    return out


def _select_units(ids: np.ndarray, unit_ids: Sequence | None) -> np.ndarray:
    """Indices of the chosen units (ids given one by one or comma-separated), in the file's order."""
    if unit_ids is None:
        return np.arange(len(ids))
    wanted = [tok for u in unit_ids for tok in str(u).replace(",", " ").split()]
    if not wanted:
        raise UsageError(None, "unit_ids is empty", param="unit_ids")
    names = as_strings(ids)
    unknown = [u for u in wanted if u not in set(names)]
    if unknown:
        raise UsageError(
            None,
            f"unit_ids names units the file does not have: {_fmt(unknown)} (units: {_fmt(names, 8)})",
            param="unit_ids",
        )
    return np.flatnonzero(np.isin(names, wanted))


def _warn_overlap(onset: np.ndarray, window: tuple[float, float], path: Path) -> None:
    t = np.sort(onset)
    gaps = np.diff(t)
    into = gaps < window[1]  # the window of a presentation ends after the next one's onset
    if into.any():
        _log.warning(
            f"{path.name}: the window {window[0]:g} to {window[1]:g} s runs into the next presentation's "
            f"onset for {int(into.sum())} of {len(t)} presentations (shortest onset gap {gaps.min():g} s)"
        )


def from_nwb(
    path: str | os.PathLike,
    window: tuple[float, float],
    intervals: str | None = None,
    stimulus_column: str | None = None,
    category_column: str = "category",
    categories: str | os.PathLike | None = None,
    unit_ids: Sequence | None = None,
    preferred: str | None = None,
    units: str = "",
    image_folder: str = "images",
    memory: int | None = None,
) -> tuple[xr.Dataset, dict[str, np.ndarray]]:
    """An NWB session -> (responses Dataset, images to write: file -> uint8 pixels).

    Response = spikes in [onset + window[0], onset + window[1]) / window length (spikes/s); NaN where
    the window falls outside the unit's observation intervals; repetition = the running count of each
    stimulus' presentations in time order. Category (and `group`, `file`) per stimulus from
    `categories` (a CSV stimulus_id,category[,group,file]) or else from the presentations table's
    columns. With an IndexSeries, the presented images are returned, named `image_folder/<id>.png`.
    """
    path = Path(path)
    t0, t1 = (float(v) for v in window)
    if not (np.isfinite(t0) and np.isfinite(t1) and t1 > t0):
        raise UsageError(None, f"window must be T0 T1 in seconds with T1 > T0, not {t0:g} {t1:g}", param="window")
    pynwb = _pynwb()
    if not path.is_file():
        raise InputDataError(path, "NWB file not found")
    table = read_stimulus_table(categories, "categories") if categories is not None else None
    try:
        with pynwb.NWBHDF5IO(str(path), "r", load_namespaces=True) as io:
            nwbfile = io.read()
            return _read(
                nwbfile,
                path,
                (t0, t1),
                intervals,
                stimulus_column,
                category_column,
                table,
                unit_ids,
                preferred,
                units,
                image_folder,
                memory,
            )
    except PbvError:
        raise
    except Exception as exc:  # h5py/hdmf/pynwb raise many unrelated types on garbage
        raise InputDataError(path, f"not a readable NWB file ({exc.__class__.__name__})") from None


def _read(
    nwbfile,
    path,
    window,
    intervals,
    stimulus_column,
    category_column,
    table,
    unit_ids,
    preferred,
    units,
    image_folder,
    memory,
) -> tuple[xr.Dataset, dict[str, np.ndarray]]:
    # structure first: units, spike times, presentations and their labels; no spike is read yet
    u = nwbfile.units
    if u is None or len(u.id) == 0:
        raise InputDataError(path, "no units (the file has no units table, or it is empty)")
    if "spike_times" not in u.colnames:
        raise InputDataError(path, "the units table has no spike_times column")
    pres = _presentations(nwbfile, path, intervals, stimulus_column, (category_column, "group", "file"))
    if len(pres.onset) == 0:
        raise InputDataError(path, f"the {pres.source} holds no presentations")
    if not np.isfinite(pres.onset).all():
        raise InputDataError(path, f"the {pres.source} has onsets that are not finite numbers")
    ids = np.asarray(u.id[:])
    chosen = _select_units(ids, unit_ids)
    order = np.argsort(pres.onset, kind="stable")  # time order: repetitions count up in it
    onset = pres.onset[order]
    shown = by_stimulus(np.empty((0, len(onset))), pres.stimulus[order], path)  # stimuli, before any spike
    category, group, files = _labels(pres, order, shown, table, category_column, path)

    ends, target = _ragged(u, "spike_times")
    n_spikes = int(np.prod(target.data.shape))
    check_memory(
        path,
        8 * n_spikes + 3 * 8 * len(chosen) * len(onset),
        f"{n_spikes} spike times, {len(chosen)} units x {len(onset)} presentations",
        memory,
    )
    starts, stops = onset + window[0], onset + window[1]
    spikes = np.asarray(target.data[:], np.float64)
    if not np.isfinite(spikes).all():
        raise InputDataError(path, "spike_times holds values that are not finite numbers")
    rows = _rows(ends)
    counts = spike_counts([spikes[rows[i]] for i in chosen], starts, stops).astype(np.float64)
    rates = counts / (window[1] - window[0])
    if "obs_intervals" in u.colnames:
        o_ends, o_target = _ragged(u, "obs_intervals")
        o_rows, o_data = _rows(o_ends), np.asarray(o_target.data[:], np.float64)
        for k, i in enumerate(chosen):
            rates[k, ~observed(o_data[o_rows[i]], starts, stops)] = np.nan  # not recorded then: missing
    trials = by_stimulus(rates, pres.stimulus[order], path)
    pixels: dict[str, np.ndarray] = {}
    if pres.images:
        files = _file_names(trials.stimuli, image_folder)
        pixels = {f: _pixels(pres.images[s], path) for f, s in zip(files, trials.stimuli)}
    region = _regions(u, path)
    ds = make_responses(
        trials.values,
        as_strings(ids[chosen]),
        trials.stimuli,
        category,
        file=files,
        region=None if region is None else [region[i] for i in chosen],
        repetition=trials.repetitions,
        preferred=preferred,
        units=units or "spikes/s",
        group=group,
    )
    ds.attrs["window"] = [window[0], window[1]]
    ds.attrs["source"] = f"{path.name}, {pres.source}"
    ds = validate_responses(ds, path)
    if preferred is not None:
        preferred_category(ds, preferred, path)
    # said once each, and only for a file that is accepted: a refusal stays one line
    _warn_overlap(onset, window, path)
    silent = np.nansum(counts, axis=1) == 0
    if silent.any():
        _log.warning(
            f"{path.name}: {int(silent.sum())} unit(s) without spikes in any window, kept as zeros: "
            f"{_fmt(as_strings(ids[chosen][silent]))}"
        )
    _log.debug(
        f"{path.name}: {len(chosen)} units x {len(trials.stimuli)} stimuli from {len(onset)} presentations "
        f"({human_bytes(trials.values.nbytes)})"
    )
    return ds, pixels


def _labels(
    pres: Presentations, order: np.ndarray, shown, table, category_column: str, path: Path
) -> tuple[list[str], list[str] | None, list[str] | None]:
    """Category, group and image file of each stimulus: from the categories table when it has the
    column, else from the presentations table's column of that name."""
    columns = {k: v[order] for k, v in pres.columns.items()}
    stimuli = shown.stimuli

    def label(name: str) -> tuple[list[str] | None, Path]:
        if table is not None and table.has(name):
            return table.column(name, stimuli), table.path
        if name in columns:
            return per_stimulus(columns[name], shown, name, path), path
        return None, path

    if table is not None and not table.has(category_column):
        raise InputDataError(table.path, f"missing column {category_column} (has: {', '.join(table.columns)})")
    category, where = label(category_column)
    if category is None:
        raise InputDataError(
            path,
            f"stimulus ids with no category: the {pres.source} has no {category_column!r} "
            "column; give categories (a CSV stimulus_id,category)",
            param="categories",
        )
    require_all(category, stimuli, "category", where)
    group, where = label("group")
    if group is not None:
        require_all(group, stimuli, "group", where)
    file_col = table.file_column() if table is not None else None
    files = table.column(file_col, stimuli) if file_col is not None else label("file")[0]
    return category, group, files
