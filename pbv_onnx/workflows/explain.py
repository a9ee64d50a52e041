"""Explanations: which pairs to explain, batched parallel backpropagation, the labelled result."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import xarray as xr

from pbv_onnx.base.errors import InputDataError, MismatchError, UsageError
from pbv_onnx.data import responses as resp_io
from pbv_onnx.method.display import display_map
from pbv_onnx.method.methods import Attribution, resolve
from pbv_onnx.method.saliency import hadamard_weights
from pbv_onnx.method.shared import (
    DEFAULT_MAP,
    MAP_CHOICES,
    channels_first,
    latent_grid,
    on_grid,
    shared_maps,
    upsample_map,
)
from pbv_onnx.method.similarity import DEFAULT_TOP_K, candidate_ids, rank_candidates, rank_order, ranked_scores
from pbv_onnx.runtime.engine import Engine
from pbv_onnx.runtime.images import load_batch
from pbv_onnx.runtime.sessions import one_blas_thread

_log = logging.getLogger(__name__)

ROLES = ("ooc", "reference")
COLORS = ("R", "G", "B")
DEFAULT_TOP_OBJECTS = 3
# Images per onnxruntime call in `explain`: a gradient pass keeps every activation of its batch, so
# on CPU 4 images peak at half the memory of 16 and run no slower (bench/memory_study.py,
# docs/performance.md); on CUDA larger batches pay (pass batch_size=16 or more).
DEFAULT_EXPLAIN_BATCH = 4
# Preprocessed images a study keeps (least recently used out first): 256 MB holds ~430 images of
# 224x224, enough for a lab's objects and references, so each file is decoded once per run.
IMAGE_CACHE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class ImageRef:
    """One image to explain: a recorded stimulus (with its id) or an outside image file."""

    label: str  # the stimulus id as text, or the path as given
    path: Path
    stimulus: Any = None  # the stimulus coordinate value; None for an outside image

    @property
    def key(self) -> tuple[str, str]:
        return ("stimulus", self.label) if self.stimulus is not None else ("path", str(self.path))


@dataclass(frozen=True)
class Pair:
    """One (channel, object, reference) to explain, with the similarity that chose the reference."""

    channel: Any
    ooc: ImageRef
    reference: ImageRef
    similarity: float


@dataclass(frozen=True)
class _Tables:
    """The readouts and recorded means as numpy arrays with id -> row maps, for the per-pair
    lookups of an explain run (an xarray selection costs more than a pair's gradient on a small
    model; docs/performance.md)."""

    row: dict  # readout channel -> row of weight and bias
    weight: np.ndarray  # (channel, feature) as stored (no float64 copy of a large readout)
    bias: np.ndarray  # (channel,) float64
    region: dict  # readout channel -> brain region ("" where none is given)
    mean: np.ndarray  # (channel, stimulus) recorded means, the responses' order
    mean_row: dict  # responses channel -> row of mean
    mean_col: dict  # stimulus coordinate value -> column of mean


@dataclass
class Study:
    """Everything an explanation reads: one engine, the readouts, the recorded responses."""

    engine: Engine
    readouts: xr.Dataset
    responses: xr.Dataset
    readouts_path: Path
    responses_path: Path
    preferred: str
    mean: xr.DataArray  # (channel, stimulus) recorded mean responses
    paths: dict[str, Path]  # stimulus id (text) -> image file
    stimuli: dict[str, Any]  # stimulus id (text) -> coordinate value
    features_cache: Path | None = None
    force_features: bool = False
    progress: bool = True
    image_cache_bytes: int = IMAGE_CACHE_BYTES
    _phi: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    _tables: _Tables | None = field(default=None, repr=False)
    _candidates: dict[tuple, list] = field(default_factory=dict, repr=False)
    _images: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _image_bytes: int = field(default=0, repr=False)

    # -- lookups --------------------------------------------------------------------------
    @property
    def channels(self) -> list:
        return self.readouts["channel"].values.tolist()

    def channel(self, text: str):
        """The readout channel whose id reads `text`."""
        for c in self.channels:
            if str(c) == str(text):
                return c
        shown = ", ".join(str(c) for c in self.channels[:8]) + (" ..." if len(self.channels) > 8 else "")
        raise UsageError(self.readouts_path, f"unknown channel {text!r} (channels: {shown})")

    @property
    def tables(self) -> _Tables:
        """The numpy lookup tables (made on first use; the datasets are not changed after opening)."""
        if self._tables is None:
            ro = self.readouts
            chans = self.channels
            weight = ro["weight"].transpose("channel", "feature").values
            bias = ro["bias"].transpose("channel").values.astype(np.float64) if "bias" in ro else np.zeros(len(chans))
            region = {c: "" for c in chans}
            for ds in (self.readouts, self.responses):  # the responses' region wins
                if "region" in ds.coords:
                    region.update(
                        (c, str(r)) for c, r in zip(ds["channel"].values.tolist(), ds["region"].values) if c in region
                    )
            mean = self.mean.transpose("channel", "stimulus")
            self._tables = _Tables(
                row={c: i for i, c in enumerate(chans)},
                weight=weight,
                bias=bias,
                region=region,
                mean=mean.values.astype(np.float64),
                mean_row={c: i for i, c in enumerate(mean["channel"].values.tolist())},
                mean_col={s: i for i, s in enumerate(mean["stimulus"].values.tolist())},
            )
        return self._tables

    def weight(self, channel) -> np.ndarray:
        """The channel's readout weights [D], float64 (a new array)."""
        return self.tables.weight[self.tables.row[channel]].astype(np.float64)

    def bias(self, channel) -> float:
        return float(self.tables.bias[self.tables.row[channel]])

    def region(self, channel) -> str:
        return self.tables.region[channel]

    def recorded(self, channel, ref: ImageRef) -> float:
        """The recorded mean response of `channel` to `ref`, NaN for an outside image."""
        if ref.stimulus is None:
            return float("nan")
        t = self.tables
        return float(t.mean[t.mean_row[channel], t.mean_col[ref.stimulus]])

    def readout_r(self, channel) -> float:
        """The channel's cross-validated r on held-out preferred images (NaN when the readouts lack it)."""
        if "r_cv_preferred" not in self.readouts:
            return float("nan")
        return float(self.readouts["r_cv_preferred"].sel(channel=channel).values)

    def predicted(self, channel, ref: ImageRef) -> float:
        return float(self.weight(channel) @ self.phi([ref])[0].astype(np.float64) + self.bias(channel))

    def images(self, paths: Sequence[Path]) -> np.ndarray:
        """Preprocessed images [N, 3, H, W] of image files, each decoded once and kept while the
        kept ones fit in `image_cache_bytes` (least recently used out first)."""
        spec = self.engine.info.preprocessing
        H, W = spec.input_size
        out = np.empty((len(paths), 3, H, W), np.float32)
        first: dict = {}  # path -> row of this call: a repeat is a copy, cached or not
        for i, p in enumerate(paths):
            if p in first:
                out[i] = out[first[p]]
                continue
            first[p] = i
            x = self._images.get(p)
            if x is None:
                x = load_batch([p], spec)[0]
                self._images[p] = x
                self._image_bytes += x.nbytes
                while self._image_bytes > self.image_cache_bytes and self._images:
                    self._image_bytes -= self._images.popitem(last=False)[1].nbytes
            else:
                self._images.move_to_end(p)
            out[i] = x
        return out

    def image(self, text: str) -> ImageRef:
        """A stimulus id of the responses file, or an image path (a recorded one maps to its id)."""
        text = str(text)
        if text in self.paths:
            return ImageRef(text, self.paths[text], self.stimuli[text])
        p = Path(text)
        if p.exists():
            resolved = p.resolve()
            for sid, sp in self.paths.items():
                if sp.resolve() == resolved:
                    return ImageRef(sid, sp, self.stimuli[sid])
            return ImageRef(text, p, None)
        raise InputDataError(text, f"neither a stimulus id in {self.responses_path} nor an image file")

    def stimulus_ref(self, stimulus) -> ImageRef:
        sid = str(stimulus)
        return ImageRef(sid, self.paths[sid], self.stimuli[sid])

    # -- features -------------------------------------------------------------------------
    def phi(self, refs: Sequence[ImageRef]) -> np.ndarray:
        """Flattened features [N, D] of the images, computed once each and kept."""
        missing = list({r.key: r for r in refs if r.key not in self._phi}.values())
        stim = [r for r in missing if r.stimulus is not None]
        outside = [r for r in missing if r.stimulus is None]
        if stim:
            # every row the feature cache returned is kept: later calls do not re-read it
            self._phi.update(_stimulus_features(self, stim))
        if outside:
            from pbv_onnx.data.features import compute_features

            feats = compute_features(self.engine, [r.path for r in outside], progress=False)
            self._phi.update({r.key: f for r, f in zip(outside, feats)})
        D = self.engine.info.n_features
        return np.stack([self._phi[r.key] for r in refs]) if refs else np.empty((0, D), np.float32)


