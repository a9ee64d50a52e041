"""The responses format: validation, means, preferred category, image paths, split halves, importers."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from pbv_onnx.base.errors import InputDataError, UsageError
from pbv_onnx.data.responses import (
    from_long_csv,
    from_npy,
    image_paths,
    load_responses,
    make_responses,
    mean_response,
    preferred_category,
    split_halves,
)


def sample(rng=None, reps=4, phase=False) -> xr.Dataset:
    rng = rng or np.random.default_rng(0)
    values = rng.normal(10, 3, (3, 5, reps))
    values[0, 1, 2] = np.nan  # a missing trial
    return make_responses(
        values,
        ["a", "b", "c"],
        [10, 11, 12, 13, 14],
        ["body", "body", "body", "object", "object"],
        file=[f"img/{i}.png" for i in range(5)],
        region=["x", "x", "y"],
        repetition=np.arange(reps),
        phase=(["p1", "p2"] * reps)[:reps] if phase else None,
        preferred="body",
        units="spikes/s",
    )


def write(ds: xr.Dataset, path: Path) -> Path:
    ds.to_netcdf(path, engine="h5netcdf")
    return path


def test_a_valid_file_round_trips_in_canonical_dim_order(tmp_path):
    ds = sample()
    path = write(ds.transpose("repetition", "stimulus", "channel"), tmp_path / "r.nc")
    back = load_responses(path)
    assert back["response"].dims == ("channel", "stimulus", "repetition")
    np.testing.assert_array_equal(back["response"].values, ds["response"].values)
    assert list(back["stimulus"].values) == [10, 11, 12, 13, 14]
    assert back.attrs["preferred_category"] == "body"


def test_mean_response_averages_repetitions_ignoring_missing_trials():
    ds = sample()
    m = mean_response(ds)
    assert m.dims == ("channel", "stimulus")
    v = ds["response"].values
    assert m.values[0, 1] == pytest.approx(np.mean(v[0, 1, [0, 1, 3]]))
    assert m.values[2, 4] == pytest.approx(np.mean(v[2, 4]))
    two_d = make_responses(v[..., 0], ["a", "b", "c"], range(5), ["body"] * 5)
    np.testing.assert_array_equal(mean_response(two_d).values, v[..., 0])


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda ds: ds.drop_vars("category"), "no 'category' coordinate"),
        (lambda ds: ds.rename({"response": "rate"}), "no 'response' variable"),
        (lambda ds: ds.rename({"stimulus": "image"}), "must have dims"),
        (lambda ds: ds.assign(response=ds["response"].where(ds["channel"] != "b")), "no responses .all NaN.: b"),
        (lambda ds: ds.assign(response=ds["response"].where(ds["stimulus"] != 12)), "stimuli with no responses"),
        (lambda ds: ds.assign(response=ds["response"].where(ds["channel"] != "a", np.inf)), "infinite"),
        (lambda ds: ds.assign_coords(channel=["a", "a", "c"]), "duplicate channel ids: a"),
        (lambda ds: ds.assign_coords(stimulus=[1, 2, 2, 3, 4]), "duplicate stimulus ids: 2"),
        (lambda ds: ds.assign(response=ds["response"].astype(str)), "real numbers"),
    ],
)
def test_malformed_files_are_refused_naming_the_file(tmp_path, break_it, message):
    path = write(break_it(sample()), tmp_path / "bad.nc")
    with pytest.raises(InputDataError, match=f"bad.nc: .*{message}"):
        load_responses(path)


def test_missing_and_corrupt_files_are_refused(tmp_path):
    with pytest.raises(InputDataError, match="not found"):
        load_responses(tmp_path / "none.nc")
    garbage = tmp_path / "garbage.nc"
    garbage.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(InputDataError, match="garbage.nc: not a readable NetCDF"):
        load_responses(garbage)


def test_preferred_category_from_attribute_or_override():
    ds = sample()
    assert preferred_category(ds) == "body"
    assert preferred_category(ds, "object") == "object"
    with pytest.raises(UsageError, match="unknown preferred category 'face'"):
        preferred_category(ds, "face", "r.nc")
    del ds.attrs["preferred_category"]
    with pytest.raises(UsageError, match="pass preferred") as err:
        preferred_category(ds)
    assert err.value.param == "preferred"


def test_image_paths_resolve_against_the_file_folder_or_an_images_root(tmp_path):
    ds = sample()
    ds = ds.assign_coords(file=("stimulus", ["img/0.png", "/abs/1.png", "2.png", "img/3.png", "img/4.png"]))
    paths = image_paths(ds, tmp_path / "data" / "r.nc")
    assert paths[0] == tmp_path / "data" / "img/0.png"
    assert paths[1] == Path("/abs/1.png")
    assert image_paths(ds, tmp_path / "r.nc", tmp_path / "pics")[2] == tmp_path / "pics" / "2.png"
    with pytest.raises(InputDataError, match="no 'file' coordinate"):
        image_paths(ds.drop_vars("file"), tmp_path / "r.nc")


def test_split_halves_use_phases_or_odd_and_even_repetitions():
    ds = sample(reps=6)
    v = ds["response"].values
    a, b = split_halves(ds)
    np.testing.assert_allclose(a.values, np.nanmean(v[..., 0::2], -1))
    np.testing.assert_allclose(b.values, np.nanmean(v[..., 1::2], -1))
    phased = ds.assign_coords(phase=("repetition", ["x", "x", "x", "y", "y", "y"]))
    a, b = split_halves(phased)
    np.testing.assert_allclose(a.values, np.nanmean(v[..., :3], -1))
    np.testing.assert_allclose(b.values, np.nanmean(v[..., 3:], -1))
    with pytest.raises(InputDataError, match="exactly two"):
        split_halves(ds.assign_coords(phase=("repetition", list("xyzxyz"))))
    assert split_halves(ds.isel(repetition=0)) is None


def long_rows(ds: xr.Dataset) -> list[dict]:
    rows = []
    for i, ch in enumerate(ds["channel"].values):
        for j, st in enumerate(ds["stimulus"].values):
            for k, rep in enumerate(ds["repetition"].values):
                val = ds["response"].values[i, j, k]
                rows.append(
                    {
                        "channel": ch,
                        "stimulus": st,
                        "category": ds["category"].values[j],
                        "file": ds["file"].values[j],
                        "repetition": rep,
                        "region": ds["region"].values[i],
                        "phase": ds["phase"].values[k],
                        "response": "" if np.isnan(val) else repr(float(val)),
                    }
                )
    return rows


def test_long_csv_import_reproduces_the_dataset(tmp_path):
    ds = sample(phase=True)
    path = tmp_path / "long.csv"
    rows = long_rows(ds)
    rng = np.random.default_rng(5)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([rows[i] for i in rng.permutation(len(rows))][::-1])  # order must not matter
    back = from_long_csv(path, preferred="body").sel(
        channel=ds["channel"], stimulus=ds["stimulus"], repetition=ds["repetition"]
    )
    np.testing.assert_array_equal(back["response"].values, ds["response"].values)
    for name in ("category", "file", "region", "phase"):
        assert list(back[name].values) == list(ds[name].values)
    assert back["stimulus"].dtype.kind == "i"


def test_long_csv_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "long.csv"
    path.write_text("channel,stimulus,file,repetition,response\na,1,x.png,0,1.0\n")
    with pytest.raises(InputDataError, match="long.csv: missing column.*category"):
        from_long_csv(path)
    path.write_text("channel,stimulus,category,file,repetition,response\na,1,body,x.png,0,1.0\na,1,body,x.png,0,2.0\n")
    with pytest.raises(InputDataError, match="line 3: a second row"):
        from_long_csv(path)
    path.write_text("channel,stimulus,category,file,repetition,response\na,1,body,x.png,0,fast\n")
    with pytest.raises(InputDataError, match="line 2: response 'fast' is not a number"):
        from_long_csv(path)
    path.write_text("channel,stimulus,category,file,repetition,response\na,1,body,x.png,0,1\na,2,object,y.png,0,1\n")
    with pytest.raises(UsageError, match="unknown preferred category 'face'"):
        from_long_csv(path, preferred="face")


def test_npy_import_with_stimulus_and_channel_tables(tmp_path):
    ds = sample()
    np.save(tmp_path / "r.npy", ds["response"].values)
    (tmp_path / "stim.csv").write_text(
        "stimulus,category,file\n"
        + "".join(f"{s},{c},{f}\n" for s, c, f in zip(ds["stimulus"].values, ds["category"].values, ds["file"].values))
    )
    (tmp_path / "chan.csv").write_text("channel,region\na,x\nb,x\nc,y\n")
    back = from_npy(tmp_path / "r.npy", tmp_path / "stim.csv", tmp_path / "chan.csv", preferred="body")
    xr.testing.assert_identical(back["response"], load_ds_like(back, ds)["response"])
    (tmp_path / "short.csv").write_text("stimulus,category,file\n1,body,a.png\n")
    with pytest.raises(InputDataError, match="short.csv: 1 stimuli, but the array has 5"):
        from_npy(tmp_path / "r.npy", tmp_path / "short.csv")


def load_ds_like(back: xr.Dataset, ds: xr.Dataset) -> xr.Dataset:
    """`ds` with the coordinates `back` is expected to carry."""
    return ds.assign_coords(channel=back["channel"], stimulus=back["stimulus"])
