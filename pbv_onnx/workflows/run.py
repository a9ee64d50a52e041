"""Runs behind the commands, up to their results: a study explained (with checkpoints), a match ranking as rows."""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import xarray as xr

from pbv_onnx.base.errors import UsageError
from pbv_onnx.data.pairs import load_pairs
from pbv_onnx.method.methods import Attribution, resolve
from pbv_onnx.method.shared import DEFAULT_MAP
from pbv_onnx.method.similarity import DEFAULT_TOP_K
from pbv_onnx.workflows import checkpoint
from pbv_onnx.workflows import explain as ex


def explain_study(
    study: ex.Study,
    channels: Sequence | None = None,
    images: Sequence[str] | None = None,
    top_objects: int = ex.DEFAULT_TOP_OBJECTS,
    reference: str | None = None,
    candidates: str = "top-k",
    top_k: int = DEFAULT_TOP_K,
    method: str | Attribution = "parallel",
    path: str | None = None,
    save_inputs: bool = False,
    checkpoints: str | os.PathLike | None = None,
    resume: bool = False,
    force: bool = False,
    pairs: Any = None,
    map: str = DEFAULT_MAP,
    **options: Any,
) -> xr.Dataset:
    """The explanations dataset of a study: pairs (given objects or each channel's top_objects, each
    with its best reference among the candidates, or the forced reference), backpropagated.

    `pairs`: instead, a given list of pairs: a PAIRS.csv path, a table with columns channel, object
    and optional reference, or (channel, object[, reference]) tuples (no reference: the best match).
    `map`: the map a report shows (pixel, shared or guided). `checkpoints`: the output whose work
    folder keeps finished pairs (reused with `resume`).
    """
    attribution = resolve(method, path, **options)  # before any computation
    ex.check_map(study.engine, map)
    if pairs is not None:
        if channels or images or reference is not None:
            raise UsageError(None, "pairs lists every pair: give no channel, image or reference with it", param="pairs")
        rows, source = load_pairs(pairs)
        todo = ex.pairs_from_rows(study, rows, source, candidates, top_k)
    else:
        todo = ex.build_pairs(study, channels, images, top_objects, reference, candidates, top_k)
    run_options = {
        "candidates": candidates,
        "top_k": top_k,
        "top_objects": None if images or pairs is not None else top_objects,
        "reference": reference,
        **({"pairs_file": str(source) if source is not None else "(given in memory)"} if pairs is not None else {}),
        **attribution.options,
        "batch_size": study.engine.batch_size,
        "device": study.engine.provider,
    }
    saved = None
    if checkpoints is not None:
        saved = checkpoint.Checkpoints(
            checkpoints, ex.run_description(study, todo, attribution, save_inputs), resume=resume, force=force
        )
    return ex.explain(study, todo, attribution, save_inputs=save_inputs, options=run_options, checkpoint=saved, map=map)


def run_match(
    model: str | os.PathLike,
    readouts: str | os.PathLike,
    responses: str | os.PathLike,
    channel: str,
    image: str,
    images_root: str | os.PathLike | None = None,
    candidates: str = "top-k",
    top_k: int = DEFAULT_TOP_K,
    features_cache: str | os.PathLike | None = None,
    device: str = "auto",
) -> dict:
    """`pbv-onnx match`: a channel's candidate references ranked by s_n(object, reference), as
    {"channel", "object", "candidates", "ranking": [{"rank", "stimulus", "similarity", "recorded"}]}
    (recorded is NaN for an outside image)."""
    study = ex.open_study(model, readouts, responses, images_root, features_cache, device=device, progress=False)
    ch = study.channel(channel)
    ranked = ex.match(study, ch, study.image(image), candidates, top_k)
    rows = [
        {"rank": int(r), "stimulus": str(s), "similarity": float(v), "recorded": float(rec)}
        for r, s, v, rec in zip(
            ranked["rank"].values,
            ranked["stimulus"].values,
            ranked["similarity"].values,
            np.asarray(ranked["recorded"].values),
        )
    ]
    return {"channel": str(ch), "object": ranked.attrs["object"], "candidates": candidates, "ranking": rows}
