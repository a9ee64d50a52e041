"""Neuron-specific weighted cosine similarity, candidate sets and ranking (docs/method.md section 2)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import xarray as xr

from pbv_onnx.base.errors import InputDataError, UsageError

CANDIDATE_MODES = ("top-k", "all")
DEFAULT_TOP_K = 20


def weighted_norms(weight: np.ndarray, features: np.ndarray) -> np.ndarray:
    """||w * phi(x)|| for each row of `features` [M, D] (or one vector [D])."""
    z = np.asarray(features, np.float64) * np.asarray(weight, np.float64)
    return np.sqrt(np.einsum("...d,...d->...", z, z))


def similarities(weight: np.ndarray, obj: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """s_n(o, b) of one object [D] against many candidates [M, D], as one matrix product.

    s_n(o, b) = sum_i w_i^2 phi_i(o) phi_i(b) / (||w * phi(o)|| ||w * phi(b)||). Where either
    weighted norm is zero (all features the readout weighs are zero, e.g. silenced by a ReLU)
    the two images share no weighted feature and the similarity is defined as 0.
    """
    w = np.asarray(weight, np.float64)
    u = w * np.asarray(obj, np.float64)
    z = np.asarray(candidates, np.float64) * w
    if z.ndim != 2 or u.ndim != 1 or z.shape[1] != u.shape[0]:
        raise ValueError(f"need obj [D] and candidates [M, D], got {u.shape} and {z.shape}")
    num = z @ u
    den = np.linalg.norm(u) * np.sqrt(np.einsum("md,md->m", z, z))
    out = np.zeros(len(z))
    ok = den > 0
    out[ok] = num[ok] / den[ok]
    return out


def rank_order(scores: np.ndarray, ids: Sequence) -> np.ndarray:
    """Indices sorting `scores` high to low, equal scores in ascending stimulus-id order."""
    keys = np.asarray([str(i) for i in ids])
    return np.lexsort((keys, -np.asarray(scores, np.float64)))


def candidate_ids(
    mean_response: xr.DataArray,
    categories: xr.DataArray,
    preferred: str,
    channel,
    mode: str = "top-k",
    k: int = DEFAULT_TOP_K,
    source: str | None = None,
) -> list:
    """The reference candidates for `channel`: its top-k preferred-category stimuli by recorded
    mean response (ties by stimulus id), or all preferred-category stimuli.

    `mean_response` is (channel, stimulus); `categories` is (stimulus,).
    """
    if mode not in CANDIDATE_MODES:
        raise UsageError(
            None, f"candidates must be one of {', '.join(CANDIDATE_MODES)}, not {mode!r}", param="candidates"
        )
    if mode == "top-k" and k < 1:
        raise UsageError(None, f"top_k must be at least 1, not {k}", param="top_k")
    pref = np.asarray(categories.values).astype(str) == str(preferred)
    stimuli = np.asarray(categories["stimulus"].values)[pref]
    if len(stimuli) == 0:
        raise InputDataError(source, f"empty candidate set: no stimulus of the preferred category {preferred!r}")
    resp = mean_response.sel(channel=channel).sel(stimulus=stimuli).values.astype(np.float64)
    keep = np.isfinite(resp)
    stimuli, resp = stimuli[keep], resp[keep]
    if len(stimuli) == 0:
        raise InputDataError(
            source, f"empty candidate set: channel {channel} has no recorded response to any {preferred!r} stimulus"
        )
    if mode == "all":
        return sorted(stimuli.tolist(), key=str)
    order = rank_order(resp, stimuli)[:k]
    return stimuli[order].tolist()


def ranked_scores(
    weight: np.ndarray,
    obj: np.ndarray,
    features: np.ndarray,
    ids: Sequence,
    source: str | None = None,
    label: str = "the object",
) -> tuple[np.ndarray, np.ndarray]:
    """(order, similarities) of one object [D] against candidate features [M, D] with stimulus
    ids: `order` ranks them high to low (ties by stimulus id).

    An object whose weighted features are all zero has no defined best match: that is an error.
    """
    if len(ids) == 0:
        raise InputDataError(source, "empty candidate set")
    if weighted_norms(weight, obj) == 0:
        raise InputDataError(
            source,
            f"{label} has no active feature weighted by this channel's readout "
            "(all zero after the ReLU); its similarity to any reference is undefined",
        )
    s = similarities(weight, obj, features)
    return rank_order(s, ids), s


def rank_candidates(
    weight: np.ndarray, obj: np.ndarray, candidates: xr.DataArray, source: str | None = None, label: str = "the object"
) -> xr.DataArray:
    """Similarity of one object to labelled candidate features (stimulus, feature), ranked.

    Returns a DataArray (stimulus) of similarities sorted high to low (ties by stimulus id).
    """
    ids = candidates["stimulus"].values
    order, s = ranked_scores(weight, obj, candidates.transpose("stimulus", "feature").values, ids, source, label)
    return xr.DataArray(s[order], dims=("stimulus",), coords={"stimulus": ids[order]}, name="similarity")
