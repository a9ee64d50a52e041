"""Hadamard weights, parallel backpropagation, baselines and display maps (METHOD.md sections 3-4)."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from pbv_onnx.base.errors import UsageError
from pbv_onnx.runtime.images import Preprocessing
from pbv_onnx.method.filters import gaussian_smooth

METHODS = ("parallel", "gradient", "grad-x-act", "integrated")
BASELINES = ("black", "blur")
DEFAULT_STEPS = 16
# Blur baseline: a Gaussian this fraction of the shorter image side wide removes object detail
# while keeping the colour layout, so integrated gradients credit shape rather than colour.
BLUR_SIGMA_FRACTION = 0.05

# engine.vjp-shaped callable: (images [N,3,H,W], cotangents [N,D]) -> (features, input_grad)
Vjp = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def check_options(methods: Sequence[str], steps: int = DEFAULT_STEPS, baseline: str = "black") -> None:
    """UsageError for an unknown method or baseline or too few steps (before any computation)."""
    for method in methods:
        if method not in METHODS:
            raise UsageError(None, f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    if baseline not in BASELINES:
        raise UsageError(None, f"--baseline must be one of {', '.join(BASELINES)}, not {baseline!r}")
    if steps < 1:
        raise UsageError(None, f"--steps must be at least 1, not {steps}")


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


def pair_cotangents(method: str, weight: np.ndarray, phi_o: np.ndarray,
                    phi_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cotangents (v_o, v_b) backpropagated through the object and the reference.

    parallel / integrated: one shared v (the Hadamard weights); gradient: v = w_n on each image;
    grad-x-act: v = w_n * phi(x), each image with its own activations.
    """
    w = np.asarray(weight, np.float64)
    if method in ("parallel", "integrated"):
        v = hadamard_weights(w, phi_o, phi_b)
        return v, v
    if method == "gradient":
        return w, w
    if method == "grad-x-act":
        return w * np.asarray(phi_o, np.float64), w * np.asarray(phi_b, np.float64)
    raise ValueError(f"unknown method {method!r}")


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


def baseline_images(x: np.ndarray, baseline: str, spec: Preprocessing) -> np.ndarray:
    """Integrated-gradients baselines x0 for images [N, 3, H, W]."""
    if baseline == "black":
        return np.broadcast_to(black_baseline(spec), x.shape).astype(np.float32)
    if baseline == "blur":
        return blur_baseline(x)
    raise ValueError(f"unknown baseline {baseline!r}")


def backprop(vjp: Vjp, images: np.ndarray, cotangents: np.ndarray) -> np.ndarray:
    """J_phi(x)^T v for each image and its cotangent: [N, 3, H, W]."""
    _, grad = vjp(np.asarray(images, np.float32), np.asarray(cotangents, np.float32))
    return grad


def integrated(vjp: Vjp, images: np.ndarray, baselines: np.ndarray, cotangents: np.ndarray,
               steps: int = DEFAULT_STEPS) -> np.ndarray:
    """G = (x - x0) * mean_k J_phi(x0 + (k/m)(x - x0))^T v, k = 1..m, for each image [N, 3, H, W].

    One VJP call per step on the whole batch keeps memory at one batch of images.
    """
    if steps < 1:
        raise ValueError("steps must be at least 1")
    x = np.asarray(images, np.float64)
    x0 = np.asarray(baselines, np.float64)
    acc = np.zeros_like(x)
    for k in range(1, steps + 1):
        acc += backprop(vjp, (x0 + (k / steps) * (x - x0)).astype(np.float32), cotangents)
    return ((x - x0) * acc / steps).astype(np.float32)


