"""GPU check: onnxruntime providers; on CUDA, parity (CUDA fp32 / TF32 / fp16 vs CPU fp32) and
timings of session creation, first call, forward+VJP, forward-only, multi-cotangent VJP, IO binding
against plain runs, explain's mix of call shapes with and without the Engine's fixed shapes, and
torch CUDA autograd where torch is importable.

    python bench/gpu_check.py [MODEL.onnx ...] [--images 8] [--weights DIR] [--photos DIR] [--out ...]

Without models given it uses build/bench/*.onnx, build/models/*.onnx and models/*.onnx. `--weights`
is a folder searched (by file name, checked by sha256) for weights files the models' metadata name
at a path that does not exist here. Exits 0 after reporting, also when no CUDA provider exists (the
report says so); 1 on a failed fp32 parity check (fp16 is reported, not required).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from pbv_onnx.method.stats import rel_l2  # noqa: E402

# CUDA fp32 (TF32 off) vs CPU fp32 input_grad, relative L2. Different convolution algorithms sum in
# different orders: the CPU provider itself is 1.9e-3 to 7e-3 away from torch autograd on the
# benchmarked backbones, and CUDA measured 0.3e-3 to 1.4e-3 from the CPU provider.
FP32_TOL = 1e-2
FP16_TOL = 5e-2  # fp16 vs fp32, reported (fp16_ok), not part of `ok`: fp16 is an option to weigh
# CUDA provider configurations compared (over sessions.CUDA_OPTIONS, the default).
CONFIGS = {"default": {}, "exhaustive": {"cudnn_conv_algo_search": "EXHAUSTIVE"}, "tf32": {"use_tf32": "1"}}


def gpu_name() -> str:
    import subprocess

    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def map_corr(a, b) -> float:
    """Pearson correlation of per-pixel saliency (|gradient| summed over colour), what users see."""
    ma = np.abs(np.asarray(a, np.float64)).sum(axis=-3).ravel()
    mb = np.abs(np.asarray(b, np.float64)).sum(axis=-3).ravel()
    return float(np.corrcoef(ma, mb)[0, 1])


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns: dict, repeats: int) -> tuple[dict, list]:
    """Medians of each function's time over `repeats` rounds that run every function once (after
    one warm-up call each), and the per-round times. The order rotates from round to round: with a
    fixed order the first function of each round ran 7-18% slower than the same call later in the
    round on an H200, enough to make either of two equal configurations look faster."""
    for fn in fns.values():
        fn()
    names, rounds = list(fns), []
    for r in range(repeats):
        t = {}
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            t[name] = time.perf_counter() - t0
        rounds.append(t)
    return {name: statistics.median(r[name] for r in rounds) for name in fns}, rounds


def paired(rounds: list, a: str, b: str) -> float:
    """Median over rounds of time(a) / time(b)."""
    return statistics.median(r[a] / r[b] for r in rounds)


def images_for(spec, n: int, photos: Path | None) -> np.ndarray:
    """n preprocessed photographs from `photos` (default: the shared folder), else uniform noise."""
    from pbv_onnx.demo.sources import shared_photos
    from pbv_onnx.runtime.images import load_batch

    files = shared_photos(photos)
    if files:
        return load_batch([files[i % len(files)] for i in range(n)], spec)
    rng = np.random.default_rng(0)
    return rng.uniform(-1, 1, (n, 3, *spec.input_size)).astype(np.float32)


def weights_file(record: dict, search: Path | None) -> Path | None:
    """The weights file a model's metadata names: its path, else a file of that name in `search`
    with the recorded sha256."""
    from pbv_onnx.runtime.modelfile import file_sha256

    path = Path(record.get("path", ""))
    if path.is_file():
        return path
    if search is not None and (search / path.name).is_file():
        cand = search / path.name
        if record.get("sha256") in (None, file_sha256(cand)):
            return cand
    return None


def torch_cuda(info, x: np.ndarray, cot: np.ndarray, search: Path | None) -> dict:
    """torch CUDA autograd on the same backbone (rebuilt from the model's metadata), TF32 off:
    {"torch": version, "run": fn, "run_benchmark": fn (cudnn.benchmark, its counterpart of
    EXHAUSTIVE search), "grad": input gradient}, or {"skipped": why}."""
    try:
        import torch

        from pbv_onnx.export import backbone
    except Exception as exc:  # torch/torchvision absent on this machine
        return {"skipped": f"torch not importable ({exc.__class__.__name__}: {exc})"}
    if not torch.cuda.is_available():
        return {"skipped": "torch has no CUDA here"}
    w = info.metadata.get("weights", {})
    if w.get("source") == "none":
        bb = backbone.load_backbone(info.arch, "none", int(w.get("seed", 0)))
    elif w.get("source") == "file" and (path := weights_file(w, search)) is not None:
        bb = backbone.load_backbone(info.arch, str(path))
    else:
        return {"skipped": f"weights {w} not reproducible here"}
    net = backbone.truncate(bb.model, info.layer or None, info.pool).cuda().eval()
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    xt, ct = torch.from_numpy(x).cuda(), torch.from_numpy(cot).cuda()

    def run(bench: bool = False):
        torch.backends.cudnn.benchmark = bench
        xi = xt.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(net(xi), xi, ct)
        return g.cpu().numpy()  # the runtime returns numpy arrays on the host too

    grad = run()
    return {"torch": torch.__version__, "run": run, "run_benchmark": lambda: run(True), "grad": grad}


# explain's mix of engine calls: (images, cotangents per image; 0 = the one-per-image pass)
EXPLAIN_CALLS = [(6, 0), (2, 4), (11, 0), (3, 3), (1, 5), (14, 0), (4, 2)]


def explain_pattern(path: Path, x: np.ndarray, fixed_shapes: bool) -> dict:
    """Seconds for EXPLAIN_CALLS on a fresh engine at explain's batch size: the first pass (sessions
    made, convolutions planned) and a second one. Unpadded, each call's shape differs from the last."""
    from pbv_onnx.runtime.engine import Engine

    eng = Engine(path, device="cuda", fixed_shapes=fixed_shapes)
    fs = eng.info.feature_shape
    rng = np.random.default_rng(1)
    images = x[np.arange(14) % len(x)] + np.arange(14, dtype=np.float32)[:, None, None, None] * 1e-3  # distinct
    feeds = [
        (images[:m], rng.standard_normal((m, *fs) if k == 0 else (m, k, *fs)).astype(np.float32), k)
        for m, k in EXPLAIN_CALLS
    ]

    def once() -> float:
        t0 = time.perf_counter()
        for im, c, k in feeds:
            eng.vjp(im, c) if k == 0 else eng.vjp_multi(im, c)
        return time.perf_counter() - t0

    return {"first_s": once(), "again_s": once(), "calls": len(feeds), "pads": eng.pads}