def _stimulus_features(study: Study, refs: Sequence[ImageRef]) -> dict[tuple[str, str], np.ndarray]:
    """{key: features} of recorded stimuli, through the shared feature cache where one is given
    (then of the whole stimulus set, which the cache covers)."""
    from pbv_onnx.data import features as feat_io

    if study.features_cache is not None:
        # The cache covers the whole stimulus set, so later commands reuse it as is.
        ids = list(study.stimuli.values())
        paths = [study.paths[str(s)] for s in ids]
    else:
        ids = [r.stimulus for r in refs]
        paths = [r.path for r in refs]
    da = feat_io.load_or_compute_features(
        study.engine, paths, ids, cache=study.features_cache, force=study.force_features, progress=study.progress
    )
    values = da.transpose("stimulus", "feature").values
    return {("stimulus", str(s)): row for s, row in zip(ids, values)}


def open_study(
    model: str | os.PathLike,
    readouts: str | os.PathLike,
    responses: str | os.PathLike,
    images_root: str | os.PathLike | None = None,
    features_cache: str | os.PathLike | None = None,
    device: str = "auto",
    batch_size: int = 16,
    force_features: bool = False,
    progress: bool = True,
    engine: Engine | None = None,
    image_cache_bytes: int = IMAGE_CACHE_BYTES,
) -> Study:
    """Open the model once, and the readouts and responses it will explain (all checked)."""
    from pbv_onnx.data import readouts as ro_io

    engine = engine or Engine(model, device=device, batch_size=batch_size)
    readouts_path, responses_path = Path(readouts), Path(responses)
    ro = ro_io.load_readouts(readouts_path, engine.info)
    ds = resp_io.load_responses(responses_path)
    return _study(
        engine,
        ro,
        ds,
        readouts_path,
        responses_path,
        images_root,
        features_cache,
        force_features,
        progress,
        image_cache_bytes,
    )


