"""Display maps and their colour scales: what figures show of an input gradient."""

from __future__ import annotations

import numpy as np


def display_map(grad: np.ndarray) -> np.ndarray:
    """S = sum over colour of |G|: [..., 3, H, W] -> [..., H, W]. Never normalised.

    Summed colour by colour (numpy's own order for this axis, so the same bits as
    np.abs(G).sum(axis=-3)) without an |G| copy of the whole run's gradients."""
    g = np.asarray(grad)
    out = np.abs(g[..., 0, :, :])
    for c in range(1, g.shape[-3]):
        out += np.abs(g[..., c, :, :])
    return out


def shared_vmax(maps: np.ndarray, percentile: float = 99.5) -> float:
    """One colour-scale maximum for a set of display maps (a pair, a channel or a run).

    A high percentile of all their pixels pooled, so one hot pixel does not wash out the rest;
    the same value is used for every map in the set, never one per image.
    """
    a = np.array(maps, np.float64).ravel()  # our own copy: the percentile partitions it in place
    finite = np.isfinite(a)
    if not finite.all():
        a = a[finite]
    del finite
    if a.size == 0:
        return 1.0
    v = float(np.percentile(a, percentile, overwrite_input=True))
    if v <= 0:
        v = float(a.max())
    return v if v > 0 else 1.0
