"""Saliency primitives: Hadamard weights, one vector-Jacobian product, integrated-gradients baselines.

The cotangent rules (method/cotangents.py) and the paths (method/paths.py) are built on these.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from pbv_onnx.method.filters import gaussian_smooth
from pbv_onnx.runtime.images import Preprocessing

# Blur baseline: a Gaussian this fraction of the shorter image side wide removes object detail
# while keeping the colour layout, so integrated gradients credit shape rather than colour.
BLUR_SIGMA_FRACTION = 0.05

# engine.vjp-shaped callable: (images [N,3,H,W], cotangents [N,D]) -> (features, input_grad)
Vjp = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def hadamard_weights(weight: np.ndarray, phi_o: np.ndarray, phi_b: np.ndarray) -> np.ndarray:
    """v = (w^2 * phi(o) * phi(b)) / (||w * phi(o)|| ||w * phi(b)||), so that sum(v) = s_n(o, b).

    Where either weighted norm is zero the pair shares no weighted feature: v = 0 (similarity 0),
    and both maps are zero.
    """
    w = np.asarray(weight, np.float64)
    u = w * np.asarray(phi_o, np.float64)
    z = w * np.asarray(phi_b, np.float64)
    den = np.linalg.norm(u) * np.linalg.norm(z)
    if den == 0:
        return np.zeros_like(u)
    return u * z / den


def black_baseline(spec: Preprocessing) -> np.ndarray:
    """The preprocessed image of an all-black picture: (0 - mean) / std per colour, [3, H, W]."""
    H, W = spec.input_size
    level = (0.0 - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.broadcast_to(level[:, None, None], (3, H, W)).astype(np.float32)


def blur_baseline(x: np.ndarray, sigma: float | None = None) -> np.ndarray:
    """A Gaussian-blurred copy of preprocessed image(s) [..., 3, H, W]."""
    if sigma is None:
        sigma = BLUR_SIGMA_FRACTION * min(x.shape[-2:])
    return gaussian_smooth(x, sigma).astype(np.float32)


BASELINES: dict[str, Callable[[np.ndarray, Preprocessing], np.ndarray]] = {
    "black": lambda x, spec: np.broadcast_to(black_baseline(spec), x.shape).astype(np.float32),
    "blur": lambda x, spec: blur_baseline(x),
}


def baseline_images(x: np.ndarray, baseline: str, spec: Preprocessing) -> np.ndarray:
    """Integrated-gradients baselines x0 for images [N, 3, H, W]."""
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}")
    return BASELINES[baseline](x, spec)


def backprop(vjp: Vjp, images: np.ndarray, cotangents: np.ndarray) -> np.ndarray:
    """J_phi(x)^T v for each image and its cotangent: [N, 3, H, W] (one VJP call)."""
    _, grad = vjp(np.asarray(images, np.float32), np.asarray(cotangents, np.float32))
    return grad
