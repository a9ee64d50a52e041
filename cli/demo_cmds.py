"""`pbv-onnx demo build` and `pbv-onnx demo validate`: the embedded demo and its ground-truth check."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from pbv_onnx.cli.app import app, progress
from pbv_onnx.cli.options import DEVICE
from pbv_onnx.method.methods import METHODS, help_text

demo_app = typer.Typer(
    help="The embedded demo: real photographs, synthetic body-selective channels "
    "with a known answer, and validation against it.",
    no_args_is_help=True,
)
app.add_typer(demo_app, name="demo")


@demo_app.command("build")
def build(
    gt_model: Path = typer.Option(
        ...,
        "--gt-model",
        help="Exported model (pool none) whose spatial "
        "features generate the ground truth: sparse, pooled and nonlinear, so not "
        "the linear readout even on the layer you fit.",
    ),
    out: Path = typer.Option(
        ..., "--out", help="Experiment folder to write (stimuli, masks, stimuli.csv, responses.nc, ground_truth.nc)."
    ),
    channels: int = typer.Option(16, "--channels", help="Synthetic channels (half per region)."),
    bodies: int = typer.Option(96, "--bodies", help="Body stimuli."),
    objects: int = typer.Option(56, "--objects", help="Plain object stimuli."),
    planted: int = typer.Option(40, "--planted", help="Objects with a pasted body part (and a mask)."),
    seed: int = typer.Option(0, "--seed", help="Seed of crops, pastes, channels and trial noise."),
    shared: Optional[Path] = typer.Option(
        None,
        "--shared-images",
        help="Folder of extra labelled photos (default: ../shared/images beside the project, if present).",
    ),
    no_shared: bool = typer.Option(False, "--no-shared", help="Use only photos shipped in registry packages."),
    device: str = DEVICE,
    force: bool = typer.Option(False, "--force", help="Replace an existing experiment folder."),
) -> None:
    """Build the demo experiment: real photos, planted objects, synthetic body-selective responses."""
    from pbv_onnx.demo.build import build_experiment
    from pbv_onnx.demo.stimuli import Counts

    m = build_experiment(
        out,
        gt_model,
        Counts(body=bodies, object=objects, planted=planted),
        channels,
        seed,
        shared,
        not no_shared,
        device,
        force=force,
    )
    typer.echo(f"{out}: {m['n_stimuli']} stimuli from {len(m['sources'])} photos, {channels} channels")


@demo_app.command("validate")
def validate(
    model: Path = typer.Option(..., "--model", help="The exported model the readouts were fitted on."),
    readouts: Path = typer.Option(..., "--readouts", help="Readouts fitted on the experiment's responses."),
    experiment: Path = typer.Option(..., "--experiment", help="Experiment folder from `pbv-onnx demo build`."),
    out: Path = typer.Option(..., "--out", help="Markdown table to write (a .json beside it holds the numbers)."),
    method: Optional[List[str]] = typer.Option(
        None,
        "--method",
        help="Method(s) to score, repeatable: "
        f"{help_text()}, or RULE+PATH such as parallel+smooth "
        "(default: every method).",
    ),
    per_object: int = typer.Option(1, "--per-object", help="Channels scored per planted object (its most driven)."),
    steps: int = typer.Option(4, "--steps", help="Integration steps for the integrated method."),
    device: str = DEVICE,
    force: bool = typer.Option(True, "--force/--no-force", help="Overwrite earlier results."),
) -> None:
    """Score the maps against the planted body parts; print and write the validation table."""
    from pbv_onnx.demo.validate import run_validation, write_results

    res = run_validation(
        model,
        readouts,
        experiment,
        methods=method or tuple(METHODS),
        per_object=per_object,
        steps=steps,
        device=device,
        progress=progress(),
    )
    text = write_results(res, out, out.with_suffix(".json"), force)
    typer.echo(text)
