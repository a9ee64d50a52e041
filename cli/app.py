"""The shared Typer app and the error boundary: one-line errors, distinct exit codes."""

from __future__ import annotations

import logging
import re
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

_state = {"debug": False, "progress": True}
LOGGER = "pbv_onnx"


class _StderrHandler(logging.StreamHandler):
    """Writes to the sys.stderr of the moment (a test may have replaced it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it; sys.stderr is read at each write
        pass


class _Formatter(logging.Formatter):
    """`pbv-onnx: <message>`, flags in place of the parameters a record names (extra `params`)."""

    def format(self, record: logging.LogRecord) -> str:
        text = with_flags(record.getMessage(), tuple(getattr(record, "params", ())))
        return f"pbv-onnx: {text}"


def configure_logging(verbose: bool = False, quiet: bool = False) -> None:
    """The library's log on stderr: INFO by default, DEBUG with -v, warnings only with -q."""
    logger = logging.getLogger(LOGGER)
    for h in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(h)
    handler = _StderrHandler()
    handler.setFormatter(_Formatter())
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


def progress() -> bool:
    """Whether commands show progress bars (off with -q)."""
    return _state["progress"]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pbv-onnx {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Log debugging detail too."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="Only warnings and errors; no progress bars."),
) -> None:
    _state["debug"] = debug
    _state["progress"] = not quiet
    configure_logging(verbose, quiet)
    if not debug:  # third-party warnings would break the one-line error contract; --debug shows them
        warnings.simplefilter("ignore")


def _usage_line(exc: ClickException) -> str:
    """Click's usage error as one line: `<command>: <message> (see <command> --help)`."""
    ctx = getattr(exc, "ctx", None)
    where = ctx.command_path if ctx is not None else "pbv-onnx"
    msg = " ".join(exc.format_message().split())
    return f"{where}: {msg} (see '{where} --help')"


# Python parameter -> command-line flag where the flag is not `--` + the name with dashes.
FLAGS = {
    "csv_path": "--csv",
    "npy_path": "--npy",
    "images_root": "--images",
    "features_cache": "--features",
    "n_channels": "--channels",
    "per_object": "--per-object",
}


def flag(param: str) -> str:
    """The command-line flag of a library parameter: `top_objects` -> `--top-objects`."""
    return FLAGS.get(param, "--" + param.replace("_", "-"))


def with_flags(message: str, params: tuple[str, ...]) -> str:
    """A library message as the command line shows it: each parameter it names becomes its flag
    (`force=True` -> `--force`, `folds=9` -> `--folds 9`, `top_objects` -> `--top-objects`). A message
    that writes `name=` anywhere has only those forms replaced (its other uses of the word are prose)."""
    for param in params:
        name = rf"(?<![\w./-]){re.escape(param)}"
        keyword = re.search(rf"{name}=", message) is not None
        pattern = rf"{name}(?:=True\b|(=))" if keyword else rf"{name}(?![\w=-])"
        message = re.sub(pattern, lambda m: flag(param) + (" " if m.lastindex else ""), message)
    return message


def cli_message(exc: PbvError) -> str:
    """The error line of a PbvError, flags in place of the parameters it names."""
    msg = with_flags(exc.message, exc.params)
    return f"{exc.path}: {msg}" if exc.path else msg


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
        print(f"pbv-onnx: error: {cli_message(exc)}", file=sys.stderr)
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
        print(
            f"pbv-onnx: error: internal error: {exc.__class__.__name__}: {exc} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        sys.exit(1)
    if code == EXIT_INTERRUPTED:  # Click turns Ctrl-C (and SIGTERM) inside a command into Exit(130)
        _interrupted()
    sys.exit(code if isinstance(code, int) else 0)
