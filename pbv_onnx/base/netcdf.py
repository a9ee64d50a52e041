"""Safe NetCDF reads: the whole file into memory, every failure a one-line InputDataError."""

from __future__ import annotations

import os
from pathlib import Path

import xarray as xr

from pbv_onnx.base.errors import InputDataError


def read_netcdf(path: str | os.PathLike, what: str) -> xr.Dataset:
    """Open a NetCDF file (h5netcdf) fully into memory; `what` names the file kind in errors."""
    path = Path(path)
    if not path.is_file():
        raise InputDataError(path, f"{what} file not found")
    try:
        with xr.open_dataset(path, engine="h5netcdf") as ds:
            return ds.load()
    except Exception as exc:  # h5py/h5netcdf/xarray raise many unrelated types on garbage
        raise InputDataError(path, f"not a readable NetCDF {what} file ({exc.__class__.__name__})") from None
