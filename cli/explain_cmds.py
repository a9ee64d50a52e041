"""`pbv-onnx match` and `pbv-onnx explain`: reference matching and parallel backpropagation."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List, Optional

import typer

from pbv_onnx.cli.app import app, progress
from pbv_onnx.cli.options import DEVICE, FEATURES, IMAGES, MODEL
from pbv_onnx.method import methods
from pbv_onnx.method.shared import DEFAULT_MAP, MAP_CHOICES
from pbv_onnx.method.similarity import CANDIDATE_MODES, DEFAULT_TOP_K
from pbv_onnx.report import html as report
from pbv_onnx.report.run import run_explain
from pbv_onnx.workflows import explain as ex
from pbv_onnx.workflows import run

_READOUTS = typer.Option(..., "--readouts", help="Readouts file (from `pbv-onnx fit`) for this model.")
_RESPONSES = typer.Option(..., "--responses", help="Recorded responses file (NetCDF).")
_CANDIDATES = typer.Option(
    "top-k",
    "--candidates",
    help=f"Reference candidates: {' or '.join(CANDIDATE_MODES)} (the channel's top-k "
    "preferred stimuli by recorded response, or all preferred stimuli).",
)
_TOP_K = typer.Option(DEFAULT_TOP_K, "--top-k", help="k for --candidates top-k.")


def _num(v: float) -> str:
    return "" if v is None or not math.isfinite(v) else f"{v:.4g}"


@app.command()
def match(
    model: Path = MODEL,
    readouts: Path = _READOUTS,
    responses: Path = _RESPONSES,
    channel: str = typer.Option(..., "--channel", help="Channel id."),
    image: str = typer.Option(..., "--image", help="The object: a stimulus id of the responses file or an image path."),
    images: Optional[Path] = IMAGES,
    candidates: str = _CANDIDATES,
    top_k: int = _TOP_K,
    features: Optional[Path] = FEATURES,
    device: str = DEVICE,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Rank a channel's candidate references by the neuron-specific similarity s_n(object, reference)."""
    table = run.run_match(model, readouts, responses, channel, image, images, candidates, top_k, features, device)
    rows = table["ranking"]
    if as_json:
        payload = {
            **table,
            "ranking": [{**r, "recorded": r["recorded"] if math.isfinite(r["recorded"]) else None} for r in rows],
        }
        typer.echo(json.dumps(payload, indent=2))
        return
    typer.echo(f"channel {table['channel']}, object {table['object']}, {len(rows)} candidates ({candidates})")
    width = max([len("stimulus")] + [len(r["stimulus"]) for r in rows])
    typer.echo(f"{'rank':>4}  {'stimulus':<{width}}  {'similarity':>10}  {'recorded':>9}")
    for r in rows:
        typer.echo(f"{r['rank']:>4}  {r['stimulus']:<{width}}  {r['similarity']:>10.4f}  {_num(r['recorded']):>9}")


@app.command()
def explain(
    model: Path = MODEL,
    readouts: Path = _READOUTS,
    responses: Path = _RESPONSES,
    out: Path = typer.Option(..., "--out", help="Output folder (explanations.nc, figures, index.html)."),
    channel: Optional[List[str]] = typer.Option(None, "--channel", help="Channel id (repeatable; default: all)."),
    image: Optional[List[str]] = typer.Option(
        None,
        "--image",
        help="Object to explain: stimulus id or image path (repeatable; default: each channel's --top-objects).",
    ),
    top_objects: int = typer.Option(
        ex.DEFAULT_TOP_OBJECTS,
        "--top-objects",
        help="Without --image: each channel's K most driving out-of-category stimuli.",
    ),
    reference: Optional[str] = typer.Option(
        None, "--reference", help="Force this reference (stimulus id or image path) instead of matching."
    ),
    pairs: Optional[Path] = typer.Option(
        None,
        "--pairs",
        help="CSV of the pairs to explain, columns channel, object and optional reference (empty: the best "
        "match); instead of --channel, --image and --reference.",
    ),
    map_choice: str = typer.Option(
        DEFAULT_MAP,
        "--map",
        help=f"What the figures show: {', '.join(MAP_CHOICES)} (the paper's pixel map; the similarity decomposed "
        "over the cut layer's positions; their product). explanations.nc keeps every map computed.",
    ),
    candidates: str = _CANDIDATES,
    top_k: int = _TOP_K,
    method: str = typer.Option("parallel", "--method", help=f"Attribution method: {methods.help_text()}."),
    path: Optional[str] = typer.Option(
        None,
        "--path",
        help=f"Gradient path: {methods.path_help()} (default: the method's own; combines with any method's rule).",
    ),
    steps: int = typer.Option(
        methods.option("steps").default, "--steps", help=f"--path integrated: {methods.option('steps').help}."
    ),
    baseline: str = typer.Option(
        methods.option("baseline").default,
        "--baseline",
        help=f"--path integrated: {methods.option('baseline').help}, "
        f"{' or '.join(methods.option('baseline').choices)}.",
    ),
    noise: float = typer.Option(
        methods.option("noise").default, "--noise", help=f"--path smooth: {methods.option('noise').help}."
    ),
    samples: int = typer.Option(
        methods.option("samples").default, "--samples", help=f"--path smooth: {methods.option('samples').help}."
    ),
    seed: int = typer.Option(
        methods.option("seed").default,
        "--seed",
        help=f"--path smooth: {methods.option('seed').help} (the same seed, the same maps).",
    ),
    path_option: Optional[List[str]] = typer.Option(
        None,
        "--path-option",
        help="NAME=VALUE: a path's option by name (repeatable), for paths whose options have no flag here.",
    ),
    images: Optional[Path] = IMAGES,
    features: Optional[Path] = FEATURES,
    device: str = DEVICE,
    batch_size: int = typer.Option(
        ex.DEFAULT_EXPLAIN_BATCH,
        "--batch-size",
        help="Images per onnxruntime call (a gradient pass keeps its batch's activations: 4 keeps memory low "
        "on CPU; on CUDA 16 or more is faster).",
    ),
    smooth: float = typer.Option(0.0, "--smooth", help="Gaussian sigma (pixels) for the displayed maps only."),
    scale: str = typer.Option(
        "run",
        "--scale",
        help="Colour scale shared by: run (all pairs), channel, or pair (always shared by both maps of a pair).",
    ),
    save_inputs: bool = typer.Option(False, "--save-inputs", help="Also store the preprocessed images."),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue an interrupted run: reuse the pairs it "
        "checkpointed (in .OUT.partial beside --out) if its inputs and options match.",
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace an existing output folder (and discard the checkpoints of an interrupted run)."
    ),
) -> None:
    """Explain objects that drive body-selective channels: match a reference, backpropagate both."""
    report.check_display(smooth, scale)
    given = {"steps": steps, "baseline": baseline, "noise": noise, "samples": samples, "seed": seed}
    attribution = methods.resolve(method, path, **{**given, **methods.path_options(path_option or [])})
    ds = run_explain(
        model,
        readouts,
        responses,
        out,
        channel,
        image,
        top_objects,
        reference,
        candidates,
        top_k,
        attribution,
        images_root=images,
        features_cache=features,
        device=device,
        batch_size=batch_size,
        smooth=smooth,
        scale=scale,
        save_inputs=save_inputs,
        resume=resume,
        force=force,
        progress=progress(),
        pairs=pairs,
        map=map_choice,
    )
    typer.echo(f"{ds.sizes['pair']} pairs -> {out}/index.html")
