"""Maps of the validation study, computed on the engine directly (numpy cotangents -> one VJP each).

Every map here is [H, W] at the model's input size. Pixel maps are the paper's display map
S = sum over colour of |G|; shared maps are M (docs/method.md) upsampled bilinearly; guided
maps are their product. Pooled readouts are evaluated on the unpooled engine through the identity
phibar_c = (1/P) sum_p A_(c,p): the pooled model's VJP with cotangent v [C] is the unpooled model's VJP
with cotangent v_c / P at every position, exactly (average pooling is linear), so no second model
is needed for the pooled experiments.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from pbv_onnx.method.saliency import hadamard_weights
from pbv_onnx.method.shared import shared_maps, upsample_map

Vjp = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def display(grads: np.ndarray) -> np.ndarray:
    """[N, 3, H, W] input gradients -> [N, H, W] display maps S = sum over colour of |G| (float64)."""
    return np.abs(np.asarray(grads, np.float64)).sum(axis=1)


def pixel_maps(vjp: Vjp, images: np.ndarray, cotangents: np.ndarray) -> np.ndarray:
    """[N, H, W]: S of J_phi(x)^T v for each image and its cotangent ([N, *feature_shape])."""
    if len(images) == 0:
        return np.zeros((0, *np.shape(images)[2:]))
    return display(vjp(np.asarray(images, np.float32), np.asarray(cotangents, np.float32))[1])


def pooled_cotangent(v: np.ndarray, spatial: tuple[int, int]) -> np.ndarray:
    """A pooled model's cotangent v [C] as the unpooled model's [C, h, w]: v_c / P at every position."""
    h, w = spatial
    return np.repeat(np.repeat(np.asarray(v, np.float64)[:, None, None], h, 1), w, 2) / (h * w)


def cotangent(rule: str, w: np.ndarray, a_o: np.ndarray, a_b: np.ndarray | None, pooled: bool) -> np.ndarray:
    """The object's cotangent [C, h, w] on the unpooled engine for a rule ("parallel", "gradient",
    "grad-x-act"), readout `w` ([C, h, w] unpooled, [C] pooled) and the maps at the cut a_o, a_b [C, h, w]
    (a_b may be mean features; None for the rules that ignore the reference)."""
    w = np.asarray(w, np.float64)
    phi_o = a_o.mean(axis=(1, 2)) if pooled else np.asarray(a_o, np.float64)
    if rule == "parallel":
        phi_b = a_b.mean(axis=(1, 2)) if pooled else np.asarray(a_b, np.float64)
        v = hadamard_weights(w.ravel(), phi_o.ravel(), phi_b.ravel()).reshape(w.shape)
    elif rule == "gradient":
        v = w
    elif rule == "grad-x-act":
        v = w * phi_o
    else:
        raise ValueError(f"unknown rule {rule!r}")
    return pooled_cotangent(v, a_o.shape[1:]) if pooled else v


def shared_pixel_maps(
    w: np.ndarray, a_o: np.ndarray, a_b: np.ndarray, pooled: bool, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, float]:
    """(object's shared map [H, W], reference's shared map [H, W], similarity): M upsampled to `size`."""
    m_o, m_b = shared_maps(np.asarray(w, np.float64), np.asarray(a_o, np.float64), np.asarray(a_b, np.float64), pooled)
    return upsample_map(m_o, size), upsample_map(m_b, size), float(m_o.sum())


def parallel_maps(
    vjp: Vjp,
    w: np.ndarray,
    x_o: np.ndarray,
    a_o: np.ndarray,
    a_b: np.ndarray,
    pooled: bool = False,
    x_b: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The parallel maps of N pairs (object images x_o [N, 3, H, W], maps at the cut a_o, a_b [N, C, h, w],
    readouts w [N, *w_shape]): {"pixel", "shared", "guided"} of the object, [N, H, W] each, "similarity" [N],
    and, with reference images x_b, the reference's "ref_pixel", "ref_shared", "ref_guided"."""
    size = tuple(np.shape(x_o)[2:])
    n = len(x_o)
    cots = np.stack([cotangent("parallel", w[i], a_o[i], a_b[i], pooled) for i in range(n)])
    out: dict[str, np.ndarray] = {}
    sh = [shared_pixel_maps(w[i], a_o[i], a_b[i], pooled, size) for i in range(n)]
    out["shared"] = np.stack([s[0] for s in sh])
    out["similarity"] = np.array([s[2] for s in sh])
    if x_b is None:
        out["pixel"] = pixel_maps(vjp, x_o, cots)
    else:  # object and reference in one VJP call
        both = pixel_maps(vjp, np.concatenate([x_o, x_b]), np.concatenate([cots, cots]))
        out["pixel"], out["ref_pixel"] = both[:n], both[n:]
        out["ref_shared"] = np.stack([s[1] for s in sh])
        out["ref_guided"] = out["ref_pixel"] * out["ref_shared"]
    out["guided"] = out["pixel"] * out["shared"]
    return out


def baseline_maps(
    vjp: Vjp, w: np.ndarray, x_o: np.ndarray, a_o: np.ndarray, pooled: bool = False
) -> dict[str, np.ndarray]:
    """{"gradient", "grad-x-act"} pixel maps [N, H, W] of the objects: the controls that ignore the reference."""
    n = len(x_o)
    rules = ("gradient", "grad-x-act")
    cots = np.concatenate([np.stack([cotangent(r, w[i], a_o[i], None, pooled) for i in range(n)]) for r in rules])
    maps = pixel_maps(vjp, np.concatenate([x_o, x_o]), cots)
    return {r: maps[k * n : (k + 1) * n] for k, r in enumerate(rules)}