def make_study(
    engine: Engine,
    readouts: xr.Dataset,
    responses: xr.Dataset,
    images_root: str | os.PathLike | None = None,
    readouts_path: str | os.PathLike | None = None,
    responses_path: str | os.PathLike | None = None,
    features_cache: str | os.PathLike | None = None,
    force_features: bool = False,
    progress: bool = False,
    image_cache_bytes: int = IMAGE_CACHE_BYTES,
) -> Study:
    """A study of readouts and responses datasets in memory (both checked against the engine's model).

    The paths only name the datasets in messages and provenance; by default, the files they were
    read from (xarray's `source` encoding), if any. Relative image files of the responses resolve
    against `images_root`, else the responses file's folder.
    """
    from pbv_onnx.data import readouts as ro_io

    readouts_path = _source(readouts, readouts_path)
    responses_path = _source(responses, responses_path)
    ro = ro_io.check_readouts(readouts, readouts_path, engine.info)
    ds = resp_io.validate_responses(responses, responses_path)
    return _study(
        engine,
        ro,
        ds,
        readouts_path,
        responses_path,
        images_root,
        features_cache,
        force_features,
        progress,
        image_cache_bytes,
    )


def _source(ds: xr.Dataset, path: str | os.PathLike | None) -> Path | None:
    """The file a dataset names as its own: `path` if given, else the one it was read from."""
    source = path if path is not None else ds.encoding.get("source")
    return None if source is None else Path(source)


def _study(
    engine: Engine,
    ro: xr.Dataset,
    ds: xr.Dataset,
    readouts_path: Path | None,
    responses_path: Path | None,
    images_root,
    features_cache,
    force_features: bool,
    progress: bool,
    image_cache_bytes: int,
) -> Study:
    """The study of checked datasets."""
    source = responses_path  # None: relative image files need images_root
    # datasets that never were files are named as such in messages and provenance
    readouts_path = readouts_path or Path("(readouts dataset)")
    responses_path = responses_path or Path("(responses dataset)")
    missing = [c for c in ro["channel"].values.tolist() if c not in set(ds["channel"].values.tolist())]
    if missing:
        raise MismatchError(readouts_path, f"channel(s) {', '.join(map(str, missing[:5]))} are not in {responses_path}")
    preferred = resp_io.preferred_category(ds, None, responses_path)
    fitted_for = str(ro.attrs.get("preferred_category", preferred))
    if fitted_for != preferred:
        raise MismatchError(
            readouts_path,
            f"was fitted for preferred category {fitted_for!r}, but {responses_path.name} says {preferred!r}",
        )
    paths = resp_io.image_paths(ds, source, images_root)
    stim_values = ds["stimulus"].values.tolist()
    return Study(
        engine=engine,
        readouts=ro,
        responses=ds,
        readouts_path=readouts_path,
        responses_path=responses_path,
        preferred=preferred,
        mean=resp_io.mean_response(ds),
        paths={str(s): p for s, p in zip(stim_values, paths)},
        stimuli={str(s): s for s in stim_values},
        features_cache=None if features_cache is None else Path(features_cache),
        force_features=force_features,
        progress=progress,
        image_cache_bytes=image_cache_bytes,
    )


