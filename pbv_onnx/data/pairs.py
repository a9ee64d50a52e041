"""PAIRS.csv: a given list of (channel, object[, reference]) to explain in one run (docs/formats.md)."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from pbv_onnx.base.errors import InputDataError, UsageError

REQUIRED = ("channel", "object")
OPTIONAL = ("reference",)


@dataclass(frozen=True)
class PairRow:
    """One requested pair as written: `where` names it in messages ("row 3 (line 4)")."""

    where: str
    channel: str
    object: str
    reference: str | None  # None: the object's best-matching reference


def _cell(value: Any) -> str:
    """A cell as text: None, NaN and blanks are empty."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value).strip()


def _rows(records: Iterable[tuple[str, dict[str, Any]]], source: str | None) -> list[PairRow]:
    out = []
    for where, rec in records:
        channel, obj, ref = _cell(rec.get("channel")), _cell(rec.get("object")), _cell(rec.get("reference"))
        for name, value in (("channel", channel), ("object", obj)):
            if not value:
                raise InputDataError(source, f"{where}: empty {name}")
        out.append(PairRow(where, channel, obj, ref or None))
    if not out:
        raise InputDataError(source, "no pairs (the file has a header but no rows)")
    return out


def _check_columns(columns: Iterable[str], source: str | None) -> None:
    have = [str(c).strip() for c in columns]
    missing = [c for c in REQUIRED if c not in have]
    if missing:
        raise InputDataError(
            source,
            f"missing column(s) {', '.join(missing)} (has: {', '.join(have) or 'none'}; "
            f"needs {', '.join(REQUIRED)} and optionally {', '.join(OPTIONAL)})",
        )


def read_pairs(path: str | os.PathLike) -> list[PairRow]:
    """The rows of a PAIRS.csv file (columns channel, object, optional reference; others ignored)."""
    path = Path(path)
    if not path.is_file():
        raise InputDataError(path, "pairs file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputDataError(path, f"cannot read the pairs file ({exc.__class__.__name__})") from None
    if not text.strip():
        raise InputDataError(path, "empty file (expected a header: channel,object[,reference])")
    try:
        reader = csv.DictReader(text.splitlines())
        columns = reader.fieldnames or []
        _check_columns(columns, str(path))
        records = []
        for k, rec in enumerate(reader, start=1):
            if not any(_cell(v) for v in rec.values() if not isinstance(v, list)):
                continue  # a blank line
            records.append((f"row {k} (line {reader.line_num})", {str(c).strip(): v for c, v in rec.items()}))
    except csv.Error as exc:
        raise InputDataError(path, f"not a readable CSV file ({exc})") from None
    return _rows(records, str(path))


def pairs_table(table: Any, source: str | None = None) -> list[PairRow]:
    """Rows from a table in memory: a DataFrame-like object (with `columns`), a sequence of dicts,
    or a sequence of tuples (channel, object[, reference])."""
    if hasattr(table, "columns") and hasattr(table, "to_dict"):
        _check_columns(table.columns, source)
        records = table.to_dict("records")
        return _rows(((f"row {k}", r) for k, r in enumerate(records, start=1)), source)
    try:
        items = list(table)
    except TypeError:
        raise UsageError(
            None, "pairs must be a PAIRS.csv path, a table or a list of (channel, object[, reference])", param="pairs"
        ) from None
    records = []
    for k, item in enumerate(items, start=1):
        if isinstance(item, dict):
            if k == 1:
                _check_columns(item.keys(), source)
            records.append((f"row {k}", item))
        elif isinstance(item, (tuple, list)) and len(item) in (2, 3):
            records.append((f"row {k}", dict(zip(("channel", "object", "reference"), item))))
        else:
            raise UsageError(
                None, f"pairs row {k}: expected (channel, object[, reference]), got {item!r}", param="pairs"
            )
    if not records:
        raise UsageError(None, "pairs is empty", param="pairs")
    return _rows(records, source)


def load_pairs(pairs: Any) -> tuple[list[PairRow], Path | None]:
    """(rows, the file they came from) of a PAIRS.csv path or a table in memory."""
    if isinstance(pairs, (str, os.PathLike)):
        return read_pairs(pairs), Path(pairs)
    return pairs_table(pairs), None
