"""Entry point: registers every command module on the shared app."""

from __future__ import annotations

import signal

from cli.app import app, run
from cli import model_cmds  # noqa: F401  (export, info)


def main() -> None:
    # SIGTERM unwinds like Ctrl-C so temporary outputs are removed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    run()


__all__ = ["app", "main"]