# -- choosing pairs -------------------------------------------------------------------------


def top_objects(study: Study, channel, k: int = DEFAULT_TOP_OBJECTS) -> list[ImageRef]:
    """The channel's k most driving out-of-category stimuli by recorded mean response."""
    if k < 1:
        raise UsageError(None, f"top_objects must be at least 1, not {k}", param="top_objects")
    cats = study.responses["category"].values.astype(str)
    stimuli = study.responses["stimulus"].values[cats != study.preferred]
    resp = study.mean.sel(channel=channel).sel(stimulus=stimuli).values.astype(np.float64)
    keep = np.isfinite(resp)
    stimuli, resp = stimuli[keep], resp[keep]
    if len(stimuli) == 0:
        raise InputDataError(
            study.responses_path,
            f"channel {channel} has no recorded response to any object outside {study.preferred!r}",
        )
    return [study.stimulus_ref(s) for s in stimuli[rank_order(resp, stimuli)[:k]]]


def candidates(
    study: Study, channel, mode: str = "top-k", k: int = DEFAULT_TOP_K, exclude: ImageRef | None = None
) -> list[ImageRef]:
    """Reference candidates for the channel; the object itself is never its own reference."""
    key = (channel, mode, k)
    if key not in study._candidates:  # the same for every object of the channel
        study._candidates[key] = candidate_ids(
            study.mean, study.responses["category"], study.preferred, channel, mode, k, source=str(study.responses_path)
        )
    refs = [study.stimulus_ref(s) for s in study._candidates[key]]
    if exclude is not None:
        refs = [r for r in refs if r.key != exclude.key]
    if not refs:
        raise InputDataError(study.responses_path, f"empty candidate set for channel {channel}")
    return refs


def match(study: Study, channel, obj: ImageRef, mode: str = "top-k", k: int = DEFAULT_TOP_K) -> xr.Dataset:
    """Rank the channel's candidate references by s_n(o, b): similarity and recorded response."""
    refs = candidates(study, channel, mode, k, exclude=obj)
    feats = study.phi(refs)
    cand = xr.DataArray(feats, dims=("stimulus", "feature"), coords={"stimulus": [r.stimulus for r in refs]})
    ranked = rank_candidates(
        study.weight(channel), study.phi([obj])[0], cand, source=obj.label, label=f"{obj.label} (channel {channel})"
    )
    rec = study.mean.sel(channel=channel).sel(stimulus=ranked["stimulus"].values).values
    return xr.Dataset(
        {"similarity": ranked, "recorded": ("stimulus", rec)},
        coords={"rank": ("stimulus", np.arange(1, ranked.sizes["stimulus"] + 1))},
        attrs={"channel": str(channel), "object": obj.label, "candidates": mode},
    )


def build_pairs(
    study: Study,
    channels: Sequence | None = None,
    images: Sequence[str] | None = None,
    top_k_objects: int = DEFAULT_TOP_OBJECTS,
    reference: str | None = None,
    mode: str = "top-k",
    k: int = DEFAULT_TOP_K,
) -> list[Pair]:
    """The (channel, object, reference) pairs: given objects or each channel's top drivers, each
    with the best-matching reference, or a forced one."""
    chans = [study.channel(c) for c in channels] if channels else study.channels
    given = [study.image(t) for t in images] if images else None
    forced = study.image(reference) if reference is not None else None
    plan = [(c, o) for c in chans for o in (given if given is not None else top_objects(study, c, top_k_objects))]
    # All features needed, computed in one pass, before any matching.
    needed = [o for _, o in plan] + ([forced] if forced else [])
    if forced is None:
        for c in chans:
            needed += candidates(study, c, mode, k)
    study.phi(needed)
    pairs = []
    for c, o in plan:
        if forced is not None:
            s = float(hadamard_weights(study.weight(c), *study.phi([o, forced])).sum())
            pairs.append(Pair(c, o, forced, s))
        else:
            pairs.append(best_match(study, c, o, mode, k))
    return pairs


