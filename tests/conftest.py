"""Shared fixtures: a tiny torch-free model, real photographs, the repo root."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(Path(__file__).resolve().parent))


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
