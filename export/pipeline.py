"""The export stage end to end: backbone -> truncated fx graph -> VJP graph -> ONNX, verified, written."""

from __future__ import annotations

import io
import logging
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torchvision
from torch import nn

import pbv_onnx
from pbv_onnx.base.atomic import check_writable
from pbv_onnx.base.errors import ModelError, UsageError
from pbv_onnx.export import backbone, verify
from pbv_onnx.export.adjoint import VJPModule, describe, fp32_table
from pbv_onnx.export.onnx_route import ExportResult, write_model
from pbv_onnx.runtime.engine import COTANGENT, COTANGENTS, FEATURES, IMAGE, INPUT_GRAD, INPUT_GRADS
from pbv_onnx.runtime.fp16 import FP32_ONLY_KEY
from pbv_onnx.runtime.images import Preprocessing
from pbv_onnx.runtime.modelfile import (
    DEFAULT_GRAD_TOLERANCE,
    DEFAULT_OPSET,
    DEFAULT_TOLERANCE,
    FEATURE_MAP,
    FORMAT_VERSION,
    MULTI_COTANGENT,
    features_subgraph,
    multi_subgraph,
    vjp_subgraph,
)
from pbv_onnx.runtime.sessions import session_options


def _log(msg: str) -> None:
    logging.getLogger(__name__).info(msg)


def to_onnx(vjp: nn.Module, input_shape: tuple[int, ...], feature_shape: tuple[int, ...], opset: int) -> bytes:
    """Serialise the VJP module with dynamic batch axes (legacy TorchScript exporter)."""
    image = torch.zeros((2, *input_shape))
    cot = torch.zeros((2, *feature_shape))
    cots = torch.zeros((4, *feature_shape))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # No constant folding: the adjoint's weight transposes stay ops on the shared initializers
        # (onnxruntime folds them at session start), so the file holds each weight once.
        torch.onnx.export(
            vjp,
            (image, cot, cots),
            buf,
            dynamo=False,
            opset_version=opset,
            input_names=[IMAGE, COTANGENT, COTANGENTS],
            output_names=[FEATURES, INPUT_GRAD, INPUT_GRADS]
            + ([FEATURE_MAP] if getattr(vjp, "_feature_map", None) is not None else []),
            # cotangent shares the image's batch axis (one per image); cotangents
            # hold K rows per image (N*K), a batch axis of their own
            dynamic_axes={
                IMAGE: {0: "N"},
                FEATURES: {0: "N"},
                COTANGENT: {0: "N"},
                INPUT_GRAD: {0: "N"},
                COTANGENTS: {0: "NK"},
                INPUT_GRADS: {0: "NK"},
                FEATURE_MAP: {0: "N"},
            },
            do_constant_folding=False,
        )
    return buf.getvalue()


def default_empty_cotangents(proto, feature_shape: tuple[int, ...]) -> None:
    """Give `cotangents` an empty default, in place: (image, cotangent) alone then runs the whole
    graph, as the export format's interface says, the multi-cotangent pass on no rows."""
    from onnx import numpy_helper

    proto.graph.initializer.append(numpy_helper.from_array(np.zeros((0, *feature_shape), np.float32), COTANGENTS))


def undo_initializer_dedup(proto) -> None:
    """Turn `Identity(initializer)` nodes back into initializers, in place.

    The exporter replaces initializers with equal values (e.g. BatchNorm weights that are all
    ones) by Identity nodes; onnxruntime's Conv+BatchNorm fusion then drops Identity outputs that
    the adjoint still reads. Such parameters are per-channel vectors, so copying them is cheap.
    """
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


