"""The demo's validation study (issue 21 items 3-9): `pbv-onnx demo validate` runs every experiment of
pbv_onnx/demo/validation/ on an experiment folder built by `pbv-onnx demo build` and writes the report."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from pbv_onnx.base.atomic import atomic_file
from pbv_onnx.base.errors import InputDataError
from pbv_onnx.demo.validation import experiments as xp
from pbv_onnx.demo.validation.lab import open_lab
from pbv_onnx.demo.validation.report import summary_targets, to_markdown

say = logging.getLogger(__name__).info


def _public(d):
    """The result without the private (underscore) entries: maps and per-pair arrays stay in memory."""
    if isinstance(d, dict):
        return {k: _public(v) for k, v in d.items() if not str(k).startswith("_")}
    if isinstance(d, (list, tuple)):
        return [_public(v) for v in d]
    if isinstance(d, np.generic):
        return d.item()
    return d


def readout_summary(lab) -> dict:
    """Fig. 3a numbers (channel means) and cos(w_hat, w*) per channel."""
    from pbv_onnx.demo import synthetic

    ro = lab.readouts

    def m(name):
        return float(np.nanmean(ro[name].values)) if name in ro else float("nan")

    cos = np.asarray(synthetic.cos_w_star(lab.gt, ro), np.float64)
    return {
        "channels": int(ro.sizes["channel"]),
        "r_cv_preferred": m("r_cv_preferred"),
        "r_ooc": m("r_ooc"),
        "reliability_preferred": m("reliability_preferred"),
        "ceiling_preferred": m("ceiling_preferred"),
        "r_critical": m("r_critical"),
        "cv_folds_by": str(ro.attrs.get("cv_folds_by", "?")),
        "cos_w_star": {"mean": float(cos.mean()), "min": float(cos.min()), "max": float(cos.max())},
    }


def run_validation(
    model: str | os.PathLike,
    readouts: str | os.PathLike,
    experiment: str | os.PathLike,
    cascade: str | os.PathLike | None = None,
    settings: xp.Settings | None = None,
    device: str = "auto",
    batch_size: int = 16,
) -> dict:
    """Every validation number on an experiment folder (see pbv_onnx/demo/validation/experiments.py)."""
    st = settings or xp.Settings()
    folder = Path(experiment)
    t_all, cpu_all = time.perf_counter(), time.process_time()
    lab = open_lab(model, readouts, folder, device, batch_size)
    pairs, swap_gate, counts = xp.gate_table(folder)
    if not pairs:
        raise InputDataError(folder / "gate.csv", "no planted pair passes the gate (or the file is missing)")
    manifest = folder / "experiment.json"
    res: dict = {
        "model": str(model),
        "layer": lab.engine.info.layer,
        "settings": vars(st),
        "gate": counts,
        "experiment": json.loads(manifest.read_text()) if manifest.is_file() else {},
        "readouts": readout_summary(lab),
        "seconds": {},
    }
    for name, run in (
        ("planted", lambda: xp.planted_study(lab, pairs, st)),
        ("swap", lambda: xp.swap_study(lab, st, swap_gate)),
        ("decoy", lambda: xp.decoy_study(lab, st)),
        ("sanity", lambda: xp.sanity_study(lab, res["planted"], pairs, st, None if cascade is None else Path(cascade))),
        ("faithfulness", lambda: xp.faithfulness_study(lab, res["planted"], pairs, st)),
    ):
        t0, c0 = time.perf_counter(), time.process_time()
        say(f"{name} ...")
        res[name] = run()
        res["seconds"][name] = round(time.perf_counter() - t0, 1)
        res.setdefault("cpu_by_section", {})[name] = round(time.process_time() - c0, 1)
        say(f"{name}: {res['seconds'][name]} s")
    res["seconds"]["total"] = round(time.perf_counter() - t_all, 1)
    res["cpu_seconds"] = round(time.process_time() - cpu_all, 1)  # all threads: the machine may be shared
    res["targets"] = summary_targets(res)
    return _public(res)


def write_results(res: dict, out_md: str | os.PathLike, out_json: str | os.PathLike, force: bool = True) -> str:
    """Write the markdown report and the JSON numbers (atomically); return the markdown."""
    text = to_markdown(res)
    with atomic_file(out_md, force) as tmp:
        tmp.write_text(text)
    with atomic_file(out_json, force) as tmp:
        tmp.write_text(json.dumps(res, indent=2, default=float) + "\n")
    return text