def best_match(study: Study, channel, obj: ImageRef, mode: str, k: int) -> Pair:
    """The pair of `obj` with its top-ranked reference, as `match` ranks them (numpy only: a
    study of hundreds of channels matches each of its objects)."""
    refs = candidates(study, channel, mode, k, exclude=obj)
    order, s = ranked_scores(
        study.weight(channel),
        study.phi([obj])[0],
        study.phi(refs),
        [r.stimulus for r in refs],
        source=obj.label,
        label=f"{obj.label} (channel {channel})",
    )
    return Pair(channel, obj, refs[order[0]], float(s[order[0]]))


def _row_image(study: Study, text: str, folder: Path | None) -> ImageRef | None:
    """A stimulus id, else an image file (relative to the pairs file's folder, else as given), else None."""
    if text in study.paths:
        return ImageRef(text, study.paths[text], study.stimuli[text])
    for p in ([folder / text] if folder is not None else []) + [Path(text)]:
        if p.is_file():
            resolved = p.resolve()
            for sid, sp in study.paths.items():
                if sp.resolve() == resolved:
                    return ImageRef(sid, sp, study.stimuli[sid])
            return ImageRef(text, p, None)
    return None


def pairs_from_rows(
    study: Study, rows: Sequence, source: Path | None = None, mode: str = "top-k", k: int = DEFAULT_TOP_K
) -> list[Pair]:
    """The pairs a list asks for (data.pairs.PairRow: channel, object, reference or None for the
    object's best match among the candidates), every row checked before any computation; errors
    name `source` (the pairs file) and the row."""
    from pbv_onnx.data.pairs import PairRow

    name = source if source is not None else "pairs"
    folder = source.parent if source is not None else None
    by_text = {str(c): c for c in study.channels}
    plan: list[tuple[PairRow, Any, ImageRef, ImageRef | None]] = []
    for row in rows:
        if row.channel not in by_text:
            shown = ", ".join(list(by_text)[:8]) + (" ..." if len(by_text) > 8 else "")
            raise InputDataError(
                name, f"{row.where}: unknown channel {row.channel!r} (channels of {study.readouts_path}: {shown})"
            )
        refs = []
        for role, text in (("object", row.object), ("reference", row.reference)):
            if text is None:
                refs.append(None)
                continue
            ref = _row_image(study, text, folder)
            if ref is None:
                raise InputDataError(
                    name,
                    f"{row.where}: {role} {text!r} is neither a stimulus id of {study.responses_path} "
                    "nor an image file",
                )
            refs.append(ref)
        plan.append((row, by_text[row.channel], refs[0], refs[1]))
    # All features needed, computed in one pass, before any matching.
    needed = [r for _, _, o, b in plan for r in (o, b) if r is not None]
    for c in dict.fromkeys(c for _, c, _, b in plan if b is None):
        needed += candidates(study, c, mode, k)
    study.phi(needed)
    pairs = []
    for row, c, o, b in plan:
        try:
            if b is None:
                pairs.append(best_match(study, c, o, mode, k))
            else:
                pairs.append(Pair(c, o, b, float(hadamard_weights(study.weight(c), *study.phi([o, b])).sum())))
        except InputDataError as exc:
            raise InputDataError(name, f"{row.where}: {exc.message}") from None
    return pairs


# -- shared maps ----------------------------------------------------------------------------


def shared_map_support(engine: Engine) -> str | None:
    """None where the model gives shared maps (docs/formats.md, `shared_map`), else why not, in one line."""
    info = engine.info
    if info.pool not in ("none", "avg"):
        return f"{info.path}: pool {info.pool!r} has no decomposition of the similarity over positions"
    if not engine.has_spatial_maps:
        return (
            f"{info.path}: pooled model without the pre-pool output 'feature_map' (exported before the "
            "format had it); re-export it for shared maps"
        )
    if latent_grid(engine.map_shape) is None:
        return f"{info.path}: features of shape {list(engine.map_shape)} have no spatial grid"
    return None


def check_map(engine: Engine, map: str) -> str | None:
    """Check a display choice (`map`: pixel, shared or guided) against the model, before any
    computation; returns why the model has no shared maps (None where it has them)."""
    if map not in MAP_CHOICES:
        raise UsageError(None, f"map must be one of {', '.join(MAP_CHOICES)}, not {map!r}", param="map")
    why = shared_map_support(engine)
    if why is not None and map != "pixel":
        from pbv_onnx.base.errors import ModelError

        raise ModelError(None, f"map {map!r} needs shared maps, which this model cannot give: {why}", param="map")
    return why


