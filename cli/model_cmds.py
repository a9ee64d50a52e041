"""Commands `export` (PyTorch -> ONNX with the gradient graph) and `info` (what a model file says)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Tuple

import typer

from pbv_onnx.base.errors import DependencyError, ModelError, PbvError, UsageError
from pbv_onnx.cli.app import app
from pbv_onnx.runtime.modelfile import DEFAULT_GRAD_TOLERANCE, DEFAULT_OPSET, DEFAULT_TOLERANCE, FLOOR_FACTOR

EXPORT_HINT = "the export stage needs PyTorch: pip install 'pbv-onnx[export]'"


def _export_module():
    """Import the export stage lazily: the CLI itself never imports torch."""
    try:
        from pbv_onnx.export import pipeline  # the package itself imports lazily: name the torch module
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in {"torch", "torchvision", "onnxscript"}:
            raise DependencyError(None, EXPORT_HINT) from None
        raise
    return pipeline


@app.command("export")
def export_cmd(
    arch: Optional[str] = typer.Option(
        None, "--arch", help="torchvision classification model, e.g. mobilenet_v2, resnet50, vit_b_16."
    ),
    onnx_file: Optional[Path] = typer.Option(
        None,
        "--onnx",
        help="An ONNX forward model from any exporter (one image input [N,3,H,W]) instead of --arch; needs no PyTorch.",
    ),
    layer: Optional[str] = typer.Option(
        None,
        "--layer",
        help="With --arch: module path to cut at (inclusive), e.g. features.18, layer4. With --onnx: tensor "
        "name to cut at (default: the graph's output; `pbv-onnx info --layers FILE` lists them).",
    ),
    out: Path = typer.Option(..., "--out", help="The .onnx file to write."),
    weights: Optional[str] = typer.Option(
        None,
        "--weights",
        help="Required: torchvision weights name (IMAGENET1K_V1), a state_dict file, or none (seeded random weights).",
    ),
    seed: int = typer.Option(
        0, "--seed", help="Seed of the random init (--weights none) and of the verification cotangents."
    ),
    pool: str = typer.Option(
        "none",
        "--pool",
        help="none: the layer's features as they are ([C,h,w], or [T,D] tokens); avg: mean over space or "
        "tokens [C]; cls: the class token [D] (token features).",
    ),
    resize: Optional[str] = typer.Option(
        None, "--resize", help="HxW exact size, or N for the shorter side (needs --crop)."
    ),
    crop: Optional[str] = typer.Option(None, "--crop", help="Centre crop N or HxW after resizing."),
    mean: Optional[Tuple[float, float, float]] = typer.Option(None, "--mean", help="Normalisation mean R G B."),
    std: Optional[Tuple[float, float, float]] = typer.Option(None, "--std", help="Normalisation std R G B."),
    opset: int = typer.Option(DEFAULT_OPSET, "--opset", help="ONNX opset (16 or later)."),
    exporter: str = typer.Option(
        "torchscript",
        "--exporter",
        help="With --arch: torch.onnx's exporter, torchscript (deprecated by torch) or dynamo "
        "(torch.export-based; opset 18 or later).",
    ),
    tolerance: float = typer.Option(
        DEFAULT_TOLERANCE, "--tolerance", help="Largest relative L2 error of the features (onnxruntime vs torch)."
    ),
    grad_tolerance: float = typer.Option(
        DEFAULT_GRAD_TOLERANCE,
        "--grad-tolerance",
        help=f"Largest relative L2 error of input_grad (raised to {FLOOR_FACTOR:g}x the fp32 floor "
        "where that is larger).",
    ),
    arch_name: Optional[str] = typer.Option(
        None, "--arch-name", help="With --onnx: the backbone name recorded in the model (default: the file's stem)."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --out."),
) -> None:
    """Export a truncated backbone (torchvision by --arch, or any ONNX forward model by --onnx) and its
    gradient graph to one verified ONNX model."""
    if (arch is None) == (onnx_file is None):
        raise UsageError(
            None, "pass exactly one of arch (a torchvision model) or onnx (an ONNX file)", ("arch", "onnx")
        )
    # what both front ends take
    common = dict(
        layer=layer,
        pool=pool,
        resize=resize,
        crop=crop,
        mean=_triple(mean),
        std=_triple(std),
        seed=seed,
        tolerance=tolerance,
        grad_tolerance=grad_tolerance,
        force=force,
    )
    if onnx_file is not None:
        if weights:
            raise UsageError(None, "weights apply to arch, not to onnx", ("weights", "arch", "onnx"))
        if exporter != "torchscript":
            raise UsageError(None, "exporter applies to arch (torch.onnx), not to onnx", ("exporter", "onnx"))
        from pbv_onnx.export.onnx_route import export_onnx

        export_onnx(onnx_file, out, arch_name=arch_name, **common)
        return
    if layer is None:
        raise UsageError(None, "arch needs layer (the module path to cut at, e.g. features.18)", ("arch", "layer"))
    if arch_name is not None:
        raise UsageError(None, "arch_name applies to onnx (arch names the model itself)", ("arch_name", "onnx"))
    export = _export_module()
    export.export_model(out, arch=arch, weights=weights, opset=opset, exporter=exporter, **common)


def _triple(value):
    """Typer gives (None, None, None) for an absent tuple option."""
    return None if value is None or all(v is None for v in value) else tuple(value)


@app.command("info")
def info_cmd(
    model: Path = typer.Argument(..., help="An exported .onnx model (with --layers: any ONNX forward model)."),
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON."),
    layers: bool = typer.Option(
        False, "--layers", help="List the tensors one can cut at (name, op, shape): for `export --onnx --layer`."
    ),
) -> None:
    """Print what an exported model says about itself, or with --layers the tensors of any ONNX model
    one can cut at (torch-free)."""
    from pbv_onnx.runtime.describe import describe_model, format_info

    if layers:
        _print_layers(model, as_json)
        return
    info = describe_model(model)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(format_info(info))


def _print_layers(path: Path, as_json: bool) -> None:
    """`info --layers`: the cut-able tensors of an ONNX file, in graph order."""
    from pbv_onnx.export.onnx_route import cut_names
    from pbv_onnx.runtime.modelfile import read_model

    _, model, _ = read_model(path)
    try:
        rows = cut_names(model)
    except PbvError as exc:
        if exc.path is None:
            exc.path = str(path)
        raise
    except Exception as exc:
        why = f"{exc.__class__.__name__}: {str(exc).splitlines()[0]}" if str(exc) else exc.__class__.__name__
        raise ModelError(path, f"cannot list its tensors ({why})") from None
    if as_json:
        keys = ("name", "op", "shape", "layout")
        typer.echo(json.dumps([dict(zip(keys, (n, op, _dims(s), lay))) for n, op, s, lay in rows], indent=2))
        return
    width = max([len("tensor")] + [len(n) for n, _, _, _ in rows])
    opw = max([len("op")] + [len(op) for _, op, _, _ in rows])
    shw = max([len("shape")] + [len(str(_dims(s))) for _, _, s, _ in rows])
    typer.echo(f"{'tensor':<{width}}  {'op':<{opw}}  {'shape':<{shw}}  layout")
    for name, op, shape, layout in rows:
        typer.echo(f"{name:<{width}}  {op:<{opw}}  {str(_dims(shape)):<{shw}}  {layout}".rstrip())
    typer.echo(f"{len(rows)} tensors; cut at one with `pbv-onnx export --onnx {path.name} --layer NAME ...`")
    if any(layout == "NHWC" for *_, layout in rows):
        typer.echo("NHWC: channels last; export turns such a layer to [N, C, H, W] (pooling and maps read it so)")
    if any(layout == "NCT" for *_, layout in rows):
        typer.echo("NCT: channels before tokens; export turns such a layer to [N, T, C] (tokens)")
    if any(layout == "?" for *_, layout in rows):
        typer.echo("?: axes not followed (lost in a Reshape); export reads 4-D as [N, C, H, W], 3-D as [N, T, C]")


def _dims(shape) -> list:
    """A shape for people and JSON: ints, the batch axis and other symbols as text, unknown as '?'."""
    if shape is None:
        return []
    return [d if isinstance(d, (int, str)) else "?" for d in shape]
