"""Interrupted and concurrent runs: killed explains leave the previous output or nothing, `--resume`
finishes them without recomputing checkpointed pairs, and two writers never share one output."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from test_explain import make_study_files

from pbv_onnx.base.atomic import atomic_dir, atomic_file, output_lock
from pbv_onnx.base.errors import MismatchError, OutputError
from pbv_onnx.runtime.engine import Engine
from pbv_onnx.workflows import explain as ex
from pbv_onnx.workflows.checkpoint import Checkpoints, work_folder

PBV = Path(sys.executable).parent / "pbv-onnx"
# Three pairs of channel 3; integrated gradients with many steps make each pair take a while, so
# a kill lands mid-computation.
RUN = [
    "--channel",
    "3",
    "--top-objects",
    "3",
    "--batch-size",
    "2",
    "--method",
    "integrated",
    "--steps",
    "1000",
    "--device",
    "cpu",
]
N_PAIRS = 3


def explain_cmd(files: dict, out: Path, *extra: str) -> list[str]:
    return [
        str(PBV),
        "explain",
        "--model",
        str(files["model"]),
        "--readouts",
        str(files["readouts"]),
        "--responses",
        str(files["responses"]),
        "--out",
        str(out),
        *RUN,
        *extra,
    ]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def gradients(out: Path) -> dict[str, np.ndarray]:
    with xr.open_dataset(out / "explanations.nc", engine="h5netcdf") as ds:
        return {k: ds[k].values.copy() for k in ("input_grad", "saliency", "similarity")} | {
            "pairs": ds["ooc"].values.astype(str).tolist() + ds["reference"].values.astype(str).tolist()
        }


def assert_same_explanations(a: Path, b: Path) -> None:
    ga, gb = gradients(a), gradients(b)
    assert ga["pairs"] == gb["pairs"]
    for k in ("input_grad", "saliency", "similarity"):
        np.testing.assert_array_equal(ga[k], gb[k], err_msg=k)


def hidden_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def wait_for_checkpoint(proc: subprocess.Popen, out: Path, timeout: float = 120) -> None:
    """Until the run has saved at least one finished pair (it is then computing the next)."""
    folder = work_folder(out)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if folder.is_dir() and any(folder.glob("chunk-*.npz")):
            return
        if proc.poll() is not None:
            pytest.fail(f"explain ended before its first checkpoint: {proc.stderr.read()}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail("no checkpoint appeared")


@pytest.fixture(scope="module")
def files(tiny_model, tmp_path_factory) -> dict:
    return make_study_files(tmp_path_factory.mktemp("interrupts"), tiny_model)


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory) -> Path:
    """An uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "out"
    res = run(explain_cmd(files, out))
    assert res.returncode == 0, res.stderr
    return out


# -- through the console script -----------------------------------------------------------------


