"""Entry point: registers every command module on the shared app."""

from __future__ import annotations

import gc
import signal

from pbv_onnx.cli import (
    data_cmds,  # noqa: F401  (import-responses, features, fit, predict, evaluate)
    demo_cmds,  # noqa: F401  (demo build, demo validate)
    explain_cmds,  # noqa: F401  (match, explain)
    model_cmds,  # noqa: F401  (export, info)
)
from pbv_onnx.cli.app import app, run


def main() -> None:
    # SIGTERM unwinds like Ctrl-C so temporary outputs are removed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # The imported modules live until exit: keep them out of every garbage collection, the one at
    # interpreter shutdown included (a noticeable share of a cold `explain`; docs/performance.md).
    gc.freeze()
    try:
        run()
    finally:
        gc.freeze()


__all__ = ["app", "main"]
