"""The error model: one exception class per failure class, each with its own exit code."""

from __future__ import annotations

from os import PathLike


class PbvError(Exception):
    """A user-facing failure: `<file>: <what is wrong>`, never a traceback.

    `param`: the Python parameter(s) the message names (e.g. "top_objects"), so that the command
    line can show its own flag (`--top-objects`) in their place; the library never quotes a flag.
    """

    exit_code = 1

    def __init__(self, path: str | PathLike | None, message: str, param: str | tuple[str, ...] | None = None):
        self.path = None if path is None else str(path)
        self.message = message
        self.params: tuple[str, ...] = () if param is None else (param,) if isinstance(param, str) else tuple(param)
        super().__init__(str(self))

    @property
    def param(self) -> str | None:
        """The (first) parameter the message names, or None."""
        return self.params[0] if self.params else None

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class UsageError(PbvError):
    """Bad options or option combinations."""

    exit_code = 2


class InputDataError(PbvError):
    """A responses, features, readouts or image file that is missing, corrupt or malformed."""

    exit_code = 3


class ModelError(PbvError):
    """An ONNX model that is missing, corrupt, unsafe, or an export that failed verification."""

    exit_code = 4


class MismatchError(PbvError):
    """Files that belong to different models or stimulus sets."""

    exit_code = 5


class OutputError(PbvError):
    """An output that exists (without --force), is locked, or cannot be written."""

    exit_code = 6


class OutputLockedError(OutputError):
    """An output another running pbv-onnx process is writing (its lock is held)."""


class DependencyError(PbvError):
    """An optional dependency (the export extra, onnxruntime-gpu) that is not installed."""

    exit_code = 7


EXIT_INTERRUPTED = 130
