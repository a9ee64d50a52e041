"""Options shared by several commands, declared once so their flags and help read the same."""

from __future__ import annotations

import typer

MODEL = typer.Option(..., "--model", help="Exported .onnx model.")
IMAGES = typer.Option(
    None,
    "--images",
    help="Folder that relative stimulus file names are resolved against (default: the responses file's folder).",
)
FEATURES = typer.Option(None, "--features", help="Feature cache file (read and updated).")
DEVICE = typer.Option(
    "auto",
    "--device",
    help="Where onnxruntime runs: auto (CUDA if available), cuda or cpu. "
    "Small runs are faster on cpu: CUDA plans each session on its first call.",
)
BATCH_SIZE = typer.Option(16, "--batch-size", help="Images per onnxruntime call.")
FORCE = typer.Option(False, "--force", help="Overwrite an existing output.")
