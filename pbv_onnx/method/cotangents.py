"""Cotangent rules: which vector v each image of a pair is backpropagated with (docs/method.md sections 3-4).

A rule is one small registered class: `@register_rule("name")`, a one-line `description`, and
`cotangents(weight, phi_o, phi_b) -> (v_o, v_b)`, float64 [D] each. Everything downstream (the
method table, explain, the CLI's choices, the report) reads `RULES`.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from pbv_onnx.method.registry import registrar
from pbv_onnx.method.saliency import hadamard_weights


class CotangentRule:
    """One way to turn a readout and a pair's features into the two images' cotangents."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    @property
    def panel_label(self) -> str:
        """What the figures call a map of this rule (a rule may say more, e.g. "shared features")."""
        return self.name

    def cotangents(self, weight: np.ndarray, phi_o: np.ndarray, phi_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(v_o, v_b), float64 [D] each: the cotangents of the object and of the reference."""
        raise NotImplementedError


RULES: dict[str, CotangentRule] = {}


# Class decorator: `@register_rule("name")` registers a CotangentRule under a unique name.
register_rule = registrar(RULES, "cotangent rule")


def _f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float64)


@register_rule("parallel")
class Parallel(CotangentRule):
    """Parallel backpropagation: both images with the one shared v, the Hadamard weights."""

    description = "the Hadamard weights v = w^2 phi(o) phi(b) / (||w phi(o)|| ||w phi(b)||), shared by both images"
    panel_label = "shared features"

    def cotangents(self, weight: np.ndarray, phi_o: np.ndarray, phi_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        v = hadamard_weights(weight, phi_o, phi_b)
        return v, v


@register_rule("gradient")
class Gradient(CotangentRule):
    """The single-image readout gradient: v = w_n on each image."""

    description = "the readout weights v = w on each image (readout gradient)"

    def cotangents(self, weight: np.ndarray, phi_o: np.ndarray, phi_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w = _f64(weight)
        return w, w


@register_rule("grad-x-act")
class GradientTimesActivation(CotangentRule):
    """Gradient x activation: v = w_n * phi(x), each image with its own activations."""

    description = "v = w * phi(x), each image with its own features (gradient x activation)"

    def cotangents(self, weight: np.ndarray, phi_o: np.ndarray, phi_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w = _f64(weight)
        return w * _f64(phi_o), w * _f64(phi_b)
