"""NWB sessions in: exact spike counts in windows, both presentation forms, bad input, and the whole path
import-responses -> fit -> explain on the tiny model."""

from __future__ import annotations

import datetime
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from clirun import fit_and_explain, pbv, refused
from PIL import Image

from pbv_onnx.base.errors import InputDataError, UsageError
from pbv_onnx.data.nwb import from_nwb, observed, spike_counts
from pbv_onnx.data.presentations import running_count
from pbv_onnx.data.responses import import_responses

pynwb = pytest.importorskip("pynwb")
from pynwb.base import ImageReferences, Images  # noqa: E402
from pynwb.image import GrayscaleImage, IndexSeries, RGBImage  # noqa: E402


def session(
    path: Path,
    units: list[tuple],
    trials: list[dict] | None = None,
    images: list | None = None,
    index: tuple | None = None,
    trial_columns: tuple[str, ...] = ("stimulus_id", "category"),
) -> Path:
    """An NWB file: units (id, spike times, location[, obs_intervals]); trials as dicts with start_time
    and the columns; or an IndexSeries (onsets, indices) over Images `images` (pynwb Image objects)."""
    f = pynwb.NWBFile("test session", "s1", datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc))
    dev = f.create_device("array")
    locations = list(dict.fromkeys(u[2] for u in units))
    group = f.create_electrode_group("shank", "one shank", "IT", dev)
    for loc in locations:
        f.add_electrode(group=group, location=loc)
    for unit in units:
        uid, times, loc = unit[:3]
        extra = {"obs_intervals": unit[3]} if len(unit) > 3 else {}
        f.add_unit(spike_times=list(times), electrodes=[locations.index(loc)], id=uid, **extra)
    if trials is not None:
        for col in trial_columns:
            f.add_trial_column(col, col)
        for t in trials:
            f.add_trial(start_time=t["start_time"], stop_time=t["start_time"] + 0.5, **{c: t[c] for c in trial_columns})
    if index is not None:
        container = Images(
            name="stimuli", images=images, order_of_images=ImageReferences(name="order_of_images", data=images)
        )
        f.add_stimulus_template(container)
        onsets, indices = index
        f.add_stimulus(
            IndexSeries(
                name="presentations",
                data=np.asarray(indices, np.uint32),
                indexed_images=container,
                unit="N/A",
                timestamps=np.asarray(onsets, float),
            )
        )
    with pynwb.NWBHDF5IO(str(path), "w") as io:
        io.write(f)
    return path


# Known spikes (dyadic times, so onset + window edges are exact): window [0, 0.5) after each onset.
TRIALS = [
    {"start_time": 1.0, "stimulus_id": "a", "category": "body", "group": "g1"},
    {"start_time": 2.0, "stimulus_id": "b", "category": "object", "group": "g2"},
    {"start_time": 3.0, "stimulus_id": "a", "category": "body", "group": "g1"},
    {"start_time": 4.0, "stimulus_id": "c", "category": "body", "group": "g3"},
]
UNITS = [
    (7, [3.375, 1.0, 1.25, 1.5, 2.125, 3.5, 0.5], "aIT"),  # unsorted on purpose
    (9, [4.0, 4.0625, 4.25, 2.4375], "pIT"),
    (11, [], "aIT"),
]
# rates (spikes/s) by hand: unit 7: a@1 {1.0, 1.25} (1.5 is the window's open end) -> 4, b@2 {2.125} -> 2,
# a@3 {3.375} (3.5 excluded) -> 2, c@4 none -> 0; unit 9: a 0, b {2.4375} -> 2, a 0, c {4.0, 4.0625, 4.25} -> 6
EXPECTED = np.array(
    [[[4, 2], [2, np.nan], [0, np.nan]], [[0, 0], [2, np.nan], [6, np.nan]], [[0, 0], [0, np.nan], [0, np.nan]]]
)


@pytest.fixture(scope="module")
def trials_nwb(tmp_path_factory) -> Path:
    return session(
        tmp_path_factory.mktemp("nwb") / "trials.nwb", UNITS, TRIALS, trial_columns=("stimulus_id", "category", "group")
    )