def latent_shared_maps(study: Study, pairs: Sequence[Pair]) -> np.ndarray:
    """The shared maps M of every pair on the latent grid, float64 [P, 2 (object, reference), h, w];
    the model must support them (`shared_map_support`). Pooled models: one forward pass per image
    through the pre-pool output, a batch of distinct images at a time."""
    eng = study.engine
    shape = eng.map_shape
    h, w, _ = latent_grid(shape)
    out = np.empty((len(pairs), 2, h, w))

    def put(i: int, weight: np.ndarray, a_o: np.ndarray, a_b: np.ndarray, pooled: bool) -> None:
        m_o, m_b = shared_maps(weight, channels_first(a_o, shape), channels_first(a_b, shape), pooled)
        out[i, 0], out[i, 1] = on_grid(m_o.reshape(-1), shape), on_grid(m_b.reshape(-1), shape)

    if not eng.pooled:
        for i, p in enumerate(pairs):
            a = study.phi([p.ooc, p.reference])
            put(i, channels_first(study.weight(p.channel), shape), a[0], a[1], False)
        return out
    for idx in _chunks(pairs, np.arange(len(pairs)), eng.batch_size):
        part = [pairs[j] for j in idx]
        refs = list({r.key: r for pr in part for r in (pr.ooc, pr.reference)}.values())
        row = {r.key: n for n, r in enumerate(refs)}
        maps = eng.spatial_maps(study.images([r.path for r in refs]))
        for j, pr in zip(idx, part):
            put(int(j), study.weight(pr.channel), maps[row[pr.ooc.key]], maps[row[pr.reference.key]], True)
    return out


# -- explaining -----------------------------------------------------------------------------


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, unit="pair", file=sys.stderr, disable=None if enabled else True, dynamic_ncols=True
    )


def backprop_pairs(
    engine: Engine, images: Iterable[np.ndarray], cot_o: np.ndarray, cot_b: np.ndarray, attribution: Attribution
) -> np.ndarray:
    """Input gradients [P, 2, 3, H, W] of P pairs along the attribution's path: the 2P images of
    the pairs (object, reference per pair, `images` [P, 2, 3, H, W]) stacked with their cotangents,
    one batch per VJP call."""
    x = np.asarray(images, np.float32)
    P = len(x)
    stacked = x.reshape(2 * P, *x.shape[2:])
    cot = np.stack([np.asarray(cot_o), np.asarray(cot_b)], axis=1).reshape(2 * P, -1).astype(np.float32)
    grad = attribution.attribute(engine.vjp, stacked, cot, engine.info.preprocessing)
    return grad.reshape(P, 2, *grad.shape[1:])


def _chunks(pairs: Sequence[Pair], todo: np.ndarray, batch_size: int) -> Iterable[np.ndarray]:
    """Pairs per engine call, in order: up to batch_size distinct images each (batch_size // 2
    pairs when none share one). Pairs sharing an image (one object for several channels, a common
    reference) go together: the image is loaded once and Engine.vjp runs its forward pass once
    for all its cotangents."""
    start = 0
    while start < len(todo):
        seen: set = set()
        end = start
        while end < len(todo) and end - start < 2 * batch_size:
            keys = {pairs[todo[end]].ooc.key, pairs[todo[end]].reference.key}
            if end > start and len(seen | keys) > batch_size:
                break
            seen |= keys
            end += 1
        yield todo[start:end]
        start = end


def run_description(
    study: Study,
    pairs: Sequence[Pair],
    method: str | Attribution = "parallel",
    save_inputs: bool = False,
    *,
    path: str | None = None,
    **path_options: Any,
) -> dict:
    """What decides an explain run's gradients, for checkpoints: hashes of the model, the readouts
    and every image, the attribution (method label, rule, path, path options), the pairs in order."""
    attribution = resolve(method, path, **path_options)
    from pbv_onnx.data.features import content_hash
    from pbv_onnx.runtime.modelfile import file_sha256

    hashes: dict[Path, str] = {}

    def image(ref: ImageRef) -> list[str]:
        if ref.path not in hashes:
            hashes[ref.path] = content_hash(ref.path)
        return [ref.key[0], ref.key[1], hashes[ref.path]]

    return {
        "model_sha256": study.engine.info.sha256,
        "readouts_sha256": file_sha256(study.readouts_path),
        **attribution.description(),
        "save_inputs": bool(save_inputs),
        "pairs": [[str(p.channel), *image(p.ooc), *image(p.reference)] for p in pairs],
    }


