"""BrainIO assemblies in (with and without time bins, MultiIndex-free as BrainIO writes them), bad input,
the whole path import-responses -> fit -> explain, and predictions out as a BrainIO assembly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from clirun import fit_and_explain, pbv, refused

from pbv_onnx.base.errors import UsageError
from pbv_onnx.data.brainio import from_brainio


def write_assembly(
    path: Path,
    values: np.ndarray,
    stimulus_id,
    neuroid_id,
    region=None,
    repetition=None,
    time_bins: list[tuple[float, float]] | None = None,
    name: str | None = "data",
) -> Path:
    """An assembly as BrainIO's write_netcdf stores one: MultiIndex levels reset to plain coordinates,
    the DataArray saved as `data` (compressed) or, unnamed, as xarray's default variable."""
    dims = ("presentation", "neuroid") + (("time_bin",) if time_bins else ())
    coords = {"stimulus_id": ("presentation", list(stimulus_id)), "neuroid_id": ("neuroid", list(neuroid_id))}
    if repetition is not None:
        coords["repetition"] = ("presentation", list(repetition))
    if region is not None:
        coords["region"] = ("neuroid", list(region))
    if time_bins:
        coords["time_bin_start"] = ("time_bin", [a for a, _ in time_bins])
        coords["time_bin_end"] = ("time_bin", [b for _, b in time_bins])
    da = xr.DataArray(values, dims=dims, coords=coords)
    levels = {
        "presentation": [c for c in ("stimulus_id", "repetition") if c in coords],
        "neuroid": [c for c in ("neuroid_id", "region") if c in coords],
    }
    # a NeuroidAssembly in memory (MultiIndex where there are two levels; one would rename the coordinate) ...
    da = da.set_index({dim: names for dim, names in levels.items() if len(names) > 1})
    da = da.reset_index(list(da.indexes))  # ... and as BrainIO writes it (no MultiIndex in NetCDF)
    if name is None:
        da.to_netcdf(path, engine="h5netcdf")
    else:
        da.to_dataset(name=name).to_netcdf(path, engine="h5netcdf", encoding={name: {"zlib": True, "complevel": 1}})
    return path


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text(header + "\n" + "".join(r + "\n" for r in rows))
    return path


# 3 stimuli x 2 repetitions, shown in a shuffled order, 3 neuroids
STIMS = ["s2", "s1", "s3", "s1", "s2", "s3"]
REPS = [0, 0, 0, 1, 1, 1]
VALUES = np.arange(18, dtype=float).reshape(6, 3) * 1.5


@pytest.fixture
def stimulus_set(tmp_path) -> Path:
    return write_csv(
        tmp_path / "stimulus_set.csv",
        "stimulus_id,filename,category,group",
        ["s1,s1.png,body,g1", "s2,s2.png,object,g2", "s3,s3.png,body,g1", "s9,s9.png,body,g3"],
    )


def test_an_assembly_maps_presentations_to_stimulus_and_repetition(tmp_path, stimulus_set):
    path = write_assembly(tmp_path / "a.nc", VALUES, STIMS, ["n1", "n2", "n3"], ["IT", "IT", "V4"], REPS)
    ds = from_brainio(path, stimulus_set, images=tmp_path / "pics", out_dir=tmp_path / "out", preferred="body")
    assert ds["stimulus"].values.tolist() == ["s2", "s1", "s3"]  # order of first presentation
    assert ds["channel"].values.tolist() == ["n1", "n2", "n3"]
    assert ds["region"].values.tolist() == ["IT", "IT", "V4"]
    assert ds["repetition"].values.tolist() == [0, 1]
    assert ds["category"].values.tolist() == ["object", "body", "body"]
    assert ds["group"].values.tolist() == ["g2", "g1", "g1"]
    assert ds["file"].values.tolist() == ["../pics/s2.png", "../pics/s1.png", "../pics/s3.png"]
    for p, (s, r) in enumerate(zip(STIMS, REPS)):
        np.testing.assert_array_equal(ds["response"].sel(stimulus=s, repetition=r).values, VALUES[p])


