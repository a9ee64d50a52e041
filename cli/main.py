"""Entry point: registers every command module on the shared app."""

from __future__ import annotations

import gc
import signal

from pbv_onnx.cli.app import app, run
from pbv_onnx.cli import model_cmds  # noqa: F401  (export, info)
from pbv_onnx.cli import data_cmds  # noqa: F401  (import-responses, features, fit, predict, evaluate)
from pbv_onnx.cli import explain_cmds  # noqa: F401  (match, explain)
from pbv_onnx.cli import demo_cmds  # noqa: F401  (demo build, demo validate)


def main() -> None:
    # SIGTERM unwinds like Ctrl-C so temporary outputs are removed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # The imported modules live until exit: keep them out of every garbage collection, the one at
    # interpreter shutdown included (0.1-0.2 s of a cold `explain` with pandas loaded).
    gc.freeze()
    try:
        run()
    finally:
        gc.freeze()


__all__ = ["app", "main"]
