"""onnxruntime sessions: providers, options chosen by measurement, and a cache of optimised graphs.

Creating a CPU session spends most of its time in graph optimisation (NCHWc layouts, fusions),
several times what loading the graph it produces takes (docs/performance.md).
The first session of a model on a machine saves that optimised graph in a cache folder; later
sessions load it with optimisation off. The entry is keyed by the model's sha256, the
onnxruntime version and the CPU (the optimised graph uses this CPU's NCHWc block size). It is
published whole (written to a temporary file, renamed), and a sidecar records its size and
modification time, checked on every load (hashing it would cost more than half of what the cache
saves). Any cache problem (unwritable folder, damaged or replaced entry) falls back to optimising
in memory: the cache can make a run faster, never different or failed.

A graph may also be rewritten after onnxruntime optimises it (a Rewrite; the K-per-image graph's,
layout.py). The rewritten graph is used, and cached, only where it computes what onnxruntime's
own graph computes on a probe input; otherwise, or if the rewrite fails, onnxruntime's graph is.
With the cache off the rewrite goes through a temporary file.

Folder: `$PBV_ONNX_CACHE`, else `$XDG_CACHE_HOME/pbv-onnx`, else `~/.cache/pbv-onnx`;
`PBV_ONNX_CACHE=off` turns the cache off. Its size is bounded (`$PBV_ONNX_CACHE_MAX`, default 4G):
every re-exported model and every onnxruntime upgrade makes new entries, so after each store the
least recently used entries go until the folder fits (a hit marks an entry used).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pbv_onnx.base.errors import DependencyError, UsageError

CACHE_ENV = "PBV_ONNX_CACHE"
CACHE_OFF = {"off", "0", "no", "false", "none"}
CACHE_MAX_ENV = "PBV_ONNX_CACHE_MAX"
CACHE_MAX_DEFAULT = "4G"
# A temporary file this old is a killed writer's (a store takes seconds), not one in progress.
STALE_TEMP_S = 24 * 3600

_log = logging.getLogger(__name__)


def choose_providers(device: str) -> list[str]:
    """`auto|cuda|cpu` -> onnxruntime execution providers, CUDA only where it can run."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise DependencyError(None, f"device=cuda: {cuda_missing_reason()}", param="device")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device != "auto":
        raise UsageError(None, f"device must be auto, cuda or cpu, not {device!r}", param="device")
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


# onnxruntime and onnxruntime-gpu install the same files (the package `onnxruntime`): with both, the
# one pip wrote last wins (after `pip install 'pbv-onnx[gpu]'`: the CPU-only one).
GPU_INSTALL = "pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'onnxruntime-gpu[cuda,cudnn]'"


def _installed(distribution: str) -> bool:
    from importlib import metadata

    try:
        metadata.distribution(distribution)
        return True
    except metadata.PackageNotFoundError:
        return False


def cuda_missing_reason() -> str:
    """Why this onnxruntime has no CUDA provider, and the command that fixes it."""
    if _installed("onnxruntime-gpu") and _installed("onnxruntime"):
        return (
            "onnxruntime-gpu is installed, but the CPU-only onnxruntime installed beside it replaced "
            f"its files; keep only the GPU build: {GPU_INSTALL}"
        )
    return f"onnxruntime has no CUDA provider here; on a machine with an NVIDIA GPU: {GPU_INSTALL}"


# CUDA provider options (measured by bench/gpu_check.py; figures in docs/performance.md). TF32 off:
# with it the input gradients are several per cent away from the CPU provider's. Heuristic cuDNN
# algorithm choice: the same speed per call as exhaustive search, without its benchmarking of every
# convolution on each new input shape (a cold `explain` meets several batch sizes).
CUDA_OPTIONS = {"use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"}


def provider_name(provider) -> str:
    """The name of a provider entry (a name, or a (name, options) pair)."""
    return provider if isinstance(provider, str) else provider[0]


