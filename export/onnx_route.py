"""The ONNX-graph export route, both front ends: an ONNX forward model -> the adjoint transform ->
verified, described, written atomically.

`export_onnx` takes an ONNX file from any exporter and needs no torch: it verifies against central
finite differences of a float64 copy of the forward graph (export/graph/fd.py). `export_torch_graph`
takes a torchvision backbone (torch imported inside it), exports its truncated forward with
torch.onnx and verifies against torch autograd. Both share the transform, the
consistency checks of the graph's parts, the metadata and the atomic write.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

import pbv_onnx
from pbv_onnx.base.atomic import atomic_file, check_writable
from pbv_onnx.base.errors import ModelError, PbvError, UsageError
from pbv_onnx.runtime.fp16 import FP32_ONLY_KEY
from pbv_onnx.runtime.images import Preprocessing
from pbv_onnx.runtime.modelfile import (
    COTANGENT,
    COTANGENTS,
    DEFAULT_GRAD_TOLERANCE,
    DEFAULT_TOLERANCE,
    FEATURE_MAP,
    FEATURES,
    FORMAT_VERSION,
    IMAGE,
    INPUT_GRAD,
    INPUT_GRADS,
    MULTI_COTANGENT,
    features_subgraph,
    file_sha256,
    multi_subgraph,
    read_info,
    read_model,
    vjp_subgraph,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POOLS = ("none", "avg", "cls")
# Gradient directions probed per image by the finite-difference check (export/graph/fd.py).
FD_DIRECTIONS = 6


def _log(msg: str) -> None:
    logging.getLogger(__name__).info(msg)


@dataclass
class ExportResult:
    """What an export wrote (both routes)."""

    path: Path
    feature_shape: tuple[int, ...]
    verification: dict
    seconds: float


# -- preprocessing (torch-free; export/backbone.py re-exports these) --------------------------------------
def parse_size(text: str | None, option: str) -> int | tuple[int, int] | None:
    """'224' -> 224, '224x200' -> (224, 200) (height x width)."""
    if text is None:
        return None
    try:
        parts = [int(p) for p in str(text).lower().split("x")]
    except ValueError:
        raise UsageError(None, f"{option} must be N or HxW (e.g. 224 or 224x224), not {text!r}", param=option) from None
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise UsageError(None, f"{option} must be N or HxW with positive sizes, not {text!r}", param=option)
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def build_preprocessing(
    from_weights: Preprocessing | None, resize: str | None = None, crop: str | None = None, mean=None, std=None
) -> Preprocessing:
    """The spec from torchvision weights, or the defaults (224x224, ImageNet stats); options override."""
    base = from_weights or Preprocessing(resize=(224, 224), crop=None, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    r = parse_size(resize, "resize")
    c = parse_size(crop, "crop")
    new_resize = base.resize if r is None else r
    new_crop = base.crop if c is None else (c, c) if isinstance(c, int) else c
    if r is not None and c is None and from_weights is not None:
        new_crop = None if not isinstance(r, int) else base.crop  # an exact size needs no crop
    if mean is not None and (len(mean) != 3):
        raise UsageError(None, "mean takes three values (R G B)", param="mean")
    if mean is not None and not all(0.0 <= float(v) <= 1.0 for v in mean):
        # a 0-255 mean (Keras' and Caffe's convention) would make every image nearly constant
        raise UsageError(
            None,
            f"mean {' '.join(f'{float(v):g}' for v in mean)} is not a pixel value: images are read as pixels "
            "in [0, 1]; for a model that takes [0, 255] pixels give mean 0 0 0 with std 1/255 (0.00392) "
            "each, and divide statistics given in 0-255 units by 255",
            param="mean",
        )
    if std is not None and (len(std) != 3 or min(std) <= 0):
        raise UsageError(None, "std takes three positive values (R G B)", param="std")
    spec = Preprocessing(
        resize=new_resize,
        crop=new_crop,
        mean=tuple(float(v) for v in (mean or base.mean)),
        std=tuple(float(v) for v in (std or base.std)),
        interpolation=base.interpolation,
    )
    if isinstance(spec.resize, int) and spec.crop is None:
        raise UsageError(
            None,
            f"resize={spec.resize} resizes the shorter side only; add crop to fix the input size",
            param=("resize", "crop"),
        )
    if (
        spec.crop is not None
        and not isinstance(spec.resize, int)
        and (spec.crop[0] > spec.resize[0] or spec.crop[1] > spec.resize[1])
    ):
        raise UsageError(None, f"crop={spec.crop} is larger than resize={spec.resize}", param=("crop", "resize"))
    return spec


# -- verification inputs ----------------------------------------------------------------------------------
def probe_images(
    spec: Preprocessing, n: int, images: list[Path] | None = None, seed: int = 0
) -> tuple[np.ndarray, str]:
    """Real photographs (given, else the shared or scikit-image sample photos) with a half-LSB dither,
    else seeded smooth noise; normalised as `spec` says."""
    from pbv_onnx.runtime.images import load_batch, real_photos

    if images is None:
        images = real_photos()
    if images:
        chosen = [images[int(i)] for i in np.linspace(0, len(images) - 1, min(n, len(images)))]
        x = load_batch(chosen, spec)
        # the dither makes exact ties (ReLU at 0, equal max-pool candidates in saturated regions) rare
        noise = np.random.default_rng(seed).uniform(-0.5, 0.5, x.shape) / 255.0
        x = (x + noise / np.reshape(spec.std, (1, 3, 1, 1))).astype(np.float32)
        return x, "photos (+half-LSB dither): " + ", ".join(p.name for p in chosen)
    rng = np.random.default_rng(seed)
    h, w = spec.input_size
    ch, cw = max(2, h // 16), max(2, w // 16)
    coarse = rng.uniform(0, 1, (n, 3, ch, cw))

    def interp(size: int, coarse_size: int) -> np.ndarray:  # [size, coarse_size] linear interpolation
        pos = np.linspace(0, coarse_size - 1, size)
        return np.maximum(0, 1 - np.abs(pos[:, None] - np.arange(coarse_size)[None]))

    # photo-like low frequencies (a bilinear upsampled coarse grid) plus a little fine noise
    img = interp(h, ch) @ coarse @ interp(w, cw).T + rng.normal(0, 0.02, (n, 3, h, w))
    x = (np.clip(img, 0, 1) - np.reshape(spec.mean, (1, 3, 1, 1))) / np.reshape(spec.std, (1, 3, 1, 1))
    return x.astype(np.float32), f"{n} seeded smooth noise images (no photos found)"


# -- the shared assembly ----------------------------------------------------------------------------------
def _session(proto):
    import onnxruntime as ort

    from pbv_onnx.runtime.sessions import session_options

    data = proto if isinstance(proto, bytes) else proto.SerializeToString()
    return ort.InferenceSession(data, session_options(), providers=["CPUExecutionProvider"])


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{exc.__class__.__name__}: {text.splitlines()[0]}" if text else exc.__class__.__name__


def run_transform(model, cut: str | None, pool: str, input_size: tuple[int, int], path: Path | None):
    """The adjoint transform (export/graph/transform.build: model, rules used, shapes), its failures one-line
    errors naming the file (UnsupportedOp, exit code 4, as it is)."""
    from pbv_onnx.export.graph.transform import build

    try:
        return build(model, cut=cut, pool=pool, input_size=input_size)
    except PbvError as exc:
        if exc.path is None and path is not None:
            exc.path = str(path)
            exc.args = (str(exc),)
        raise
    except Exception as exc:
        raise ModelError(path, f"the adjoint transform failed ({_first_line(exc)})") from None


def rules_of(built) -> tuple[dict, dict]:
    """The `adjoint` and `fp32_only` metadata of a transformed graph (from the rules it used)."""
    from pbv_onnx.export.graph.transform import describe, fp32_table

    return describe(built.rules, built.patterns), fp32_table([*built.rules, *built.patterns])


def consistency(proto, x: np.ndarray, feature_shape: tuple[int, ...], seed: int = 0, k: int = 2) -> dict[str, float]:
    """The checks of the graph's parts, as the Engine runs them: the features-only
    subgraph vs the VJP graph's features, K cotangents per image in one call vs one call each, and the
    whole graph fed (image, cotangent) vs its (image, cotangent) -> input_grad part."""
    from pbv_onnx.export.graph.fd import rel_l2

    # one session at a time (each holds its own copy of the weights and activations: vit_b_16 ~1 GB)
    single = _session(vjp_subgraph(proto))
    zeros = np.zeros((len(x), *feature_shape), np.float32)
    vjp_feats = single.run([FEATURES], {IMAGE: x, COTANGENT: zeros})[0]
    rng = np.random.default_rng(seed + 1)
    cots = rng.standard_normal((len(x), k, *feature_shape)).astype(np.float32)
    ones = [single.run([INPUT_GRAD], {IMAGE: x, COTANGENT: cots[:, j]})[0] for j in range(k)]
    cot0 = np.random.default_rng(seed + 2).standard_normal((len(x), *feature_shape)).astype(np.float32)
    part = single.run([INPUT_GRAD], {IMAGE: x, COTANGENT: cot0})[0]
    del single
    fwd_only = _session(features_subgraph(proto)).run([FEATURES], {IMAGE: x})[0]
    fwd_err = max(rel_l2(a, b) for a, b in zip(fwd_only, vjp_feats))
    grads = _session(multi_subgraph(proto)).run([INPUT_GRADS], {IMAGE: x, COTANGENTS: cots.reshape(-1, *feature_shape)})
    grads = grads[0].reshape(len(x), k, *x.shape[1:])
    multi_err = 0.0
    for j in range(k):
        multi_err = max([multi_err] + [rel_l2(a, b) for a, b in zip(grads[:, j], ones[j])])
    whole = _session(proto).run([INPUT_GRAD], {IMAGE: x, COTANGENT: cot0})[0]
    whole_err = max(rel_l2(a, b) for a, b in zip(whole, part))
    return {
        "features_only_vs_vjp_graph": fwd_err,
        "multi_cotangent_vs_single": multi_err,
        "whole_graph_vs_parts": whole_err,
    }


def refuse_inconsistent(out: Path, checks: dict[str, float], tolerance: float) -> None:
    """ModelError (nothing written) when a part of the graph disagrees with another beyond `tolerance`."""
    what = {
        "multi_cotangent_vs_single": "K cotangents per image in one call disagree with one call per cotangent",
        "whole_graph_vs_parts": "the whole graph fed (image, cotangent) disagrees with its (image, cotangent) "
        "-> input_grad part",
        "features_only_vs_vjp_graph": "the features-only subgraph disagrees with the VJP graph's features",
    }
    for key, text in what.items():
        if not checks[key] <= tolerance:
            raise ModelError(out, f"export refused: {text} ({checks[key]:.1e}); nothing written")


def write_model(proto, meta: dict[str, Any], out: Path, force: bool) -> None:
    """Metadata as JSON values, then an atomic write that must read back as a pbv-onnx model."""
    import onnx

    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=json.dumps(value))
    proto.producer_name = "pbv-onnx export"
    with atomic_file(out, force) as tmp:
        onnx.save(proto, str(tmp))
        read_info(tmp)


def feature_shape_of(proto, x: np.ndarray) -> tuple[int, ...]:
    """The per-image feature shape, as the features-only part computes it on `x[:1]`."""
    return tuple(int(v) for v in _session(features_subgraph(proto)).run([FEATURES], {IMAGE: x[:1]})[0].shape[1:])


# -- front end 1: an ONNX file, no torch --------------------------------------------------------------------
def image_input(model, path: Path) -> tuple[str, tuple[int | None, int | None]]:
    """The one image input [N, 3, H, W] (name, (H, W) where fixed), or a ModelError naming the file."""
    from onnx import TensorProto

    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]

    def desc(i) -> str:
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in i.type.tensor_type.shape.dim]
        return f"{i.name} {dims}"

    wanted = "the transform needs one image input [N, 3, H, W] (float32)"
    if len(inputs) != 1:
        listed = ", ".join(desc(i) for i in inputs) or "none"
        raise ModelError(path, f"{wanted}; this model has {len(inputs)} inputs ({listed})")
    (inp,) = inputs
    tt = inp.type.tensor_type
    dims = list(tt.shape.dim)
    three = len(dims) == 4 and dims[1].HasField("dim_value") and dims[1].dim_value == 3
    if tt.elem_type != TensorProto.FLOAT or not three:
        kind = TensorProto.DataType.Name(tt.elem_type)
        raise ModelError(path, f"{wanted}; its input is {desc(inp)} of ONNX type {kind}")
    hw = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims[2:])
    return inp.name, hw  # type: ignore[return-value]


def cut_names(model) -> list[tuple[str, str, Any]]:
    """list_layers: (tensor name, op type, shape, layout) of the tensors one can cut at."""
    from pbv_onnx.export.graph.layers import list_layers

    return list_layers(model, with_layout=True)


def check_layer(model, layer: str, path: Path) -> None:
    """UsageError naming the file when `layer` is not a tensor one can cut at (with a few that are)."""
    names = [row[0] for row in cut_names(model)]
    if layer in names:
        return
    close = [n for n in names if layer.lower() in n.lower() or n.lower() in layer.lower()][:5]
    few = close or names[-5:]
    raise UsageError(
        path,
        f"layer={layer!r} is not a tensor of the model one can cut at (e.g. {', '.join(few)}; "
        f"`pbv-onnx info --layers {path.name}` lists all {len(names)})",
        param="layer",
    )


def onnx_preprocessing(hw, resize, crop, mean, std, path: Path) -> Preprocessing:
    """The spec for an ONNX file: its fixed H x W unless resize says otherwise; mean and std given."""
    if mean is None or std is None:
        raise UsageError(
            path,
            "an ONNX file does not say how its images are normalised: pass mean and std (R G B each)",
            param=("mean", "std"),
        )
    if resize is None:
        if None in hw:
            raise UsageError(path, "the model's input size is not fixed: pass resize (HxW)", param="resize")
        resize = f"{hw[0]}x{hw[1]}"
    spec = build_preprocessing(None, resize, crop, mean, std)
    fixed = tuple(hw)
    if None not in fixed and tuple(spec.input_size) != fixed:
        # a graph exported at a fixed size may hard-code it (reshapes to a token count): say so early
        _log(
            f"{path.name}: input fixed at {fixed[0]}x{fixed[1]} in the file; transforming at "
            f"{spec.input_size[0]}x{spec.input_size[1]} as resize/crop say"
        )
    return spec


def export_onnx(
    onnx_file: str | Path,
    out: str | Path,
    layer: str | None = None,
    pool: str = "none",
    resize: str | None = None,
    crop: str | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    arch_name: str | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    grad_tolerance: float = DEFAULT_GRAD_TOLERANCE,
    n_images: int = 3,
    n_directions: int = FD_DIRECTIONS,
    seed: int = 0,
    force: bool = False,
    images: list[Path] | None = None,
    progress: Callable[[str], None] | None = _log,
) -> ExportResult:
    """Export an ONNX forward model (any exporter; one image input [N, 3, H, W]) cut at tensor `layer`
    with its gradient graph, verified against finite differences of a float64 copy, written atomically.

    No torch needed. Beyond `tolerance` (features) or `grad_tolerance` (directional derivatives of
    input_grad) raises ModelError and writes nothing."""
    from pbv_onnx.export.graph import fd
    from pbv_onnx.export.graph.axes import turned_perm
    from pbv_onnx.export.graph.prepare import as_float32, channels_first

    t0 = time.perf_counter()
    say = progress or (lambda msg: None)
    path = Path(onnx_file)
    out = check_writable(out, force)
    _check_options(pool, tolerance, grad_tolerance)
    _, model, _ = read_model(path)
    channels_last = channels_first(model)  # the reference below runs the same [N, 3, H, W] graph
    if channels_last:
        say(f"{path.name} takes channels-last images [N, H, W, 3]: a Transpose from [N, 3, H, W] goes first")
    model, half = as_float32(model)
    if half:
        say(f"{path.name} computes in float16: converted to float32 (weights upcast exactly)")
    if any(p.key == "format_version" for p in model.metadata_props) and any(
        o.name == INPUT_GRAD for o in model.graph.output
    ):
        raise ModelError(path, "is already a pbv-onnx model with its gradient graph; pass the forward model")
    _, hw = image_input(model, path)
    spec = onnx_preprocessing(hw, resize, crop, mean, std, path)
    if layer:
        check_layer(model, layer, path)
    say(f"transforming {path.name} (cut at {layer or 'the output'}, pool {pool}, input {spec.input_size})")
    built = run_transform(model, layer, pool, tuple(spec.input_size), path)
    proto = built.model
    layer_layout = layout_said(built, layer or model.graph.output[0].name, say)
    built.prep.shed()  # the checks below run the built model, which holds its own weights

    x, inputs_desc = probe_images(spec, n_images, images, seed)
    feature_shape = feature_shape_of(proto, x)
    say(f"verifying against finite differences of a float64 copy on {len(x)} images, {n_directions} directions each")
    try:
        # prepare turned a channels-last cut ([N, h, w, C]: tf2onnx, jax2onnx) to [N, C, h, w], or tokens
        # [N, C, T] to [N, T, C]: the float64 reference reads the layer turned the same way
        forward = fd.Forward64(model, layer, "none", perm=turned_perm(built.prep.model))
        fmap64 = forward(x)
        source = {"source_opset": _opset(model), "source_producer": _producer(model)}
        del model  # the reference holds its own float64 copy; the built model its own weights
    except Exception as exc:
        size = f"{spec.input_size[0]}x{spec.input_size[1]}"
        raise ModelError(path, f"the forward graph does not run in float64 at {size} ({_first_line(exc)})") from None
    feats64 = fd.pool_features(fmap64, pool)
    spread = feature_spread(feats64)
    session = _session(vjp_subgraph(proto))
    rng = np.random.default_rng(seed)
    feats = session.run([FEATURES], {IMAGE: x, COTANGENT: np.zeros((len(x), *feature_shape), np.float32)})[0]
    if feats.shape != feats64.shape:
        raise ModelError(
            path,
            f"the transformed graph's features {list(feats.shape)} differ in shape from the "
            f"forward graph's {list(feats64.shape)}",
        )
    cots = {"gaussian": rng.standard_normal(feats.shape).astype(np.float32), "features": feats.astype(np.float32)}
    grads = {kind: session.run([INPUT_GRAD], {IMAGE: x, COTANGENT: c})[0] for kind, c in cots.items()}
    del session  # its weights and activations, before the next sessions
    errors = {"features": max(fd.rel_l2(a, b) for a, b in zip(feats, feats64))}
    if pool != "none" and FEATURE_MAP in {o.name for o in proto.graph.output}:
        fmap = _session(fd_feature_map_graph(proto)).run([FEATURE_MAP], {IMAGE: x})[0]
        errors["feature_map"] = max(fd.rel_l2(a, b) for a, b in zip(fmap, fmap64))
    fd_err = fd.directional_errors(
        lambda z, f=forward: fd.pool_features(f(z), pool),
        x,
        cots,
        grads,
        n_directions=n_directions,
        seed=seed,
        scale_kind="gaussian",
    )
    steps = fd_err.pop("steps")
    floored = fd_err.pop("floored")
    unmoved = fd_err.pop("unmoved")
    if unmoved:
        raise ModelError(
            path,
            f"export refused: its features do not change with the image on {unmoved} of {len(x)} verification "
            "images (central differences along every direction are exactly 0): a saturated or dead network, "
            "as some random initialisations give, has no gradient to check or explain; nothing written",
        )
    errors.update(fd_err)
    del forward  # before consistency's sessions: the reference's float64 weights (vit_b_16: 0.7 GB)
    checks = consistency(proto, x, feature_shape, seed)
    limits = {k: (grad_tolerance if k.startswith("input_grad") else tolerance) for k in errors}
    verification = {
        "reference": "float64 copy of the forward graph (onnx reference evaluator); input_grad by central "
        "finite differences along random unit directions",
        "tolerance": tolerance,
        "grad_tolerance": grad_tolerance,
        "rule": "ort_vs_float64: features (and feature_map) <= tolerance; input_grad: the directional "
        "derivatives u . input_grad vs central differences of c . features, <= grad_tolerance",
        "limits": limits,
        "metric": "relative L2 ||a-b||/||b||, worst image (input_grad: over its directions; a cotangent's "
        f"||b|| taken at least {fd.FLOOR:g} x a Gaussian cotangent's per unit of cotangent norm)",
        "floored": floored,
        "n_images": int(len(x)),
        "feature_spread": spread,
        "inputs": inputs_desc,
        "cotangents": list(cots),
        "directions": int(n_directions),
        "step": f"{fd.DEFAULT_STEP:g} x ||x|| per image (unit directions)",
        "steps": steps,
        "errors": {"ort_vs_float64": errors},
        **checks,
        "runtime": f"onnxruntime {_ort_version()} CPU",
    }
    worst = max(errors, key=lambda k: errors[k] / limits[k])
    if not errors[worst] <= limits[worst]:
        why = ""
        if worst.startswith("input_grad") and spread < SATURATED_SPREAD:
            why = (
                f"; its features barely change with the image (relative spread {spread:.1e} across the "
                "verification images): a saturated network, as some random initialisations give, whose "
                "gradients float32 cannot resolve"
            )
        raise ModelError(
            out,
            f"export refused: onnxruntime differs from the float64 forward graph in {worst} by "
            f"{errors[worst]:.2e} relative L2 (limit {limits[worst]:.1e}){why}; nothing written",
        )
    refuse_inconsistent(out, checks, tolerance)

    import onnx

    versions = {
        "onnx_opset": _opset(proto),
        **source,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "pbv_onnx": pbv_onnx.__version__,
    }
    weights = {"source": "onnx", "file": path.name, "sha256": file_sha256(path)}
    if channels_last:
        weights["input_layout"] = "NHWC in the file; a Transpose from the format's NCHW put first"
    if layer_layout:
        weights["layer_layout"] = layer_layout
    if half:
        weights["precision"] = "float16 in the file; the model computes in float32 from the same weights"
    head = {"arch": arch_name or path.stem, "layer": layer or "", "pool": pool, "weights": weights}
    worst_text = f"worst error {errors[worst]:.1e} in {worst}, limit {limits[worst]:.1e}"
    return finish(proto, built, out, force, head, spec, versions, verification, worst_text, t0, say)


def layout_said(built, layer: str, say: Callable[[str], None]) -> str:
    """How the cut's axes are read (axes.layout_note: turned, or not followed and read as the
    format's), said once; "" where the layer is in the format's layout already."""
    from pbv_onnx.export.graph.axes import layout_note

    prep = built.prep
    note = layout_note(prep.cut_layout, len(prep.shapes[prep.cut]))
    if note:
        say(f"tensor {layer}: {note}")
    return note


def finish(
    proto,
    built,
    out: Path,
    force: bool,
    head: dict,
    spec: Preprocessing,
    versions: dict,
    verification: dict,
    worst_text: str,
    t0: float,
    say: Callable[[str], None],
) -> ExportResult:
    """Both routes' last step: the model's metadata (head: arch, layer, pool, weights), the atomic
    write, one line on what was written."""
    adjoint, fp32 = rules_of(built)
    feature_shape = tuple(built.feature_shape)
    meta = {
        "format_version": FORMAT_VERSION,
        "arch": head["arch"],
        "layer": head["layer"],
        "pool": head["pool"],
        "feature_shape": list(feature_shape),
        "preprocessing": spec.to_dict(),
        "weights": head["weights"],
        "versions": versions,
        "verification": verification,
        "adjoint": adjoint,
        MULTI_COTANGENT: True,
        FP32_ONLY_KEY: fp32,
    }
    if built.prep.rebatched:  # the file fixed its batch size: what was rewritten to free it
        meta["batch_free"] = {"rewrites": len(built.prep.rebatched), "notes": built.prep.rebatched}
    write_model(proto, meta, out, force)
    seconds = time.perf_counter() - t0
    say(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB; {worst_text}; {seconds:.0f} s)")
    return ExportResult(path=out, feature_shape=feature_shape, verification=verification, seconds=seconds)


# features that vary across photographs by less than this (relative), about 100 float32 roundings,
# come from a saturated network: a refused gradient check says so
SATURATED_SPREAD = 1e-5


def feature_spread(feats: np.ndarray) -> float:
    """How far the images' features are from their mean, relative: max_i ||f_i - mean|| / ||mean||."""
    f = np.asarray(feats, np.float64).reshape(len(feats), -1)
    mean = f.mean(axis=0)
    den = float(np.linalg.norm(mean))
    num = float(np.max(np.linalg.norm(f - mean, axis=1)))
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def fd_feature_map_graph(proto):
    """The image -> feature_map part."""
    from pbv_onnx.runtime.modelfile import subgraph

    return subgraph(proto, [IMAGE], [FEATURE_MAP])


