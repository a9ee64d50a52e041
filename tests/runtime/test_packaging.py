"""`pip install .` puts one package into site-packages: pbv_onnx, with the CLI and export stage inside."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """A wheel built from the tracked files alone (a copy, so the checkout's build/ stays as it is)."""
    src = tmp_path_factory.mktemp("src")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in files.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)],
        check=True,
    )
    (path,) = out.glob("pbv_onnx-*.whl")
    return zipfile.ZipFile(path)


def test_the_wheel_installs_only_pbv_onnx(wheel):
    tops = {name.split("/")[0] for name in wheel.namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"pbv_onnx"}


def test_the_cli_and_the_export_stage_install_inside_pbv_onnx(wheel):
    names = set(wheel.namelist())
    for module in (
        "pbv_onnx/cli/main.py",
        "pbv_onnx/export/pipeline.py",
        "pbv_onnx/export/graph/transform.py",
        "pbv_onnx/runtime/engine.py",
        "pbv_onnx/demo/build.py",
    ):
        assert module in names, module


def test_the_console_script_is_pbv_onnx_cli_main(wheel):
    (entry,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser()
    parser.read_string(wheel.read(entry).decode())
    assert dict(parser["console_scripts"]) == {"pbv-onnx": "pbv_onnx.cli.main:main"}


def test_every_package_folder_is_listed_in_pyproject(wheel):
    """A new subpackage left out of pyproject's list would be missing from a user's install."""
    folders = {p.parent.relative_to(ROOT / "pbv_onnx").as_posix() for p in (ROOT / "pbv_onnx").rglob("__init__.py")}
    installed = {
        Path(n).parent.relative_to("pbv_onnx").as_posix()
        for n in wheel.namelist()
        if n.startswith("pbv_onnx/") and n.endswith("/__init__.py")
    }
    assert folders <= installed, folders - installed