def test_without_repetition_the_running_count_numbers_them_and_unnamed_arrays_read(tmp_path, stimulus_set):
    path = write_assembly(tmp_path / "a.nc", VALUES[:5], STIMS[:5], [10, 11, 12], name=None)
    ds = from_brainio(path, stimulus_set)
    assert ds["channel"].values.tolist() == [10, 11, 12] and "region" not in ds.coords
    np.testing.assert_array_equal(ds["response"].sel(stimulus="s1").values.T, VALUES[[1, 3]])
    np.testing.assert_array_equal(ds["response"].sel(stimulus="s3").values[:, 0], VALUES[2])
    assert np.isnan(ds["response"].sel(stimulus="s3").values[:, 1]).all()  # shown once: the second is missing
    assert ds["file"].values.tolist() == ["s2.png", "s1.png", "s3.png"]


def test_time_bins_are_averaged_over_the_window_or_all(tmp_path, stimulus_set):
    rng = np.random.default_rng(0)
    values = rng.normal(size=(6, 3, 3))
    values[0, 0, 2] = np.nan  # a missing bin is skipped, not propagated
    bins = [(70, 120), (120, 170), (170, 220)]
    path = write_assembly(tmp_path / "t.nc", values, STIMS, ["n1", "n2", "n3"], repetition=REPS, time_bins=bins)
    every = from_brainio(path, stimulus_set)
    late = from_brainio(path, stimulus_set, time_bins=(100, 220))
    for p, (s, r) in enumerate(zip(STIMS, REPS)):
        np.testing.assert_allclose(
            every["response"].sel(stimulus=s, repetition=r).values, np.nanmean(values[p], axis=1), rtol=1e-12
        )
        np.testing.assert_allclose(
            late["response"].sel(stimulus=s, repetition=r).values, np.nanmean(values[p, :, 1:], axis=1), rtol=1e-12
        )
    with pytest.raises(UsageError, match="no time bin lies within time_bins 0 50"):
        from_brainio(path, stimulus_set, time_bins=(0, 50))


def test_bad_brainio_input_is_one_line_an_exit_code_and_nothing_written(tmp_path, stimulus_set):
    good = write_assembly(tmp_path / "good.nc", VALUES, STIMS, ["n1", "n2", "n3"], repetition=REPS)
    short = write_csv(tmp_path / "short.csv", "stimulus_id,filename,category", ["s1,s1.png,body"])
    nocat = write_csv(tmp_path / "nocat.csv", "stimulus_id,filename", ["s1,a.png", "s2,b.png", "s3,c.png"])
    blank = write_csv(tmp_path / "blank.csv", "stimulus_id,filename,category", ["s1,a,body", "s2,b,", "s3,c,body"])
    flat = tmp_path / "flat.nc"
    xr.Dataset({"data": (("trial", "unit"), VALUES)}, coords={"stimulus_id": ("trial", STIMS)}).to_netcdf(
        flat, engine="h5netcdf"
    )
    no_sid = tmp_path / "no_sid.nc"
    xr.open_dataset(good, engine="h5netcdf").load().drop_vars("stimulus_id").to_netcdf(no_sid, engine="h5netcdf")
    no_nid = tmp_path / "no_nid.nc"
    xr.open_dataset(good, engine="h5netcdf").load().drop_vars("neuroid_id").to_netcdf(no_nid, engine="h5netcdf")
    garbage = tmp_path / "garbage.nc"
    garbage.write_bytes(b"CDF\x01" + b"\0" * 200)
    cases = {
        "stimulus-set-lacks-stimuli": (
            [good, "--stimuli", short],
            3,
            ["short.csv", "lacks 2 stimulus id(s) of good.nc", "s2, s3"],
        ),
        "no-category": ([good, "--stimuli", nocat], 3, ["nocat.csv", "no 'category' column"]),
        "empty-category": ([good, "--stimuli", blank], 3, ["blank.csv", "stimulus ids with no category: s2"]),
        "no-presentation-dim": (
            [flat, "--stimuli", stimulus_set],
            3,
            ["flat.nc", "not a BrainIO neuroid assembly", "trial, unit"],
        ),
        "no-stimulus-id": ([no_sid, "--stimuli", stimulus_set], 3, ["no 'stimulus_id' coordinate"]),
        "no-neuroid-id": ([no_nid, "--stimuli", stimulus_set], 3, ["no 'neuroid_id' coordinate"]),
        "garbage": ([garbage, "--stimuli", stimulus_set], 3, ["garbage.nc", "not a readable NetCDF BrainIO"]),
        "no-stimulus-set": ([good], 2, ["--brainio needs --stimuli"]),
        "time-bins-without-time-bin": (
            [good, "--stimuli", stimulus_set, "--time-bins", "0", "100"],
            2,
            ["no time_bin dimension"],
        ),
        "window-is-for-nwb": (
            [good, "--stimuli", stimulus_set, "--window", "0", "1"],
            2,
            ["--window goes with --nwb, not --brainio"],
        ),
    }
    for name, (args, code, fragments) in cases.items():
        out = tmp_path / name / "r.nc"
        out.parent.mkdir()
        refused(pbv("import-responses", "--brainio", *args, "--out", out), code, *fragments)
        assert list(out.parent.iterdir()) == [], name


