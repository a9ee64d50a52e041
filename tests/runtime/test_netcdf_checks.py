"""NetCDF inputs are checked before their data is read: missing variables and coordinates first, then
the declared sizes against the memory the machine has."""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

import h5netcdf
import numpy as np
import pytest

from pbv_onnx.base import netcdf
from pbv_onnx.base.errors import InputDataError
from pbv_onnx.data.features import load_features
from pbv_onnx.data.readouts import load_readouts
from pbv_onnx.data.responses import load_responses

PBV = Path(sys.executable).parent / "pbv-onnx"


def declared(
    path: Path,
    dims: dict[str, int],
    variables: dict[str, tuple[tuple[str, ...], str]],
    coords: dict[str, np.ndarray] = (),
    attrs: dict | None = None,
) -> Path:
    """A NetCDF file whose `variables` declare their shapes but hold no written data (HDF5 allocates
    chunks on first write, so the file stays small whatever the shape); `coords` are written."""
    with h5netcdf.File(path, "w") as f:
        f.dimensions = dims
        for name, values in dict(coords).items():
            v = f.create_variable(name, (name,) if name in dims else ("stimulus",), values.dtype)
            v[:] = values
        others = " ".join(n for n in dict(coords) if n not in dims)
        for name, (vdims, dtype) in variables.items():
            v = f.create_variable(name, vdims, dtype, chunks=tuple(min(64, dims[d]) for d in vdims))
            if others:  # how NetCDF marks the non-dimension coordinates of a variable
                v.attrs["coordinates"] = others
        f.attrs.update(attrs or {})
    return path


def huge_responses(path: Path, with_category: bool) -> Path:
    """The issue's file: `response` declares 60,000 x 60,000 float32 (14.4 GB) in well under a megabyte."""
    n = 60_000
    coords = {"channel": np.arange(n), "stimulus": np.arange(n)}
    if with_category:
        coords["category"] = np.array(["body", "object"] * (n // 2), dtype="S6")
    return declared(path, {"channel": n, "stimulus": n}, {"response": (("channel", "stimulus"), "f4")}, coords)


def test_a_missing_coordinate_is_refused_at_once_without_reading_the_array(tmp_path):
    path = huge_responses(tmp_path / "huge.nc", with_category=False)
    assert path.stat().st_size < 2_000_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(InputDataError, match="huge.nc: no 'category' coordinate on the stimulus dimension"):
        load_responses(path)
    assert time.perf_counter() - start < 5
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kb < 500_000, f"the peak memory grew by {grown_kb} kB: the array was read"


def test_a_declared_array_larger_than_memory_is_refused_before_reading(tmp_path, monkeypatch):
    path = huge_responses(tmp_path / "huge.nc", with_category=True)
    monkeypatch.setattr(netcdf, "available_memory", lambda: 4_000_000_000)  # a 4 GB machine
    with pytest.raises(
        InputDataError,
        match=r"huge.nc: declares 14\.4 GB of data \('response' is 60000 x 60000 "
        r"float32\), more than the 4\.0 GB of memory available",
    ):
        load_responses(path)


def test_features_and_readouts_are_checked_the_same_way(tmp_path, monkeypatch):
    feats = declared(
        tmp_path / "features.nc",
        {"stimulus": 3, "feature": 10**7},
        {"features": (("stimulus", "feature"), "f4")},
        {"stimulus": np.arange(3), "content_sha256": np.array(["0" * 64] * 3, dtype="S64")},
        {"model_sha256": "0" * 64, "feature_shape": [10**7]},
    )
    monkeypatch.setattr(netcdf, "available_memory", lambda: 50_000_000)
    with pytest.raises(
        InputDataError,
        match=r"features.nc: declares 120\.0 MB of data \('features' is 3 x 10000000 "
        r"float32\), more than the 50\.0 MB",
    ):
        load_features(feats)
    readouts = declared(
        tmp_path / "readouts.nc",
        {"channel": 2, "feature": 10**9},
        {"weight": (("channel", "feature"), "f4")},
        {"channel": np.arange(2)},
        {"model_sha256": "0" * 64, "feature_shape": [10**9], "preferred_category": "body"},
    )
    with pytest.raises(InputDataError, match="readouts.nc: not a readouts file .no 'bias' variable"):
        load_readouts(readouts)


def test_available_memory_is_known_here_and_bounded_by_the_address_space_limit():
    free = netcdf.available_memory()
    assert free is not None and free > 0
    code = (
        "import resource; from pbv_onnx.base.netcdf import available_memory; "
        "resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, resource.RLIM_INFINITY)); print(available_memory())"
    )
    capped = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0 < capped < 8 * 2**30


def test_fit_refuses_such_files_in_one_line(tiny_model, tmp_path):
    """Through the command line, where the machine's own memory is the limit: a 40 TB declaration."""
    missing = huge_responses(tmp_path / "huge.nc", with_category=False)
    n = 100
    coords = {"channel": np.arange(n), "stimulus": np.arange(n), "category": np.array(["body"] * n, dtype="S4")}
    vast = declared(
        tmp_path / "vast.nc",
        {"channel": n, "stimulus": n, "repetition": 10**9},
        {"response": (("channel", "stimulus", "repetition"), "f4")},
        coords,
    )
    for path, fragments in (
        (missing, ["huge.nc", "no 'category' coordinate"]),
        (vast, ["vast.nc", "declares 40.0 TB of data", "of memory available"]),
    ):
        start = time.perf_counter()
        res = subprocess.run(
            [
                str(PBV),
                "fit",
                "--model",
                str(tiny_model),
                "--responses",
                str(path),
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "ro.nc"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 3 and len(lines) == 1, res.stderr
        assert all(f in lines[0] for f in fragments), lines[0]
        assert time.perf_counter() - start < 60
        assert not (tmp_path / "ro.nc").exists()
