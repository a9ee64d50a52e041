"""The export stage's torch front end: a torchvision backbone (or a torch module) -> its ONNX model with the
gradient graph, through the ONNX-graph transform (export/onnx_route.py, export/graph/)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from torch import nn

from pbv_onnx.base.atomic import check_writable
from pbv_onnx.base.errors import UsageError
from pbv_onnx.export import backbone, onnx_route
from pbv_onnx.export.onnx_route import ExportResult
from pbv_onnx.runtime.images import Preprocessing
from pbv_onnx.runtime.modelfile import DEFAULT_GRAD_TOLERANCE, DEFAULT_OPSET, DEFAULT_TOLERANCE


def _log(msg: str) -> None:
    logging.getLogger(__name__).info(msg)


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
    exporter: str = "torchscript",
) -> ExportResult:
    """Export `arch` cut at `layer` (or a given torch `module`) with its gradient graph: torch.onnx
    exports the truncated forward (`exporter`: torchscript, or dynamo, torch's torch.export-based
    exporter), the ONNX-graph transform (export/graph/) adds the gradient graph
    (export/onnx_route.export_torch_graph).

    `weights` (with `arch`): a torchvision weights name, a state_dict file, or "none" for seeded
    random weights (their small parameters redrawn at order 1, recorded); there is no default.
    Verifies the ONNX graph against torch autograd before writing; beyond `tolerance` (relative L2,
    worst sample) raises ModelError and writes nothing.
    """
    say = progress or (lambda msg: None)
    out = check_writable(out, force)
    for name, value in (("tolerance", tolerance), ("grad_tolerance", grad_tolerance)):
        if not 0 < value < 1:
            raise UsageError(None, f"{name} must be in (0, 1), not {value}", param=name)
    if opset < 16:
        raise UsageError(None, f"opset must be at least 16 (ScatterElements with add), not {opset}", param="opset")
    if exporter not in onnx_route.EXPORTERS:
        raise UsageError(
            None, f"exporter must be one of {', '.join(onnx_route.EXPORTERS)}, not {exporter!r}", param="exporter"
        )
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
    return onnx_route.export_torch_graph(
        out, net_module, arch, layer, pool, spec, weights_record, seed, opset, tolerance, grad_tolerance,
        force, n_images, images, progress, exporter,
    )  # fmt: skip