def test_spike_counts_are_exact_half_open_windows():
    times = [np.array([0.5, 0.1, 0.2, 0.2, 0.7]), np.array([])]
    counts = spike_counts(times, np.array([0.0, 0.2, 0.5]), np.array([0.2, 0.5, 1.0]))
    assert counts.tolist() == [[1, 2, 2], [0, 0, 0]]


def test_running_count_and_observation_intervals():
    assert running_count(np.array([3, 1, 3, 3, 1, 0])).tolist() == [0, 0, 1, 2, 1, 0]
    inside = observed(
        np.array([[0.0, 2.0], [1.5, 3.0], [5.0, 6.0]]),
        np.array([0.5, 2.5, 4.0, 5.0, 5.5]),
        np.array([1.0, 3.0, 5.5, 6.0, 6.5]),
    )
    assert inside.tolist() == [True, True, False, True, False]


def test_trials_table_gives_rates_repetitions_regions_and_groups(trials_nwb, caplog):
    with caplog.at_level(logging.WARNING, logger="pbv_onnx"):
        ds, pixels = from_nwb(trials_nwb, (0.0, 0.5), preferred="body")
    assert pixels == {}
    assert ds["response"].dims == ("channel", "stimulus", "repetition")
    np.testing.assert_array_equal(ds["response"].values, EXPECTED)
    assert ds["channel"].values.tolist() == [7, 9, 11]
    assert ds["stimulus"].values.tolist() == ["a", "b", "c"]
    assert ds["category"].values.tolist() == ["body", "object", "body"]
    assert ds["group"].values.tolist() == ["g1", "g2", "g3"]
    assert ds["region"].values.tolist() == ["aIT", "pIT", "aIT"]
    assert ds["repetition"].values.tolist() == [0, 1]
    assert ds.attrs["units"] == "spikes/s" and ds.attrs["preferred_category"] == "body"
    # the silent unit is said once; the windows end before the next onset, so no overlap warning
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "without spikes in any window" in messages[0] and "11" in messages[0]


def test_unit_ids_select_units_and_windows_scale_rates(trials_nwb):
    ds, _ = from_nwb(trials_nwb, (0.0, 0.25), unit_ids=["9,7"])
    assert ds["channel"].values.tolist() == [7, 9]  # the file's order
    # [0, 0.25): unit 7 keeps {1.0} at a@1 and {2.125} at b; unit 9 {4.0, 4.0625} at c
    np.testing.assert_array_equal(
        ds["response"].values, [[[4, 0], [4, np.nan], [0, np.nan]], [[0, 0], [0, np.nan], [8, np.nan]]]
    )
    with pytest.raises(UsageError, match="unit_ids names units the file does not have: 12"):
        from_nwb(trials_nwb, (0.0, 0.5), unit_ids=["7", "12"])


def test_windows_outside_a_units_observation_intervals_are_missing(tmp_path):
    units = [(1, [1.25, 2.25, 3.25], "IT", [[0.0, 2.6]]), (2, [1.25, 3.25, 4.25], "IT", [[0.0, 10.0]])]
    path = session(tmp_path / "obs.nwb", units, TRIALS)
    ds, _ = from_nwb(path, (0.0, 0.5))
    np.testing.assert_array_equal(ds["response"].values[0], [[2, np.nan], [2, np.nan], [np.nan, np.nan]])
    np.testing.assert_array_equal(ds["response"].values[1], [[2, 2], [0, np.nan], [2, np.nan]])


def test_categories_csv_overrides_and_a_missing_category_is_refused(trials_nwb, tmp_path):
    cats = tmp_path / "cats.csv"
    cats.write_text("stimulus_id,category,file\na,face,img/a.png\nb,object,img/b.png\nc,face,img/c.png\n")
    ds, _ = from_nwb(trials_nwb, (0.0, 0.5), categories=cats)
    assert ds["category"].values.tolist() == ["face", "object", "face"]
    assert ds["file"].values.tolist() == ["img/a.png", "img/b.png", "img/c.png"]
    cats.write_text("stimulus_id,category\na,face\nb,object\n")
    with pytest.raises(InputDataError, match="cats.csv: stimulus ids with no category: c"):
        from_nwb(trials_nwb, (0.0, 0.5), categories=cats)


