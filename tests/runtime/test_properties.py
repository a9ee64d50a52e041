"""Property tests of the loaders: on any input they return a valid result or raise a PbvError, never anything else."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from pbv_onnx.base.errors import InputDataError, PbvError
from pbv_onnx.data.features import load_features
from pbv_onnx.data.readouts import load_readouts
from pbv_onnx.data.responses import from_long_csv, from_npy, load_responses, validate_responses
from pbv_onnx.runtime.images import Preprocessing, load_image, preprocess

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SPEC = Preprocessing(resize=(16, 16), crop=None, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


# -- responses datasets ---------------------------------------------------------------------------

DTYPES = ["float64", "float32", "int16", "int64", "bool", "U3", "complex64"]


@st.composite
def responses_datasets(draw) -> xr.Dataset:
    """Datasets shaped roughly like responses files, with any of their parts wrong or missing."""
    C, S = draw(st.integers(0, 3)), draw(st.integers(0, 5))
    R = draw(st.sampled_from([None, 1, 2, 3]))
    shape = (C, S) if R is None else (C, S, R)
    dims = ("channel", "stimulus") if R is None else ("channel", "stimulus", "repetition")
    if draw(st.booleans()):  # sometimes the dims are wrong
        dims = tuple(draw(st.permutations(list(dims) if len(dims) == 3 else list(dims) + ["trial"])))[: len(shape)]
    values = np.asarray(
        draw(
            st.lists(
                st.sampled_from([0.0, 1.5, -2.0, 7.0, np.nan, np.inf, -np.inf]),
                min_size=int(np.prod(shape)),
                max_size=int(np.prod(shape)),
            )
        )
    ).reshape(shape)
    dtype = draw(st.sampled_from(DTYPES))
    with np.errstate(invalid="ignore"):
        data = (
            values.astype(dtype)
            if dtype not in ("int16", "int64", "bool")
            else np.nan_to_num(values, posinf=9, neginf=-9).astype(dtype)
        )
    ds = xr.Dataset({draw(st.sampled_from(["response", "response", "rate"])): (dims, data)})
    size = dict(zip(dims, shape))
    n_ch, n_st = size.get("channel", 0), size.get("stimulus", 0)
    coords = {
        "channel": (
            "channel",
            draw(st.lists(st.sampled_from(["c1", "c2", "c3", "c1"]), min_size=n_ch, max_size=n_ch))
            if draw(st.booleans())
            else np.arange(n_ch),
        ),
        "stimulus": (
            "stimulus",
            draw(st.lists(st.text("abs12", min_size=0, max_size=3), min_size=n_st, max_size=n_st)),
        ),
        "category": (
            "stimulus",
            draw(st.lists(st.sampled_from(["body", "object", "", " "]), min_size=n_st, max_size=n_st)),
        ),
        "file": ("stimulus", [f"img/{i}.png" for i in range(n_st)]),
    }
    for name in draw(st.sets(st.sampled_from(sorted(coords)))):
        del coords[name]  # missing coordinates
    for name, (dim, vals) in coords.items():
        if dim in size:
            ds = ds.assign_coords({name: (dim, np.asarray(vals))})
    if draw(st.booleans()):
        ds.attrs["preferred_category"] = "body"
    return ds


def _valid_responses(ds: xr.Dataset) -> None:
    r = ds["response"]
    assert r.dims[:2] == ("channel", "stimulus") and r.dtype == np.float64
    assert not np.isinf(r.values).any()
    present = ~np.isnan(r.values)
    assert present.reshape(r.shape[0], -1).any(1).all()
    assert np.moveaxis(present, 1, 0).reshape(r.shape[1], -1).any(1).all()
    for dim in ("channel", "stimulus"):
        assert len(set(ds[dim].values.astype(str))) == ds.sizes[dim] > 0


@SETTINGS
@given(responses_datasets())
def test_validating_responses_succeeds_validly_or_raises_a_pbv_error(ds):
    try:
        out = validate_responses(ds, "r.nc")
    except PbvError as exc:
        assert exc.path == "r.nc" and exc.message
        return
    _valid_responses(out)


@settings(max_examples=25, deadline=None)
@pytest.mark.filterwarnings("ignore:You are writing invalid netcdf")
@given(responses_datasets())
def test_loading_a_responses_file_succeeds_validly_or_raises_a_pbv_error(folder, ds):
    path = folder / "r.nc"
    try:
        ds.to_netcdf(path, engine="h5netcdf", invalid_netcdf=True)
    except Exception:  # not every drawn dataset can be written at all
        assume(False)
    try:
        out = load_responses(path)
    except PbvError as exc:
        assert str(path) == exc.path
        return
    _valid_responses(out)


# -- corrupt bytes for every NetCDF loader and the importers ----------------------------------------


@pytest.fixture(scope="module")
def valid_nc(folder) -> bytes:
    ds = xr.Dataset(
        {"response": (("channel", "stimulus"), np.ones((2, 3)))},
        coords={"channel": [1, 2], "stimulus": ["a", "b", "c"], "category": ("stimulus", ["x"] * 3)},
    )
    ds.to_netcdf(folder / "valid.nc", engine="h5netcdf")
    return (folder / "valid.nc").read_bytes()


@SETTINGS
@given(
    cut=st.floats(0, 1),
    flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=8),
    loader=st.sampled_from([load_responses, load_features, load_readouts]),
)
def test_netcdf_loaders_on_damaged_files_raise_pbv_errors(folder, valid_nc, cut, flips, loader):
    data = bytearray(valid_nc[: int(len(valid_nc) * cut)])
    for where, byte in flips:
        if data:
            data[int(where * (len(data) - 1))] = byte
    path = folder / "damaged.nc"
    path.write_bytes(bytes(data))
    try:
        loader(path)
    except PbvError as exc:
        assert exc.path == str(path)


@SETTINGS
@given(
    text=st.text(
        alphabet=st.sampled_from(list('channel,stimulus,category,file,response,repetition,\n"1.5xyn;a\t\r '))
        | st.characters(),
        max_size=400,
    )
)
def test_the_csv_importer_on_any_text_succeeds_validly_or_raises_a_pbv_error(folder, text):
    path = folder / "long.csv"
    path.write_bytes(text.encode("utf-8", errors="replace"))
    try:
        ds = from_long_csv(path)
    except PbvError:
        return
    _valid_responses(ds)


@SETTINGS
@given(data=st.binary(max_size=300), header=st.booleans())
def test_the_npy_importer_on_any_bytes_raises_a_pbv_error_or_succeeds(folder, data, header):
    path = folder / "a.npy"
    if header:  # a real .npy header followed by arbitrary (often too short) data
        buf = io.BytesIO()
        np.save(buf, np.zeros((2, 3)))
        data = buf.getvalue()[:128] + data
    path.write_bytes(data)
    (folder / "stimuli.csv").write_text("stimulus,category,file\na,body,a.png\nb,body,b.png\nc,object,c.png\n")
    try:
        ds = from_npy(path, folder / "stimuli.csv")
    except PbvError:
        return
    _valid_responses(ds)


# -- image bytes -----------------------------------------------------------------------------------


def _encoded(fmt: str, size=(5, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 90)).save(buf, format=fmt)
    return buf.getvalue()


FORMATS = {fmt: _encoded(fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")}


@SETTINGS
@given(
    fmt=st.sampled_from(sorted(FORMATS)),
    cut=st.floats(0, 1),
    flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=4),
    tail=st.binary(max_size=64),
)
def test_image_loading_succeeds_validly_or_raises_an_input_data_error(folder, fmt, cut, flips, tail):
    data = bytearray(FORMATS[fmt][: max(1, int(len(FORMATS[fmt]) * cut))] + tail)
    for where, byte in flips:
        data[int(where * (len(data) - 1))] = byte
    path = folder / f"img.{fmt.lower()}"
    path.write_bytes(bytes(data))
    try:
        im = load_image(path)
    except InputDataError as exc:
        assert exc.path == str(path)
        return
    assert im.mode == "RGB" and im.size[0] > 0 and im.size[1] > 0
    x = preprocess(im, SPEC)
    assert x.shape == (3, 16, 16) and x.dtype == np.float32 and np.isfinite(x).all()


@SETTINGS
@given(data=st.binary(max_size=200))
def test_loading_random_bytes_raises_only_input_data_errors(folder, data):
    path = folder / "random.png"
    path.write_bytes(data)
    try:
        im = load_image(path)
    except InputDataError:
        return
    assert im.mode == "RGB"
