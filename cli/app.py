"""The shared Typer app and the error boundary: one-line errors, distinct exit codes."""

from __future__ import annotations

import sys
import traceback
import warnings

import typer
from typer import Abort

try:  # typer >= 0.25 vendors click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # older typer runs on click itself
    from click.exceptions import ClickException, NoArgsIsHelpError

from pbv_onnx import __version__
from pbv_onnx.base.errors import EXIT_INTERRUPTED, PbvError

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
    if not debug:  # third-party warnings would break the one-line error contract; --debug shows them
        warnings.simplefilter("ignore")


def _usage_line(exc: ClickException) -> str:
    """Click's usage error as one line: `<command>: <message> (see <command> --help)`."""
    ctx = getattr(exc, "ctx", None)
    where = ctx.command_path if ctx is not None else "pbv-onnx"
    msg = " ".join(exc.format_message().split())
    return f"{where}: {msg} (see '{where} --help')"


def _interrupted() -> None:
    print("pbv-onnx: interrupted; no output was written", file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)


def run() -> None:
    """Run the app; turn every failure into `pbv-onnx: error: <file>: <what>` and an exit code."""
    try:
        # Not standalone: Click's own usage errors come back here to be printed as one line.
        code = app(standalone_mode=False)
    except PbvError as exc:
        if _state["debug"]:
            traceback.print_exc()
        print(f"pbv-onnx: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except NoArgsIsHelpError as exc:  # a bare `pbv-onnx` or group: the help text, as Click does
        exc.show()
        sys.exit(exc.exit_code)
    except ClickException as exc:
        print(f"pbv-onnx: error: {_usage_line(exc)}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, Abort):
        _interrupted()
    except Exception as exc:  # a bug: still one line unless --debug
        if _state["debug"]:
            raise
        print(f"pbv-onnx: error: internal error: {exc.__class__.__name__}: {exc} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)
    if code == EXIT_INTERRUPTED:  # Click turns Ctrl-C (and SIGTERM) inside a command into Exit(130)
        _interrupted()
    sys.exit(code if isinstance(code, int) else 0)