def keep_batch_axis(proto) -> int:
    """Tell shape inference, in place, that a Resize scaling its batch axis by 1 keeps it: ONNX
    infers that axis unknown, and onnxruntime keeps a product in its blocked layout only where it
    can prove both operands' shapes equal (a mask carries the symbolic N), so every mask product
    after an un-pooling ran in the plain layout with layout conversions around it (vgg16's
    one-per-image graph: 36 conversions, 15 with the batch axis kept).
    Each such output gets a value_info with its input's batch axis; repeated until nothing
    changes, since a restored axis can reach further Resizes. Returns how many were annotated."""
    from onnx import numpy_helper

    from pbv_onnx.runtime.layout import inferred_types

    consts = {t.name: t for t in proto.graph.initializer}
    consts.update(
        {
            n.output[0]: n.attribute[0].t
            for n in proto.graph.node
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"
        }
    )
    resizes = []
    for node in proto.graph.node:
        if node.op_type == "Resize" and len(node.input) >= 3 and node.input[2] in consts:
            scales = numpy_helper.to_array(consts[node.input[2]])
            if scales.size and scales[0] == 1.0:
                resizes.append(node)
    if not resizes:
        return 0
    # the graph inputs' named axes (N, NK): shape inference names unknown axes unk__*, not these
    named = {d.dim_param for i in proto.graph.input for d in i.type.tensor_type.shape.dim if d.dim_param}
    done: set[str] = set()
    outputs = {o.name for o in proto.graph.output}  # their types are the exporter's to declare
    while True:
        shapes = inferred_types(proto)
        added = 0
        for node in resizes:
            src, out = shapes.get(node.input[0]), shapes.get(node.output[0])
            if node.output[0] in done | outputs or src is None or out is None or not src.shape.dim:
                continue
            batch = src.shape.dim[0]
            if batch.dim_param not in named:
                continue
            info = proto.graph.value_info.add()
            info.name = node.output[0]
            info.type.tensor_type.CopyFrom(out)
            info.type.tensor_type.shape.dim[0].CopyFrom(batch)
            done.add(node.output[0])
            added += 1
        if not added:
            return len(done)