def rgb(seed: int, shape=(6, 8)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def test_index_series_over_images_gives_stimuli_named_by_image_and_their_pixels(tmp_path):
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8)
    unit_float = np.linspace(0, 1, 6 * 8 * 3).reshape(6, 8, 3)
    images = [
        RGBImage(name="body 1", data=rgb(1)),
        GrayscaleImage(name="obj 2", data=grey),
        RGBImage(name="body3", data=unit_float),
    ]
    units = [(5, [0.125, 1.0625, 1.125, 2.375, 3.0], "IT")]
    path = session(tmp_path / "ix.nwb", units, images=images, index=([0.0, 1.0, 2.0, 3.0], [0, 1, 0, 2]))
    cats = tmp_path / "cats.csv"
    cats.write_text("stimulus_id,category\nbody 1,body\nobj 2,object\nbody3,body\n")
    ds, pixels = from_nwb(path, (0.0, 0.25), categories=cats, image_folder="r_images")
    assert ds["stimulus"].values.tolist() == ["body 1", "obj 2", "body3"]
    # unit 5: body 1@0 {0.125} -> 4, obj 2@1 {1.0625, 1.125} -> 8, body 1@2 none (2.375 is after 2.25) -> 0,
    # body3@3 {3.0} -> 4
    np.testing.assert_array_equal(ds["response"].values, [[[4, 0], [8, np.nan], [4, np.nan]]])
    assert ds["file"].values.tolist() == ["r_images/body_1.png", "r_images/obj_2.png", "r_images/body3.png"]
    np.testing.assert_array_equal(pixels["r_images/body_1.png"], rgb(1))
    np.testing.assert_array_equal(pixels["r_images/obj_2.png"], grey)
    np.testing.assert_array_equal(pixels["r_images/body3.png"], np.round(unit_float * 255).astype(np.uint8))


def test_import_writes_the_images_beside_the_output(tmp_path):
    images = [RGBImage(name="b0", data=rgb(2)), RGBImage(name="o0", data=rgb(3))]
    path = session(tmp_path / "ix.nwb", [(1, [0.1, 1.1, 1.2], "IT")], images=images, index=([0.0, 1.0], [0, 1]))
    cats = tmp_path / "cats.csv"
    cats.write_text("stimulus_id,category\nb0,body\no0,object\n")
    out = tmp_path / "out" / "resp.nc"
    ds = import_responses(out, nwb=path, window=(0.0, 0.5), categories=cats)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["resp.nc", "resp_images"]
    for name, seed in (("b0", 2), ("o0", 3)):
        np.testing.assert_array_equal(np.asarray(Image.open(out.parent / "resp_images" / f"{name}.png")), rgb(seed))
    back = xr.open_dataset(out, engine="h5netcdf").load()
    np.testing.assert_array_equal(back["response"].values, ds["response"].values)
    assert back["file"].values.tolist() == ["resp_images/b0.png", "resp_images/o0.png"]


# -- the command line: warnings, refusals, the missing extra ----------------------------------------


def test_a_window_into_the_next_onset_is_one_warning_line(trials_nwb, tmp_path):
    res = pbv(
        "import-responses", "--nwb", trials_nwb, "--window", "0", "1.5", "--unit-ids", "7", "--out", tmp_path / "r.nc"
    )
    assert res.returncode == 0, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "runs into the next presentation's onset for 3 of 4 presentations" in lines[0], lines
    ds = xr.open_dataset(tmp_path / "r.nc", engine="h5netcdf").load()
    # [onset, onset + 1.5): unit 7 counts a@1 {1.0, 1.25, 1.5, 2.125}, a@3 {3.375, 3.5}
    np.testing.assert_allclose(ds["response"].values[0, 0], [4 / 1.5, 2 / 1.5])


