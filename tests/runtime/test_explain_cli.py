"""`pbv-onnx match` and `pbv-onnx explain` through the installed console script: output and errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from test_explain import make_study_files
from tinymodel import build_tiny_model

PBV = Path(sys.executable).parent / "pbv-onnx"


def pbv(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(PBV), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def files(tiny_model, tmp_path_factory) -> dict:
    return make_study_files(tmp_path_factory.mktemp("cli"), tiny_model)


def common(f) -> list:
    return ["--model", f["model"], "--readouts", f["readouts"], "--responses", f["responses"], "--device", "cpu"]


def assert_one_line_error(res: subprocess.CompletedProcess, *words: str) -> None:
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("pbv-onnx: error: "), lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert "Traceback" not in res.stderr


def test_match_prints_a_ranked_table_and_json(files):
    res = pbv("match", *common(files), "--channel", "7", "--image", "o01", "--top-k", "5")
    assert res.returncode == 0, res.stderr
    rows = [line.split() for line in res.stdout.splitlines()[2:]]
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4, 5]
    sims = [float(r[2]) for r in rows]
    assert sims == sorted(sims, reverse=True)
    js = pbv("match", *common(files), "--channel", "7", "--image", "o01", "--top-k", "5", "--json")
    assert js.returncode == 0, js.stderr
    data = json.loads(js.stdout)
    assert [r["stimulus"] for r in data["ranking"]] == [r[1] for r in rows]
    assert all(r["stimulus"].startswith("b") for r in data["ranking"])
    every = json.loads(
        pbv("match", *common(files), "--channel", "7", "--image", "o01", "--candidates", "all", "--json").stdout
    )
    assert len(every["ranking"]) == sum(s.startswith("b") for s in files["stimuli"])


def test_explain_writes_the_output_folder(files, tmp_path):
    out = tmp_path / "out"
    res = pbv(
        "explain",
        *common(files),
        "--out",
        out,
        "--channel",
        "3",
        "--channel",
        "11",
        "--top-objects",
        "2",
        "--batch-size",
        "3",
        "--smooth",
        "0.8",
    )
    assert res.returncode == 0, res.stderr
    ds = xr.open_dataset(out / "explanations.nc", engine="h5netcdf")
    assert ds.sizes["pair"] == 4
    assert sorted(set(ds["channel"].values.tolist())) == ["11", "3"]
    assert set(ds["method"].values.tolist()) == {"parallel"}
    ds.close()
    assert (out / "index.html").is_file() and len(list((out / "pairs").glob("*.png"))) == 4
    again = pbv(
        "explain",
        *common(files),
        "--out",
        out,
        "--channel",
        "3",
        "--image",
        "o00",
        "--method",
        "integrated",
        "--steps",
        "2",
        "--baseline",
        "blur",
        "--force",
    )
    assert again.returncode == 0, again.stderr
    ds = xr.open_dataset(out / "explanations.nc", engine="h5netcdf")
    assert ds.sizes["pair"] == 1 and ds["method"].values.tolist() == ["integrated"]
    assert json.loads(ds.attrs["options"])["baseline"] == "blur"
    ds.close()


def _nothing_written(folder: Path) -> bool:
    return not any(p.name.startswith(".") or p.name == "out" for p in folder.iterdir())


def test_unknown_channel(files, tmp_path):
    res = pbv("explain", *common(files), "--out", tmp_path / "out", "--channel", "99")
    assert_one_line_error(res, "readouts.nc", "unknown channel '99'")
    assert _nothing_written(tmp_path)


def test_unreadable_image(files, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    res = pbv("explain", *common(files), "--out", tmp_path / "out", "--channel", "3", "--image", bad)
    assert_one_line_error(res, "broken.png")
    assert not (tmp_path / "out").exists()
    res = pbv("match", *common(files), "--channel", "3", "--image", tmp_path / "missing.png")
    assert_one_line_error(res, "missing.png", "neither a stimulus id")


def test_readouts_of_another_model(files, tmp_path):
    other = build_tiny_model(tmp_path / "other.onnx", seed=4)
    res = pbv(
        "explain",
        "--model",
        other,
        "--readouts",
        files["readouts"],
        "--responses",
        files["responses"],
        "--out",
        tmp_path / "out",
        "--device",
        "cpu",
    )
    assert_one_line_error(res, "readouts.nc", "another model")
    assert not (tmp_path / "out").exists()


def test_empty_candidate_set(tiny_model, tmp_path):
    f = make_study_files(tmp_path / "s", tiny_model, nan_body_channel=1)
    res = pbv("explain", *common(f), "--out", tmp_path / "out", "--channel", "7")
    assert_one_line_error(res, "responses.nc", "empty candidate set")
    assert not (tmp_path / "out").exists()
    res = pbv("match", *common(f), "--channel", "7", "--image", "o00")
    assert_one_line_error(res, "empty candidate set")


def test_existing_output_without_force(files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = pbv("explain", *common(files), "--out", out, "--channel", "3")
    assert_one_line_error(res, str(out), "already exists")
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


def test_bad_options(files, tmp_path):
    res = pbv("explain", *common(files), "--out", tmp_path / "out", "--method", "magic")
    assert_one_line_error(res, "--method")
    res = pbv("match", *common(files), "--channel", "3", "--image", "o00", "--candidates", "some")
    assert_one_line_error(res, "--candidates")
    assert np.all([not p.name.startswith(".") for p in tmp_path.iterdir()])
