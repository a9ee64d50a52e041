"""Shared fixtures: a tiny torch-free model, real photographs, the repo root."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(Path(__file__).resolve().parent))

# The session cache of this test run (inherited by the CLI subprocesses), never the user's own.
_CACHE = tempfile.TemporaryDirectory(prefix="pbv-onnx-test-cache-")
os.environ["PBV_ONNX_CACHE"] = _CACHE.name


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.onnx")


@pytest.fixture(scope="session")
def shared_images() -> list[Path]:
    """Real photographs from ../shared/images (skipped where the folder is absent)."""
    folder = SHARED / "images"
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    if not files:
        pytest.skip("../shared/images is not present")
    return files
