"""`pbv-onnx explain` as one call: files in, the output folder written (claimed, checkpointed, atomic)."""

from __future__ import annotations

import os
from typing import Any, Sequence

import xarray as xr

from pbv_onnx.base.atomic import claim_output
from pbv_onnx.method.methods import Attribution, resolve
from pbv_onnx.method.shared import DEFAULT_MAP
from pbv_onnx.method.similarity import DEFAULT_TOP_K
from pbv_onnx.report import html as report
from pbv_onnx.workflows import checkpoint
from pbv_onnx.workflows import explain as ex
from pbv_onnx.workflows.run import explain_study


def run_explain(
    model: str | os.PathLike,
    readouts: str | os.PathLike,
    responses: str | os.PathLike,
    out: str | os.PathLike,
    channels: Sequence | None = None,
    images: Sequence[str] | None = None,
    top_objects: int = ex.DEFAULT_TOP_OBJECTS,
    reference: str | None = None,
    candidates: str = "top-k",
    top_k: int = DEFAULT_TOP_K,
    method: str | Attribution = "parallel",
    path: str | None = None,
    images_root: str | os.PathLike | None = None,
    features_cache: str | os.PathLike | None = None,
    device: str = "auto",
    batch_size: int = ex.DEFAULT_EXPLAIN_BATCH,
    smooth: float = 0.0,
    scale: str = "run",
    save_inputs: bool = False,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    pairs: Any = None,
    map: str = DEFAULT_MAP,
    **options: Any,
) -> xr.Dataset:
    """`pbv-onnx explain`: files in, the output folder `out` written atomically (explanations.nc,
    figures, index.html); finished pairs checkpointed beside it until it is in place. `pairs`: a
    PAIRS.csv (or table) of the pairs to explain; `map`: what the figures show (pixel, shared, guided)."""
    report.check_display(smooth, scale)
    attribution = resolve(method, path, **options)
    # Held for the whole run, before any computation: a second run into `out` is refused at once.
    with claim_output(out, force):
        checkpoint.check_leftovers(out, resume, force)
        study = ex.open_study(
            model,
            readouts,
            responses,
            images_root,
            features_cache,
            device=device,
            batch_size=batch_size,
            progress=progress,
        )
        ds = explain_study(
            study,
            channels,
            images,
            top_objects,
            reference,
            candidates,
            top_k,
            attribution,
            save_inputs=save_inputs,
            checkpoints=out,
            resume=resume,
            force=force,
            pairs=pairs,
            map=map,
        )
        report.write_output(ds, out, ex.channel_summary(study), smooth, scale, force, progress=progress, map=map)
        checkpoint.discard(out)
    return ds