def with_cuda_options(providers: list, overrides: dict[str, str] | None = None) -> list:
    """The provider list with CUDA_OPTIONS (and `overrides`) attached to the CUDA provider."""
    options = {**CUDA_OPTIONS, **{k: str(v) for k, v in (overrides or {}).items()}}
    return [(p, options) if p == "CUDAExecutionProvider" else p for p in providers]


def preload_cuda_libraries() -> str:
    """Load the CUDA and cuDNN libraries of NVIDIA's pip packages (`onnxruntime-gpu[cuda,cudnn]`), or
    the system's, before a CUDA session, so that no LD_LIBRARY_PATH is needed. Returns the first
    library that failed to load ('' when none did); onnxruntime's own messages are kept off stdout."""
    import contextlib
    import io

    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)  # onnxruntime-gpu >= 1.21
    if preload is None:
        return ""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            preload()
        except Exception as exc:  # a broken install: the session below reports it too
            return str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
    failed = [line.strip() for line in out.getvalue().splitlines() if line.startswith("Failed to load")]
    return failed[0] if failed else ""


def quiet_cuda_log() -> None:
    """Silence onnxruntime's process-wide log for CUDA sessions: cuDNN's frontend logs an error for
    each convolution it hands back to the classic path ("No execution plans support the graph"),
    which is routine, and a provider that cannot load is reported by the Engine in one line."""
    import onnxruntime as ort

    ort.set_default_logger_severity(4)


def one_blas_thread():
    """A context in which numpy's BLAS runs on one thread (threadpoolctl). Around work that
    alternates small numpy products with onnxruntime calls: after a multithreaded BLAS call,
    OpenBLAS's idle workers keep spinning for a while and take the cores from onnxruntime's
    threads (docs/performance.md), and small products gain nothing from more threads."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, user_api="blas")


def session_options(threads: int | None = None, cpu: bool = True):
    """onnxruntime options, chosen by measurement (bench/run.py; figures in docs/performance.md):
    all graph optimisations (NCHWc convolutions; the lower levels are slower); worker threads that
    sleep when idle instead of spinning: spinning gains nothing on a quiet machine, while a
    spinning session's workers run on after its call and slow whatever runs next, another
    session of the same model or other processes; `threads` intra-op threads (default: one per
    physical core). On the CPU (`cpu`), no memory pattern: with it a session's second call
    allocates the planned block afresh and page-faults it in, and explain peaks higher, for no
    speed once warm."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
    if cpu:
        opts.enable_mem_pattern = False
    opts.log_severity_level = 3
    return opts


def cache_dir() -> Path | None:
    """The cache folder, or None when `PBV_ONNX_CACHE=off`."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in CACHE_OFF or not value.strip() else Path(value)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pbv-onnx"


def parse_bytes(text: str) -> int:
    """`500M`, `4G`, `64k` or a byte count -> bytes (binary units); ValueError otherwise."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise ValueError(f"not a size: {text!r}")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def cache_limit() -> int:
    """The cache's size limit in bytes: `$PBV_ONNX_CACHE_MAX`, else 4 GiB; a value that is not a
    size is reported once per run and the default used (the cache never fails a run)."""
    value = os.environ.get(CACHE_MAX_ENV, CACHE_MAX_DEFAULT)
    try:
        return parse_bytes(value)
    except ValueError:
        _warn_bad_limit(value)
        return parse_bytes(CACHE_MAX_DEFAULT)


@functools.lru_cache(maxsize=None)
def _warn_bad_limit(value: str) -> None:
    """One warning per bad value, not one per session."""
    _log.warning("%s=%r is not a size (e.g. 500M, 4G); the cache keeps %s", CACHE_MAX_ENV, value, CACHE_MAX_DEFAULT)


