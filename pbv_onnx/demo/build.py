"""Build the demo experiment folder: stimuli, masks, the stimulus table, responses.nc, ground truth."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from pbv_onnx.base.atomic import atomic_dir
from pbv_onnx.base.errors import UsageError
from pbv_onnx.data.responses import make_responses
from pbv_onnx.demo import synthetic
from pbv_onnx.demo.sources import available_sources
from pbv_onnx.demo.stimuli import Counts, plan_stimuli, write_stimuli
from pbv_onnx.runtime.engine import Engine
from pbv_onnx.runtime.images import load_batch

RESPONSES = "responses.nc"
GROUND_TRUTH = "ground_truth.nc"
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
) -> dict:
    """Write the whole experiment folder atomically; returns its manifest."""
    if min(counts.body, counts.object, counts.planted) < 0 or counts.body < 5:
        raise UsageError(None, "the demo needs at least 5 body stimuli and no negative counts")
    sources = available_sources(None if shared is None else Path(shared), use_shared)
    table = plan_stimuli([(s, im.size) for s, im in sources], counts, seed)
    photos = {s.name: im for s, im in sources}
    engine = Engine(gt_model, device=device, batch_size=batch_size)
    with atomic_dir(out, force) as tmp:
        write_stimuli(tmp, table, photos, counts.size)
        x = load_batch([tmp / s.file for s in table], engine.info.preprocessing)
        feats = engine.feature_maps(x)
        gt = synthetic.design_channels(feats, table, counts.size, n_channels, seed)
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
        manifest = {
            "seed": seed,
            "counts": asdict(counts),
            "n_channels": n_channels,
            "n_stimuli": len(table),
            "sources": [
                {"name": s.name, "category": s.category, "kind": s.kind, "origin": s.origin, "part": s.part}
                for s, _ in sources
            ],
            "ground_truth_model": {"file": info.path.name, "sha256": info.sha256, "layer": info.layer},
            "files": {"stimuli": "stimuli.csv", "responses": RESPONSES, "ground_truth": GROUND_TRUTH},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
