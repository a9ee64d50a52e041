"""Safe NetCDF reads, checked before they read: structure first, then the declared sizes against the
memory the machine has, then the whole file into memory; every failure a one-line InputDataError."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import xarray as xr

from pbv_onnx.base.errors import InputDataError, PbvError

try:
    import resource
except ImportError:  # not POSIX: no address-space limit to read
    resource = None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_available() -> int | None:
    # a container's memory cap (cgroup v2); MemAvailable shows the host's memory, not the cap
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
    except (OSError, ValueError):
        return None


def _address_space_available() -> int | None:
    # `ulimit -v` caps the address space: an allocation past it is a MemoryError
    if resource is None:
        return None
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY:
            return None
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        return soft - used
    except (OSError, ValueError, AttributeError):
        return None


def available_memory() -> int | None:
    """Bytes a new allocation can take: the least of the free memory, the container's cap and the
    address-space limit; None when none of them is known."""
    known = [m for m in (_meminfo_available(), _cgroup_available(), _address_space_available()) if m is not None]
    return max(0, min(known)) if known else None


def human_bytes(n: float) -> str:
    """1.44e10 -> '14.4 GB' (decimal units)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def check_memory(path: str | os.PathLike | None, nbytes: int, detail: str, memory: int | None = None) -> None:
    """InputDataError when the `nbytes` a file declares (`detail` says where) exceed `memory`, by
    default the available memory."""
    limit = available_memory() if memory is None else memory
    if limit is not None and nbytes > limit:
        raise InputDataError(
            path,
            f"declares {human_bytes(nbytes)} of data ({detail}), more than the "
            f"{human_bytes(limit)} of memory available",
        )


def declared_bytes(ds: xr.Dataset) -> tuple[int, str]:
    """Bytes the variables of a lazily opened Dataset declare (from shapes and dtypes, nothing read),
    and a description of the largest: "'response' is 60000 x 60000 float32"."""
    sizes = {name: int(v.size) * v.dtype.itemsize for name, v in ds.variables.items()}
    if not sizes:
        return 0, "no variables"
    name = max(sizes, key=sizes.get)
    v = ds.variables[name]
    return sum(sizes.values()), f"{name!r} is {' x '.join(map(str, v.shape))} {v.dtype}"


def read_netcdf(
    path: str | os.PathLike, what: str, check: Callable[[xr.Dataset], None] | None = None, memory: int | None = None
) -> xr.Dataset:
    """Open a NetCDF file (h5netcdf) fully into memory; `what` names the file kind in errors.

    Before any array is read, `check` (given the lazily opened Dataset) refuses a missing variable
    or coordinate, then the declared sizes are held against `memory` (default: the available memory).
    """
    path = Path(path)
    if not path.is_file():
        raise InputDataError(path, f"{what} file not found")
    try:
        ds = xr.open_dataset(path, engine="h5netcdf")  # lazy: only the index coordinates are read
    except Exception as exc:  # h5py/h5netcdf/xarray raise many unrelated types on garbage
        raise InputDataError(path, f"not a readable NetCDF {what} file ({exc.__class__.__name__})") from None
    with ds:
        try:
            if check is not None:
                check(ds)
            total, largest = declared_bytes(ds)
            check_memory(path, total, largest, memory)
            return ds.load()
        except PbvError:
            raise
        except Exception as exc:
            raise InputDataError(path, f"not a readable NetCDF {what} file ({exc.__class__.__name__})") from None
