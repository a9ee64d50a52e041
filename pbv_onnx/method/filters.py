"""Gaussian smoothing over the last two axes (images and maps)."""

from __future__ import annotations

import numpy as np


def gaussian_kernel(sigma: float) -> np.ndarray:
    """A normalised 1-D Gaussian, truncated at 4 sigma."""
    radius = max(1, int(np.ceil(4.0 * sigma)))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_smooth(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian filter over the last two axes (y, x), reflecting at the borders."""
    a = np.asarray(a)
    if sigma <= 0:
        return a.copy()
    k = gaussian_kernel(sigma)
    r = len(k) // 2
    out = a.astype(np.float64)
    for axis in (-2, -1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (r, r)
        padded = np.moveaxis(np.pad(out, pad, mode="reflect"), axis, -1)
        win = np.lib.stride_tricks.sliding_window_view(padded, len(k), axis=-1)
        out = np.moveaxis(win @ k, -1, axis)
    return out.astype(a.dtype if np.issubdtype(a.dtype, np.floating) else np.float64)
