"""The Typer application behind the `pbv-onnx` command."""