def check_model(path: Path, n: int, repeats: int, search: Path | None, photos: Path | None = None) -> dict:
    from pbv_onnx.runtime.engine import Engine

    cpu = Engine(path, device="cpu", batch_size=n)
    x = images_for(cpu.info.preprocessing, n, photos)
    rng = np.random.default_rng(0)
    cot = rng.standard_normal((n, *cpu.info.feature_shape)).astype(np.float32)
    f_cpu, g_cpu = cpu.vjp(x, cot)
    row: dict = {"model": str(path), "arch": cpu.info.arch, "layer": cpu.info.layer, "images": n}
    row["cpu_vjp_s"] = median_time(lambda: cpu.vjp(x, cot), 3)
    engines = {}
    for name, opts in CONFIGS.items():  # start-up costs, in this order (the first also starts CUDA)
        t0 = time.perf_counter()
        gpu = Engine(path, device="cuda", batch_size=n, cuda_options=opts)
        gpu.provider  # noqa: B018  (makes the VJP session)
        t1 = time.perf_counter()
        f_gpu, g_gpu = gpu.vjp(x, cot)
        t2 = time.perf_counter()
        gpu.features(x)
        row[name] = {
            "provider": gpu.provider,
            "session_s": t1 - t0,
            "first_vjp_s": t2 - t1,
            "features_vs_cpu": rel_l2(f_gpu, f_cpu),
            "input_grad_vs_cpu": rel_l2(g_gpu, g_cpu),
        }
        engines[name] = (gpu, g_gpu)
    gpu, g_gpu = engines["default"]
    # IO binding against plain runs, on two engines made one after the other. (Earlier runs timed the
    # default engine, the process's first, against a later one; on alexnet the later float32 engines
    # all took 0.76-0.94x the first one's time, binding or not.)
    bound = Engine(path, device="cuda", batch_size=n, io_binding=True)
    plain = Engine(path, device="cuda", batch_size=n, io_binding=False)
    big = Engine(path, device="cuda", batch_size=4 * n)  # its own session: each session sees one shape
    xb = np.concatenate([x] * 4)
    cb = rng.standard_normal((len(xb), *cpu.info.feature_shape)).astype(np.float32)
    # Steady state, interleaved: every configuration runs once per round, so a GPU clocking up or a
    # busy host affects all alike; ratios are medians of within-round ratios.
    fns = {f"{name}_vjp": (lambda e=e: e.vjp(x, cot)) for name, (e, _) in engines.items()}
    fns.update({f"{name}_forward": (lambda e=e: e.features(x)) for name, (e, _) in engines.items()})
    fns["io_bound"] = lambda: bound.vjp(x, cot)
    fns["io_plain"] = lambda: plain.vjp(x, cot)
    fns["default_x4_images"] = lambda: big.vjp(xb, cb)
    times, rounds = interleaved(fns, repeats)
    for name in CONFIGS:
        r = row[name]
        r["vjp_s"], r["forward_s"] = times[f"{name}_vjp"], times[f"{name}_forward"]
        r["vjp_over_forward"] = paired(rounds, f"{name}_vjp", f"{name}_forward")
        r["vjp_vs_default"] = paired(rounds, f"{name}_vjp", "default_vjp")
        print(f"  {path.name} {name}: {json.dumps(r)}", flush=True)
    row["default"]["io_binding"] = gpu.binds
    row["default"]["vjp_io_binding_s"], row["default"]["vjp_plain_run_s"] = times["io_bound"], times["io_plain"]
    row["default"]["io_binding_vs_plain_run"] = paired(rounds, "io_bound", "io_plain")
    row["default"]["vjp_x4_images_s"] = times["default_x4_images"]
    # What the Engine's fixed shapes avoid: one unpadded session fed two batch sizes in turn. The CUDA
    # provider plans its convolutions again at each change (an H200 took 1.4 s per mobilenet_v2 call
    # in an explain run whose calls changed shape, 14 ms with one shape per session).
    unpadded = Engine(path, device="cuda", batch_size=4 * n, fixed_shapes=False)
    alt, _ = interleaved({"n": lambda: unpadded.vjp(x, cot), "4n": lambda: unpadded.vjp(xb, cb)}, max(3, repeats // 4))
    row["default"]["vjp_alternating_shapes_s"] = alt["n"]
    row["explain_pattern"] = {"padded": explain_pattern(path, x, True), "unpadded": explain_pattern(path, x, False)}
    k = 16
    cot_k = rng.standard_normal((1, k, *cpu.info.feature_shape)).astype(np.float32)
    _, g_k = gpu.vjp_multi(x[:1], cot_k)
    g_single = np.concatenate([gpu.vjp(x[:1], cot_k[:, j])[1] for j in range(k)])
    row["multi_vs_single"] = rel_l2(g_k[0], g_single)
    row["multi_k16_s"] = median_time(lambda: gpu.vjp_multi(x[:1], cot_k), repeats)
    row["single_x16_s"] = median_time(lambda: [gpu.vjp(x[:1], cot_k[:, j]) for j in range(k)], repeats)
    try:
        half = Engine(path, device="cuda", batch_size=n, precision="fp16")
        f16, g16 = half.vjp(x, cot)
        t16, r16 = interleaved({"fp16": lambda: half.vjp(x, cot), "fp32": lambda: gpu.vjp(x, cot)}, repeats)
        row["fp16"] = {
            "provider": half.provider,
            "features_vs_fp32": rel_l2(f16, f_cpu),
            "input_grad_vs_fp32": rel_l2(g16, g_cpu),
            "map_corr_vs_fp32": map_corr(g16, g_cpu),
            "vjp_s": t16["fp16"],
            "vjp_vs_fp32": paired(r16, "fp16", "fp32"),
        }
    except Exception as exc:
        row["fp16"] = {"failed": f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    tc = torch_cuda(cpu.info, x, cot, search)
    if "grad" in tc:
        times, rounds = interleaved(
            {"ort": lambda: gpu.vjp(x, cot), "torch": tc["run"], "torch_benchmark": tc["run_benchmark"]}, repeats
        )
        row["torch_cuda"] = {
            "torch": tc["torch"],
            "vjp_s": times["torch"],
            "vjp_benchmark_s": times["torch_benchmark"],
            "ort_vjp_s": times["ort"],
            "ort_grad_vs_torch": rel_l2(g_gpu, tc["grad"]),
        }
        row["ort_over_torch_cuda"] = paired(rounds, "ort", "torch")
        row["ort_over_torch_cuda_benchmark"] = paired(rounds, "ort", "torch_benchmark")
    else:
        row["torch_cuda"] = tc
    row["ok"] = bool(
        all(row[c]["provider"] == "CUDAExecutionProvider" for c in CONFIGS)
        and row["default"]["input_grad_vs_cpu"] <= FP32_TOL
        and row["exhaustive"]["input_grad_vs_cpu"] <= FP32_TOL
        and row["multi_vs_single"] <= 1e-4
    )
    row["fp16_ok"] = bool(row["fp16"].get("input_grad_vs_fp32", np.inf) <= FP16_TOL)
    return row


def io_binding(d: dict) -> str:
    """The IO binding cell: ms (x the plain run)."""
    if "vjp_io_binding_s" not in d:
        return "-"
    return f"{d['vjp_io_binding_s'] * 1e3:.2f} ({d['io_binding_vs_plain_run']:.2f}x)"


def pattern(p: dict | None) -> str:
    """The explain-pattern cell: padded, then unpadded, each "again (first)" in seconds."""
    if not p:
        return "-"
    return ", ".join(f"{p[k]['again_s']:.2f} ({p[k]['first_s']:.2f})" for k in ("padded", "unpadded"))


def markdown(report: dict) -> str:
    """The report as a markdown table (times in ms, per call of `images` images)."""
    ms = lambda v: f"{v * 1e3:.2f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
    lines = [
        f"GPU check: onnxruntime {report['onnxruntime']}, {report.get('gpu', '')}, "
        f"providers {', '.join(report['providers'])}",
        "",
    ]
    if not report["models"]:
        return "\n".join(lines + [report.get("note", "no models checked")]) + "\n"
    lines += [
        "| model | images | ORT fwd+VJP ms | ORT fwd ms | fwd+VJP / fwd | torch CUDA ms (cudnn.benchmark) "
        "| ORT / torch | grad vs CPU (rel L2) | first call s | exhaustive: first s, fwd+VJP ms | TF32:"
        " fwd+VJP ms, grad vs CPU "
        "| IO binding: fwd+VJP ms | K=16 multi / 16 single | fp16: fwd+VJP ms (x fp32), grad vs fp32, map corr "
        "| fwd+VJP ms, batch size alternating with 4x on one unpadded session "
        "| explain's mix of 7 calls, s: padded again (first), unpadded again (first) | ok |",
        "|" + "---|" * 17,
    ]
    for r in report["models"]:
        if "error" in r:
            lines.append(f"| {Path(r['model']).name} | error: {r['error']} |" + " |" * 15)
            continue
        d, e, t, h, tc = r["default"], r["exhaustive"], r["tf32"], r["fp16"], r["torch_cuda"]
        torch_cell = f"{ms(tc['vjp_s'])} ({ms(tc['vjp_benchmark_s'])})" if "vjp_s" in tc else tc.get("skipped", "-")
        vs = lambda v: f" ({v:.2f}x)" if isinstance(v, float) else ""  # noqa: E731
        ratio = f"{r['ort_over_torch_cuda']:.2f}" if "ort_over_torch_cuda" in r else "-"
        fp16 = (
            f"{ms(h['vjp_s'])}{vs(h.get('vjp_vs_fp32'))}, {h['input_grad_vs_fp32']:.3f}, {h['map_corr_vs_fp32']:.3f}"
            if "vjp_s" in h
            else h.get("failed", "-")
        )
        lines.append(
            f"| {r['arch']} {r['layer']} | {r['images']} | {ms(d['vjp_s'])} | {ms(d['forward_s'])} | "
            f"{d['vjp_over_forward']:.2f} | {torch_cell} | {ratio} | {d['input_grad_vs_cpu']:.1e} | "
            f"{d['first_vjp_s']:.2f} | {e['first_vjp_s']:.2f}, {ms(e['vjp_s'])}{vs(e.get('vjp_vs_default'))} | "
            f"{ms(t['vjp_s'])}{vs(t.get('vjp_vs_default'))}, {t['input_grad_vs_cpu']:.3f} | "
            f"{io_binding(d)} | {r['multi_k16_s'] / r['single_x16_s']:.2f} | {fp16} | "
            f"{ms(d.get('vjp_alternating_shapes_s'))} | {pattern(r.get('explain_pattern'))} | "
            f"{'yes' if r['ok'] else 'NO'} |"
        )
    paired_run = any("vjp_vs_default" in r.get("default", {}) for r in report["models"])
    lines += [
        "",
        "Times are medians per call of `images` images, float32 with TF32 off unless named; "
        + (
            "(Nx): the median within-round ratio to the default configuration, all configurations "
            "interleaved in each round. "
            if paired_run
            else "each configuration timed in turn (a run of an earlier bench/gpu_check.py, before interleaving). "
        )
        + "The default configuration starts first in the process: its first call also pays for starting "
        "CUDA and cuDNN. "
        "`ok`: CUDA within the fp32 tolerance of the CPU provider, multi-cotangent equal to single calls.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", type=Path)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--weights", type=Path, default=None, help="folder searched for weights files")
    ap.add_argument("--photos", type=Path, default=None, help="folder of photographs (default: the shared one)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_check")
    ap.add_argument("--render", type=Path, default=None, help="only write the markdown table of this JSON report")
    args = ap.parse_args()
    if args.render is not None:
        args.out.with_suffix(".md").write_text(markdown(json.loads(args.render.read_text())))
        return 0
    import onnxruntime as ort  # the Engine preloads the CUDA and cuDNN libraries it needs

    report: dict = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
        "device": ort.get_device(),
        "gpu": gpu_name(),
        "models": [],
    }
    print(json.dumps({k: report[k] for k in ("onnxruntime", "providers", "device")}), flush=True)
    if "CUDAExecutionProvider" not in report["providers"]:
        from pbv_onnx.runtime.sessions import cuda_missing_reason

        report["note"] = f"no CUDAExecutionProvider: {cuda_missing_reason()}"
        print(report["note"])
    else:
        models = args.models or sorted(
            {*ROOT.glob("build/bench/*.onnx"), *ROOT.glob("build/models/*.onnx"), *ROOT.glob("models/*.onnx")}
        )
        for path in models:
            try:
                row = check_model(path, args.images, args.repeats, args.weights, args.photos)
            except Exception as exc:
                row = {
                    "model": str(path),
                    "ok": False,
                    "error": f"{exc.__class__.__name__}: {exc}",
                    "traceback": traceback.format_exc(limit=3),
                }
            report["models"].append(row)
            print(json.dumps(row, default=float), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=float))
    args.out.with_suffix(".md").write_text(markdown(report))
    return 0 if all(r.get("ok") for r in report["models"]) else 1


if __name__ == "__main__":
    sys.exit(main())
