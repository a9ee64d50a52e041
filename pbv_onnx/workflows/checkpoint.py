"""Checkpoints of a long explain run: finished pairs kept beside the output, reused by --resume.

The work folder `.NAME.partial/` beside the output `NAME` holds `run.json` (what the run computes:
model and readouts hashes, method and options, the pairs with their images' content hashes) and
one `chunk-NNNNNN.npz` per finished engine call (pair indices and their input gradients). Chunks
are written to a temporary name and renamed, so a killed run leaves only whole chunks. `--resume`
reuses them only when `run.json` matches the new run exactly; the folder is removed once the
output is in place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from pbv_onnx.base.errors import MismatchError, OutputError

FORMAT = 1
RUN = "run.json"
_log = logging.getLogger(__name__)


def work_folder(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def check_leftovers(out: str | os.PathLike, resume: bool, force: bool) -> None:
    """Before any work: refuse to silently discard an interrupted run's checkpoints."""
    folder = work_folder(out)
    if folder.exists() and not resume and not force:
        raise OutputError(
            folder,
            "holds the checkpoints of an interrupted run: add resume=True to "
            "continue it, or force=True to start afresh",
            param=("resume", "force"),
        )


def discard(out: str | os.PathLike) -> None:
    """Remove the checkpoints of the run into `out` (its output is in place)."""
    shutil.rmtree(work_folder(out), ignore_errors=True)


def _note(msg: str) -> None:
    # the notes may name the parameters resume and force: the command line shows their flags
    _log.info(msg, extra={"params": ("resume", "force")})


def _digest(description: dict) -> str:
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _differences(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(keys) or "format"


class Checkpoints:
    """Finished pairs of one run, saved as they finish and loaded back on resume."""

    def __init__(
        self,
        out: str | os.PathLike,
        description: dict,
        resume: bool = False,
        force: bool = False,
        log: Callable[[str], None] | None = None,
    ):
        self.folder = work_folder(out)
        self.description = {"format": FORMAT, **description}
        self.key = _digest(self.description)
        self.log = log or _note  # where its notes go (resuming, damaged chunks): the logger by default
        self.saved = 0
        if not self.folder.exists():
            return
        if not resume:
            check_leftovers(out, resume, force)
            self.discard()
            return
        try:
            old = json.loads((self.folder / RUN).read_text())
        except (OSError, ValueError):
            old = None
        if old is None and not any(self.folder.glob("chunk-*.npz")):  # killed before its first chunk
            self.discard()
            return
        if not isinstance(old, dict) or old.get("key") != self.key:
            if force:
                self.discard()
                return
            what = _differences(old.get("description", {}), self.description) if isinstance(old, dict) else "unreadable"
            raise MismatchError(
                self.folder,
                f"checkpoints belong to another run (differs in: {what}); "
                "add force=True to discard them and start afresh",
                param="force",
            )

    def discard(self) -> None:
        """Remove the checkpoints (the output is in place, or force starts afresh)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def _start(self) -> None:
        if (self.folder / RUN).exists():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{RUN}.tmp"
        tmp.write_text(json.dumps({"key": self.key, "description": self.description}, indent=1, default=str))
        os.replace(tmp, self.folder / RUN)

    def load(self, grads: np.ndarray, inputs: np.ndarray | None) -> np.ndarray:
        """Fill `grads` (and `inputs`) [P, 2, 3, H, W] from the saved chunks; True where filled.

        A chunk that is unreadable or does not fit the run is ignored (its pairs are recomputed).
        """
        done = np.zeros(len(grads), bool)
        if not self.folder.is_dir():
            return done
        for path in sorted(self.folder.glob("chunk-*.npz")):
            try:
                with np.load(path, allow_pickle=False) as z:
                    idx = z["pair"]
                    g = z["input_grad"]
                    x = z["image"] if inputs is not None else None
                    key = str(z["key"])
                ok = (
                    key == self.key
                    and idx.ndim == 1
                    and np.issubdtype(idx.dtype, np.integer)
                    and len(idx)
                    and idx.min() >= 0
                    and idx.max() < len(grads)
                    and g.shape == (len(idx), *grads.shape[1:])
                    and np.isfinite(g).all()
                    and (x is None or x.shape == g.shape)
                )
            except Exception:  # a damaged file: zip, npy and key errors of many types
                ok = False
            if not ok:
                self.log(f"note: ignoring damaged checkpoint {path.name}; its pairs are recomputed")
                continue
            grads[idx] = g
            if inputs is not None:
                inputs[idx] = x
            done[idx] = True
        return done

    def save(self, idx: np.ndarray, grads: np.ndarray, inputs: np.ndarray | None) -> None:
        """Keep finished pairs `idx` (their gradients, and inputs where kept) as one chunk."""
        try:
            self._start()
            path = self.folder / f"chunk-{int(idx[0]):06d}.npz"
            tmp = self.folder / f".{path.name}.tmp"
            arrays = {"pair": np.asarray(idx, np.int64), "input_grad": grads, "key": np.asarray(self.key)}
            if inputs is not None:
                arrays["image"] = inputs
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        except OSError as exc:
            raise OutputError(self.folder, f"cannot write a checkpoint ({exc.strerror})") from None
        self.saved += len(idx)
