"""Recordings per presentation (NWB trials, BrainIO presentations) into the responses format: trials
grouped by stimulus into repetitions, per-stimulus columns, and the stimulus set table."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pbv_onnx.base.errors import InputDataError
from pbv_onnx.data.responses import _fmt, _read_csv

# the stimulus id column of a stimulus set; BrainIO's older sets call it image_id
ID_COLUMNS = ("stimulus_id", "image_id")
# the image file column: BrainIO's stimulus sets write `filename`, this project's tables `file`
FILE_COLUMNS = ("filename", "file")


def as_strings(values) -> np.ndarray:
    """Any 1-d array of ids or labels (str, bytes, numbers) as str, bytes decoded as UTF-8."""
    arr = np.asarray(values)
    if arr.dtype.kind == "S" or arr.dtype == object:
        return np.array(
            [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in arr.ravel()], dtype=str
        )
    return arr.astype(str)


def running_count(index: np.ndarray) -> np.ndarray:
    """For each position, how many earlier positions hold the same value: [a, b, a, a] -> [0, 0, 1, 2]."""
    index = np.asarray(index)
    order = np.argsort(index, kind="stable")
    ranked = index[order]
    count = np.empty(len(index), np.int64)
    count[order] = np.arange(len(index)) - np.searchsorted(ranked, ranked, side="left")
    return count


@dataclass
class Trials:
    """Presentations grouped by stimulus: `values[c, s, r]`, NaN where stimulus s has no repetition r."""

    values: np.ndarray  # [channel, stimulus, repetition]
    stimuli: list[str]  # in order of first presentation
    repetitions: list  # repetition ids
    index: np.ndarray  # [presentation] -> its stimulus' position in `stimuli`


def by_stimulus(
    values: np.ndarray, stimulus: Sequence, path: str | os.PathLike, repetition: Sequence | None = None
) -> Trials:
    """values [channel, presentation] -> Trials. Repetition ids are `repetition` when given (one per
    presentation), else the running count of each stimulus' presentations in the given order."""
    values = np.asarray(values, np.float64)
    stim = as_strings(stimulus)
    uniq, first, inverse = np.unique(stim, return_index=True, return_inverse=True)
    order = np.argsort(first)  # first-presentation order
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    s_idx = rank[inverse.ravel()]
    if repetition is None:
        r_idx = running_count(s_idx)
        reps: list = list(range(int(r_idx.max()) + 1 if len(r_idx) else 0))
    else:
        rep_values = np.asarray(repetition)
        reps_u, r_idx = np.unique(rep_values, return_inverse=True)
        r_idx = r_idx.ravel()
        reps = reps_u.tolist()
        key = s_idx * len(reps) + r_idx
        keys, counts = np.unique(key, return_counts=True)
        if (counts > 1).any():
            k = keys[counts > 1][0]
            raise InputDataError(
                path,
                f"stimulus {uniq[order][k // len(reps)]} has several presentations with "
                f"repetition {reps[k % len(reps)]}",
            )
    out = np.full((values.shape[0], len(order), len(reps)), np.nan)
    out[:, s_idx, r_idx] = values
    return Trials(out, list(uniq[order]), reps, s_idx)


def per_stimulus(values: Sequence, trials: Trials, name: str, path: str | os.PathLike) -> list[str]:
    """A per-presentation label (e.g. a trials table's category column) as one value per stimulus,
    refusing a stimulus whose presentations disagree."""
    labels = as_strings(values)
    out = [""] * len(trials.stimuli)
    seen = [False] * len(trials.stimuli)
    for s, v in zip(trials.index, labels):
        if not seen[s]:
            out[s], seen[s] = v, True
        elif out[s] != v:
            raise InputDataError(
                path, f"stimulus {trials.stimuli[s]} has two different {name} values ({out[s]!r}, {v!r})"
            )
    return out


def require_all(values: Sequence[str], stimuli: Sequence[str], name: str, path: str | os.PathLike | None) -> None:
    """InputDataError naming the stimuli whose `name` is empty."""
    missing = [s for s, v in zip(stimuli, values) if str(v).strip() == ""]
    if missing:
        raise InputDataError(path, f"stimulus ids with no {name}: {_fmt(missing)}")


@dataclass
class StimulusTable:
    """A stimulus set CSV: one row per stimulus id (`stimulus_id`, or BrainIO's older `image_id`)."""

    path: Path
    columns: list[str]
    rows: dict[str, dict[str, str]]

    def has(self, column: str) -> bool:
        """Whether the table has `column`."""
        return column in self.columns

    def column(self, name: str, stimuli: Sequence[str]) -> list[str]:
        """The value of column `name` of each stimulus ("" for a stimulus not in the table)."""
        return [self.rows.get(s, {}).get(name, "") for s in stimuli]

    def file_column(self) -> str | None:
        """The column naming each stimulus' image file, if any."""
        return next((c for c in FILE_COLUMNS if c in self.columns), None)

    def require(self, stimuli: Sequence[str], source: str | os.PathLike) -> None:
        """InputDataError when stimuli of `source` are not in the table."""
        missing = [s for s in stimuli if s not in self.rows]
        if missing:
            raise InputDataError(
                self.path, f"lacks {len(missing)} stimulus id(s) of {Path(source).name}: {_fmt(missing)}"
            )


def read_stimulus_table(path: str | os.PathLike, what: str = "stimulus set") -> StimulusTable:
    """Read a stimulus set CSV (`stimulus_id` plus any of category, filename/file, group ...)."""
    path = Path(path)
    rows = _read_csv(path, (), what)
    columns = list(rows[0])
    id_col = next((c for c in ID_COLUMNS if c in columns), None)
    if id_col is None:
        raise InputDataError(path, f"missing column stimulus_id (has: {', '.join(columns) or 'none'})")
    table: dict[str, dict[str, str]] = {}
    for line, row in enumerate(rows, start=2):
        sid = row[id_col]
        if sid == "":
            raise InputDataError(path, f"line {line}: empty {id_col}")
        if table.setdefault(sid, row) != row:
            raise InputDataError(path, f"line {line}: a second, different row for stimulus {sid!r}")
    return StimulusTable(path, columns, table)


def relative_files(
    files: Sequence[str], images: str | os.PathLike | None, out_dir: str | os.PathLike | None
) -> list[str]:
    """Image file names of a stimulus set as the responses file stores them: with an `images`
    folder, that folder's files written relative to the responses file's folder `out_dir`."""
    if images is None:
        return list(files)
    out = []
    for f in files:
        p = Path(f) if Path(f).is_absolute() else Path(images) / f
        if out_dir is None:
            out.append(str(p.absolute()))
            continue
        try:
            out.append(os.path.relpath(p.absolute(), Path(out_dir).absolute()))
        except ValueError:  # another drive (Windows): no relative path
            out.append(str(p.absolute()))
    return out