def explain(
    study: Study,
    pairs: Sequence[Pair],
    method: str | Attribution = "parallel",
    path: str | None = None,
    save_inputs: bool = False,
    options: dict | None = None,
    checkpoint=None,
    map: str = DEFAULT_MAP,
    **path_options: Any,
) -> xr.Dataset:
    """Backpropagate every pair (in batches through the one engine) -> the labelled result.

    `method` (a name of method.methods.METHODS, or a resolved Attribution), `path` (default: the
    method's) and the path's options (e.g. steps=, baseline=, noise=, samples=, seed=) choose the
    cotangent rule and the path; they are checked before any computation. Where the model allows,
    the shared maps of every pair are computed too; `map` (pixel, shared or guided) is the map a
    report of the result shows (attribute `map`).

    With a `checkpoint` (pbv_onnx.checkpoint.Checkpoints), pairs it already holds are not
    recomputed and each finished batch is saved to it.
    """
    attribution = resolve(method, path, **path_options)
    if not pairs:
        raise UsageError(None, "nothing to explain (no pairs)")
    no_shared = check_map(study.engine, map)
    eng = study.engine
    spec = eng.info.preprocessing
    P = len(pairs)
    H, W = spec.input_size
    grads = np.empty((P, 2, 3, H, W), np.float32)
    inputs = np.empty((P, 2, 3, H, W), np.float32) if save_inputs else None
    done = checkpoint.load(grads, inputs) if checkpoint is not None else np.zeros(P, bool)
    if done.any():
        checkpoint.log(f"resuming: {int(done.sum())} of {P} pairs from checkpoints in {checkpoint.folder}")
    todo = np.flatnonzero(~done)
    # BLAS on one thread throughout (to_dataset's products too): after a multithreaded call its idle
    # workers spin, taking the cores from the next onnxruntime call
    with one_blas_thread():
        try:
            with _progress(P, study.progress, f"explain ({attribution.label})") as bar:
                bar.update(int(done.sum()))
                for idx in _chunks(pairs, todo, eng.batch_size):
                    part = [pairs[j] for j in idx]
                    files = [p for pr in part for p in (pr.ooc.path, pr.reference.path)]
                    x = study.images(files).reshape(len(part), 2, 3, H, W)
                    cots = [
                        attribution.cotangents(study.weight(pr.channel), *study.phi([pr.ooc, pr.reference]))
                        for pr in part
                    ]
                    grads[idx] = backprop_pairs(
                        eng, x, np.stack([c[0] for c in cots]), np.stack([c[1] for c in cots]), attribution
                    )
                    if inputs is not None:
                        inputs[idx] = x
                    if checkpoint is not None:
                        checkpoint.save(idx, grads[idx], None if inputs is None else inputs[idx])
                    bar.update(len(part))
        except KeyboardInterrupt:
            if checkpoint is not None and (done.any() or checkpoint.saved):
                checkpoint.log(
                    f"{int(done.sum()) + checkpoint.saved} of {P} pairs are checkpointed in "
                    f"{checkpoint.folder}; rerun with resume=True to continue"
                )
            raise
        if no_shared is not None:
            _log.info(f"no shared maps: {no_shared}")
        shared = None if no_shared is not None else latent_shared_maps(study, pairs)
        return to_dataset(study, pairs, grads, inputs, attribution, options or {}, shared, map, no_shared)


