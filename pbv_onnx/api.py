"""The public Python API, arrays and datasets in, xarray out (re-exported lazily by `pbv_onnx`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import xarray as xr

from pbv_onnx.method.ridge import DEFAULT_ALPHAS
from pbv_onnx.method.similarity import DEFAULT_TOP_K
from pbv_onnx.runtime.engine import Engine
from pbv_onnx.workflows.explain import DEFAULT_TOP_OBJECTS

PathLike = str | os.PathLike


def features(engine: Engine, images) -> np.ndarray:
    """Flattened features float32 [N, D] (D = prod(feature_shape)) of images: preprocessed float32
    [N, 3, H, W], or anything `Engine.preprocess` takes (files, PIL images, HxWx3 uint8 arrays)."""
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.dtype != np.uint8:
        x = images
    else:
        x = engine.preprocess(images)
    return engine.features(x)


def stimulus_features(
    engine: Engine,
    responses: xr.Dataset | PathLike,
    images_root: PathLike | None = None,
    cache: PathLike | None = None,
    progress: bool = False,
) -> xr.DataArray:
    """Features (stimulus, feature) of every stimulus of a responses dataset (or file), with the
    model's attributes: what `fit_readouts` takes. `cache`: a features file read and updated."""
    from pbv_onnx.data.features import load_or_compute_features
    from pbv_onnx.data.responses import image_paths

    ds, source = _responses(responses)
    paths = image_paths(ds, source, images_root)
    return load_or_compute_features(
        engine, paths, ds["stimulus"].values, cache=None if cache is None else Path(cache), progress=progress
    )


def fit_readouts(
    features: xr.DataArray,
    responses: xr.Dataset | PathLike,
    preferred: str | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    folds: int = 5,
    seed: int = 0,
    progress: bool = False,
) -> xr.Dataset:
    """Ridge readouts per channel from features (stimulus, feature) to the responses, fitted on the
    preferred category (default: the responses' preferred_category) -> the readouts dataset, as
    readouts.nc holds it. The model attributes come from the features' attributes, where present."""
    from pbv_onnx.data.readouts import fit_readouts as fit

    ds, source = _responses(responses)
    return fit(features, ds, preferred, None, alphas, folds, seed, responses_path=source, progress=progress)


def similarity(w: np.ndarray, phi_obj: np.ndarray, phi_refs: np.ndarray) -> np.ndarray:
    """s_n(o, b) of one object's features [D] against references [M, D] (or one [D]) for readout
    weights w [D] -> float64 [M]: the weighted cosine, 0 where a weighted norm is 0."""
    from pbv_onnx.method.similarity import similarities

    refs = np.asarray(phi_refs)
    return similarities(w, phi_obj, refs[None] if refs.ndim == 1 else refs)


def explain(
    engine: Engine,
    readouts: xr.Dataset | PathLike,
    responses: xr.Dataset | PathLike,
    channels: Sequence | None = None,
    images: Sequence[str] | None = None,
    top_objects: int = DEFAULT_TOP_OBJECTS,
    reference: str | None = None,
    candidates: str = "top-k",
    top_k: int = DEFAULT_TOP_K,
    method: Any = "parallel",
    path: str | None = None,
    save_inputs: bool = False,
    images_root: PathLike | None = None,
    features_cache: PathLike | None = None,
    progress: bool = False,
    pairs: Any = None,
    map: str = "pixel",
    **options: Any,
) -> xr.Dataset:
    """The batch path `pbv-onnx explain` runs -> the explanations dataset (pair, role, color, y, x).

    For each channel (default: all of the readouts), each object (`images`: stimulus ids or image
    files; default: the channel's `top_objects` most driving out-of-category stimuli) is paired with
    its most similar reference (among `candidates`: "top-k" preferred stimuli by recorded response,
    or "all"), or with the forced `reference`, and both are backpropagated by `method` along `path`
    (`options`: the path's, e.g. steps=, baseline=). Readouts and responses: datasets or files;
    relative image files resolve against `images_root`, else the responses file's folder.
    `pairs` replaces channels/images/reference by a given list: a PAIRS.csv path, a table with
    columns channel, object, optional reference, or (channel, object[, reference]) tuples. Where the
    model allows, the shared maps come too (`shared_map`); `map` (pixel, shared, guided) is what
    `write_report` draws.
    """
    from pbv_onnx.data.readouts import load_readouts
    from pbv_onnx.workflows.explain import make_study
    from pbv_onnx.workflows.run import explain_study

    ro = load_readouts(readouts) if isinstance(readouts, (str, os.PathLike)) else readouts
    ds, _ = _responses(responses)
    study = make_study(engine, ro, ds, images_root=images_root, features_cache=features_cache, progress=progress)
    return explain_study(
        study,
        channels,
        images,
        top_objects,
        reference,
        candidates,
        top_k,
        method,
        path,
        save_inputs=save_inputs,
        pairs=pairs,
        map=map,
        **options,
    )


def write_report(
    res: xr.Dataset,
    out: PathLike,
    force: bool = False,
    smooth: float = 0.0,
    scale: str = "run",
    summary: xr.Dataset | None = None,
    progress: bool = False,
    map: str | None = None,
) -> Path:
    """Write an explanations dataset as a report folder, atomically: explanations.nc, one figure per
    pair, index.html (and the response panel, given `summary`: per channel mean_object and
    mean_preferred). `smooth`: Gaussian sigma of the drawn maps; `scale`: run, channel or pair; `map`:
    pixel, shared or guided (default: the result's own `map` attribute)."""
    from pbv_onnx.report.html import write_output

    return write_output(res, out, summary, smooth, scale, force, progress=progress, map=map)


def _responses(responses: xr.Dataset | PathLike) -> tuple[xr.Dataset, Path | None]:
    """A responses dataset (read and checked from a file if one is named) and the file it came from."""
    from pbv_onnx.data.responses import load_responses, validate_responses

    if isinstance(responses, (str, os.PathLike)):
        return load_responses(responses), Path(responses)
    source = responses.encoding.get("source")
    source = None if source is None else Path(source)
    return validate_responses(responses, source), source
