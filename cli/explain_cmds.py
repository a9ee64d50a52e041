"""`pbv-onnx match` and `pbv-onnx explain`: reference matching and parallel backpropagation."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List, Optional

import typer

from pbv_onnx.cli.app import app
from pbv_onnx.cli.options import BATCH_SIZE, DEVICE, FEATURES, IMAGES, MODEL
from pbv_onnx.workflows import explain as ex
from pbv_onnx.workflows import checkpoint
from pbv_onnx.report import html as report
from pbv_onnx.base.atomic import claim_output
from pbv_onnx.base.errors import UsageError
from pbv_onnx.method.saliency import BASELINES, DEFAULT_STEPS, METHODS, check_options
from pbv_onnx.method.similarity import CANDIDATE_MODES, DEFAULT_TOP_K

_READOUTS = typer.Option(..., "--readouts", help="Readouts file (from `pbv-onnx fit`) for this model.")
_RESPONSES = typer.Option(..., "--responses", help="Recorded responses file (NetCDF).")
_CANDIDATES = typer.Option("top-k", "--candidates",
                           help=f"Reference candidates: {' or '.join(CANDIDATE_MODES)} (the channel's top-k "
                           "preferred stimuli by recorded response, or all preferred stimuli).")
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
    study = ex.open_study(model, readouts, responses, images, features, device=device, progress=False)
    ch = study.channel(channel)
    ranked = ex.match(study, ch, study.image(image), candidates, top_k)
    rows = [{"rank": int(r), "stimulus": str(s), "similarity": float(v), "recorded": float(rec)}
            for r, s, v, rec in zip(ranked["rank"].values, ranked["stimulus"].values,
                                    ranked["similarity"].values, ranked["recorded"].values)]
    if as_json:
        payload = {"channel": str(ch), "object": ranked.attrs["object"], "candidates": candidates,
                   "ranking": [{**r, "recorded": r["recorded"] if math.isfinite(r["recorded"]) else None}
                               for r in rows]}
        typer.echo(json.dumps(payload, indent=2))
        return
    typer.echo(f"channel {ch}, object {ranked.attrs['object']}, {len(rows)} candidates ({candidates})")
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
    image: Optional[List[str]] = typer.Option(None, "--image", help="Object to explain: stimulus id or image path "
                                              "(repeatable; default: each channel's --top-objects)."),
    top_objects: int = typer.Option(ex.DEFAULT_TOP_OBJECTS, "--top-objects",
                                    help="Without --image: each channel's K most driving out-of-category stimuli."),
    reference: Optional[str] = typer.Option(None, "--reference", help="Force this reference (stimulus id or "
                                            "image path) instead of matching."),
    candidates: str = _CANDIDATES,
    top_k: int = _TOP_K,
    method: str = typer.Option("parallel", "--method", help=f"{' | '.join(METHODS)}."),
    steps: int = typer.Option(DEFAULT_STEPS, "--steps", help="Integration steps for --method integrated."),
    baseline: str = typer.Option("black", "--baseline", help=f"Integrated-gradients baseline: {' or '.join(BASELINES)}."),
    images: Optional[Path] = IMAGES,
    features: Optional[Path] = FEATURES,
    device: str = DEVICE,
    batch_size: int = BATCH_SIZE,
    smooth: float = typer.Option(0.0, "--smooth", help="Gaussian sigma (pixels) for the displayed maps only."),
    scale: str = typer.Option("run", "--scale", help="Colour scale shared by: run (all pairs), channel, or pair "
                              "(always shared by both maps of a pair)."),
    save_inputs: bool = typer.Option(False, "--save-inputs", help="Also store the preprocessed images."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run: reuse the pairs it "
                                "checkpointed (in .OUT.partial beside --out) if its inputs and options match."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder (and discard the "
                               "checkpoints of an interrupted run)."),
) -> None:
    """Explain objects that drive body-selective channels: match a reference, backpropagate both."""
    if scale not in report.SCALES:
        raise UsageError(None, f"--scale must be one of {', '.join(report.SCALES)}, not {scale!r}")
    if smooth < 0:
        raise UsageError(None, f"--smooth must be non-negative, not {smooth}")
    check_options([method], steps, baseline)
    # Held for the whole run, before any computation: a second run into --out is refused at once.
    with claim_output(out, force):
        checkpoint.check_leftovers(out, resume, force)
        study = ex.open_study(model, readouts, responses, images, features, device=device, batch_size=batch_size)
        pairs = ex.build_pairs(study, channel, image, top_objects, reference, candidates, top_k)
        options = {"candidates": candidates, "top_k": top_k, "top_objects": None if image else top_objects,
                   "reference": reference, "steps": steps if method == "integrated" else None,
                   "baseline": baseline if method == "integrated" else None, "batch_size": batch_size,
                   "device": study.engine.provider}
        saved = checkpoint.Checkpoints(out, ex.run_description(study, pairs, method, steps, baseline, save_inputs),
                                       resume=resume, force=force)
        ds = ex.explain(study, pairs, method, steps, baseline, save_inputs, options, checkpoint=saved)
        report.write_output(ds, out, ex.channel_summary(study), smooth, scale, force, progress=study.progress)
        saved.discard()
    typer.echo(f"{len(pairs)} pairs -> {out}/index.html")