def to_dataset(
    study: Study,
    pairs: Sequence[Pair],
    grads: np.ndarray,
    inputs: np.ndarray | None,
    method: str | Attribution,
    options: dict,
    shared: np.ndarray | None = None,
    map: str = DEFAULT_MAP,
    no_shared: str | None = None,
) -> xr.Dataset:
    """The explanations.nc layout: pair x role x color x y x x, per-pair coordinates, provenance
    (the attribution's method label, rule, path and path options among the attributes); with
    `shared` (latent maps [P, 2, h, w]) the shared maps, latent and upsampled to the input size."""
    attribution = resolve(method)
    info = study.engine.info
    H, W = grads.shape[-2:]
    per_pair = {
        "channel": [str(p.channel) for p in pairs],
        "region": [study.region(p.channel) for p in pairs],
        "ooc": [p.ooc.label for p in pairs],
        "reference": [p.reference.label for p in pairs],
        "ooc_file": [str(p.ooc.path) for p in pairs],
        "reference_file": [str(p.reference.path) for p in pairs],
        "similarity": [p.similarity for p in pairs],
        "predicted_ooc": [study.predicted(p.channel, p.ooc) for p in pairs],
        "predicted_reference": [study.predicted(p.channel, p.reference) for p in pairs],
        "recorded_ooc": [study.recorded(p.channel, p.ooc) for p in pairs],
        "recorded_reference": [study.recorded(p.channel, p.reference) for p in pairs],
        "method": [attribution.label] * len(pairs),
        # how well the channel's readout predicts held-out preferred images: a map is only as
        # channel-specific as its readout (README, validation)
        "readout_r_cv": [study.readout_r(p.channel) for p in pairs],
    }
    coords: dict[str, Any] = {
        "pair": np.arange(len(pairs)),
        "role": list(ROLES),
        "color": list(COLORS),
        "y": np.arange(H),
        "x": np.arange(W),
    }
    for name, values in per_pair.items():
        arr = np.asarray(values, dtype=np.float64) if isinstance(values[0], float) else np.asarray(values, dtype=str)
        coords[name] = ("pair", arr)
    data = {
        "input_grad": (
            ("pair", "role", "color", "y", "x"),
            np.asarray(grads, np.float32),
            {"long_name": "J_phi(x)^T v, the raw input gradient"},
        ),
        "saliency": (
            ("pair", "role", "y", "x"),
            np.asarray(display_map(grads), np.float32),
            {"long_name": "sum over colour of |input_grad| (display map, unsmoothed)"},
        ),
    }
    if shared is not None:
        roles = "role ooc: M_o, the object's positions; role reference: M_b, the reference's"
        data["shared_map_latent"] = (
            ("pair", "role", "latent_y", "latent_x"),
            np.asarray(shared, np.float64),
            {"long_name": "shared map M on the latent grid: its sum over positions is the similarity", "roles": roles},
        )
        up = np.empty((len(pairs), 2, H, W), np.float32)
        for i in range(0, len(pairs), 64):  # in parts: no float64 copy of every pair's image-sized maps
            up[i : i + 64] = upsample_map(shared[i : i + 64], (H, W))
        data["shared_map"] = (
            ("pair", "role", "y", "x"),
            up,
            {
                "long_name": "shared map M upsampled bilinearly to the input, times h*w/(H*W) (sums to the similarity)",
                "roles": roles,
            },
        )
    if inputs is not None:
        data["image"] = (("pair", "role", "color", "y", "x"), inputs, {"long_name": "preprocessed network input"})
    from pbv_onnx.runtime.describe import describe_weights

    attrs = {
        "model_sha256": info.sha256,
        "model": str(info.path),
        "arch": info.arch,
        "layer": info.layer,
        "weights": describe_weights(info.metadata.get("weights")),
        "feature_shape": json.dumps(list(info.feature_shape)),
        "preprocessing": json.dumps(info.preprocessing.to_dict()),
        "readouts": str(study.readouts_path),
        # what readout_r_cv's folds kept whole ("group": related stimuli never split; "" for readouts
        # fitted before grouped folds existed)
        "readout_cv_folds_by": str(study.readouts.attrs.get("cv_folds_by", "")),
        "responses": str(study.responses_path),
        "preferred_category": study.preferred,
        **attribution.attrs(),
        "options": json.dumps(options, default=str),
        "map": map,
        "pbv_onnx_version": _version(),
    }
    if no_shared is not None:
        attrs["shared_map"] = f"not computed: {no_shared}"
    return xr.Dataset(data, coords=coords, attrs=attrs)


def _version() -> str:
    from pbv_onnx import __version__

    return __version__


def channel_summary(study: Study) -> xr.Dataset:
    """Each channel's mean recorded response to all objects and to all preferred images (Fig. 3b)."""
    import warnings

    pref = study.responses["category"].values.astype(str) == study.preferred
    m = study.mean.sel(channel=study.channels).values.astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean_obj = np.nanmean(m[:, ~pref], axis=1) if (~pref).any() else np.full(len(m), np.nan)
        mean_pref = np.nanmean(m[:, pref], axis=1) if pref.any() else np.full(len(m), np.nan)
    return xr.Dataset(
        {"mean_object": ("channel", mean_obj), "mean_preferred": ("channel", mean_pref)},
        coords={
            "channel": np.asarray([str(c) for c in study.channels]),
            "region": ("channel", np.asarray([study.region(c) for c in study.channels], str)),
        },
        attrs={"preferred_category": study.preferred},
    )