def prune_cache(folder: Path, keep: Path | None = None, limit: int | None = None) -> list[Path]:
    """Remove the least recently used entries until `folder` holds at most `limit` bytes (default
    cache_limit()), never `keep`; and temporary files of killed writers. Returns what went. Each
    entry's stamp goes before its graph, so a concurrent reader sees a miss, never half an entry."""
    limit = cache_limit() if limit is None else limit
    gone: list[Path] = []
    now = time.time()
    entries = []
    for graph in folder.glob("*.onnx"):
        try:
            size = graph.stat().st_size
        except OSError:  # removed by another process meanwhile
            continue
        try:
            st = graph.with_suffix(".stamp").stat()
            used, size = st.st_mtime_ns, size + st.st_size
        except OSError:  # no stamp: an entry no reader will use, so the first to go
            used = 0
        entries.append((used, graph, size))
    for temp in folder.glob(".*"):
        try:
            if now - temp.stat().st_mtime > STALE_TEMP_S:
                temp.unlink()
                gone.append(temp)
        except OSError:
            pass
    total = sum(size for _, _, size in entries)
    for _, graph, size in sorted(entries, key=lambda e: e[0]):
        if total <= limit:
            break
        if graph == keep:
            continue
        try:
            graph.with_suffix(".stamp").unlink(missing_ok=True)
            graph.unlink(missing_ok=True)
        except OSError:
            continue
        total -= size
        gone.append(graph)
    if gone:
        _log.debug("session cache %s: removed %s", folder, ", ".join(p.name for p in gone))
    return gone


