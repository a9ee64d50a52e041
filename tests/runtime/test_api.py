"""The public API: lazy names, arrays in and xarray out, explain as the CLI writes it, logging,
parameter names in library errors and flags on the command line, and docs/python-api.md run as code."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from PIL import Image
from test_explain import make_study_files
from tinymodel import tiny_forward, tiny_weights

import pbv_onnx as pbv
from pbv_onnx.base.errors import OutputError, UsageError
from pbv_onnx.cli.app import cli_message, configure_logging, with_flags
from pbv_onnx.runtime.images import load_batch

ROOT = Path(__file__).resolve().parents[2]
PBV = Path(sys.executable).parent / "pbv-onnx"


@pytest.fixture(scope="module")
def study(tiny_model, tmp_path_factory) -> dict:
    return make_study_files(tmp_path_factory.mktemp("api-study"), tiny_model)


@pytest.fixture(scope="module")
def engine(tiny_model) -> pbv.Engine:
    return pbv.Engine(tiny_model, device="cpu")


def _run(code: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, **kw)


# -- names ---------------------------------------------------------------------------------------


def test_import_is_lazy_and_every_public_name_resolves():
    res = _run(
        "import sys, pbv_onnx as pbv\n"
        "heavy = [m for m in ('numpy', 'xarray', 'onnxruntime', 'PIL') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "missing = [n for n in pbv.__all__ if getattr(pbv, n, None) is None]\n"
        "assert not missing, missing\n"
        "assert 'explain_pair' in dir(pbv)\n"
        "try:\n    pbv.no_such_name\nexcept AttributeError:\n    pass\nelse:\n    raise SystemExit(1)\n"
    )
    assert res.returncode == 0, res.stderr


# -- arrays in -----------------------------------------------------------------------------------


def test_preprocess_takes_files_pil_images_and_uint8_arrays_alike(engine, study):
    files = [study["folder"] / "img" / f"{s}.png" for s in ("b00", "o02")]
    want = load_batch(files, engine.info.preprocessing)
    pil = []
    for f in files:
        with Image.open(f) as im:
            pil.append(im.copy())
    arrays = [np.asarray(p.convert("RGB")) for p in pil]
    for given in (files, [str(f) for f in files], pil, arrays, np.stack(arrays)):
        np.testing.assert_array_equal(engine.preprocess(given), want)
    np.testing.assert_array_equal(engine.preprocess(files[1]), want[1:])
    with pytest.raises(UsageError, match="HxWx3 uint8") as err:
        engine.preprocess([arrays[0].astype(np.float32)])
    assert err.value.param == "images"


def test_features_are_the_flattened_forward_pass(engine, study):
    x = engine.preprocess([study["folder"] / "img" / "b01.png", study["folder"] / "img" / "o03.png"])
    phi = pbv.features(engine, x)
    assert phi.dtype == np.float32 and phi.shape == (2, engine.info.n_features)
    np.testing.assert_allclose(phi, tiny_forward(x, tiny_weights()).reshape(2, -1), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(pbv.features(engine, [study["folder"] / "img" / "b01.png"]), phi[:1])


def test_similarity_is_the_weighted_cosine_in_float64():
    rng = np.random.default_rng(3)
    w, o, refs = rng.standard_normal(40), rng.random(40), rng.random((5, 40))
    want = [(w**2 * o * b).sum() / (np.linalg.norm(w * o) * np.linalg.norm(w * b)) for b in refs]
    np.testing.assert_allclose(pbv.similarity(w, o, refs), want, rtol=1e-12)
    np.testing.assert_allclose(pbv.similarity(w, o, refs[2]), want[2:3], rtol=1e-12)
    assert pbv.similarity(w, np.zeros(40), refs).tolist() == [0.0] * 5


def test_fit_readouts_from_a_bare_features_array_recovers_a_linear_channel():
    """No model file anywhere: features from numpy, responses exactly linear in them."""
    rng = np.random.default_rng(0)
    n_body, n_obj, D = 30, 10, 6
    phi = rng.standard_normal((n_body + n_obj, D))
    true_w = rng.standard_normal((2, D))
    resp = true_w @ phi.T + np.array([[1.0], [2.0]])
    stim = [f"s{i}" for i in range(n_body + n_obj)]
    responses = pbv.make_responses(resp, ["a", "b"], stim, ["body"] * n_body + ["object"] * n_obj, preferred="body")
    feats = xr.DataArray(phi, dims=("stimulus", "feature"), coords={"stimulus": stim})
    ro = pbv.fit_readouts(feats, responses, alphas=[1e-6], folds=3)
    assert ro["weight"].dims == ("channel", "feature") and ro.attrs["preferred_category"] == "body"
    assert ro.attrs["feature_shape"] == [D] and "model_sha256" not in ro.attrs
    np.testing.assert_allclose(ro["weight"].values, true_w, rtol=1e-3, atol=1e-3)
    assert (ro["r_ooc"].values > 0.999).all()
    with pytest.raises(UsageError) as err:
        pbv.fit_readouts(feats, responses, folds=1)
    assert err.value.param == "folds" and str(err.value).startswith("folds must be at least 2")


def test_stimulus_features_carry_the_model_and_fit_like_the_cli(engine, study, tmp_path):
    responses = pbv.load_responses(study["responses"])
    feats = pbv.stimulus_features(engine, responses)
    assert feats.attrs["model_sha256"] == engine.info.sha256
    ro = pbv.fit_readouts(feats, responses, folds=4)
    res = subprocess.run(
        [
            str(PBV),
            "fit",
            "--model",
            study["model"],
            "--responses",
            study["responses"],
            "--out",
            tmp_path / "ro.nc",
            "--folds",
            "4",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    cli = pbv.load_readouts(tmp_path / "ro.nc", engine.info)
    for name in ("weight", "bias", "r_cv_preferred", "r_ooc"):
        np.testing.assert_array_equal(ro[name].values, cli[name].values)
    assert ro.attrs["model_sha256"] == cli.attrs["model_sha256"]


# -- explain -------------------------------------------------------------------------------------


def test_explain_of_datasets_is_what_the_cli_writes(tiny_model, study, tmp_path):
    from pbv_onnx.workflows.explain import DEFAULT_EXPLAIN_BATCH

    # the CLI's explain runs its engine at its own default batch size, recorded in the options
    engine = pbv.Engine(tiny_model, device="cpu", batch_size=DEFAULT_EXPLAIN_BATCH)
    out = tmp_path / "out"
    args = [
        "explain",
        "--model",
        study["model"],
        "--readouts",
        study["readouts"],
        "--responses",
        study["responses"],
        "--out",
        out,
        "--channel",
        "7",
        "--channel",
        "11",
        "--top-objects",
        "2",
        "--device",
        "cpu",
    ]
    res = subprocess.run([str(PBV), *map(str, args)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    with xr.open_dataset(out / "explanations.nc", engine="h5netcdf") as f:
        written = f.load()
    ds = pbv.explain(
        engine,
        pbv.load_readouts(study["readouts"]),
        pbv.load_responses(study["responses"]),
        channels=["7", "11"],
        top_objects=2,
    )
    written = written.drop_vars("display_vmax")
    for key in ("display_smooth_sigma", "display_scale"):
        written.attrs.pop(key)
    xr.testing.assert_identical(ds, written)
    # and the report of it, written from the library, holds the same NetCDF
    pbv.write_report(ds, tmp_path / "lib")
    with xr.open_dataset(tmp_path / "lib" / "explanations.nc", engine="h5netcdf") as f:
        assert json.loads(f.attrs["options"]) == json.loads(ds.attrs["options"])
    assert (tmp_path / "lib" / "index.html").is_file()


def test_explain_takes_datasets_that_never_were_files(engine, study):
    responses = pbv.load_responses(study["responses"]).copy()
    responses.encoding = {}
    readouts = pbv.load_readouts(study["readouts"]).copy()
    readouts.encoding = {}
    with pytest.raises(UsageError, match="images_root") as err:
        pbv.explain(engine, readouts, responses, channels=[3], top_objects=1)
    assert err.value.param == "images_root"
    ds = pbv.explain(engine, readouts, responses, channels=[3], top_objects=1, images_root=study["folder"])
    assert ds.sizes["pair"] == 1 and ds.attrs["readouts"] == "(readouts dataset)"
    assert Path(str(ds["ooc_file"].values[0])).parent == study["folder"] / "img"


def test_write_report_refuses_bad_display_options_and_existing_output(engine, study, tmp_path):
    ds = pbv.explain(engine, study["readouts"], study["responses"], channels=[7], top_objects=1)
    with pytest.raises(UsageError) as err:
        pbv.write_report(ds, tmp_path / "r", scale="image")
    assert err.value.param == "scale" and not (tmp_path / "r").exists()
    with pytest.raises(UsageError) as err:
        pbv.write_report(ds, tmp_path / "r", smooth=-1)
    assert err.value.param == "smooth" and not (tmp_path / "r").exists()
    pbv.write_report(ds, tmp_path / "r")
    with pytest.raises(OutputError, match="force=True"):
        pbv.write_report(ds, tmp_path / "r")
    pbv.write_report(ds, tmp_path / "r", force=True, smooth=1.0, scale="pair")


# -- errors: parameters in the library, flags on the command line -------------------------------


@pytest.mark.parametrize(
    "message, params, shown",
    [
        ("top_objects must be at least 1, not 0", ("top_objects",), "--top-objects must be at least 1, not 0"),
        ("already exists (use force=True to overwrite)", ("force",), "already exists (use --force to overwrite)"),
        ("only 6; folds=9 needs at least 18", ("folds",), "only 6; --folds 9 needs at least 18"),
        (
            "give either csv_path or npy_path (with stimuli)",
            ("csv_path", "npy_path", "stimuli"),
            "give either --csv or --npy (with --stimuli)",
        ),
        (
            "cannot get torchvision weights x; pass weights=PATH",
            ("weights",),
            "cannot get torchvision weights x; pass --weights PATH",
        ),
        (
            "add resume=True to continue it, or force=True to start afresh",
            ("resume", "force"),
            "add --resume to continue it, or --force to start afresh",
        ),
        ("top_k_objects and top_k", ("top_k",), "top_k_objects and --top-k"),
    ],
)
def test_parameters_become_flags_on_the_command_line(message, params, shown):
    assert with_flags(message, params) == shown
    assert cli_message(UsageError("/data/top_k/r.nc", message, param=params)) == f"/data/top_k/r.nc: {shown}"


def test_library_errors_name_parameters_and_no_flag():
    """No raise in the library quotes a command-line flag."""
    flag = re.compile(r"""(?:Error|Op)\([^)]*?f?["'][^"']*--[a-z]""", re.S)
    files = [p for p in (ROOT / "pbv_onnx").rglob("*.py") if "cli" not in p.parts]
    files += list((ROOT / "export").rglob("*.py"))
    bad = [str(p.relative_to(ROOT)) for p in files if flag.search(p.read_text())]
    assert not bad


def test_cli_shows_the_flag_where_the_library_names_the_parameter(study, tmp_path):
    res = subprocess.run(
        [
            str(PBV),
            "explain",
            "--model",
            study["model"],
            "--readouts",
            study["readouts"],
            "--responses",
            study["responses"],
            "--out",
            tmp_path / "o",
            "--top-objects",
            "0",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2
    assert res.stderr == "pbv-onnx: error: --top-objects must be at least 1, not 0\n"
    assert not (tmp_path / "o").exists()


# -- logging -------------------------------------------------------------------------------------

_COMMAND = """
import logging, sys
import typer
from pbv_onnx.cli.app import app
from pbv_onnx.cli.main import main

@app.command("notes")
def notes() -> None:
    log = logging.getLogger("pbv_onnx.workflows.checkpoint")
    log.debug("detail")
    log.info("rerun with resume=True to continue", extra={"params": ("resume",)})
    log.warning("careful")

sys.argv = ["pbv-onnx", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize(
    "flags, lines",
    [
        ([], ["pbv-onnx: rerun with --resume to continue", "pbv-onnx: careful"]),
        (["-q"], ["pbv-onnx: careful"]),
        (["--quiet"], ["pbv-onnx: careful"]),
        (["-v"], ["pbv-onnx: detail", "pbv-onnx: rerun with --resume to continue", "pbv-onnx: careful"]),
    ],
)
def test_the_cli_logs_info_by_default_debug_with_v_and_warnings_only_with_q(flags, lines):
    res = subprocess.run([sys.executable, "-c", _COMMAND, *flags, "notes"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stderr.splitlines() == lines


def test_the_library_is_silent_but_for_warnings(tmp_path):
    """A library user who configures nothing sees no notes (Python's default: warnings only)."""
    code = (
        "import logging, numpy as np, sys\n"
        "from pbv_onnx.workflows.checkpoint import Checkpoints, work_folder\n"
        "out = sys.argv[1]\n"
        "work_folder(out).mkdir()\n"
        "cp = Checkpoints(out, {'k': 1}, resume=True)\n"
        "cp.save(np.array([0]), np.zeros((1, 2, 3, 4, 4), np.float32), None)\n"
        "(work_folder(out) / 'chunk-000005.npz').write_bytes(b'damaged')\n"
        "Checkpoints(out, {'k': 1}, resume=True).load(np.zeros((6, 2, 3, 4, 4), np.float32), None)\n"
        "logging.getLogger('pbv_onnx.x').warning('a warning')\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stderr == "a warning\n"
    configured = "import logging; logging.basicConfig(level=logging.INFO)\n" + code
    res = subprocess.run([sys.executable, "-c", configured, str(tmp_path / "b")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "ignoring damaged checkpoint chunk-000005.npz" in res.stderr


def test_configure_logging_replaces_its_handler(capsys):
    configure_logging()
    configure_logging(verbose=True)
    logging.getLogger("pbv_onnx.test").debug("once")
    assert capsys.readouterr().err == "pbv-onnx: once\n"
    configure_logging(quiet=True)
    logging.getLogger("pbv_onnx.test").info("hidden")
    assert capsys.readouterr().err == ""
    logger = logging.getLogger("pbv_onnx")
    logger.handlers.clear()
    logger.setLevel(logging.NOTSET)
    logger.propagate = True


# -- the page ------------------------------------------------------------------------------------


def test_the_python_api_page_runs(study, tmp_path, monkeypatch):
    page = (ROOT / "docs" / "python-api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, re.S)
    assert len(blocks) >= 4
    folder = tmp_path / "page"
    shutil.copytree(study["folder"] / "img", folder / "img")
    shutil.copy(study["responses"], folder / "responses.nc")
    shutil.copy(study["model"], folder / "model.onnx")
    monkeypatch.chdir(folder)
    scope: dict = {}
    for block in blocks:
        exec(compile(block, str(ROOT / "docs" / "python-api.md"), "exec"), scope)  # noqa: S102
    assert (folder / "out" / "index.html").is_file()
    assert scope["res"].sizes["pair"] == 2