def no_units(path: Path) -> Path:
    f = pynwb.NWBFile("empty", "s0", datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc))
    with pynwb.NWBHDF5IO(str(path), "w") as io:
        io.write(f)
    return path


# case -> (arguments after --nwb FILE --out OUT, exit code, fragments)
def bad_cases(trials_nwb: Path, d: Path) -> dict:
    cats = d / "cats.csv"
    cats.write_text("stimulus_id,category\na,body\nb,object\n")
    nocat = session(d / "nocat.nwb", UNITS[:1], TRIALS, trial_columns=("stimulus_id",))
    garbage = d / "garbage.nwb"
    garbage.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 300)
    return {
        "no-units": ([no_units(d / "empty.nwb"), "--window", "0", "0.5"], 3, ["empty.nwb", "no units"]),
        "no-such-intervals": (
            [trials_nwb, "--window", "0", "0.5", "--intervals", "blocks"],
            3,
            ["no intervals table or IndexSeries named 'blocks'", "trials"],
        ),
        "no-stimulus-column": (
            [trials_nwb, "--window", "0", "0.5", "--stimulus-column", "image"],
            3,
            ["no stimulus column 'image'"],
        ),
        "no-category-column": ([nocat, "--window", "0", "0.5"], 3, ["stimulus ids with no category", "--categories"]),
        "category-csv-lacks-a-stimulus": (
            [trials_nwb, "--window", "0", "0.5", "--categories", cats],
            3,
            ["cats.csv", "stimulus ids with no category: c"],
        ),
        "garbage": ([garbage, "--window", "0", "0.5"], 3, ["garbage.nwb", "not a readable NWB file"]),
        "empty-window": ([trials_nwb, "--window", "0.5", "0.5"], 2, ["--window must be T0 T1"]),
        "unknown-unit": ([trials_nwb, "--window", "0", "0.5", "--unit-ids", "3"], 2, ["--unit-ids", "3"]),
        "no-window": ([trials_nwb], 2, ["--nwb needs --window"]),
        "option-of-another-source": (
            [trials_nwb, "--window", "0", "0.5", "--time-bins", "0", "1"],
            2,
            ["--time-bins goes with --brainio, not --nwb"],
        ),
    }


def test_bad_nwb_input_is_one_line_an_exit_code_and_nothing_written(trials_nwb, tmp_path):
    cases = bad_cases(trials_nwb, tmp_path)
    for name, (args, code, fragments) in cases.items():
        out = tmp_path / name / "r.nc"
        out.parent.mkdir()
        refused(pbv("import-responses", "--nwb", *args, "--out", out), code, *fragments)
        assert list(out.parent.iterdir()) == [], name


def test_an_existing_image_folder_is_not_overwritten(tmp_path):
    images = [RGBImage(name="b0", data=rgb(2)), RGBImage(name="o0", data=rgb(3))]
    path = session(tmp_path / "ix.nwb", [(1, [0.1, 1.1], "IT")], images=images, index=([0.0, 1.0], [0, 1]))
    cats = tmp_path / "cats.csv"
    cats.write_text("stimulus_id,category\nb0,body\no0,object\n")
    (tmp_path / "r_images").mkdir()
    refused(
        pbv(
            "import-responses", "--nwb", path, "--window", "0", "0.5", "--categories", cats, "--out", tmp_path / "r.nc"
        ),
        6,
        "r_images",
        "already exists",
    )
    assert not (tmp_path / "r.nc").exists() and list((tmp_path / "r_images").iterdir()) == []


