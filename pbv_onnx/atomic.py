"""Atomic outputs: write to a temporary sibling, rename into place; never overwrite without force."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import OutputError


def check_writable(dest: str | os.PathLike, force: bool) -> Path:
    """Refuse an existing output unless `force`; make sure its folder exists."""
    dest = Path(dest)
    if dest.exists() and not force:
        raise OutputError(dest, "already exists (use --force to overwrite)")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(dest.parent, f"cannot create folder: {exc.strerror}") from None
    return dest


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success rename it onto `dest`, else remove it."""
    dest = check_writable(dest, force)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if dest.exists() and not force:  # appeared while we worked: a concurrent run
            raise OutputError(dest, "was created by another process while this one ran")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `dest`; on success swap it into place as a whole."""
    dest = check_writable(dest, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            if not force:
                raise OutputError(dest, "was created by another process while this one ran")
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
            os.replace(dest, old / "x")
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_netcdf(ds, dest: str | os.PathLike, force: bool = False) -> Path:
    """Write an xarray Dataset to NetCDF-4 atomically."""
    with atomic_file(dest, force) as tmp:
        ds.to_netcdf(tmp, engine="h5netcdf")
    return Path(dest)