def _producer(model) -> str | None:
    return f"{model.producer_name} {model.producer_version}".strip() or None


def _opset(model) -> int | None:
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _check_options(pool: str, tolerance: float, grad_tolerance: float) -> None:
    if pool not in POOLS:
        raise UsageError(None, f"pool must be one of {', '.join(POOLS)}, not {pool!r}", param="pool")
    for name, value in (("tolerance", tolerance), ("grad_tolerance", grad_tolerance)):
        if not 0 < value < 1:
            raise UsageError(None, f"{name} must be in (0, 1), not {value}", param=name)


# -- front end 2: a torch backbone, exported by torch.onnx, verified against torch autograd ---------------
EXPORTERS = ("torchscript", "dynamo")
DYNAMO_MIN_OPSET = 18  # the opset torch's dynamo exporter writes at least


def torch_forward_proto(cut, input_shape: tuple[int, ...], opset: int, exporter: str = "torchscript"):
    """The truncated forward as an ONNX ModelProto, dynamic batch: torch.onnx's TorchScript exporter
    (dynamo=False, deprecated by torch) or its torch.export-based one (dynamo=True, opset 18 or later)."""
    import contextlib
    import io
    import warnings

    import onnx
    import torch

    if exporter not in EXPORTERS:
        raise UsageError(None, f"exporter must be one of {', '.join(EXPORTERS)}, not {exporter!r}", param="exporter")
    buf = io.BytesIO()
    x = (torch.zeros((2, *input_shape)),)
    # eval-mode attention without gradients takes torch's fused fast path, an op torch.onnx cannot export
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                from pbv_onnx.export.backbone import run_to_end

                batch = torch.export.Dim("N", min=1, max=4096)
                with contextlib.redirect_stdout(io.StringIO()):  # its progress lines
                    program = torch.onnx.export(
                        run_to_end(cut),
                        x,
                        dynamo=True,
                        opset_version=max(opset, DYNAMO_MIN_OPSET),
                        input_names=[IMAGE],
                        output_names=["cut"],
                        dynamic_shapes=({0: batch},),
                        verbose=False,
                    )
                return program.model_proto
            torch.onnx.export(
                cut,
                x,
                buf,
                dynamo=False,
                opset_version=opset,
                input_names=[IMAGE],
                output_names=["cut"],
                dynamic_axes={IMAGE: {0: "N"}, "cut": {0: "N"}},
                do_constant_folding=True,
            )
    except PbvError:
        raise
    except Exception as exc:
        raise ModelError(None, f"torch.onnx.export of the truncated forward failed ({_first_line(exc)})") from None
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return onnx.load_from_string(buf.getvalue())


