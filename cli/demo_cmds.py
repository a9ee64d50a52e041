"""`pbv-onnx demo build` and `pbv-onnx demo validate`: the embedded demo and its ground-truth check."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pbv_onnx.cli.app import app
from pbv_onnx.cli.options import DEVICE

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
        help="Exported model (pool none) whose unpooled features generate the ground truth: a sparse w* "
        "(the same at every position) and a rectifying nonlinearity; use the model the readouts are fitted on.",
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        help="Experiment folder to write (stimuli, masks, stimuli.csv, responses.nc, ground_truth.nc, gate.csv).",
    ),
    channels: int = typer.Option(16, "--channels", help="Synthetic channels (half per region)."),
    bodies: int = typer.Option(96, "--bodies", help="Body stimuli."),
    objects: int = typer.Option(63, "--objects", help="Plain object stimuli."),
    planted: int = typer.Option(
        315, "--planted", help="Objects with a pasted body part (and a mask), each with its part-free copy."
    ),
    swap: int = typer.Option(
        42,
        "--swap",
        help="Objects with one part of each family, each with its part-free copy and four part-only references.",
    ),
    decoys: int = typer.Option(42, "--decoys", help="Objects with a part and a same-size patch of another object."),
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
        Counts(body=bodies, object=objects, planted=planted, swap=swap, decoy=decoys),
        channels,
        seed,
        shared,
        not no_shared,
        device,
        force=force,
    )
    g = m["gate"]
    typer.echo(
        f"{out}: {m['n_stimuli']} stimuli from {len(m['sources'])} photos ({m['object_photos']['n']} object photos), "
        f"{channels} channels; gate: {g['pairs_passing_any_channel']} of {g['pairs']} planted pairs pass for at least "
        f"one channel ({100 * g['pass']:.0f}% of pair x channel)"
    )


@demo_app.command("validate")
def validate(
    model: Path = typer.Option(..., "--model", help="The exported model the readouts were fitted on."),
    readouts: Path = typer.Option(..., "--readouts", help="Readouts fitted on the experiment's responses."),
    experiment: Path = typer.Option(..., "--experiment", help="Experiment folder from `pbv-onnx demo build`."),
    out: Path = typer.Option(..., "--out", help="Markdown report to write (a .json beside it holds the numbers)."),
    cascade: Optional[Path] = typer.Option(
        None,
        "--cascade",
        help="Folder of models with the backbone's top blocks randomised (python -m pbv_onnx.export.sanity), "
        "for the cascading-randomisation check; without it that check is not run.",
    ),
    top_k: int = typer.Option(20, "--top-k", help="Reference candidates: the channel's top-k bodies by response."),
    bootstrap: int = typer.Option(2000, "--bootstrap", help="Clustered bootstrap resamples per interval."),
    refits: int = typer.Option(5, "--refits", help="Bootstrap refits of the readout (sanity reference level)."),
    random_orders: int = typer.Option(2, "--random-orders", help="Random block orders per deletion curve."),
    ig_pairs: int = typer.Option(0, "--ig-pairs", help="Pairs for the integrated-gradients check (0: all)."),
    seed: int = typer.Option(0, "--seed", help="Seed of random references, readouts, orders and resamples."),
    device: str = DEVICE,
    force: bool = typer.Option(True, "--force/--no-force", help="Overwrite earlier results."),
) -> None:
    """Run the validation study on the demo experiment; print and write the report."""
    from pbv_onnx.demo.validate import run_validation, write_results
    from pbv_onnx.demo.validation.experiments import Settings

    st = Settings(
        top_k=top_k, bootstrap=bootstrap, refits=refits, random_orders=random_orders, ig_pairs=ig_pairs, seed=seed
    )
    res = run_validation(model, readouts, experiment, cascade, st, device=device)
    text = write_results(res, out, out.with_suffix(".json"), force)
    typer.echo(text)
