"""Parity before writing: onnxruntime vs torch autograd (fp32), and torch fp32 vs fp64 as the floor."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pbv_onnx.base.errors import ModelError
from pbv_onnx.method.stats import rel_l2
from pbv_onnx.runtime.engine import COTANGENT, FEATURES, IMAGE, INPUT_GRAD
from pbv_onnx.runtime.images import Preprocessing, load_batch, real_photos
from pbv_onnx.runtime.modelfile import FLOOR_FACTOR


def smooth_images(n: int, size: tuple[int, int], spec: Preprocessing, seed: int = 0) -> np.ndarray:
    """Photo-like smooth synthetic images (low-frequency colour gradients and blobs), normalised."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = np.empty((n, 3, h, w), np.float32)
    for i in range(n):
        img = np.zeros((3, h, w))
        for _ in range(6):
            fy, fx, ph = rng.uniform(0.5, 4, 2).tolist() + [rng.uniform(0, 2 * np.pi)]
            img += rng.uniform(0, 0.3, (3, 1, 1)) * np.sin(2 * np.pi * (fy * yy + fx * xx) + ph)
        for _ in range(4):
            cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
            img += rng.uniform(-0.5, 0.5, (3, 1, 1)) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / r**2)
        img = np.clip(0.5 + img, 0, 1)
        out[i] = (img - np.reshape(spec.mean, (3, 1, 1))) / np.reshape(spec.std, (3, 1, 1))
    return out


def verification_images(spec: Preprocessing, n: int, images: list[Path] | None = None) -> tuple[np.ndarray, str]:
    """Real photographs (given, else ../shared/images when present, else scikit-image's sample
    photos), else smooth synthetic images."""
    if images is None:
        images = real_photos()
    if images:
        chosen = [images[int(i)] for i in np.linspace(0, len(images) - 1, min(n, len(images)))]
        x = load_batch(chosen, spec)
        # Half-LSB dither: saturated flat regions make exact ties (ReLU at 0, equal max-pool
        # candidates) that each implementation breaks its own way; dithered, ties become rare
        # near-ties that torch fp32 vs fp64 meets as often as onnxruntime does, so the floor is fair.
        noise = np.random.default_rng(0).uniform(-0.5, 0.5, x.shape) / 255.0
        x = (x + noise / np.reshape(spec.std, (1, 3, 1, 1))).astype(np.float32)
        return x, "photos (+half-LSB dither): " + ", ".join(p.name for p in chosen)
    return smooth_images(n, spec.input_size, spec), f"{n} smooth synthetic images"


def torch_vjp(
    net: nn.Module, x: np.ndarray, cotangents: list[np.ndarray], dtype
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Features and J^T c for each cotangent batch c, by torch autograd in `dtype`."""
    xt = torch.from_numpy(x).to(dtype).requires_grad_(True)
    with torch.enable_grad():
        y = net(xt)
        grads = [torch.autograd.grad(y, xt, torch.from_numpy(c).to(dtype), retain_graph=True)[0] for c in cotangents]
    return y.detach().double().numpy(), [g.double().numpy() for g in grads]


def _per_sample_max(a: np.ndarray, b: np.ndarray) -> float:
    return max(rel_l2(ai, bi) for ai, bi in zip(a, b))


def measure(session, net: nn.Module, x: np.ndarray, seed: int = 0) -> dict:
    """Run the ONNX graph and torch autograd (fp32 and fp64) on the same images and cotangents.

    Cotangents: per-sample Gaussian noise, and the feature map itself (the VJP of 0.5 ||phi||^2,
    a realistic, activation-shaped weighting). Errors are the worst per-sample relative L2.
    """
    net32 = net.float().eval()
    feats32 = net32(torch.from_numpy(x)).detach().numpy()
    rng = np.random.default_rng(seed)
    cots = {"gaussian": rng.standard_normal(feats32.shape).astype(np.float32), "features": feats32.astype(np.float32)}
    f32, g32 = torch_vjp(net32, x, list(cots.values()), torch.float32)
    net64 = copy.deepcopy(net32).double()
    f64, g64 = torch_vjp(net64, x, list(cots.values()), torch.float64)
    ort_f, ort_g = None, []
    for c in cots.values():
        f, g = session.run([FEATURES, INPUT_GRAD], {IMAGE: x, COTANGENT: c})
        ort_f = f if ort_f is None else ort_f
        ort_g.append(g)
    result = {
        "ort_vs_torch32": {"features": _per_sample_max(ort_f, f32)},
        "torch32_vs_torch64": {"features": _per_sample_max(f32, f64)},
        "ort_vs_torch64": {"features": _per_sample_max(ort_f, f64)},
    }
    for name, a, b in (
        ("ort_vs_torch32", ort_g, g32),
        ("torch32_vs_torch64", g32, g64),
        ("ort_vs_torch64", ort_g, g64),
    ):
        for kind, ai, bi in zip(cots, a, b):
            result[name][f"input_grad[{kind}]"] = _per_sample_max(ai, bi)
    result["cotangents"] = list(cots)
    return result


def limits(errors: dict, tolerance: float, grad_tolerance: float) -> dict[str, float]:
    """Allowed ORT-vs-torch-fp32 error per quantity.

    Features: `tolerance`. Input gradients: `grad_tolerance`, or 10x the fp32 floor (torch fp32
    vs fp64 on the same inputs) if larger. Input gradients of ReLU/max-pool networks are
    discontinuous: rounding flips a few ReLU masks and max-pool choices at near-ties, and
    onnxruntime's summation order meets other near-ties than torch does, so deep networks'
    fp32 gradients agree only to ~1e-2; a wrong adjoint is off by O(1).
    """
    floor = errors["torch32_vs_torch64"]
    return {
        k: tolerance if k == "features" else max(grad_tolerance, FLOOR_FACTOR * floor[k])
        for k in errors["ort_vs_torch32"]
    }


def worst(errors: dict, tolerance: float, grad_tolerance: float) -> tuple[str, float, float]:
    """The quantity whose ORT-vs-torch-fp32 error is largest relative to its limit: (name, error, limit)."""
    lim = limits(errors, tolerance, grad_tolerance)
    ort = errors["ort_vs_torch32"]
    key = max(ort, key=lambda k: ort[k] / lim[k])
    return key, ort[key], lim[key]


def torch_record(errors: dict, cotangents, tolerance: float, grad_tolerance: float, n_images: int, inputs: str) -> dict:
    """The model's `verification` metadata for a check against torch autograd (both routes write it)."""
    return {
        "tolerance": tolerance,
        "grad_tolerance": grad_tolerance,
        "floor_factor": FLOOR_FACTOR,
        "rule": "ort_vs_torch32: features <= tolerance; input_grad <= "
        "max(grad_tolerance, floor_factor * torch32_vs_torch64)",
        "limits": limits(errors, tolerance, grad_tolerance),
        "metric": "relative L2 ||a-b||/||b||, worst sample",
        "n_images": int(n_images),
        "inputs": inputs,
        "cotangents": cotangents,
        "errors": errors,
    }


def refuse_beyond_limits(out, errors: dict, tolerance: float, grad_tolerance: float) -> tuple[str, float, float]:
    """Raise ModelError (nothing written) when onnxruntime differs from torch autograd beyond its
    limit; else the worst quantity (name, error, limit)."""
    what, err, limit = worst(errors, tolerance, grad_tolerance)
    if not err <= limit:
        raise ModelError(
            out,
            f"export refused: onnxruntime differs from torch autograd in {what} "
            f"by {err:.2e} relative L2 (limit {limit:.1e}); nothing written",
        )
    return what, err, limit
