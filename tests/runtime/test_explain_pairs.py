"""`explain --pairs PAIRS.csv` and `pbv_onnx.explain(..., pairs=...)`: a given list of pairs in one run."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from test_explain import make_study_files
from test_interrupts import Interrupt

import pbv_onnx
from pbv_onnx.base.errors import InputDataError, UsageError
from pbv_onnx.data.pairs import pairs_table, read_pairs
from pbv_onnx.runtime.engine import Engine
from pbv_onnx.workflows import explain as ex
from pbv_onnx.workflows.checkpoint import work_folder
from pbv_onnx.workflows.run import explain_study

PBV = Path(sys.executable).parent / "pbv-onnx"


@pytest.fixture(scope="module")
def files(tiny_model, tmp_path_factory) -> dict:
    f = make_study_files(tmp_path_factory.mktemp("pairs"), tiny_model)
    # an image outside the responses file, named relative to the pairs file's folder
    (f["folder"] / "extra").mkdir()
    shutil.copy(f["images"] / "o03.png", f["folder"] / "extra" / "outside.png")
    return f


def write(folder: Path, text: str, name: str = "pairs.csv") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def run(f: dict, *args) -> subprocess.CompletedProcess:
    common = ["--model", f["model"], "--readouts", f["readouts"], "--responses", f["responses"], "--device", "cpu"]
    cmd = [str(PBV), "explain", *map(str, common), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_the_pairs_asked_for_are_explained_in_order(files, tmp_path):
    pairs = write(files["folder"], "channel,object,reference,note\n7,o01,b03,x\n3,o02,,\n11,extra/outside.png,b00,\n")
    res = run(files, "--pairs", pairs, "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    ds = xr.open_dataset(tmp_path / "out" / "explanations.nc", engine="h5netcdf").load()
    assert ds["channel"].values.tolist() == ["7", "3", "11"]
    assert ds["ooc"].values.tolist() == ["o01", "o02", "extra/outside.png"]
    # no reference: the best match, as `match` ranks the candidates
    study = ex.open_study(files["model"], files["readouts"], files["responses"], device="cpu", progress=False)
    best = ex.match(study, 3, study.image("o02"))
    assert ds["reference"].values.tolist() == ["b03", str(best["stimulus"].values[0]), "b00"]
    assert float(ds["similarity"].values[1]) == pytest.approx(float(best["similarity"].values[0]), rel=1e-6)
    assert np.isnan(ds["recorded_ooc"].values[2]) and ds["ooc_file"].values[2].endswith("extra/outside.png")
    assert '"pairs_file"' in ds.attrs["options"]
    # the same pairs through the usual options give the same gradients
    one = run(files, "--channel", "7", "--image", "o01", "--reference", "b03", "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    single = xr.open_dataset(tmp_path / "one" / "explanations.nc", engine="h5netcdf")
    np.testing.assert_allclose(ds["input_grad"].values[0], single["input_grad"].values[0], rtol=1e-6, atol=1e-9)


def test_python_pairs_take_a_path_a_table_or_tuples(files):
    eng = Engine(files["model"], device="cpu")
    csv = write(files["folder"], "channel,object,reference\n7,o01,b03\n3,o02,\n", "api.csv")
    a = pbv_onnx.explain(eng, files["readouts"], files["responses"], pairs=csv)
    b = pbv_onnx.explain(eng, files["readouts"], files["responses"], pairs=[(7, "o01", "b03"), ("3", "o02")])
    import pandas as pd

    frame = pd.DataFrame({"channel": [7, 3], "object": ["o01", "o02"], "reference": ["b03", None]})
    c = pbv_onnx.explain(eng, files["readouts"], files["responses"], pairs=frame)
    for other in (b, c):
        assert other["reference"].values.tolist() == a["reference"].values.tolist()
        np.testing.assert_array_equal(other["input_grad"].values, a["input_grad"].values)
    with pytest.raises(UsageError, match="give no channel, image or reference"):
        pbv_onnx.explain(eng, files["readouts"], files["responses"], channels=["3"], pairs=csv)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("channel,object\n7,o01\n99,o02\n", ["row 2 (line 3)", "unknown channel '99'", "channels of"]),
        ("channel,object\n7,nothing.png\n", ["row 1 (line 2)", "object 'nothing.png' is neither a stimulus id"]),
        ("channel,object,reference\n7,o01,b01\n3,o01,b77\n", ["row 2 (line 3)", "reference 'b77' is neither"]),
        ("chan,object\n7,o01\n", ["missing column(s) channel", "has: chan, object"]),
        ("channel,reference\n7,b01\n", ["missing column(s) object"]),
        ("", ["empty file"]),
        ("channel,object,reference\n", ["no pairs"]),
        ("channel,object\n7,\n", ["row 1 (line 2)", "empty object"]),
    ],
)
def test_bad_pairs_files_are_one_line_errors(files, tmp_path, text, words):
    pairs = write(tmp_path, text)
    res = run(files, "--pairs", pairs, "--out", tmp_path / "out")
    assert res.returncode == 3, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith(f"pbv-onnx: error: {pairs}: "), lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not (tmp_path / "out").exists()


def test_a_missing_pairs_file_and_mixed_options(files, tmp_path):
    res = run(files, "--pairs", tmp_path / "none.csv", "--out", tmp_path / "out")
    assert res.returncode == 3 and "none.csv: pairs file not found" in res.stderr
    pairs = write(tmp_path, "channel,object\n7,o01\n")
    res = run(files, "--pairs", pairs, "--channel", "7", "--out", tmp_path / "out")
    assert res.returncode == 2 and "--pairs lists every pair" in res.stderr


def test_tables_in_memory_are_checked_too():
    with pytest.raises(InputDataError, match="missing column"):
        pairs_table([{"channel": 1, "obj": "a"}])
    with pytest.raises(UsageError, match="row 2: expected"):
        pairs_table([(1, "a"), (1,)])
    with pytest.raises(UsageError, match="pairs is empty"):
        pairs_table([])
    rows = pairs_table([(1, "a"), {"channel": 2, "object": "b", "reference": "c"}])
    assert [(r.channel, r.object, r.reference) for r in rows] == [("1", "a", None), ("2", "b", "c")]


def test_blank_lines_and_extra_columns_are_ignored(tmp_path):
    path = write(tmp_path, "\ufeffchannel , object,reference,comment\n7,o01,,first\n\n3, o02 ,b01,\n")
    rows = read_pairs(path)
    assert [(r.where, r.channel, r.object, r.reference) for r in rows] == [
        ("row 1 (line 2)", "7", "o01", None),
        ("row 2 (line 4)", "3", "o02", "b01"),  # rows count data rows, lines count lines
    ]


def test_pairs_runs_checkpoint_and_resume(files, tmp_path, monkeypatch):
    pairs = write(tmp_path, "channel,object,reference\n7,o01,b03\n3,o02,\n11,o03,b01\n3,o04,\n")
    study = ex.open_study(
        files["model"], files["readouts"], files["responses"], batch_size=2, device="cpu", progress=False
    )
    full = explain_study(study, pairs=pairs)
    out = tmp_path / "out"
    monkeypatch.setattr(study.engine, "vjp", Interrupt(study.engine, stop_at=3))
    with pytest.raises(KeyboardInterrupt):
        explain_study(study, pairs=pairs, checkpoints=out)
    assert len(list(work_folder(out).glob("chunk-*.npz"))) == 2
    counter = Interrupt(study.engine)
    monkeypatch.setattr(study.engine, "vjp", counter)
    resumed = explain_study(study, pairs=pairs, checkpoints=out, resume=True)
    assert counter.calls == 2
    for name in ("input_grad", "saliency", "shared_map", "shared_map_latent"):
        np.testing.assert_array_equal(resumed[name].values, full[name].values)
