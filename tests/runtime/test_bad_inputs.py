"""A battery of bad inputs through the installed `pbv-onnx` script: one-line errors, exit codes, nothing written.

Every case builds a valid study, breaks one thing, runs one command and expects exactly one stderr
line `pbv-onnx: error: ...` naming the offending file (or option), the exit code of its error class,
and the case folder (and the shared inputs) byte-for-byte as before. The cases run two at a time,
each in its own folder; each test then checks one case's result.
"""

from __future__ import annotations

import csv
import importlib.util
import re
import shutil
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
import xarray as xr
from test_explain import make_study_files
from tinymodel import build_tiny_model

from pbv_onnx.base.atomic import output_lock
from pbv_onnx.data.features import features_for_responses
from pbv_onnx.data.readouts import fit_files
from pbv_onnx.workflows.checkpoint import work_folder

PBV = Path(sys.executable).parent / "pbv-onnx"
USAGE, DATA, MODEL, MISMATCH, OUTPUT, DEPENDENCY = 2, 3, 4, 5, 6, 7


# -- crafting bad files ------------------------------------------------------------------------


def png_header(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's calling card)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
    return path


def truncated(src: Path, dst: Path, keep: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


def edited_nc(src: Path, dst: Path, edit: Callable[[xr.Dataset], xr.Dataset]) -> Path:
    with xr.open_dataset(src, engine="h5netcdf") as ds:
        ds = ds.load()
    edit(ds).to_netcdf(dst, engine="h5netcdf")
    return dst


def edited_model(src: Path, dst: Path, edit: Callable[[onnx.ModelProto], None]) -> Path:
    model = onnx.load(str(src))
    edit(model)
    dst.write_bytes(model.SerializeToString())
    return dst


def external_data_outside(model: onnx.ModelProto) -> None:
    """Move the first weight to 'external data' in a file outside the model's folder."""
    t = model.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", "432")):
        entry = t.external_data.add()
        entry.key, entry.value = key, value


def set_meta(model: onnx.ModelProto, key: str, value: str | None) -> None:
    props = [(p.key, p.value) for p in model.metadata_props if p.key != key]
    del model.metadata_props[:]
    for k, v in props + ([(key, value)] if value is not None else []):
        model.metadata_props.add(key=k, value=v)


def long_csv(ds: xr.Dataset, path: Path, edit: Callable[[list[list[str]]], None] | None = None) -> Path:
    rows = [["channel", "stimulus", "category", "file", "repetition", "response"]]
    for i, ch in enumerate(ds["channel"].values):
        for j, st in enumerate(ds["stimulus"].values):
            for k in range(ds.sizes["repetition"]):
                rows.append(
                    [
                        str(ch),
                        str(st),
                        str(ds["category"].values[j]),
                        str(ds["file"].values[j]),
                        str(k),
                        repr(float(ds["response"].values[i, j, k])),
                    ]
                )
    if edit:
        edit(rows)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def npy_inputs(
    ds: xr.Dataset,
    folder: Path,
    values: np.ndarray | None = None,
    n_stimuli: int | None = None,
    allow_pickle: bool = False,
) -> list:
    arr = ds["response"].values if values is None else values
    np.save(folder / "resp.npy", arr, allow_pickle=allow_pickle)
    n = ds.sizes["stimulus"] if n_stimuli is None else n_stimuli
    with open(folder / "stimuli.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["stimulus", "category", "file"])
        for j in range(n):
            w.writerow([ds["stimulus"].values[j], ds["category"].values[j], ds["file"].values[j]])
    return ["--npy", folder / "resp.npy", "--stimuli", folder / "stimuli.csv", "--preferred", "body"]


def write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return path


def without_attr(ds: xr.Dataset, key: str) -> xr.Dataset:
    ds.attrs.pop(key)
    return ds


def study_copy(base: dict, case: Path) -> Path:
    """The study folder (responses.nc, readouts.nc, img/) copied into the case folder, to break."""
    shutil.copytree(base["folder"], case / "s")
    return case / "s"


def responses_with(base: dict, case: Path, edit) -> Path:
    s = study_copy(base, case)
    return edited_nc(base["responses"], s / "responses_bad.nc", edit)


def readouts_with(base: dict, case: Path, edit, name: str = "readouts_bad.nc") -> Path:
    return edited_nc(base["readouts"], case / name, edit)


# -- the cases -----------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    code: int
    names: str  # what the error line must mention
    build: Callable[[dict, Path], list]  # (base files, case folder) -> argv after `pbv-onnx`
    hold_lock: str | None = None  # an output this test process holds the lock of
    without: str | None = None  # a module that must not be importable for the case


def _features(b, c, responses=None, model=None, cache=None):
    if cache is not None:  # an existing --out: a cache to reuse and update
        shutil.copy(cache, c / "features.nc")
    return [
        "features",
        "--model",
        model or b["model"],
        "--responses",
        responses or b["responses"],
        "--out",
        c / "features.nc",
        "--device",
        "cpu",
    ]


def _match(b, readouts):
    return [
        "match",
        "--model",
        b["model"],
        "--readouts",
        readouts,
        "--responses",
        b["responses"],
        "--channel",
        "7",
        "--image",
        "o01",
        "--device",
        "cpu",
    ]


def _explain(b, c, *extra, leftovers=False):
    if leftovers:
        _leftover_checkpoints(c)
    return [
        "explain",
        "--model",
        b["model"],
        "--readouts",
        b["readouts"],
        "--responses",
        b["responses"],
        "--out",
        c / "out",
        "--channel",
        "3",
        "--image",
        "o00",
        "--device",
        "cpu",
        *extra,
    ]


def _leftover_checkpoints(c: Path) -> Path:
    folder = work_folder(c / "out")
    folder.mkdir()
    (folder / "run.json").write_text('{"key": "0", "description": {"method": "gradient"}}')
    (folder / "chunk-000000.npz").write_bytes(b"PK")
    return folder


def _bad_image(b, c, make) -> list:
    s = study_copy(b, c)
    make(s / "img" / "b00.png")
    return _features(b, c, responses=s / "responses.nc")


CASES = [
    # import-responses
    Case(
        "csv-missing-column",
        DATA,
        "long.csv",
        lambda b, c: [
            "import-responses",
            "--csv",
            long_csv(b["ds"], c / "long.csv", lambda r: [x.pop(2) for x in r]),
            "--out",
            c / "r.nc",
        ],
    ),
    Case(
        "csv-response-not-a-number",
        DATA,
        "long.csv",
        lambda b, c: [
            "import-responses",
            "--csv",
            long_csv(b["ds"], c / "long.csv", lambda r: r[3].__setitem__(5, "12,5")),
            "--out",
            c / "r.nc",
        ],
    ),
    Case(
        "csv-binary-garbage",
        DATA,
        "long.csv",
        lambda b, c: [
            "import-responses",
            "--csv",
            write(c / "long.csv", b"\xff\xfe\x00\x81" * 64),
            "--out",
            c / "r.nc",
        ],
    ),
    Case(
        "npy-pickled-objects",
        DATA,
        "resp.npy",
        lambda b, c: [
            "import-responses",
            *npy_inputs(b["ds"], c, np.array([[{"a": 1}]], object), allow_pickle=True),
            "--out",
            c / "r.nc",
        ],
    ),
    Case(
        "npy-infinite-values",
        DATA,
        "resp.npy",
        lambda b, c: [
            "import-responses",
            *npy_inputs(b["ds"], c, np.full(b["ds"]["response"].shape, np.inf)),
            "--out",
            c / "r.nc",
        ],
    ),
    Case(
        "npy-stimulus-table-too-short",
        DATA,
        "stimuli.csv",
        lambda b, c: ["import-responses", *npy_inputs(b["ds"], c, n_stimuli=3), "--out", c / "r.nc"],
    ),
    Case(
        "csv-and-npy-together",
        USAGE,
        "--csv",
        lambda b, c: [
            "import-responses",
            "--csv",
            long_csv(b["ds"], c / "long.csv"),
            *npy_inputs(b["ds"], c),
            "--out",
            c / "r.nc",
        ],
    ),
    Case(
        "import-over-existing-output",
        OUTPUT,
        "r.nc",
        lambda b, c: [
            "import-responses",
            "--csv",
            long_csv(b["ds"], c / "long.csv"),
            "--out",
            write(c / "r.nc", "earlier result"),
        ],
    ),
    # features: responses, images, models, caches
    Case(
        "responses-garbage",
        DATA,
        "responses_bad.nc",
        lambda b, c: _features(b, c, responses=write(c / "responses_bad.nc", b"CDF\x01" + b"\x00" * 200)),
    ),
    Case(
        "responses-truncated",
        DATA,
        "responses_bad.nc",
        lambda b, c: _features(b, c, responses=truncated(b["responses"], c / "responses_bad.nc")),
    ),
    Case(
        "responses-all-nan-channel",
        DATA,
        "responses_bad.nc",
        lambda b, c: _features(
            b,
            c,
            responses=responses_with(b, c, lambda ds: ds.assign(response=ds["response"].where(ds["channel"] != 7))),
        ),
    ),
    Case(
        "responses-without-category",
        DATA,
        "responses_bad.nc",
        lambda b, c: _features(b, c, responses=responses_with(b, c, lambda ds: ds.drop_vars("category"))),
    ),
    Case(
        "responses-text-values",
        DATA,
        "responses_bad.nc",
        lambda b, c: _features(
            b, c, responses=responses_with(b, c, lambda ds: ds.assign(response=ds["response"].astype(str)))
        ),
    ),
    Case("image-missing", DATA, "b00.png", lambda b, c: _bad_image(b, c, lambda p: p.unlink())),
    Case(
        "image-truncated", DATA, "b00.png", lambda b, c: _bad_image(b, c, lambda p: p.write_bytes(p.read_bytes()[:60]))
    ),
    Case("image-pixel-bomb", DATA, "b00.png", lambda b, c: _bad_image(b, c, lambda p: png_header(p, 9000, 9000))),
    Case(
        "model-garbage",
        MODEL,
        "model.onnx",
        lambda b, c: _features(b, c, model=write(c / "model.onnx", b"\x08\x07garbage" * 50)),
    ),
    Case(
        "model-external-data-outside-folder",
        MODEL,
        "model.onnx",
        lambda b, c: _features(b, c, model=edited_model(b["model"], c / "model.onnx", external_data_outside)),
    ),
    Case(
        "model-not-a-pbv-export",
        MODEL,
        "model.onnx",
        lambda b, c: _features(
            b, c, model=edited_model(b["model"], c / "model.onnx", lambda m: set_meta(m, "format_version", None))
        ),
    ),
    Case(
        "features-cache-of-another-model",
        MISMATCH,
        "features.nc",
        lambda b, c: _features(b, c, cache=b["features_other"]),
    ),
    # fit
    Case(
        "fit-unknown-preferred-category",
        USAGE,
        "responses.nc",
        lambda b, c: [
            "fit",
            "--model",
            b["model"],
            "--responses",
            b["responses"],
            "--out",
            c / "ro.nc",
            "--preferred",
            "face",
            "--device",
            "cpu",
        ],
    ),
    Case(
        "fit-too-few-preferred-stimuli",
        DATA,
        "responses.nc",
        lambda b, c: [
            "fit",
            "--model",
            b["model"],
            "--responses",
            b["responses"],
            "--out",
            c / "ro.nc",
            "--folds",
            "5",
            "--device",
            "cpu",
        ],
    ),
    Case(
        "fit-features-of-another-model",
        MISMATCH,
        "features_other.nc",
        lambda b, c: [
            "fit",
            "--model",
            b["model"],
            "--responses",
            b["responses"],
            "--out",
            c / "ro.nc",
            "--features",
            b["features_other"],
            "--folds",
            "4",
            "--device",
            "cpu",
        ],
    ),
    # predict
    Case(
        "predict-readouts-of-another-model",
        MISMATCH,
        "readouts.nc",
        lambda b, c: [
            "predict",
            "--model",
            b["other_model"],
            "--readouts",
            b["readouts"],
            "--images",
            b["images"],
            "--out",
            c / "p.csv",
            "--device",
            "cpu",
        ],
    ),
    Case(
        "predict-readouts-nan-weights",
        DATA,
        "readouts_bad.nc",
        lambda b, c: [
            "predict",
            "--model",
            b["model"],
            "--readouts",
            readouts_with(b, c, lambda ds: ds.assign(weight=ds["weight"] * np.nan)),
            "--images",
            b["images"],
            "--out",
            c / "p.csv",
            "--device",
            "cpu",
        ],
    ),
    Case(
        "predict-readouts-without-model-hash",
        DATA,
        "readouts_bad.nc",
        lambda b, c: [
            "predict",
            "--model",
            b["model"],
            "--readouts",
            readouts_with(b, c, lambda ds: without_attr(ds, "model_sha256")),
            "--images",
            b["images"],
            "--out",
            c / "p.csv",
            "--device",
            "cpu",
        ],
    ),
    Case(
        "predict-empty-image-folder",
        DATA,
        "empty",
        lambda b, c: [
            "predict",
            "--model",
            b["model"],
            "--readouts",
            b["readouts"],
            "--images",
            (c / "empty").mkdir() or c / "empty",
            "--device",
            "cpu",
        ],
    ),
    # evaluate
    Case(
        "evaluate-readouts-garbage",
        DATA,
        "readouts_bad.nc",
        lambda b, c: [
            "evaluate",
            "--readouts",
            truncated(b["fitted"], c / "readouts_bad.nc", 0.3),
            "--responses",
            b["responses"],
            "--out",
            c / "eval",
        ],
    ),
    Case(
        "evaluate-responses-lacking-a-channel",
        MISMATCH,
        "responses_bad.nc",
        lambda b, c: [
            "evaluate",
            "--readouts",
            b["fitted"],
            "--responses",
            responses_with(b, c, lambda ds: ds.sel(channel=[7, 11])),
            "--out",
            c / "eval",
        ],
    ),
    # match
    Case(
        "match-readouts-of-another-feature-shape",
        MISMATCH,
        "readouts_bad.nc",
        lambda b, c: _match(
            b,
            readouts_with(
                b,
                c,
                lambda ds: xr.Dataset(
                    {
                        "weight": (("channel", "feature"), np.ones((3, 6 * 8 * 9), np.float32)),
                        "bias": ("channel", np.zeros(3, np.float32)),
                    },
                    coords={"channel": ds["channel"].values},
                    attrs={**ds.attrs, "feature_shape": [6, 8, 9]},
                ),
            ),
        ),
    ),
    Case(
        "match-readouts-for-another-preferred-category",
        MISMATCH,
        "readouts_bad.nc",
        lambda b, c: _match(b, readouts_with(b, c, lambda ds: ds.assign_attrs(preferred_category="face"))),
    ),
    # explain
    Case("explain-output-being-written", OUTPUT, "out", lambda b, c: _explain(b, c), hold_lock="out"),
    Case("explain-leftover-checkpoints", OUTPUT, ".out.partial", lambda b, c: _explain(b, c, leftovers=True)),
    Case("explain-resume-other-run", MISMATCH, ".out.partial", lambda b, c: _explain(b, c, "--resume", leftovers=True)),
    Case(
        "explain-image-pixel-bomb",
        DATA,
        "bomb.png",
        lambda b, c: [
            "explain",
            "--model",
            b["model"],
            "--readouts",
            b["readouts"],
            "--responses",
            b["responses"],
            "--out",
            c / "out",
            "--channel",
            "3",
            "--image",
            png_header(c / "bomb.png", 30000, 30000),
            "--device",
            "cpu",
        ],
    ),
    # info, export, usage
    Case(
        "info-truncated-model", MODEL, "model.onnx", lambda b, c: ["info", truncated(b["model"], c / "model.onnx", 0.6)]
    ),
    Case(
        "info-unsupported-format-version",
        MODEL,
        "model.onnx",
        lambda b, c: [
            "info",
            edited_model(b["model"], c / "model.onnx", lambda m: set_meta(m, "format_version", "99")),
        ],
    ),
    Case(
        "export-without-torch",
        DEPENDENCY,
        "PyTorch",
        lambda b, c: ["export", "--arch", "resnet18", "--layer", "layer4", "--out", c / "m.onnx"],
        without="torch",
    ),
    Case(
        "unknown-option",
        USAGE,
        "--bogus",
        lambda b, c: ["fit", "--model", b["model"], "--responses", b["responses"], "--out", c / "ro.nc", "--bogus"],
    ),
    Case(
        "missing-required-option",
        USAGE,
        "--out",
        lambda b, c: ["explain", "--model", b["model"], "--readouts", b["readouts"], "--responses", b["responses"]],
    ),
]


# -- running them --------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict:
    """Every file and folder below `folder` (hidden ones included) with size and mtime."""
    return {
        str(p.relative_to(folder)): (None if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns))
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture(scope="module")
def base(tiny_model, tmp_path_factory) -> dict:
    """Valid inputs (study, features, fitted readouts, a second model) shared read-only by all cases."""
    root = tmp_path_factory.mktemp("battery")
    f = make_study_files(root / "study", tiny_model)
    with xr.open_dataset(f["responses"], engine="h5netcdf") as ds:
        f["ds"] = ds.load()
    other = build_tiny_model(root / "other.onnx", seed=4)
    features_for_responses(other, f["responses"], root / "features_other.nc", device="cpu", progress=False)
    fit_files(tiny_model, f["responses"], root / "fitted.nc", folds=4, device="cpu", progress=False)
    return {
        **f,
        "other_model": other,
        "features_other": root / "features_other.nc",
        "fitted": root / "fitted.nc",
        "root": root,
    }


def _run(case: Case, b: dict, folder: Path) -> dict:
    folder.mkdir()
    argv = case.build(b, folder)
    if case.without and importlib.util.find_spec(case.without) is not None:
        return {"skip": f"{case.without} is installed here", "argv": [str(a) for a in argv]}
    before = snapshot(folder)
    cmd = [str(PBV), *map(str, argv)]
    if case.hold_lock:
        with output_lock(folder / case.hold_lock):
            before = snapshot(folder)
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            after = snapshot(folder)
    else:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        after = snapshot(folder)
    return {"res": res, "before": before, "after": after, "argv": [str(a) for a in argv]}


@pytest.fixture(scope="module")
def results(base, tmp_path_factory) -> dict:
    cases_root = tmp_path_factory.mktemp("cases")
    shared_before = snapshot(base["root"])
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {c.id: pool.submit(_run, c, base, cases_root / c.id) for c in CASES}
        out = {k: f.result() for k, f in futures.items()}
    out["shared"] = (shared_before, snapshot(base["root"]))
    return out


def test_the_battery_covers_every_command_and_error_class(results):
    assert len({c.id for c in CASES}) == len(CASES) >= 30
    assert {USAGE, DATA, MODEL, MISMATCH, OUTPUT, DEPENDENCY} <= {c.code for c in CASES}
    commands = {results[c.id]["argv"][0] for c in CASES}
    assert {
        "import-responses",
        "features",
        "fit",
        "predict",
        "evaluate",
        "match",
        "explain",
        "info",
        "export",
    } <= commands


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_in_one_line_and_nothing_changes(case, results):
    r = results[case.id]
    if "skip" in r:
        pytest.skip(r["skip"])
    res = r["res"]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert re.match(r"^pbv-onnx: error: .+", lines[0]), lines[0]
    assert case.names in lines[0], lines[0]
    assert res.returncode == case.code, lines[0]
    assert r["after"] == r["before"], f"the case folder changed: {lines[0]}"


def test_nothing_is_ever_unpickled():
    """Untrusted files are data only: no pickle module, every np.load refuses pickles."""
    root = Path(__file__).resolve().parents[2]
    for path in sorted((root / "pbv_onnx").rglob("*.py")) + sorted((root / "cli").rglob("*.py")):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", text, re.M), path
        assert "allow_pickle=True" not in text, path
        for call in re.findall(r"np\.load\(([^)]*)\)", text):
            assert "allow_pickle=False" in call, (path, call)


def test_the_shared_inputs_are_untouched(results):
    before, after = results["shared"]
    assert after == before