@functools.lru_cache(maxsize=1)
def _cpu_identity() -> str:
    """What the optimised graph depends on besides the model: machine and instruction-set flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = " ".join(sorted(line.split(":", 1)[1].split()))
                    break
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {flags}"


def cache_key(model_sha256: str, graph: str) -> str:
    """Entry name for one graph (`vjp` or `features`) of one model on this machine and runtime."""
    import onnxruntime as ort

    ident = "\n".join([model_sha256, graph, ort.__version__, _cpu_identity(), "level=all"])
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size} {st.st_mtime_ns}"


def _load_entry(path: Path) -> bytes | None:
    """The cached graph if it is the file the cache wrote (size and mtime as recorded), else None;
    a hit marks the entry used (its stamp's mtime, which prune_cache reads)."""
    try:
        stamp = path.with_suffix(".stamp")
        want = stamp.read_text().strip()
        if _stamp(path) != want:
            return None
        data = path.read_bytes()
    except OSError:
        return None
    _mark_used(stamp)
    return data


def _mark_used(stamp: Path) -> None:
    """Set the stamp's mtime to now from the fine clock: the file system's own (a few ms coarse)
    would tie a hit with the store just before it."""
    now = time.time_ns()
    try:
        os.utime(stamp, ns=(now, now))
    except OSError:  # a read-only cache still serves its entries
        pass


def _store_entry(folder: Path, path: Path, make_session):
    """Create the session with onnxruntime writing its optimised graph to a temporary file, then
    publish that file and its stamp (a reader never sees a graph with a stale stamp: the old stamp
    goes first, the new one last)."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp.onnx", dir=folder)
    os.close(fd)
    try:
        sess = make_session(tmp)
        path.with_suffix(".stamp").unlink(missing_ok=True)
        os.replace(tmp, path)
        stamp_tmp = Path(tmp).with_suffix(".stamp")
        stamp_tmp.write_text(_stamp(path) + "\n")
        os.replace(stamp_tmp, path.with_suffix(".stamp"))
        _mark_used(path.with_suffix(".stamp"))
        try:
            prune_cache(folder, keep=path)
        except OSError:  # pruning only bounds the folder; the entry is stored
            pass
        return sess
    finally:
        for leftover in (Path(tmp), Path(tmp).with_suffix(".stamp")):
            leftover.unlink(missing_ok=True)


@dataclass(frozen=True)
class Rewrite:
    """A change to onnxruntime's optimised CPU graph (see layout.py). `apply` edits the saved graph
    (a ModelProto) in place and returns how many places it changed; `probe` gives feeds on which
    the rewritten graph must compute what the optimised graph computes, or it is not used. `name`
    (with its version) keys the cache entry of the rewritten graph."""

    name: str
    probe: Callable[[], dict]
    apply: Callable[[Any], int]


# Largest relative L2 difference of a rewritten graph's outputs from the optimised graph's on the
# probe: the rewrites reorder memory, not arithmetic (measured: bitwise equal); a wrong layout
# would be off by the size of the values themselves.
REWRITE_TOLERANCE = 1e-6


def _load_optimised(model: bytes | str, options, providers):
    """A session for a graph onnxruntime has already optimised: loaded with optimisation off."""
    import onnxruntime as ort

    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(model, options, providers=providers)
    finally:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def _agrees(reference, candidate, feeds: dict) -> bool:
    """Whether every output of `candidate` on `feeds` is finite and within REWRITE_TOLERANCE of
    `reference`'s."""
    import numpy as np

    names = [o.name for o in reference.get_outputs()]
    for want, got in zip(reference.run(names, feeds), candidate.run(names, feeds)):
        want, got = np.asarray(want, np.float64), np.asarray(got, np.float64)
        if want.shape != got.shape or not np.all(np.isfinite(got)):
            return False
        if np.linalg.norm(got - want) > REWRITE_TOLERANCE * max(np.linalg.norm(want), 1e-30):
            return False
    return True


def _optimise(source: bytes | str, options, providers, target: str, rewrite: Rewrite | None):
    """A session for `source` with all optimisations, its optimised graph written to `target`;
    with `rewrite`, the rewritten graph (written over `target`) where it changes something and
    agrees with the optimised one on the probe, else the optimised graph."""
    import onnxruntime as ort

    options.optimized_model_filepath = target
    try:
        sess = ort.InferenceSession(source, options, providers=providers)
    finally:
        options.optimized_model_filepath = ""
    if rewrite is None:
        return sess
    try:
        import onnx

        model = onnx.load(target)
        if not rewrite.apply(model):
            return sess
        data = model.SerializeToString()
        del model
        candidate = _load_optimised(data, options, providers)
        if not _agrees(sess, candidate, rewrite.probe()):
            return sess
    except Exception:  # a rewrite only ever makes a graph faster: without it the session is whole
        return sess
    with open(target, "wb") as f:  # what the cache keeps is what the session runs
        f.write(data)
    return candidate


def create_session(
    source: bytes | str | Callable[[], bytes | str],
    options,
    providers: list,
    model_sha256: str | None = None,
    graph: str = "vjp",
    rewrite: Rewrite | None = None,
):
    """An InferenceSession for `source` (model bytes or path, or a function making them, called
    only on a cache miss). On the CPU provider with a known model hash, the optimised graph comes
    from the cache when it holds a whole entry, and goes into it otherwise. `rewrite` (CPU
    provider, all optimisations) is applied to the optimised graph where it holds (Rewrite).
    Returns (session, "hit" | "stored" | "off")."""
    import onnxruntime as ort

    def make_source():
        return source() if callable(source) else source

    def plain():
        return ort.InferenceSession(make_source(), options, providers=providers)

    if (
        provider_name(providers[0]) != "CPUExecutionProvider"
        or options.graph_optimization_level != ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    ):
        return plain(), "off"

    def uncached():
        if rewrite is None:
            return plain()
        try:
            with tempfile.TemporaryDirectory(prefix="pbv-onnx-") as tmp:
                return _optimise(make_source(), options, providers, os.path.join(tmp, "graph.onnx"), rewrite)
        except OSError:  # no temporary folder: the graph as onnxruntime optimises it
            return plain()

    folder = cache_dir()
    if folder is None or model_sha256 is None:
        return uncached(), "off"
    path = folder / f"{cache_key(model_sha256, graph if rewrite is None else f'{graph}+{rewrite.name}')}.onnx"
    cached = _load_entry(path)
    if cached is not None:
        try:
            return _load_optimised(cached, options, providers), "hit"
        except Exception:  # an entry this runtime cannot load: rebuild it below
            pass

    if callable(source):
        source = source()
    try:
        return _store_entry(folder, path, lambda tmp: _optimise(source, options, providers, tmp, rewrite)), "stored"
    except Exception:  # unwritable or full cache folder; a bad model fails again just below
        return uncached(), "off"
