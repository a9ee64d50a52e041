"""The data commands end to end through the installed `pbv-onnx` script, and their refusals."""

from __future__ import annotations

import csv
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from simresponses import simulate
from tinymodel import build_tiny_model

from pbv_onnx.data.features import load_features
from pbv_onnx.data.readouts import load_readouts

PBV = Path(sys.executable).parent / "pbv-onnx"


def pbv(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(PBV), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_refused(res: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == code, res.stderr
    assert len(lines) == 1 and lines[0].startswith("pbv-onnx: error: "), res.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def write_long_csv(ds: xr.Dataset, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["channel", "stimulus", "category", "file", "repetition", "response", "region"])
        for i, ch in enumerate(ds["channel"].values):
            for j, st in enumerate(ds["stimulus"].values):
                for k, rep in enumerate(ds["repetition"].values):
                    w.writerow(
                        [
                            ch,
                            st,
                            ds["category"].values[j],
                            ds["file"].values[j],
                            rep,
                            repr(float(ds["response"].values[i, j, k])),
                            ds["region"].values[i],
                        ]
                    )


@pytest.fixture(scope="module")
def study(tiny_model, tmp_path_factory):
    """A small simulated study run through import-responses, features, fit and evaluate."""
    root = tmp_path_factory.mktemp("study")
    sim = simulate(root, tiny_model, n_body=16, n_object=8, channels=3, reps=4, noise=0.5, seed=3)
    write_long_csv(sim.ds, root / "long.csv")
    runs = {
        "import": pbv(
            "import-responses",
            "--csv",
            root / "long.csv",
            "--preferred",
            "body",
            "--units",
            "spikes/s",
            "--out",
            root / "responses.nc",
        ),
        "features": pbv(
            "features",
            "--model",
            tiny_model,
            "--responses",
            root / "responses.nc",
            "--out",
            root / "features.nc",
            "--device",
            "cpu",
            "--batch-size",
            "5",
        ),
        "fit": pbv(
            "fit",
            "--model",
            tiny_model,
            "--responses",
            root / "responses.nc",
            "--features",
            root / "features.nc",
            "--alphas",
            "1e-2,0.1,1",
            "--folds",
            "4",
            "--out",
            root / "readouts.nc",
        ),
    }
    last = {
        "evaluate": (
            "evaluate",
            "--readouts",
            root / "readouts.nc",
            "--responses",
            root / "responses.nc",
            "--out",
            root / "eval",
        ),
        "predict": (
            "predict",
            "--model",
            tiny_model,
            "--readouts",
            root / "readouts.nc",
            "--images",
            root / "images" / "object0000.png",
            root / "images" / "body0001.png",
            "--out",
            root / "preds.csv",
        ),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(pbv, *args) for name, args in last.items()}
        runs.update({name: f.result() for name, f in futures.items()})
    return root, sim, runs


def test_import_features_fit_evaluate_predict_run_end_to_end(study, tiny_model):
    root, sim, runs = study
    for name, res in runs.items():
        assert res.returncode == 0, (name, res.stderr)
    ds = xr.open_dataset(root / "responses.nc", engine="h5netcdf").load()
    np.testing.assert_allclose(ds["response"].values, sim.ds["response"].values)
    feats = load_features(root / "features.nc")
    np.testing.assert_allclose(feats.values, sim.features, rtol=1e-6)
    ro = load_readouts(root / "readouts.nc")
    assert ro.attrs["alphas"].tolist() == [1e-2, 0.1, 1.0] and ro.attrs["folds"] == 4
    assert set(ro["alpha"].values) <= {1e-2, 0.1, 1.0}
    assert list(ro["region"].values) == ["aSTS"] * 3
    assert sorted(p.name for p in (root / "eval").iterdir()) == ["channels.csv", "channels.nc", "fig3a.png"]
    table = xr.open_dataset(root / "eval" / "channels.nc", engine="h5netcdf").load()
    np.testing.assert_allclose(table["r_ooc"].values, ro["r_ooc"].values, rtol=1e-5)
    with open(root / "preds.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image", "ch0", "ch1", "ch2"] and len(rows) == 3
    # the printed predictions are the readout applied to the image's features
    j = list(feats["stimulus"].values).index(
        list(sim.ds["stimulus"].values[sim.ds["file"].values == "images/object0000.png"])[0]
    )
    expected = feats.values[j].astype(np.float64) @ ro["weight"].values.T.astype(np.float64) + ro["bias"].values
    np.testing.assert_allclose([float(v) for v in rows[1][1:]], expected, rtol=1e-4)


def test_outputs_are_not_overwritten_without_force(study, tiny_model):
    root, _, _ = study
    before = (root / "readouts.nc").read_bytes()
    res = pbv(
        "evaluate", "--readouts", root / "readouts.nc", "--responses", root / "responses.nc", "--out", root / "eval"
    )
    assert_refused(res, 6, "eval", "already exists")
    assert (root / "readouts.nc").read_bytes() == before


def fit_args(model, responses, out, *extra):
    return ("fit", "--model", model, "--responses", responses, "--out", out, "--folds", "4", *extra)


def broken_copy(sim, path: Path, change) -> Path:
    change(sim.ds.copy(deep=True)).to_netcdf(path, engine="h5netcdf")
    return path


# case -> (exit code, fragments of the error line)
REFUSALS = {
    "no_category": (3, ["no 'category' coordinate"]),
    "nan_channel": (3, ["channels with no responses", "ch1"]),
    "missing_image": (3, ["body0003.png", "not found"]),
    "unreadable_image": (3, ["broken.png", "not a readable image"]),
    "unknown_preferred": (2, ["unknown preferred category 'face'"]),
    "too_few_preferred": (3, ["only 16 preferred", "--folds 9 needs at least 18"]),
    "import_without_category": (3, ["long.csv", "category"]),
    "features_of_another_model": (5, ["features.nc", "another model"]),
    "readouts_of_another_model": (5, ["readouts.nc", "another model"]),
}


@pytest.fixture(scope="module")
def refusals(study, tiny_model, tmp_path_factory):
    """Every refusal case, run concurrently (each is a fresh process): case -> (result, output folder)."""
    root, sim, _ = study
    base = tmp_path_factory.mktemp("refusals")
    (root / "bad").mkdir()
    (root / "bad" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    other = build_tiny_model(base / "other.onnx", seed=1)
    # broken responses files live beside the images, so their relative image paths resolve
    responses = {
        "no_category": lambda ds: ds.drop_vars("category"),
        "nan_channel": lambda ds: ds.assign(response=ds["response"].where(ds["channel"] != "ch1")),
        "missing_image": lambda ds: ds.assign_coords(
            file=("stimulus", [f.replace("body0003", "gone/body0003") for f in ds["file"].values])
        ),
        "unreadable_image": lambda ds: ds.assign_coords(
            file=("stimulus", ["bad/broken.png"] + list(ds["file"].values[1:]))
        ),
    }
    commands = {}
    for case in REFUSALS:
        (base / case).mkdir()
    for case, change in responses.items():
        path = broken_copy(sim, root / f"{case}.nc", change)
        commands[case] = fit_args(tiny_model, path, base / case / "readouts.nc")
    commands["unknown_preferred"] = fit_args(
        tiny_model, root / "responses.nc", base / "unknown_preferred" / "readouts.nc", "--preferred", "face"
    )
    commands["too_few_preferred"] = fit_args(
        tiny_model, root / "responses.nc", base / "too_few_preferred" / "readouts.nc", "--folds", "9"
    )
    (root / "long.csv.bad").mkdir()
    table = root / "long.csv.bad" / "long.csv"
    table.write_text("channel,stimulus,file,repetition,response\na,1,x.png,0,1.0\n")
    commands["import_without_category"] = (
        "import-responses",
        "--csv",
        table,
        "--out",
        base / "import_without_category" / "r.nc",
    )
    commands["features_of_another_model"] = fit_args(
        other,
        root / "responses.nc",
        base / "features_of_another_model" / "readouts.nc",
        "--features",
        root / "features.nc",
    )
    commands["readouts_of_another_model"] = (
        "predict",
        "--model",
        other,
        "--readouts",
        root / "readouts.nc",
        "--images",
        root / "images",
        "--out",
        base / "readouts_of_another_model" / "p.nc",
    )
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {case: pool.submit(pbv, *args) for case, args in commands.items()}
        return {case: (f.result(), base / case) for case, f in futures.items()}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_input_is_refused_with_one_line_and_nothing_is_written(refusals, case):
    res, folder = refusals[case]
    code, fragments = REFUSALS[case]
    assert_refused(res, code, *fragments)
    assert list(folder.iterdir()) == []
