"""The installed `pbv-onnx` command run as a user runs it, and the checks its tests share."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PBV = Path(sys.executable).parent / "pbv-onnx"


def pbv(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(PBV), *map(str, args)], capture_output=True, text=True, timeout=300)


def refused(res: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    """The run failed with `code` and one `pbv-onnx: error:` line holding every fragment; that line."""
    lines = res.stderr.strip().splitlines()
    assert res.returncode == code, res.stderr
    assert len(lines) == 1 and lines[0].startswith("pbv-onnx: error: "), res.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def fit_and_explain(model: Path, root: Path, channel: str) -> Path:
    """`fit` then `explain` (one object of `channel`) on root/responses.nc; the explain folder."""
    res = pbv(
        "fit",
        "--model",
        model,
        "--responses",
        root / "responses.nc",
        "--folds",
        "4",
        "--alphas",
        "0.1,1",
        "--device",
        "cpu",
        "--out",
        root / "readouts.nc",
    )
    assert res.returncode == 0, res.stderr
    res = pbv(
        "explain",
        "--model",
        model,
        "--readouts",
        root / "readouts.nc",
        "--responses",
        root / "responses.nc",
        "--channel",
        channel,
        "--top-objects",
        "1",
        "--device",
        "cpu",
        "--out",
        root / "out",
    )
    assert res.returncode == 0, res.stderr
    return root / "out"
