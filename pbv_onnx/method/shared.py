"""The shared map: the similarity s_n(o, b) decomposed exactly over latent positions (docs/method.md section 4).

Pooled features (global average over the P positions of the pre-pool map A at the cut, phibar = mean_p A):

    M_o(p) = sum_c w_c^2 A_c(o, p) phibar_c(b) / (P ||w * phibar(o)|| ||w * phibar(b)||)

and M_b the same with the roles swapped; sum_p M_o(p) = sum_p M_b(p) = s_n(o, b). Unpooled features
(position is part of the feature index): M(p) = sum_c v_(c, p) with v the Hadamard cotangent, the same
map for both images. `upsample_map` brings M to the input size (docs/formats.md, `shared_map`).
"""

from __future__ import annotations

import math

import numpy as np

MAP_CHOICES = ("pixel", "shared", "guided")
DEFAULT_MAP = "pixel"


def _norm(x: np.ndarray) -> float:
    return float(np.sqrt(np.sum(x * x)))


def shared_maps(w: np.ndarray, a_o: np.ndarray, a_b: np.ndarray, pooled: bool) -> tuple[np.ndarray, np.ndarray]:
    """(M_o, M_b), float64 shaped like the positions, whose sums over positions equal s_n(o, b).

    `w`: the readout shaped like the features ([C] when pooled, [C, h, w] unpooled); `a_o`, `a_b`:
    the pre-pool maps [C, h, w] of object and reference (unpooled: the features themselves); any
    position axes after C work the same (e.g. [D, T] for tokens). A pair with no shared weighted
    feature (a zero weighted norm) has similarity 0 and all-zero maps.
    """
    w = np.asarray(w, np.float64)
    a_o = np.asarray(a_o, np.float64)
    a_b = np.asarray(a_b, np.float64)
    if a_o.ndim < 2 or a_o.shape != a_b.shape:
        raise ValueError(f"need two maps [C, *positions] of one shape, got {a_o.shape} and {a_b.shape}")
    c, pos = a_o.shape[0], a_o.shape[1:]
    flat_o, flat_b = a_o.reshape(c, -1), a_b.reshape(c, -1)
    zeros = (np.zeros(pos), np.zeros(pos))
    if pooled:
        if w.shape != (c,):
            raise ValueError(f"pooled: the readout must be [C] = [{c}], got {w.shape}")
        bar_o, bar_b = flat_o.mean(axis=1), flat_b.mean(axis=1)
        den = flat_o.shape[1] * _norm(w * bar_o) * _norm(w * bar_b)
        if den == 0:
            return zeros
        w2 = w * w
        m_o = (w2 * bar_b) @ flat_o / den
        m_b = (w2 * bar_o) @ flat_b / den
        return m_o.reshape(pos), m_b.reshape(pos)
    if w.shape != a_o.shape:
        raise ValueError(f"unpooled: the readout must be shaped like the features {a_o.shape}, got {w.shape}")
    wf = w.reshape(c, -1)
    den = _norm(wf * flat_o) * _norm(wf * flat_b)
    if den == 0:
        return zeros
    m = (wf * wf * flat_o * flat_b).sum(axis=0).reshape(pos) / den
    return m, m.copy()


def _interpolation(n_out: int, n_in: int) -> np.ndarray:
    """[n_out, n_in] bilinear weights, half-pixel centres, edges clamped (torch align_corners=False)."""
    u = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    u = np.clip(u, 0, n_in - 1)
    lo = np.floor(u).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = u - lo
    r = np.zeros((n_out, n_in))
    r[np.arange(n_out), lo] += 1 - frac
    r[np.arange(n_out), hi] += frac
    return r


def upsample_map(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """M [..., h, w] -> [..., H, W]: bilinear (half-pixel centres, edges clamped), times h*w / (H*W).

    The factor spreads each latent position's share over the pixels it covers, so the image map sums to
    sum(M) = s_n(o, b) exactly when H/h and W/w are whole numbers (clamped bilinear then gives every
    position the same total weight), and within the edge rows' interpolation error otherwise.
    """
    m = np.asarray(m, np.float64)
    if m.ndim < 2:
        raise ValueError(f"need a map [..., h, w], got {m.shape}")
    big_h, big_w = int(size[0]), int(size[1])
    h, wd = m.shape[-2:]
    ry, rx = _interpolation(big_h, h), _interpolation(big_w, wd)
    return np.einsum("Yh,...hw,Xw->...YX", ry, m, rx, optimize=True) * (h * wd / (big_h * big_w))


def latent_grid(shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """Where the positions of a per-image map lie on the image: (h, w, skip) for a map [C, h, w]
    (skip 0) or tokens [T, D] with T = g*g (skip 0) or g*g + 1 (skip 1: a leading class token, which
    has no place on the image); None when the shape gives no grid ([D], or T not a square)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 3:
        return shape[1], shape[2], 0
    if len(shape) == 2:
        t = shape[0]
        for skip in (0, 1):
            g = math.isqrt(max(t - skip, 0))
            if g > 0 and g * g == t - skip:
                return g, g, skip
    return None


def channels_first(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A per-image map (or a readout) flattened in C order of `shape` -> [C, P] (channels, positions):
    [C, h, w] -> [C, h*w]; tokens [T, D] -> [D, T]."""
    shape = tuple(int(s) for s in shape)
    arr = np.asarray(x).reshape(shape)
    if len(shape) == 3:
        return arr.reshape(shape[0], -1)
    if len(shape) == 2:
        return arr.T
    raise ValueError(f"a map of shape {shape} has no positions")


def on_grid(m: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Per-position values [P] (positions as `channels_first` orders them) -> [h, w] on the latent grid
    (a class token's value left out). Raises ValueError for a shape without a grid."""
    grid = latent_grid(shape)
    if grid is None:
        raise ValueError(f"a map of shape {tuple(shape)} has no spatial grid")
    h, w, skip = grid
    return np.asarray(m).reshape(-1)[skip:].reshape(h, w)


def guided_map(pixel: np.ndarray, shared_upsampled: np.ndarray) -> np.ndarray:
    """The guided map: the pixel map S times the upsampled shared map (pixel detail where M says)."""
    return np.asarray(pixel, np.float64) * np.asarray(shared_upsampled, np.float64)
