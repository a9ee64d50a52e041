"""Build the demo experiment folder: stimuli, masks, the stimulus table, responses.nc, ground truth, gate."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pbv_onnx.base.atomic import atomic_dir
from pbv_onnx.base.errors import UsageError
from pbv_onnx.data.responses import make_responses
from pbv_onnx.demo import synthetic
from pbv_onnx.demo.sources import available_sources
from pbv_onnx.demo.stimuli import Counts, Stimulus, plan_stimuli, write_stimuli
from pbv_onnx.runtime.engine import Engine
from pbv_onnx.runtime.images import load_batch

RESPONSES = "responses.nc"
GROUND_TRUTH = synthetic.GROUND_TRUTH
MANIFEST = "experiment.json"
UNITS = "spikes/s"


def build_experiment(
    out: str | os.PathLike,
    gt_model: str | os.PathLike,
    counts: Counts = Counts(),
    n_channels: int = 16,
    seed: int = 0,
    shared: str | os.PathLike | None = None,
    use_shared: bool = True,
    device: str = "auto",
    batch_size: int = 16,
    force: bool = False,
    features_per_channel: int = synthetic.FEATURES_PER_CHANNEL,
) -> dict:
    """Write the whole experiment folder atomically; returns its manifest."""
    if min(counts.body, counts.object, counts.planted, counts.swap, counts.decoy) < 0 or counts.body < 5:
        raise UsageError(None, "the demo needs at least 5 body stimuli and no negative counts")
    sources = available_sources(None if shared is None else Path(shared), use_shared)
    table = plan_stimuli([(s, im.size) for s, im in sources], counts, seed)
    photos = {s.name: im for s, im in sources}
    engine = Engine(gt_model, device=device, batch_size=batch_size)
    if engine.info.preprocessing.crop is not None:  # boxes map to the model's input only when it is not cropped
        raise UsageError(None, f"{Path(gt_model).name} crops its input; the demo needs a model that only resizes")
    # references sit on the preprocessing mean, which is 0 after normalisation: neutral for the model
    grey = tuple(int(round(255 * m)) for m in engine.info.preprocessing.mean)
    with atomic_dir(out, force) as tmp:
        write_stimuli(tmp, table, photos, counts.size, grey)
        x = load_batch([tmp / s.file for s in table], engine.info.preprocessing)
        feats = engine.feature_maps(x)
        gt = synthetic.design_channels(feats, table, counts.size, n_channels, seed, k=features_per_channel)
        trials, phase = synthetic.simulate(gt, feats, seed=seed)
        ds = make_responses(
            trials,
            gt.channel,
            [s.stimulus for s in table],
            [s.category for s in table],
            file=[s.file for s in table],
            region=gt.region,
            phase=phase,
            preferred="body",
            units=UNITS,
            group=[s.group for s in table],
        )
        ds.attrs["description"] = (
            "pbv-onnx demo: synthetic body-selective channels generated from "
            f"{engine.info.arch} {engine.info.layer} (see ground_truth.nc)"
        )
        ds.to_netcdf(tmp / RESPONSES, engine="h5netcdf")
        info = engine.info
        gt_attrs = {
            "model_sha256": info.sha256,
            "model_file": info.path.name,
            "arch": info.arch,
            "layer": info.layer,
            "feature_shape": json.dumps(list(info.feature_shape)),
            "seed": seed,
            "definition": synthetic.__doc__.strip(),
        }
        gt.to_dataset(gt_attrs).to_netcdf(tmp / GROUND_TRUTH, engine="h5netcdf")
        gate_rows = gate_table(gt, table, x, feats, engine, counts.size)
        write_gate(tmp / synthetic.GATE, gate_rows)
        object_photos = sorted({s.name for s, _ in sources if s.category == "object"})
        manifest = {
            "seed": seed,
            "counts": asdict(counts),
            "n_channels": n_channels,
            "n_stimuli": len(table),
            "sources": [
                {
                    "name": s.name,
                    "category": s.category,
                    "kind": s.kind,
                    "origin": s.origin,
                    "part": s.part,
                    "family": s.family,
                }
                for s, _ in sources
            ],
            "ground_truth_model": {"file": info.path.name, "sha256": info.sha256, "layer": info.layer},
            "files": {
                "stimuli": "stimuli.csv",
                "responses": RESPONSES,
                "ground_truth": GROUND_TRUTH,
                "gate": synthetic.GATE,
            },
            "roles": {r: sum(s.role == r for s in table) for r in sorted({s.role for s in table})},
            "object_photos": {"n": len(object_photos), "names": object_photos},
            "reference_background": list(grey),
            "features": {f: gt.family_features(f).tolist() for f in synthetic.FAMILIES},
            "gate": gate_summary(gate_rows),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _deleted(x: np.ndarray, boxes: list[tuple[int, int, int, int]], size: int) -> np.ndarray:
    """Copies of preprocessed images with each box set to 0, the preprocessing mean (boxes in stimulus px,
    scaled to the model's input; the demo's preprocessing only resizes, it does not crop)."""
    out = x.copy()
    sy, sx = x.shape[2] / size, x.shape[3] / size
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        out[i, :, int(round(y0 * sy)) : int(round(y1 * sy)), int(round(x0 * sx)) : int(round(x1 * sx))] = 0
    return out


def gate_table(
    gt: synthetic.GroundTruth, table: list[Stimulus], x: np.ndarray, feats: np.ndarray, engine: Engine, size: int
) -> list[dict]:
    """The gate for every planted pair (and each part of every swap object) and every channel."""
    index = {s.stimulus: i for i, s in enumerate(table)}
    body_sd = synthetic.gt_response(gt, feats[[s.role == "body" for s in table]]).std(1)
    rows: list[dict] = []
    jobs = [(s, 1, s.paste_box) for s in table if s.role == "planted"]
    jobs += [(s, p, b) for s in table if s.role == "swap" for p, b in ((1, s.paste_box), (2, s.paste2_box))]
    if not jobs:
        return rows
    i_with = [index[s.stimulus] for s, _, _ in jobs]
    i_free = [index[s.pair] for s, _, _ in jobs]
    r_with = synthetic.gt_response(gt, feats[i_with])
    r_free = synthetic.gt_response(gt, feats[i_free])
    r_del = synthetic.gt_response(gt, engine.feature_maps(_deleted(x[i_with], [b for _, _, b in jobs], size)))
    g = synthetic.gate(r_with, r_free, r_del, body_sd)
    for j, (s, part, _) in enumerate(jobs):
        for n, ch in enumerate(gt.channel):
            rows.append(
                {
                    "stimulus": s.stimulus,
                    "role": s.role,
                    "part": part,
                    "partfree": s.pair,
                    "channel": str(ch),
                    "r_with": r_with[n, j],
                    "r_partfree": r_free[n, j],
                    "r_deleted": r_del[n, j],
                    "rise": g["rise"][n, j],
                    "body_sd": body_sd[n],
                    "rise_sd": g["rise_sd"][n, j],
                    "lost": g["lost"][n, j],
                    "pass_rise": int(g["pass_rise"][n, j]),
                    "pass_delete": int(g["pass_delete"][n, j]),
                    "pass": int(g["passed"][n, j]),
                }
            )
    return rows


def write_gate(path: Path, rows: list[dict]) -> None:
    """gate.csv: one row per (stimulus, part, channel), numbers to 6 significant digits."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(synthetic.GATE_COLUMNS))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def gate_summary(rows: list[dict]) -> dict:
    """Pass counts of the planted pairs: per (pair, channel), and pairs passing in at least one / all channels."""
    planted = [r for r in rows if r["role"] == "planted"]
    pairs = sorted({r["stimulus"] for r in planted})
    by_pair = {p: [r for r in planted if r["stimulus"] == p] for p in pairs}
    n = max(len(planted), 1)
    return {
        "pairs": len(pairs),
        "pair_channels": len(planted),
        "pass_rise": sum(r["pass_rise"] for r in planted) / n,
        "pass_delete": sum(r["pass_delete"] for r in planted) / n,
        "pass": sum(r["pass"] for r in planted) / n,
        "pairs_passing_any_channel": sum(any(r["pass"] for r in v) for v in by_pair.values()),
        "pairs_passing_all_channels": sum(all(r["pass"] for r in v) for v in by_pair.values()),
        "swap_parts_pass": sum(r["pass"] for r in rows if r["role"] == "swap")
        / max(sum(r["role"] == "swap" for r in rows), 1),
    }
