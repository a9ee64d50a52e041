"""bench/run.py's tables: every backbone of the committed results, with torch's own ratios beside."""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@functools.cache
def _bench():
    # the module imports torch only inside the functions that time it: rendering needs none
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table(text: str, heading: str) -> list[str]:
    """The data rows of the table under a '## heading'."""
    section = text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ")][1:]


def test_committed_results_render_each_backbone_with_torchs_own_ratios():
    results = json.loads((ROOT / "bench" / "results" / "latest.json").read_text())
    text = _bench().markdown(results)
    main = _table(text, "Forward + VJP")
    same = _table(text, "The same ratios for torch")
    assert len(main) == len(same) == len(results["backbones"]) > 0
    for row, other, r in zip(main, same, results["backbones"]):
        name = f"| {r['arch']} {r['layer']} |"
        assert row.startswith(name) and other.startswith(name)
        cells = [c.strip() for c in other.strip("|").split("|")][1:]
        assert cells == [
            f"{r['torch_forward']:.3f}",
            f"{r['torch_over_2fwd']:.2f}",
            f"{r['ort_over_2fwd_beside_torch']:.2f}",
            f"{r['ort_fwd_over_torch_fwd']:.2f}",
            f"{r['ort_over_torch']:.2f}",
            f"{(r['ort_vjp'] - r['ort_forward']) / (r['torch_vjp'] - r['torch_forward']):.2f}",
        ]
        # the yardsticks are measured, not derived from each other: torch's forward alone is
        # faster than its forward + VJP, and the ratio of forwards agrees with the times in the row
        assert r["torch_forward"] < r["torch_vjp"]
        assert (
            abs(r["ort_fwd_over_torch_fwd"] - r["ort_forward"] / r["torch_forward"])
            < 0.35 * r["ort_fwd_over_torch_fwd"]
        )


def test_results_from_before_the_torch_forward_render_without_that_table():
    results = json.loads((ROOT / "bench" / "results" / "latest.json").read_text())
    for r in results["backbones"]:
        for key in ("torch_forward", "torch_over_2fwd", "ort_fwd_over_torch_fwd"):
            r.pop(key, None)
    text = _bench().markdown(results)
    assert "The same ratios for torch" not in text
    assert len(_table(text, "Forward + VJP")) == len(results["backbones"])