def test_without_pynwb_nwb_input_is_exit_code_7_with_the_install_line(trials_nwb, tmp_path):
    out = tmp_path / "r.nc"
    code = (
        "import sys; sys.modules['pynwb'] = None; "  # the import of pynwb fails as if it were absent
        f"sys.argv = ['pbv-onnx', 'import-responses', '--nwb', {str(trials_nwb)!r}, '--window', '0', '0.5', "
        f"'--out', {str(out)!r}]; from pbv_onnx.cli.main import main; main()"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    refused(res, 7, "pip install 'pbv-onnx[nwb]'")
    assert not out.exists()


# -- the whole path: an NWB session with its images -> fit -> explain ------------------------------


def test_nwb_session_to_fit_to_explain(tiny_model, tmp_path):
    from simresponses import simulate

    sim = simulate(tmp_path / "sim", tiny_model, n_body=12, n_object=6, channels=2, reps=1, noise=0.0, seed=5)
    names = [Path(f).stem for f in sim.ds["file"].values]
    pictures = {n: np.asarray(Image.open(tmp_path / "sim" / f)) for n, f in zip(names, sim.ds["file"].values)}
    rng = np.random.default_rng(0)
    reps = 2
    order = np.concatenate([rng.permutation(len(names)) for _ in range(reps)])
    onsets = 1.0 + np.arange(len(order))  # one presentation a second; window [0.05, 0.30)
    counts = np.clip(np.round(sim.signal * 2), 0, None).astype(int)  # [unit, stimulus] spikes per window
    spikes = [[] for _ in range(counts.shape[0])]
    for t, s in zip(onsets, order):
        for c in range(counts.shape[0]):
            spikes[c] += list(t + 0.05 + 0.25 * (np.arange(counts[c, s]) + 0.5) / max(counts[c, s], 1))
            spikes[c] += [t + 0.5, t + 0.75]  # outside the window: not counted
    images = [RGBImage(name=n, data=pictures[n]) for n in names]
    path = session(
        tmp_path / "rig.nwb",
        [(c, sorted(spikes[c]), "aIT") for c in range(counts.shape[0])],
        images=images,
        index=(onsets, order),
    )
    cats = tmp_path / "cats.csv"
    cats.write_text("stimulus_id,category\n" + "".join(f"{n},{c}\n" for n, c in zip(names, sim.ds["category"].values)))
    root = tmp_path / "study"
    res = pbv(
        "import-responses",
        "--nwb",
        path,
        "--window",
        "0.05",
        "0.30",
        "--categories",
        cats,
        "--preferred",
        "body",
        "--out",
        root / "responses.nc",
    )
    assert res.returncode == 0, res.stderr
    ds = xr.open_dataset(root / "responses.nc", engine="h5netcdf").load()
    stim = ds["stimulus"].values.tolist()
    expected = counts[:, [names.index(s) for s in stim]] / 0.25
    np.testing.assert_allclose(ds["response"].values, np.repeat(expected[:, :, None], reps, axis=2), rtol=1e-12)
    fit_and_explain(tiny_model, root, "1")
    ex = xr.open_dataset(root / "out" / "explanations.nc", engine="h5netcdf").load()
    assert ex.sizes["pair"] == 1 and (root / "out" / "index.html").is_file()


def test_intervals_names_an_index_series_and_the_declared_spikes_are_held_against_memory(tmp_path):
    images = [RGBImage(name="b0", data=rgb(2)), RGBImage(name="o0", data=rgb(3))]
    both = session(tmp_path / "both.nwb", UNITS[:2], TRIALS, images=images, index=([1.0, 2.0], [1, 0]))
    cats = tmp_path / "cats.csv"
    cats.write_text("stimulus_id,category\nb0,body\no0,object\n")
    ds, pixels = from_nwb(both, (0.0, 0.5), intervals="presentations", categories=cats)
    assert ds["stimulus"].values.tolist() == ["o0", "b0"] and len(pixels) == 2
    np.testing.assert_array_equal(ds["response"].values[:, :, 0], [[4, 2], [0, 2]])
    with pytest.raises(InputDataError, match=r"both.nwb: declares .* \(11 spike times, 2 units x 4 presentations\)"):
        from_nwb(both, (0.0, 0.5), memory=100)
    bare = session(tmp_path / "bare.nwb", UNITS[:1])
    with pytest.raises(
        InputDataError,
        match="no 'trials' table and no IndexSeries over Images .TimeIntervals tables: "
        "none; IndexSeries: none.; name the presentations with intervals",
    ):
        from_nwb(bare, (0.0, 0.5))
