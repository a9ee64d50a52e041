"""Atomic outputs: write to a temporary sibling, rename into place; never overwrite without force.

Every output `NAME` has three kinds of hidden siblings: `.NAME.lock` (the writer's pid, held with
an OS lock for as long as the writer runs), `.NAME.<random>.tmp` (the output being written) and,
while `--force` swaps a folder, `.NAME.<random>.old` (the previous one). A run killed outright
(SIGKILL, power loss) can leave them behind; the next writer of `NAME` takes the lock over,
restores a previous output caught mid-swap and removes the rest before writing.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from pbv_onnx.base.errors import OutputError, OutputLockedError

try:
    import fcntl
except ImportError:  # not POSIX: fall back to pid files alone
    fcntl = None

_claimed: set[str] = set()  # outputs this process holds the lock of for a whole command


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_path(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.lock"


def _holder(lock: Path) -> int:
    try:
        return int(lock.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def _busy(dest: Path, lock: Path) -> OutputLockedError:
    pid = _holder(lock)
    who = f" (pid {pid})" if pid else ""
    return OutputLockedError(dest, f"is being written by another pbv-onnx run{who}; wait for it to finish or stop it")


def _acquire_flock(dest: Path, lock: Path) -> int:
    """An fd holding an exclusive flock on the lock file; the lock dies with the process."""
    for _ in range(5):
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise _busy(dest, lock) from None
        # A holder that just finished unlinked the file we opened: lock the new one instead.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            return fd
        os.close(fd)
    raise OutputError(dest, f"cannot take the lock {lock.name}")


def _acquire_pidfile(dest: Path, lock: Path) -> int:
    """Without flock: an exclusive create; a lock whose pid is gone is taken over."""
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid = _holder(lock)
            if pid and _pid_alive(pid):
                raise _busy(dest, lock) from None
            lock.unlink(missing_ok=True)
            continue
        os.write(fd, str(os.getpid()).encode())
        return fd
    raise OutputError(dest, f"cannot take the lock {lock.name}")


def _stale_siblings(dest: Path) -> list[Path]:
    pattern = re.compile(r"\." + re.escape(dest.name) + r"\.[a-z0-9_]+\.(tmp|old)")
    try:
        return [p for p in dest.parent.iterdir() if pattern.fullmatch(p.name)]
    except OSError:
        return []


def clean_stale(dest: str | os.PathLike) -> None:
    """Remove what killed writers of `dest` left behind; call only while holding its lock.

    A `.old` folder whose output is missing is the previous output caught mid-swap: restore it.
    """
    dest = Path(dest)
    for p in _stale_siblings(dest):
        if p.name.endswith(".old") and (p / "x").exists() and not dest.exists():
            os.replace(p / "x", dest)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


@contextlib.contextmanager
def output_lock(dest: str | os.PathLike) -> Iterator[None]:
    """Hold `.<name>.lock` beside `dest` so two runs never write the same output at once.

    A second writer (another process, or the same one) is refused with OutputLockedError. A lock
    left by a killed run is taken over, and its temporary siblings are removed.
    """
    dest = Path(dest)
    lock = _lock_path(dest)
    try:
        fd = (_acquire_flock if fcntl is not None else _acquire_pidfile)(dest, lock)
    except OSError as exc:
        raise OutputError(lock.parent, f"cannot write here ({exc.strerror})") from None
    try:
        clean_stale(dest)
        yield
    finally:
        lock.unlink(missing_ok=True)  # before closing, so no one locks a file about to vanish
        os.close(fd)


def check_writable(dest: str | os.PathLike, force: bool) -> Path:
    """Refuse an existing output unless `force`; make sure its folder exists."""
    dest = Path(dest)
    if dest.exists() and not force:
        raise OutputError(dest, "already exists (use force=True to overwrite)", param="force")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(dest.parent, f"cannot create folder: {exc.strerror}") from None
    if not os.access(dest.parent, os.W_OK | os.X_OK):
        raise OutputError(dest.parent, "folder is not writable")
    return dest


@contextlib.contextmanager
def claim_output(dest: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Check `dest` and hold its lock for a whole command, so a concurrent run into the same
    output is refused at once rather than after its work; atomic writes of `dest` inside reuse it."""
    dest = check_writable(dest, force)
    key = os.path.abspath(dest)
    if key in _claimed:
        yield dest
        return
    with output_lock(dest):
        _claimed.add(key)
        try:
            check_writable(dest, force)  # it may have appeared between the first check and the lock
            yield dest
        finally:
            _claimed.discard(key)


def _lock_unless_claimed(dest: Path):
    return contextlib.nullcontext() if os.path.abspath(dest) in _claimed else output_lock(dest)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM for the two renames of a swap, so Ctrl-C cannot split them."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def _write_errors(dest: Path) -> Iterator[None]:
    """A failed write (disk full, permissions) is an output error naming the output, not a crash."""
    try:
        yield
    except OSError as exc:
        raise OutputError(dest, f"cannot write ({exc.strerror or exc.__class__.__name__})") from None


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success rename it onto `dest`, else remove it."""
    dest = check_writable(dest, force)
    with _lock_unless_claimed(dest):
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        os.close(fd)
        tmp = Path(tmp)
        try:
            with _write_errors(dest):
                yield tmp
                if dest.exists() and not force:  # appeared while we worked: a concurrent run
                    raise OutputError(dest, "was created by another process while this one ran")
                os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `dest`; on success swap it into place as a whole."""
    dest = check_writable(dest, force)
    with _lock_unless_claimed(dest):
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
        try:
            with _write_errors(dest):
                yield tmp
            if dest.exists():
                if not force:
                    raise OutputError(dest, "was created by another process while this one ran")
                # Swap: the old folder moves aside in one rename, the new one takes its place.
                # A kill between the two renames is repaired by the next writer (clean_stale).
                old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
                with _write_errors(dest), _signals_deferred():
                    os.replace(dest, old / "x")
                    os.replace(tmp, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                with _write_errors(dest):
                    os.replace(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def write_netcdf(ds, dest: str | os.PathLike, force: bool = False) -> Path:
    """Write an xarray Dataset to NetCDF-4 atomically."""
    with atomic_file(dest, force) as tmp:
        ds.to_netcdf(tmp, engine="h5netcdf")
    return Path(dest)