def test_assembly_to_fit_to_explain_and_predictions_out_as_an_assembly(tiny_model, tmp_path):
    from simresponses import simulate

    root = tmp_path / "study"
    sim = simulate(root, tiny_model, n_body=12, n_object=6, channels=3, reps=2, noise=0.3, seed=7)
    resp = sim.ds["response"].values  # [channel, stimulus, repetition]
    stims, reps = np.meshgrid(np.arange(resp.shape[1]), np.arange(resp.shape[2]), indexing="ij")
    order = np.random.default_rng(1).permutation(stims.size)
    s_of, r_of = stims.ravel()[order], reps.ravel()[order]
    values = resp[:, s_of, r_of].T  # [presentation, neuroid]
    sids = sim.ds["stimulus"].values[s_of]
    write_assembly(root / "assembly.nc", values, sids, ["IT.1", "IT.2", "IT.3"], ["IT"] * 3, r_of)
    files = sim.ds["file"].values
    write_csv(
        root / "stimulus_set.csv",
        "stimulus_id,filename,category",
        [f"{s},{Path(f).name},{c}" for s, f, c in zip(sim.ds["stimulus"].values, files, sim.ds["category"].values)],
    )
    res = pbv(
        "import-responses",
        "--brainio",
        root / "assembly.nc",
        "--stimuli",
        root / "stimulus_set.csv",
        "--images",
        root / "images",
        "--preferred",
        "body",
        "--out",
        root / "responses.nc",
    )
    assert res.returncode == 0, res.stderr
    ds = xr.open_dataset(root / "responses.nc", engine="h5netcdf").load()
    back = ds["response"].sel(stimulus=sim.ds["stimulus"].values).transpose("channel", "stimulus", "repetition")
    np.testing.assert_array_equal(back.values, resp)
    # the stimulus set's file names, found in --images, are stored relative to the responses file
    assert ds.sel(stimulus=sim.ds["stimulus"].values)["file"].values.tolist() == files.tolist()
    fit_and_explain(tiny_model, root, "IT.2")
    assert (root / "out" / "explanations.nc").is_file()

    pictures = [root / "images" / "object0000.png", root / "images" / "body0001.png"]
    common = (
        "predict",
        "--model",
        tiny_model,
        "--readouts",
        root / "readouts.nc",
        "--images",
        *pictures,
        "--device",
        "cpu",
    )
    assert pbv(*common, "--out", root / "plain.nc").returncode == 0
    res = pbv(*common, "--format", "brainio", "--out", root / "pred.nc")
    assert res.returncode == 0, res.stderr
    plain = xr.open_dataset(root / "plain.nc", engine="h5netcdf").load()["prediction"]
    asm = xr.open_dataset(root / "pred.nc", engine="h5netcdf").load()
    assert asm["data"].dims == ("presentation", "neuroid") and not asm.indexes  # MultiIndex-free, as BrainIO
    assert asm["neuroid_id"].values.tolist() == ["IT.1", "IT.2", "IT.3"]
    assert asm["region"].values.tolist() == ["IT"] * 3
    assert asm["stimulus_id"].values.tolist() == [str(p) for p in pictures]
    assert asm["filename"].values.tolist() == ["object0000.png", "body0001.png"]
    np.testing.assert_allclose(asm["data"].values, plain.transpose("stimulus", "channel").values, rtol=1e-12)
    # the assembly reads back through the importer: the same coordinate names both ways
    write_csv(root / "pred_set.csv", "stimulus_id,category", [f"{pictures[0]},object", f"{pictures[1]},body"])
    again = from_brainio(root / "pred.nc", root / "pred_set.csv")
    np.testing.assert_allclose(again["response"].values[:, :, 0], asm["data"].values.T, rtol=1e-12)
    refused(pbv(*common, "--format", "brainio", "--out", root / "pred.csv"), 2, "--out must end in .nc")
    refused(pbv(*common, "--format", "brainio"), 2, "--format brainio needs --out")
