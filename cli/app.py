"""The shared Typer app and the error boundary: one-line errors, distinct exit codes."""

from __future__ import annotations

import sys
import traceback

import typer

from pbv_onnx import __version__
from pbv_onnx.errors import EXIT_INTERRUPTED, PbvError

app = typer.Typer(
    name="pbv-onnx",
    help="Parallel backpropagation for shared-feature visualisation of category-selective neurons.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pbv-onnx {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    _state["debug"] = debug


def run() -> None:
    """Run the app; turn every failure into `pbv-onnx: error: <file>: <what>` and an exit code."""
    try:
        app()
    except PbvError as exc:
        if _state["debug"]:
            traceback.print_exc()
        print(f"pbv-onnx: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("pbv-onnx: interrupted; no output was written", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # a bug: still one line unless --debug
        if _state["debug"]:
            raise
        print(f"pbv-onnx: error: internal error: {exc.__class__.__name__}: {exc} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)
