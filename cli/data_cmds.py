"""Data commands: import-responses, features, fit, predict, evaluate."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import typer

from pbv_onnx.cli.app import app, progress
from pbv_onnx.cli.options import BATCH_SIZE, DEVICE, FEATURES, FORCE, IMAGES, MODEL


@app.command("import-responses")
def import_responses(
    out: Path = typer.Option(..., "--out", help="Responses NetCDF file to write."),
    csv: Optional[Path] = typer.Option(
        None, "--csv", help="Long-format CSV: channel, stimulus, category, file, repetition, response[, region, phase]."
    ),
    npy: Optional[Path] = typer.Option(None, "--npy", help="NumPy array (channel, stimulus[, repetition])."),
    stimuli: Optional[Path] = typer.Option(
        None, "--stimuli", help="With --npy: CSV stimulus, category, file in the array's stimulus order."
    ),
    channels: Optional[Path] = typer.Option(
        None, "--channels", help="With --npy: CSV channel[, region] in the array's channel order (default ids 0..C-1)."
    ),
    nwb: Optional[Path] = typer.Option(
        None,
        "--nwb",
        help="NWB session: units with spike times, presentations "
        "in a trials table or an IndexSeries over Images (optional nwb extra).",
    ),
    window: Optional[Tuple[float, float]] = typer.Option(
        None, "--window", help="With --nwb: T0 T1, count spikes in [onset+T0, onset+T1) s; response = spikes/s."
    ),
    intervals: Optional[str] = typer.Option(
        None,
        "--intervals",
        help="With --nwb: the TimeIntervals table (or IndexSeries) of the presentations (default: trials).",
    ),
    stimulus_column: Optional[str] = typer.Option(
        None, "--stimulus-column", help="With --nwb: the stimulus id column (default: stimulus_id, then image_id)."
    ),
    category_column: Optional[str] = typer.Option(
        None,
        "--category-column",
        help="Category column of the presentations table or stimulus set (default: category).",
    ),
    categories: Optional[Path] = typer.Option(
        None, "--categories", help="With --nwb: CSV stimulus_id, category[, group, file]."
    ),
    unit_ids: Optional[List[str]] = typer.Option(
        None, "--unit-ids", help="With --nwb: only these units (comma-separated or repeated)."
    ),
    brainio: Optional[Path] = typer.Option(
        None,
        "--brainio",
        help="BrainIO neuroid assembly (.nc: presentation x "
        "neuroid[ x time_bin]); with --stimuli, its stimulus set CSV.",
    ),
    time_bins: Optional[Tuple[float, float]] = typer.Option(
        None, "--time-bins", help="With --brainio: average the time bins within START END (default: all)."
    ),
    images: Optional[Path] = typer.Option(
        None, "--images", help="With --brainio: folder of the stimulus set's image files."
    ),
    preferred: Optional[str] = typer.Option(None, "--preferred", help="Preferred category, e.g. body."),
    units: str = typer.Option("", "--units", help="Response units, e.g. spikes/s."),
    force: bool = FORCE,
) -> None:
    """Build a responses file from a CSV table, a .npy array, an NWB session or a BrainIO assembly."""
    from pbv_onnx.data.responses import import_responses as run

    ds = run(
        out,
        csv_path=csv,
        npy_path=npy,
        stimuli=stimuli,
        channels=channels,
        preferred=preferred,
        units=units,
        force=force,
        nwb=nwb,
        brainio=brainio,
        window=window,
        intervals=intervals,
        stimulus_column=stimulus_column,
        category_column=category_column,
        categories=categories,
        unit_ids=unit_ids or None,
        time_bins=time_bins,
        images=images,
    )
    typer.echo(
        f"{out}: {ds.sizes['channel']} channels x {ds.sizes['stimulus']} stimuli"
        + (f" x {ds.sizes['repetition']} repetitions" if "repetition" in ds.sizes else "")
    )


@app.command("features")
def features(
    model: Path = MODEL,
    responses: Path = typer.Option(..., "--responses", help="Responses file naming the stimulus images."),
    out: Path = typer.Option(
        ..., "--out", help="Features file; an existing one for the same model is reused as a cache and updated."
    ),
    images: Optional[Path] = IMAGES,
    device: str = DEVICE,
    batch_size: int = BATCH_SIZE,
    force: bool = typer.Option(False, "--force", help="Recompute everything and replace --out."),
) -> None:
    """Compute (or update) the latent features of every stimulus image."""
    from pbv_onnx.data.features import features_for_responses

    da = features_for_responses(model, responses, out, images, device, batch_size, force, progress())
    typer.echo(f"{out}: {da.sizes['stimulus']} stimuli x {da.sizes['feature']} features")


@app.command("fit")
def fit(
    model: Path = MODEL,
    responses: Path = typer.Option(..., "--responses", help="Responses file."),
    out: Path = typer.Option(..., "--out", help="Readouts NetCDF file to write."),
    images: Optional[Path] = IMAGES,
    features: Optional[Path] = FEATURES,
    preferred: Optional[str] = typer.Option(
        None, "--preferred", help="Preferred category (default: the responses file's preferred_category)."
    ),
    alphas: Optional[List[str]] = typer.Option(
        None,
        "--alphas",
        help="Relative ridge penalties (times the mean "
        "eigenvalue of the Gram matrix), comma-separated or repeated; "
        "default 1e-3,1e-2,0.1,1,10,100.",
    ),
    folds: int = typer.Option(5, "--folds", help="Cross-validation folds (nested for the held-out r)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the fold assignment."),
    device: str = DEVICE,
    batch_size: int = BATCH_SIZE,
    force: bool = FORCE,
) -> None:
    """Fit a ridge readout per channel on the preferred-category images."""
    from pbv_onnx.data.readouts import fit_files, parse_alphas

    ds = fit_files(
        model,
        responses,
        out,
        images,
        features,
        preferred,
        parse_alphas(alphas),
        folds,
        seed,
        device,
        batch_size,
        force,
        progress(),
    )
    typer.echo(
        f"{out}: {ds.sizes['channel']} channels; mean r held-out preferred "
        f"{float(ds['r_cv_preferred'].mean()):.3f}, out-of-category {float(ds['r_ooc'].mean()):.3f}"
    )


@app.command("predict")
def predict(
    model: Path = MODEL,
    readouts: Path = typer.Option(..., "--readouts", help="Readouts file fitted on this model."),
    images: List[Path] = typer.Option(..., "--images", help="Image files or folders (more may follow as arguments)."),
    more: Optional[List[Path]] = typer.Argument(None, help="More image files or folders.", show_default=False),
    out: Optional[Path] = typer.Option(None, "--out", help="Write predictions to .nc or .csv instead of printing."),
    format: Optional[str] = typer.Option(
        None,
        "--format",
        help="netcdf, csv or brainio (a BrainIO neuroid assembly, .nc); default: by the suffix of --out.",
    ),
    device: str = DEVICE,
    batch_size: int = BATCH_SIZE,
    force: bool = FORCE,
) -> None:
    """Predict every channel's response to images."""
    from pbv_onnx.data.readouts import predict_files, prediction_table

    pred = predict_files(
        model, readouts, list(images) + list(more or []), out, device, batch_size, force, progress(), format
    )
    if out is None:
        typer.echo(prediction_table(pred), nl=False)
    else:
        typer.echo(f"{out}: {pred.sizes['channel']} channels x {pred.sizes['stimulus']} images")


@app.command("evaluate")
def evaluate(
    readouts: Path = typer.Option(..., "--readouts", help="Readouts file from `pbv-onnx fit`."),
    responses: Path = typer.Option(..., "--responses", help="Responses file."),
    out: Path = typer.Option(..., "--out", help="Folder to write: channels.csv, channels.nc, fig3a.png."),
    force: bool = FORCE,
) -> None:
    """Per-channel table and Fig. 3a: held-out r, out-of-category r, reliability, critical r."""
    from pbv_onnx.workflows.evaluate import evaluate_files

    table = evaluate_files(readouts, responses, out, force)
    typer.echo(f"{out}: {table.sizes['channel']} channels")
