"""GPU check: onnxruntime providers; on CUDA, parity (CUDA fp32 / fp16 vs CPU fp32) and timings
of forward+VJP, multi-cotangent VJP, and torch CUDA autograd where torch is importable.

    python bench/gpu_check.py [MODEL.onnx ...] [--images 8] [--out bench/results/gpu_check]

Without models given it uses build/bench/*.onnx, build/models/*.onnx and models/*.onnx. Exits 0
after reporting, also when no CUDA provider exists (the report says so); 1 on a failed parity check.
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

FP32_TOL = 1e-3   # CUDA fp32 vs CPU fp32 input_grad, relative L2 (cuDNN algorithms, TF32 off)
FP16_TOL = 5e-2   # fp16 vs fp32 on CUDA


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    nb = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / nb) if nb > 0 else float(np.linalg.norm(a - b))


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def images_for(spec, n: int) -> np.ndarray:
    from pbv_onnx.demo.sources import shared_photos
    from pbv_onnx.images import load_batch

    files = shared_photos(ROOT.parent / "shared" / "images")
    if files:
        return load_batch([files[i % len(files)] for i in range(n)], spec)
    rng = np.random.default_rng(0)
    return rng.uniform(-1, 1, (n, 3, *spec.input_size)).astype(np.float32)


def torch_cuda(info, x: np.ndarray, cot: np.ndarray, repeats: int) -> dict:
    """torch CUDA autograd on the same backbone (rebuilt from the model's metadata), if possible."""
    try:
        import torch

        from export import backbone
    except Exception as exc:  # torch/torchvision absent on this machine
        return {"skipped": f"torch not importable ({exc.__class__.__name__})"}
    if not torch.cuda.is_available():
        return {"skipped": "torch has no CUDA here"}
    w = info.metadata.get("weights", {})
    if w.get("source") == "none":
        bb = backbone.load_backbone(info.arch, "none", int(w.get("seed", 0)))
    elif w.get("source") == "file" and Path(w.get("path", "")).is_file():
        bb = backbone.load_backbone(info.arch, w["path"])
    else:
        return {"skipped": f"weights {w} not reproducible here"}
    net = backbone.truncate(bb.model, info.layer or None, info.pool).cuda().eval()
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    xt, ct = torch.from_numpy(x).cuda(), torch.from_numpy(cot).cuda()
    out = {}

    def run():
        xi = xt.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(net(xi), xi, ct)
        out["g"] = g
        torch.cuda.synchronize()

    t = median_time(run, repeats)
    return {"vjp_s": t, "grad": out["g"].cpu().numpy()}


def check_model(path: Path, n: int, repeats: int) -> dict:
    from pbv_onnx.model import Engine

    cpu = Engine(path, device="cpu", batch_size=n)
    x = images_for(cpu.info.preprocessing, n)
    rng = np.random.default_rng(0)
    cot = rng.standard_normal((n, *cpu.info.feature_shape)).astype(np.float32)
    f_cpu, g_cpu = cpu.vjp(x, cot)
    row: dict = {"model": str(path), "arch": cpu.info.arch, "layer": cpu.info.layer, "images": n}
    row["cpu_vjp_s"] = median_time(lambda: cpu.vjp(x, cot), max(1, repeats // 2))
    gpu = Engine(path, device="cuda", batch_size=n)
    row["provider"] = gpu.provider
    f_gpu, g_gpu = gpu.vjp(x, cot)
    row["cuda_fp32_vs_cpu"] = {"features": rel_l2(f_gpu, f_cpu), "input_grad": rel_l2(g_gpu, g_cpu)}
    row["cuda_vjp_s"] = median_time(lambda: gpu.vjp(x, cot), repeats)
    row["cuda_forward_s"] = median_time(lambda: gpu.features(x), repeats)
    k = 16
    cot_k = rng.standard_normal((1, k, *cpu.info.feature_shape)).astype(np.float32)
    _, g_k = gpu.vjp_multi(x[:1], cot_k)
    g_single = np.concatenate([gpu.vjp(x[:1], cot_k[:, j])[1] for j in range(k)])
    row["cuda_multi_vs_single"] = rel_l2(g_k[0], g_single)
    row["cuda_multi_k16_s"] = median_time(lambda: gpu.vjp_multi(x[:1], cot_k), repeats)
    row["cuda_single_x16_s"] = median_time(lambda: [gpu.vjp(x[:1], cot_k[:, j]) for j in range(k)], repeats)
    try:
        half = Engine(path, device="cuda", batch_size=n, precision="fp16")
        f16, g16 = half.vjp(x, cot)
        row["cuda_fp16_vs_fp32"] = {"features": rel_l2(f16, f_gpu), "input_grad": rel_l2(g16, g_gpu)}
        row["cuda_fp16_vjp_s"] = median_time(lambda: half.vjp(x, cot), repeats)
    except Exception as exc:
        row["cuda_fp16"] = f"failed: {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    tc = torch_cuda(cpu.info, x, cot, repeats)
    if "grad" in tc:
        row["torch_cuda_vjp_s"] = tc["vjp_s"]
        row["ort_cuda_vs_torch_cuda_grad"] = rel_l2(g_gpu, tc["grad"])
        row["ort_over_torch_cuda"] = row["cuda_vjp_s"] / tc["vjp_s"]
    else:
        row["torch_cuda"] = tc["skipped"]
    row["ok"] = (row["cuda_fp32_vs_cpu"]["input_grad"] <= FP32_TOL and row["cuda_multi_vs_single"] <= 1e-4
                 and row.get("cuda_fp16_vs_fp32", {"input_grad": 0})["input_grad"] <= FP16_TOL)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", type=Path)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_check")
    args = ap.parse_args()
    import onnxruntime as ort

    report: dict = {"python": sys.version.split()[0], "platform": platform.platform(),
                    "onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
                    "device": ort.get_device(), "models": []}
    print(json.dumps({k: report[k] for k in ("onnxruntime", "providers", "device")}), flush=True)
    if "CUDAExecutionProvider" not in report["providers"]:
        report["note"] = ("no CUDAExecutionProvider in this onnxruntime: install onnxruntime-gpu "
                          "matching the CUDA/cuDNN here (pip install 'pbv-onnx[gpu]')")
        print(report["note"])
    else:
        models = args.models or sorted({*ROOT.glob("build/bench/*.onnx"), *ROOT.glob("build/models/*.onnx"),
                                        *ROOT.glob("models/*.onnx")})
        for path in models:
            try:
                row = check_model(path, args.images, args.repeats)
            except Exception as exc:
                row = {"model": str(path), "ok": False, "error": f"{exc.__class__.__name__}: {exc}",
                       "traceback": traceback.format_exc(limit=3)}
            report["models"].append(row)
            print(json.dumps(row, default=float), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=float))
    return 0 if all(r.get("ok") for r in report["models"]) else 1


if __name__ == "__main__":
    sys.exit(main())
