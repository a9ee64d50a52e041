"""Attribution paths: how the vector-Jacobian product is taken along the inputs (docs/method.md section 4).

A path is one small registered class: `@register_path("name")`, a one-line `description`, its
`options` (each an `Option` with its default and validation), and
`attribute(vjp, images [N,3,H,W], cotangents [N,D], spec, **options) -> input gradients [N,3,H,W]`.
Each VJP call takes one batch of images (the N given), so memory stays at one batch whatever the path.
Everything downstream (the method table, explain, the CLI's choices, the report) reads `PATHS`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import numpy as np

from pbv_onnx.base.errors import UsageError
from pbv_onnx.method.registry import registrar
from pbv_onnx.method.saliency import BASELINES, Vjp, backprop, baseline_images
from pbv_onnx.runtime.images import Preprocessing

_KINDS = {int: "an integer", float: "a number", str: "a name"}


@dataclass(frozen=True)
class Option:
    """One option of a path: its name (a Python parameter), default, help, and allowed values."""

    name: str
    default: Any  # its type is the option's type (int, float or str)
    help: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None  # the smallest allowed value

    def check(self, value: Any) -> Any:
        """`value` as the option's type (text too, as from a command line); UsageError naming the
        option where it is not allowed."""
        kind = type(self.default)
        try:
            if isinstance(value, bool) and kind is not str:
                raise ValueError
            if kind is int:
                v = int(value) if not isinstance(value, float) or value.is_integer() else None
                if v is None:
                    raise ValueError
            elif kind is float:
                v = float(value)
                if not math.isfinite(v):
                    raise ValueError
            else:
                v = str(value)
        except (TypeError, ValueError):
            raise UsageError(None, f"{self.name} must be {_KINDS[kind]}, not {value!r}", param=self.name) from None
        if self.choices and v not in self.choices:
            raise UsageError(None, f"{self.name} must be one of {', '.join(self.choices)}, not {v!r}", param=self.name)
        if self.minimum is not None and v < self.minimum:
            raise UsageError(None, f"{self.name} must be at least {self.minimum:g}, not {v:g}", param=self.name)
        return v


class AttributionPath:
    """One way to take the VJP along the inputs: a single gradient, an integral, an average."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()

    def defaults(self) -> dict[str, Any]:
        """The path's options at their defaults."""
        return {o.name: o.default for o in self.options}

    def attribute(
        self, vjp: Vjp, images: np.ndarray, cotangents: np.ndarray, spec: Preprocessing, **options: Any
    ) -> np.ndarray:
        """Input gradients [N, 3, H, W] of images [N, 3, H, W] with their cotangents [N, D]."""
        raise NotImplementedError


PATHS: dict[str, AttributionPath] = {}


# Class decorator: `@register_path("name")` registers an AttributionPath under a unique name.
register_path = registrar(PATHS, "path")


@register_path("plain")
class Plain(AttributionPath):
    """The plain input gradient: one VJP, G = J_phi(x)^T v."""

    description = "one vector-Jacobian product, G = J_phi(x)^T v"

    def attribute(
        self, vjp: Vjp, images: np.ndarray, cotangents: np.ndarray, spec: Preprocessing, **options: Any
    ) -> np.ndarray:
        return backprop(vjp, images, cotangents)


@register_path("integrated")
class Integrated(AttributionPath):
    """Integrated gradients: G = (x - x0) * mean_k J_phi(x0 + (k/m)(x - x0))^T v, k = 1..m."""

    description = "integrated gradients from a black or blurred baseline, G = (x - x0) * mean_k J(x_k)^T v"
    options = (
        Option("steps", 16, "integration steps m (one VJP each)", minimum=1),
        Option("baseline", "black", "the baseline image x0", choices=tuple(BASELINES)),
    )

    def attribute(
        self,
        vjp: Vjp,
        images: np.ndarray,
        cotangents: np.ndarray,
        spec: Preprocessing,
        *,
        steps: int,
        baseline: str,
        **options: Any,
    ) -> np.ndarray:
        x = np.asarray(images, np.float64)
        x0 = np.asarray(baseline_images(np.asarray(images, np.float32), baseline, spec), np.float64)
        acc = np.zeros_like(x)
        for k in range(1, steps + 1):  # one VJP call per step on the whole batch
            acc += backprop(vjp, (x0 + (k / steps) * (x - x0)).astype(np.float32), cotangents)
        return ((x - x0) * acc / steps).astype(np.float32)


def _image_seed(image: np.ndarray) -> list[int]:
    """Four 32-bit words of the sha256 of an image's float32 bytes."""
    digest = hashlib.sha256(np.ascontiguousarray(image, np.float32).tobytes()).digest()
    return np.frombuffer(digest[:16], np.uint32).tolist()


@register_path("smooth")
class Smooth(AttributionPath):
    """SmoothGrad: the mean input gradient over noisy copies x + N(0, sigma^2)."""

    description = (
        "SmoothGrad, the mean input gradient over noisy copies x + N(0, sigma^2), "
        "sigma = noise x (max - min) of the preprocessed image"
    )
    options = (
        Option("noise", 0.15, "sigma as a fraction of the preprocessed image's range (max - min)", minimum=0),
        Option("samples", 16, "noisy copies per image (one VJP each)", minimum=1),
        Option("seed", 0, "seed of the noise", minimum=0),
    )

    def draws(self, images: np.ndarray, *, noise: float, samples: int, seed: int) -> Iterator[np.ndarray]:
        """The noisy copies, one float32 batch [N, 3, H, W] per sample.

        Each image's noise is seeded by `seed` and the image's own pixels, not its place in the
        batch: batching, an image shared by several pairs, and a resumed run all draw the same noise.
        """
        x = np.asarray(images, np.float32)
        x64 = x.astype(np.float64)
        sigma = noise * (x64.max(axis=(1, 2, 3)) - x64.min(axis=(1, 2, 3))) if len(x) else np.zeros(0)
        rngs = [np.random.default_rng([seed, *_image_seed(im)]) for im in x]
        for _ in range(samples):
            eps = np.stack([r.standard_normal(x.shape[1:]) for r in rngs]) if len(x) else x64
            yield (x64 + sigma[:, None, None, None] * eps).astype(np.float32)

    def attribute(
        self,
        vjp: Vjp,
        images: np.ndarray,
        cotangents: np.ndarray,
        spec: Preprocessing,
        *,
        noise: float,
        samples: int,
        seed: int,
        **options: Any,
    ) -> np.ndarray:
        acc = np.zeros(np.shape(images), np.float64)
        for noisy in self.draws(images, noise=noise, samples=samples, seed=seed):  # one VJP call per sample
            acc += backprop(vjp, noisy, cotangents)
        return (acc / samples).astype(np.float32)
