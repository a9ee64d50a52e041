"""One pair, arrays in and xarray out (for notebooks): the batch explain's maps of an object and a reference."""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from pbv_onnx.base.errors import UsageError
from pbv_onnx.method.display import display_map
from pbv_onnx.method.methods import Attribution, resolve
from pbv_onnx.method.shared import DEFAULT_MAP, channels_first, on_grid, shared_maps, upsample_map
from pbv_onnx.method.similarity import similarities
from pbv_onnx.runtime.engine import Engine
from pbv_onnx.workflows.explain import COLORS, ROLES, backprop_pairs, check_map


def _image(x: np.ndarray, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A preprocessed image [3, H, W] (or [1, 3, H, W]) as float32 [3, H, W]."""
    a = np.asarray(x, np.float32)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.shape != shape:
        raise UsageError(
            None,
            f"{name} must be a preprocessed image [{', '.join(map(str, shape))}] "
            f"(or [1, {', '.join(map(str, shape))}]), got {list(np.shape(x))}",
            param=name,
        )
    return a


def explain_pair(
    engine: Engine,
    w: np.ndarray,
    x_obj: np.ndarray,
    x_ref: np.ndarray,
    method: str | Attribution = "parallel",
    path: str | None = None,
    map: str = DEFAULT_MAP,
    **options: Any,
) -> xr.Dataset:
    """The maps of one (object, reference) pair for readout weights w [D]: input_grad (role, color, y, x),
    saliency (role, y, x), role = ["ooc", "reference"], attrs similarity = s_n(o, b) and the attribution.

    `method`, `path` and the path's options as in `explain` (checked before any computation); the
    maps come from the batch explain's own code (`backprop_pairs`). Where the model allows, also
    shared_map_latent and shared_map as in explanations.nc; `map` (role, y, x) is the map chosen by
    `map`: pixel (the saliency), shared, or guided (their product).
    """
    attribution = resolve(method, path, **options)
    weight = np.asarray(w, np.float64)
    D = engine.info.n_features
    if weight.ndim != 1 or weight.shape[0] != D:
        raise UsageError(
            None, f"w must be readout weights [{D}] (the model's features), got {list(weight.shape)}", param="w"
        )
    shape = tuple(engine.info.input_shape)
    x = np.stack([_image(x_obj, "x_obj", shape), _image(x_ref, "x_ref", shape)])
    no_shared = check_map(engine, map)
    phi = engine.features(x)
    v_o, v_b = attribution.cotangents(weight, phi[0], phi[1])
    grads = backprop_pairs(engine, x[None], v_o[None], v_b[None], attribution)[0]
    H, W = grads.shape[-2:]
    saliency = display_map(grads)
    data = {
        "input_grad": (("role", "color", "y", "x"), grads, {"long_name": "J_phi(x)^T v, the raw input gradient"}),
        "saliency": (
            ("role", "y", "x"),
            saliency,
            {"long_name": "sum over colour of |input_grad| (display map, unsmoothed)"},
        ),
    }
    attrs = {"similarity": float(similarities(weight, phi[0], phi[1][None])[0]), **attribution.attrs(), "map": map}
    chosen = saliency
    if no_shared is None:
        shape = engine.map_shape
        a = engine.spatial_maps(x) if engine.pooled else phi
        wt = weight if engine.pooled else channels_first(weight, shape)
        m = shared_maps(wt, channels_first(a[0], shape), channels_first(a[1], shape), engine.pooled)
        latent = np.stack([on_grid(mi.reshape(-1), shape) for mi in m])
        up = upsample_map(latent, (H, W)).astype(np.float32)
        data["shared_map_latent"] = (("role", "latent_y", "latent_x"), latent, {"long_name": "shared map M"})
        data["shared_map"] = (("role", "y", "x"), up, {"long_name": "shared map M upsampled, times h*w/(H*W)"})
        chosen = {"pixel": saliency, "shared": up, "guided": saliency * up}[map]
    else:
        attrs["shared_map"] = f"not computed: {no_shared}"
    data["map"] = (("role", "y", "x"), chosen, {"long_name": f"the {map} map"})
    return xr.Dataset(
        data,
        coords={"role": list(ROLES), "color": list(COLORS), "y": np.arange(H), "x": np.arange(W)},
        attrs=attrs,
    )
