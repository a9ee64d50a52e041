"""Atomic outputs: all or nothing, no overwrite without force, one writer at a time."""

from __future__ import annotations

import os

import pytest

from pbv_onnx.base.atomic import atomic_dir, atomic_file, output_lock
from pbv_onnx.base.errors import OutputError


def test_failed_write_leaves_nothing(tmp_path):
    dest = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_file(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_kept_without_force_and_replaced_with_force(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old").write_text("old")
    with pytest.raises(OutputError, match=r"use force=True to overwrite"):
        with atomic_dir(dest):
            pass
    assert (dest / "old").exists()
    with pytest.raises(RuntimeError):
        with atomic_dir(dest, force=True) as tmp:
            (tmp / "new").write_text("new")
            raise RuntimeError("killed")
    assert sorted(p.name for p in dest.iterdir()) == ["old"]
    with atomic_dir(dest, force=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in dest.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_second_writer_of_the_same_output_is_refused_while_the_first_runs(tmp_path):
    dest = tmp_path / "out"
    with atomic_dir(dest):
        with pytest.raises(OutputError, match="another pbv-onnx run"):
            with atomic_dir(dest):
                pass


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    dest = tmp_path / "out.nc"
    (tmp_path / ".out.nc.lock").write_text("999999999")
    with output_lock(dest):
        assert (tmp_path / ".out.nc.lock").read_text() == str(os.getpid())
    assert not (tmp_path / ".out.nc.lock").exists()
