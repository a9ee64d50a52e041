"""bench/gpu_check.py where there is no GPU: it reports why and how to fix it, and renders results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.py"


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="a CUDA onnxruntime is here")
def test_without_cuda_the_report_says_how_to_get_it(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["models"] == [] and "onnxruntime-gpu" in report["note"]
    assert "no CUDAExecutionProvider" in out.with_suffix(".md").read_text()


def test_committed_results_render_one_row_per_model(tmp_path):
    results = ROOT / "bench" / "results" / "gpu_check.json"
    report = json.loads(results.read_text())
    out = tmp_path / "table"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--render", str(results), "--out", str(out)],
        check=True,
        timeout=120,
        cwd=tmp_path,
    )
    rows = [line for line in out.with_suffix(".md").read_text().splitlines() if line.startswith("| ")][1:]
    assert len(rows) == len(report["models"]) > 0
    for row, model in zip(rows, report["models"]):
        assert row.startswith(f"| {model['arch']} {model['layer']} |")
        assert f"{model['default']['vjp_s'] * 1e3:.2f}" in row


def test_the_explain_pattern_cell_shows_padded_then_unpadded(tmp_path):
    report = json.loads((ROOT / "bench" / "results" / "gpu_check.json").read_text())
    report["models"][0]["explain_pattern"] = {
        "padded": {"again_s": 0.326, "first_s": 9.77},
        "unpadded": {"again_s": 21.06, "first_s": 23.33},
    }
    source, out = tmp_path / "report.json", tmp_path / "table"
    source.write_text(json.dumps(report))
    subprocess.run(
        [sys.executable, str(SCRIPT), "--render", str(source), "--out", str(out)], check=True, timeout=120, cwd=tmp_path
    )
    rows = [line for line in out.with_suffix(".md").read_text().splitlines() if line.startswith("| ")]
    assert "| 0.33 (9.77), 21.06 (23.33) |" in rows[1]
    assert all(row.count("|") == rows[0].count("|") for row in rows)  # every row has every column
