"""The runtime never imports torch: proven in an environment where torch is not installed."""

from __future__ import annotations

import importlib.util
import pkgutil
import subprocess
import sys

import pbv_onnx


def test_torch_is_not_installed_in_the_runtime_environment():
    assert importlib.util.find_spec("torch") is None, "runtime tests must run without torch"


def test_importing_every_runtime_module_and_the_cli_loads_no_torch():
    modules = [m.name for m in pkgutil.walk_packages(pbv_onnx.__path__, "pbv_onnx.")]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r} + ['pbv_onnx.cli.main']:\n"
        "    importlib.import_module(m)\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]\n"
        "print(len(sys.modules)); assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