def undo_initializer_dedup(proto) -> None:
    """Turn `Identity(initializer)` nodes back into initializers, in place.

    torch.onnx replaces initializers with equal values (e.g. BatchNorm weights that are all ones) by
    Identity nodes; onnxruntime's Conv+BatchNorm fusion then drops Identity outputs that the adjoint
    still reads. Such parameters are per-channel vectors, so copying them is cheap."""
    inits = {t.name: t for t in proto.graph.initializer}
    keep = []
    for node in proto.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            copy = proto.graph.initializer.add()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
        else:
            keep.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(keep)


def export_torch_graph(
    out: str | Path,
    module,
    arch: str,
    layer: str | None,
    pool: str,
    spec: Preprocessing,
    weights_record: dict[str, Any],
    seed: int = 0,
    opset: int = 17,
    tolerance: float = DEFAULT_TOLERANCE,
    grad_tolerance: float = DEFAULT_GRAD_TOLERANCE,
    force: bool = False,
    n_images: int = 4,
    images: list[Path] | None = None,
    progress: Callable[[str], None] | None = _log,
    exporter: str = "torchscript",
) -> ExportResult:
    """Export a torch `module` cut at module `layer` through the ONNX-graph transform: torch.onnx exports
    the truncated forward (`exporter`: torchscript or dynamo), the transform adds the gradient graph,
    torch autograd (float32 and float64) verifies it. Random weights come redrawn at order 1 from
    backbone.load_backbone (recorded in weights_record)."""
    import onnx
    import torch
    import torchvision

    from pbv_onnx.export import backbone, verify
    from pbv_onnx.export.graph.axes import turned_perm

    t0 = time.perf_counter()
    say = progress or (lambda msg: None)
    out = check_writable(out, force)
    _check_options(pool, tolerance, grad_tolerance)
    module = module.eval().requires_grad_(False)
    cut, net = backbone.truncate_for_graph(module, layer, pool)
    input_shape = (3, *spec.input_size)
    if exporter == "dynamo":
        opset = max(opset, DYNAMO_MIN_OPSET)
    say(f"exporting the forward pass up to {layer or 'the output'} with torch.onnx ({exporter}, opset {opset})")
    forward = torch_forward_proto(cut, input_shape, opset, exporter)
    undo_initializer_dedup(forward)
    say(f"building the gradient graph (ONNX-graph transform, pool {pool})")
    built = run_transform(forward, None, pool, tuple(spec.input_size), None)
    proto = built.model
    feature_shape = tuple(built.feature_shape)
    net.perm = turned_perm(built.prep.model)  # torch's reference reads the layer as the model now does
    layer_layout = layout_said(built, layer or "the output", say)
    if layer_layout:
        weights_record = {**weights_record, "layer_layout": layer_layout}
    built.prep.shed()  # the checks below run the built model, which holds its own weights

    x, inputs_desc = verify.verification_images(spec, n_images, images)
    say(f"verifying onnxruntime against torch autograd on {len(x)} images ({inputs_desc.split(':')[0]})")
    session = _session(vjp_subgraph(proto))
    errors = verify.measure(session, net, x, seed)
    del session  # its weights and activations, before the next sessions
    cotangents = errors.pop("cotangents")
    extra = {}
    if pool != "none":
        with torch.no_grad():
            fmap = cut(torch.from_numpy(x)).numpy()
        got = _session(fd_feature_map_graph(proto)).run([FEATURE_MAP], {IMAGE: x})[0]
        extra["feature_map_vs_torch32"] = max(verify.rel_l2(a, b) for a, b in zip(got, fmap))
    checks = consistency(proto, x, feature_shape, seed)
    verification = {
        "reference": "torch autograd (float32 and float64) of the truncated network",
        **verify.torch_record(errors, cotangents, tolerance, grad_tolerance, len(x), inputs_desc),
        **extra,
        **checks,
        "runtime": f"onnxruntime {_ort_version()} CPU",
    }
    what, err, limit = verify.refuse_beyond_limits(out, errors, tolerance, grad_tolerance)
    if not extra.get("feature_map_vs_torch32", 0.0) <= tolerance:
        raise ModelError(
            out,
            f"export refused: feature_map differs from torch by {extra['feature_map_vs_torch32']:.1e}; nothing written",
        )
    refuse_inconsistent(out, checks, tolerance)
    versions = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torch_onnx_exporter": exporter,
        "onnx_opset": _opset(proto),
        "onnx": onnx.__version__,
        "pbv_onnx": pbv_onnx.__version__,
    }
    head = {"arch": arch, "layer": layer or "", "pool": pool, "weights": weights_record}
    worst_text = f"worst error {err:.1e} in {what}, limit {limit:.1e}"
    return finish(proto, built, out, force, head, spec, versions, verification, worst_text, t0, say)
