"""Commands `export` (PyTorch -> ONNX with the gradient graph) and `info` (what a model file says)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Tuple

import typer

from pbv_onnx.base.errors import DependencyError
from pbv_onnx.cli.app import app
from pbv_onnx.runtime.modelfile import DEFAULT_GRAD_TOLERANCE, DEFAULT_OPSET, DEFAULT_TOLERANCE, FLOOR_FACTOR

EXPORT_HINT = "the export stage needs PyTorch: pip install 'pbv-onnx[export]'"


def _export_module():
    """Import the export stage lazily: the CLI itself never imports torch."""
    try:
        from pbv_onnx import export
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in {"torch", "torchvision", "onnxscript"}:
            raise DependencyError(None, EXPORT_HINT) from None
        raise
    return export


@app.command("export")
def export_cmd(
    arch: str = typer.Option(..., "--arch", help="torchvision classification model, e.g. mobilenet_v2, resnet50."),
    layer: str = typer.Option(..., "--layer", help="Module path to cut at (inclusive), e.g. features.18, layer4."),
    out: Path = typer.Option(..., "--out", help="The .onnx file to write."),
    weights: Optional[str] = typer.Option(
        None,
        "--weights",
        help="Required: torchvision weights name (IMAGENET1K_V1), a state_dict file, or none (seeded random weights).",
    ),
    seed: int = typer.Option(
        0, "--seed", help="Seed of the random init (--weights none) and of the verification cotangents."
    ),
    pool: str = typer.Option("none", "--pool", help="none: features [C,h,w]; avg: global average pooled [C]."),
    resize: Optional[str] = typer.Option(
        None, "--resize", help="HxW exact size, or N for the shorter side (needs --crop)."
    ),
    crop: Optional[str] = typer.Option(None, "--crop", help="Centre crop N or HxW after resizing."),
    mean: Optional[Tuple[float, float, float]] = typer.Option(None, "--mean", help="Normalisation mean R G B."),
    std: Optional[Tuple[float, float, float]] = typer.Option(None, "--std", help="Normalisation std R G B."),
    opset: int = typer.Option(DEFAULT_OPSET, "--opset", help="ONNX opset (16 or later)."),
    tolerance: float = typer.Option(
        DEFAULT_TOLERANCE, "--tolerance", help="Largest relative L2 error of the features (onnxruntime vs torch)."
    ),
    grad_tolerance: float = typer.Option(
        DEFAULT_GRAD_TOLERANCE,
        "--grad-tolerance",
        help=f"Largest relative L2 error of input_grad (raised to {FLOOR_FACTOR:g}x the fp32 floor "
        "where that is larger).",
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --out."),
) -> None:
    """Export a truncated torchvision backbone and its gradient graph to one verified ONNX model."""
    export = _export_module()
    export.export_model(
        out,
        arch=arch,
        layer=layer,
        weights=weights,
        seed=seed,
        pool=pool,
        resize=resize,
        crop=crop,
        mean=_triple(mean),
        std=_triple(std),
        opset=opset,
        tolerance=tolerance,
        grad_tolerance=grad_tolerance,
        force=force,
    )


def _triple(value):
    """Typer gives (None, None, None) for an absent tuple option."""
    return None if value is None or all(v is None for v in value) else tuple(value)


@app.command("info")
def info_cmd(
    model: Path = typer.Argument(..., help="An exported .onnx model."),
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON."),
) -> None:
    """Print what an exported model says about itself (torch-free)."""
    from pbv_onnx.runtime.describe import describe_model, format_info

    info = describe_model(model)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(format_info(info))