def vjp_proto(vjp: nn.Module, input_shape: tuple[int, ...], feature_shape: tuple[int, ...], opset: int = DEFAULT_OPSET):
    """The VJP module as an ONNX ModelProto (no metadata yet, not verified)."""
    import onnx

    try:
        model_bytes = to_onnx(vjp, input_shape, feature_shape, opset)
    except Exception as exc:
        raise ModelError(
            None, f"torch.onnx.export failed ({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    proto = onnx.load_from_string(model_bytes)
    undo_initializer_dedup(proto)
    default_empty_cotangents(proto, feature_shape)
    keep_batch_axis(proto)
    return proto


def multi_cotangent_error(
    single, multi, x: np.ndarray, feature_shape: tuple[int, ...], seed: int = 0, k: int = 2
) -> float:
    """Worst relative L2 between input_grads of K cotangents per image in one call ([N*K, ...],
    image-major, the `multi` session) and the same cotangents one call each (the `single`
    session): the multi-cotangent layout is exact."""
    rng = np.random.default_rng(seed + 1)
    cots = rng.standard_normal((len(x), k, *feature_shape)).astype(np.float32)
    grads = multi.run([INPUT_GRADS], {IMAGE: x, COTANGENTS: cots.reshape(-1, *feature_shape)})[0]
    grads = grads.reshape(len(x), k, *x.shape[1:])
    worst = 0.0
    for j in range(k):
        one = single.run([INPUT_GRAD], {IMAGE: x, COTANGENT: cots[:, j]})[0]
        worst = max([worst] + [verify.rel_l2(a, b) for a, b in zip(grads[:, j], one)])
    return worst


def prepool_node(net) -> str:
    """The name of the node feeding the pooling head that backbone.truncate appended (the map before pooling)."""
    hits = [n for n in net.graph.nodes if n.op == "call_module" and n.target == "head.pool"]
    if len(hits) != 1:
        raise ModelError(None, "cannot find the pooling head in the traced network")
    return hits[0].args[0].name


def _session(model_bytes: bytes):
    import onnxruntime as ort

    return ort.InferenceSession(model_bytes, session_options(), providers=["CPUExecutionProvider"])


def export_model(
    out: str | Path,
    arch: str | None = None,
    layer: str | None = None,
    weights: str | None = None,
    seed: int = 0,
    pool: str = "none",
    resize: str | None = None,
    crop: str | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    opset: int = DEFAULT_OPSET,
    tolerance: float = DEFAULT_TOLERANCE,
    grad_tolerance: float = DEFAULT_GRAD_TOLERANCE,
    force: bool = False,
    n_images: int = 4,
    module: nn.Module | None = None,
    preprocessing: Preprocessing | None = None,
    images: list[Path] | None = None,
    progress: Callable[[str], None] | None = _log,
    adjoint: str = "auto",
) -> ExportResult:
    """Export `arch` cut at `layer` (or a given fx-traceable `module`) with its gradient graph.

    `adjoint`: "fx" (hand-written adjoints of the torch.fx graph), "graph" (torch.onnx exports the
    truncated forward, the ONNX-graph transform adds the gradient graph; export/onnx_route.py) or
    "auto" (fx where its adjoints cover the model, else graph).

    `weights` (with `arch`): a torchvision weights name, a state_dict file, or "none" for seeded
    random weights; there is no default. Verifies the ONNX graph against torch autograd before
    writing; beyond `tolerance` (relative L2, worst sample) raises ModelError and writes nothing.
    """
    t0 = time.perf_counter()
    say = progress or (lambda msg: None)
    out = check_writable(out, force)
    for name, value in (("tolerance", tolerance), ("grad_tolerance", grad_tolerance)):
        if not 0 < value < 1:
            raise UsageError(None, f"{name} must be in (0, 1), not {value}", param=name)
    if opset < 16:
        raise UsageError(None, f"opset must be at least 16 (ScatterElements with add), not {opset}", param="opset")
    if module is None:
        if not arch:
            raise UsageError(None, "arch is required", param="arch")
        if not weights:
            raise UsageError(
                None,
                "no weights chosen: pass weights=NAME (torchvision weights, e.g. IMAGENET1K_V1), "
                "weights=PATH (a state_dict file) or weights=none (seeded random weights)",
                param="weights",
            )
        say(f"building {arch} (weights: {weights})")
        bb = backbone.load_backbone(arch, weights, seed)
        net_module, weights_record = bb.model, bb.weights
        spec = preprocessing or backbone.build_preprocessing(bb.preprocessing, resize, crop, mean, std)
    else:
        arch = arch or type(module).__name__
        net_module = module.eval().requires_grad_(False)
        weights_record = {"source": "module", "class": type(module).__name__}
        spec = preprocessing or backbone.build_preprocessing(None, resize, crop, mean, std)
    if adjoint not in ("auto", "fx", "graph"):
        raise UsageError(None, f"adjoint must be auto, fx or graph, not {adjoint!r}", param="adjoint")
    input_shape = (3, *spec.input_size)
    if adjoint != "graph" and pool != "cls":
        say(f"tracing up to {layer or 'the output'}" + (" + global average pooling" if pool == "avg" else ""))
        try:
            net = backbone.truncate(net_module, layer, pool)
            # a pooled model also outputs the map before pooling (the shared map needs it; docs/formats.md)
            vjp = VJPModule(net, input_shape, feature_map=prepool_node(net) if pool != "none" else None)
        except ModelError as exc:  # untraceable, or an fx node without an adjoint rule
            if adjoint == "fx":
                raise
            say(f"the fx adjoints do not cover this model ({exc.message.split(';')[0]}): ONNX-graph transform")
            adjoint = "graph"
    elif adjoint == "fx":
        raise UsageError(None, "pool=cls needs the ONNX-graph transform (adjoint=graph or auto)", param="pool")
    else:
        adjoint = "graph"
    if adjoint == "graph":
        from pbv_onnx.export import onnx_route

        return onnx_route.export_torch_graph(
            out, net_module, arch, layer, pool, spec, weights_record, seed, opset, tolerance, grad_tolerance,
            force, n_images, images, progress,
        )  # fmt: skip
    with torch.no_grad():
        feature_shape = tuple(net(torch.zeros((1, *input_shape))).shape[1:])

    say(f"exporting the gradient graph to ONNX (opset {opset}, features {list(feature_shape)})")
    proto = vjp_proto(vjp, input_shape, feature_shape, opset)
    model_bytes = proto.SerializeToString()
    import onnx

    x, inputs_desc = verify.verification_images(spec, n_images, images)
    say(f"verifying onnxruntime against torch autograd on {len(x)} images ({inputs_desc.split(':')[0]})")
    # verified as the Engine runs it: each of the graph's parts on its own
    session = _session(vjp_subgraph(proto).SerializeToString())
    errors = verify.measure(session, net, x, seed)
    cotangents = errors.pop("cotangents")
    # Engine runs features through the image->features subgraph: it must equal the VJP graph's.
    zeros = np.zeros((len(x), *feature_shape), np.float32)
    fwd_only = _session(features_subgraph(proto).SerializeToString()).run([FEATURES], {IMAGE: x})[0]
    fwd_err = verify.rel_l2(fwd_only, session.run([FEATURES], {IMAGE: x, COTANGENT: zeros})[0])
    multi_err = multi_cotangent_error(
        session, _session(multi_subgraph(proto).SerializeToString()), x, feature_shape, seed
    )
    # and the whole graph, fed (image, cotangent) only, as the format's interface promises
    cot0 = np.random.default_rng(seed + 2).standard_normal((len(x), *feature_shape)).astype(np.float32)
    whole = _session(model_bytes).run([INPUT_GRAD], {IMAGE: x, COTANGENT: cot0})[0]
    whole_err = verify.rel_l2(whole, session.run([INPUT_GRAD], {IMAGE: x, COTANGENT: cot0})[0])
    map_err = None
    if pool != "none":  # the map before pooling, averaged, is the features
        fmap = _session(model_bytes).run([FEATURE_MAP], {IMAGE: x, COTANGENT: cot0})[0]
        map_err = verify.rel_l2(fmap.reshape(*fmap.shape[:2], -1).mean(-1), fwd_only)
    verification = {
        **verify.torch_record(errors, cotangents, tolerance, grad_tolerance, len(x), inputs_desc),
        "features_only_vs_vjp_graph": fwd_err,
        "multi_cotangent_vs_single": multi_err,
        "whole_graph_vs_parts": whole_err,
        **({} if map_err is None else {"feature_map_mean_vs_features": map_err}),
        "runtime": f"onnxruntime {_ort_version()} CPU",
    }
    what, err, limit = verify.refuse_beyond_limits(out, errors, tolerance, grad_tolerance)
    if not multi_err <= tolerance:
        raise ModelError(
            out,
            "export refused: K cotangents per image in one call disagree with one "
            f"call per cotangent ({multi_err:.1e}); nothing written",
        )
    if not whole_err <= tolerance:
        raise ModelError(
            out,
            "export refused: the whole graph fed (image, cotangent) disagrees with "
            f"its (image, cotangent) -> input_grad part ({whole_err:.1e}); nothing written",
        )
    if map_err is not None and not map_err <= tolerance:
        raise ModelError(
            out,
            f"export refused: the {FEATURE_MAP} output, averaged, disagrees with the features ({map_err:.1e}); "
            "nothing written",
        )
    if not fwd_err <= tolerance:
        raise ModelError(
            out,
            "export refused: the features-only subgraph disagrees with the "
            f"VJP graph's features ({fwd_err:.1e}); nothing written",
        )

    meta = {
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "layer": layer or "",
        "pool": pool,
        "feature_shape": list(feature_shape),
        "preprocessing": spec.to_dict(),
        "weights": weights_record,
        "versions": {
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "onnx_opset": opset,
            "onnx": onnx.__version__,
            "pbv_onnx": pbv_onnx.__version__,
        },
        "verification": verification,
        "adjoint": describe(vjp.rules),
        MULTI_COTANGENT: True,
        FP32_ONLY_KEY: fp32_table(vjp.rules),
    }
    write_model(proto, meta, out, force)
    seconds = time.perf_counter() - t0
    say(
        f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB; worst error {err:.1e} in {what}, "
        f"limit {limit:.1e}; {seconds:.0f} s)"
    )
    return ExportResult(path=out, feature_shape=feature_shape, verification=verification, seconds=seconds)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