def test_sigkill_mid_run_leaves_nothing_and_resume_completes_it(files, reference, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(explain_cmd(files, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(proc, out)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not out.exists()
    assert any(work_folder(out).glob("chunk-*.npz"))
    refused = run(explain_cmd(files, out))  # checkpoints are never discarded silently
    assert refused.returncode == 6 and "--resume" in refused.stderr, refused.stderr
    res = run(explain_cmd(files, out, "--resume"))
    assert res.returncode == 0, res.stderr
    resumed = [line for line in res.stderr.splitlines() if "resuming:" in line]
    assert len(resumed) == 1, res.stderr
    reused = int(resumed[0].split("resuming: ")[1].split(" of ")[0])
    assert 1 <= reused <= N_PAIRS
    assert_same_explanations(out, reference)
    # the stale lock, temporary folder and checkpoints of the killed run are gone
    assert hidden_leftovers(tmp_path) == []


def test_sigterm_keeps_the_previous_output_and_resume_replaces_it(files, reference, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("the earlier result")
    proc = subprocess.Popen(
        explain_cmd(files, out, "--force"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for_checkpoint(proc, out)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err.strip().splitlines()[-1]
    assert "Traceback" not in err
    assert [p.name for p in out.iterdir()] == ["previous.txt"]
    assert (out / "previous.txt").read_text() == "the earlier result"
    assert hidden_leftovers(tmp_path) == [work_folder(out).name]  # SIGTERM cleans up all but checkpoints
    res = run(explain_cmd(files, out, "--resume", "--force"))
    assert res.returncode == 0, res.stderr
    assert "resuming:" in res.stderr
    assert not (out / "previous.txt").exists()
    assert_same_explanations(out, reference)
    assert hidden_leftovers(tmp_path) == []


def test_concurrent_runs_into_different_folders_succeed_and_into_one_folder_the_second_is_refused(
    files, reference, tmp_path
):
    a, b = tmp_path / "a", tmp_path / "b"
    first = subprocess.Popen(explain_cmd(files, a), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    other = subprocess.Popen(explain_cmd(files, b), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(first, a)
    # Paused (its lock still held) while the second run tries: a fast first run must not finish
    # before the second one has started up.
    first.send_signal(signal.SIGSTOP)
    try:
        second = run(explain_cmd(files, a))
    finally:
        first.send_signal(signal.SIGCONT)
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 6, second.stderr
    assert len(lines) == 1 and lines[0].startswith("pbv-onnx: error: ") and str(a) in lines[0], second.stderr
    assert "being written by another pbv-onnx run" in lines[0]
    for proc in (first, other):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert_same_explanations(a, reference)
    assert_same_explanations(b, reference)
    assert hidden_leftovers(tmp_path) == []


# -- in process: resume skips work ----------------------------------------------------------------


class Interrupt:
    """Counts engine VJP calls; raises KeyboardInterrupt on call `stop_at` (as Ctrl-C would)."""

    def __init__(self, engine: Engine, stop_at: int | None = None):
        self.engine, self.stop_at, self.calls = engine, stop_at, 0
        self._vjp = engine.vjp

    def __call__(self, images, cotangents):
        self.calls += 1
        if self.stop_at is not None and self.calls == self.stop_at:
            raise KeyboardInterrupt
        return self._vjp(images, cotangents)


def _study(files):
    study = ex.open_study(
        files["model"], files["readouts"], files["responses"], batch_size=2, device="cpu", progress=False
    )
    pairs = ex.build_pairs(study, channels=["3", "7"], top_k_objects=3)
    return study, pairs


def test_resume_recomputes_only_the_pairs_not_checkpointed(files, tmp_path, monkeypatch):
    study, pairs = _study(files)
    assert len(pairs) == 6  # batch size 2: one pair per engine call
    full = ex.explain(study, pairs)
    desc = ex.run_description(study, pairs, "parallel", False)
    out = tmp_path / "out"
    notes: list[str] = []

    counter = Interrupt(study.engine, stop_at=3)
    monkeypatch.setattr(study.engine, "vjp", counter)
    with pytest.raises(KeyboardInterrupt):
        ex.explain(study, pairs, checkpoint=Checkpoints(out, desc, log=notes.append))
    assert len(list(work_folder(out).glob("chunk-*.npz"))) == 2
    assert "2 of 6 pairs are checkpointed" in notes[-1]

    counter = Interrupt(study.engine)
    monkeypatch.setattr(study.engine, "vjp", counter)
    resumed = ex.explain(study, pairs, checkpoint=Checkpoints(out, desc, resume=True, log=notes.append))
    assert counter.calls == 4
    assert "resuming: 2 of 6 pairs" in notes[-1]
    np.testing.assert_array_equal(resumed["input_grad"].values, full["input_grad"].values)
    np.testing.assert_array_equal(resumed["saliency"].values, full["saliency"].values)


def test_checkpoints_of_another_run_are_refused_or_discarded(files, tmp_path, monkeypatch):
    study, pairs = _study(files)
    desc = ex.run_description(study, pairs, "parallel", False)
    out = tmp_path / "out"
    monkeypatch.setattr(study.engine, "vjp", Interrupt(study.engine, stop_at=2))
    with pytest.raises(KeyboardInterrupt):
        ex.explain(study, pairs, checkpoint=Checkpoints(out, desc, log=lambda m: None))
    other = ex.run_description(study, pairs[:5], "gradient", False)
    with pytest.raises(MismatchError, match=r"differs in: method, pairs"):
        Checkpoints(out, other, resume=True)
    with pytest.raises(OutputError, match="add resume=True") as refused:
        Checkpoints(out, desc)
    assert refused.value.params == ("resume", "force")
    assert any(work_folder(out).glob("chunk-*.npz"))
    Checkpoints(out, other, resume=True, force=True)  # --force: start afresh
    assert not work_folder(out).exists()


def test_a_damaged_checkpoint_is_recomputed(files, tmp_path, monkeypatch):
    study, pairs = _study(files)
    pairs = pairs[:3]
    full = ex.explain(study, pairs)
    desc = ex.run_description(study, pairs, "parallel", False)
    out = tmp_path / "out"
    ex.explain(study, pairs, checkpoint=Checkpoints(out, desc))
    chunk = work_folder(out) / "chunk-000001.npz"
    chunk.write_bytes(chunk.read_bytes()[:100])  # a truncated file (a disk error, not a kill)
    counter = Interrupt(study.engine)
    monkeypatch.setattr(study.engine, "vjp", counter)
    notes: list[str] = []
    again = ex.explain(study, pairs, checkpoint=Checkpoints(out, desc, resume=True, log=notes.append))
    assert counter.calls == 1 and any("damaged checkpoint chunk-000001.npz" in n for n in notes)
    np.testing.assert_array_equal(again["input_grad"].values, full["input_grad"].values)


# -- in process: what a killed writer leaves behind ------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_next_writer_cleans_up_after_a_killed_one(tmp_path):
    out = tmp_path / "out.nc"
    (tmp_path / ".out.nc.lock").write_text(str(_dead_pid()))
    (tmp_path / ".out.nc.k3j_x9q2.tmp").write_bytes(b"half a file")
    (tmp_path / ".out.nc.more.nc.abc.tmp").write_bytes(b"not ours")  # another output's temporary
    with atomic_file(out) as tmp:
        tmp.write_text("whole")
    assert out.read_text() == "whole"
    assert hidden_leftovers(tmp_path) == [".out.nc.more.nc.abc.tmp"]


def test_a_folder_caught_mid_swap_is_restored(tmp_path):
    out = tmp_path / "out"
    old = tmp_path / ".out.q1w2e3r4.old"
    (old / "x").mkdir(parents=True)
    (old / "x" / "result.txt").write_text("previous")
    (tmp_path / ".out.z9y8x7w6.tmp").mkdir()
    with output_lock(out):
        pass
    assert (out / "result.txt").read_text() == "previous"
    assert hidden_leftovers(tmp_path) == []


def test_a_live_writer_is_never_disturbed(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("being written")
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys\nfrom pbv_onnx.base.atomic import output_lock\n"
                "try:\n    output_lock(sys.argv[1]).__enter__()\nexcept Exception as e:\n"
                "    print(type(e).__name__, e)\n",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "OutputLockedError" in probe.stdout and f"pid {os.getpid()}" in probe.stdout, probe
        assert (tmp / "a").exists()
    assert (out / "a").read_text() == "being written"
    shutil.rmtree(out)
