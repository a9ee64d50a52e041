"""Benchmark: onnxruntime forward+VJP vs torch autograd vs forward-only, cold explain, multi-channel explain.

Run in the export environment (it needs torch for the baselines):
    .venv/export/bin/python bench/run.py [--quick] [--only mobilenet_v2 ...]
Writes bench/results/latest.json and bench/results/latest.md. All ratios compare runs in this one
process on the same images, interleaved and repeated, medians; machine load is recorded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

RESULTS = ROOT / "bench" / "results"
CACHE = ROOT / "build" / "bench"
RUNTIME_ENV = ROOT / ".venv" / "runtime"
EXPORT_ENV = ROOT / ".venv" / "export"
MNV2_WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet.pth"

# name, arch, layer, weights, preprocessing overrides (mean, std), repeats
BACKBONES = [
    ("mobilenet_v2", "mobilenet_v2", "features.18", "shared", 7),
    ("alexnet", "alexnet", "features", "none", 7),
    ("resnet50", "resnet50", "layer4", "none", 3),
    ("vgg16", "vgg16", "features.29", "none", 3),
]


def _machine_load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _images(spec, n: int) -> tuple[np.ndarray, str]:
    from export.verify import smooth_images
    from pbv_onnx.images import load_batch

    files = sorted(p for p in (SHARED / "images").glob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    if len(files) >= 1:
        chosen = [files[i % len(files)] for i in range(n)]
        return load_batch(chosen, spec), f"{n} photos from ../shared/images"
    return smooth_images(n, spec.input_size, spec), f"{n} smooth synthetic images"


def _source_hash() -> str:
    h = hashlib.sha256()
    for rel in ("export/adjoint.py", "export/pipeline.py", "export/backbone.py"):
        h.update((ROOT / rel).read_bytes())
    return h.hexdigest()[:12]


def build_model(arch: str, layer: str, weights: str, threads: int):
    """(truncated torch net, path of an unverified exported model) - cached by source hash.

    Parity is the tests' and the export's job; here only speed is measured (a rough parity
    number is still printed for the timed outputs)."""
    import torch

    from export import backbone
    from export.adjoint import ADJOINT_DESCRIPTION, VJPModule
    from export.pipeline import DEFAULT_OPSET, vjp_proto
    from pbv_onnx.model import FORMAT_VERSION, MULTI_COTANGENT

    torch.set_num_threads(threads)
    if weights == "shared":
        bb = backbone.load_backbone(arch, str(MNV2_WEIGHTS))
        spec = backbone.build_preprocessing(None, "224x224", None, (0.5,) * 3, (0.5,) * 3)
    else:
        bb = backbone.load_backbone(arch, "none", 0)
        spec = backbone.build_preprocessing(None, "224x224")
    net = backbone.truncate(bb.model, layer, "none")
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{arch}-{layer}-{weights}-{_source_hash()}.onnx"
    if not path.is_file():
        import onnx

        input_shape = (3, *spec.input_size)
        vjp = VJPModule(net, input_shape)
        with torch.no_grad():
            feature_shape = tuple(net(torch.zeros((1, *input_shape))).shape[1:])
        proto = vjp_proto(vjp, input_shape, feature_shape, DEFAULT_OPSET)
        meta = {"format_version": FORMAT_VERSION, "arch": arch, "layer": layer, "pool": "none",
                "feature_shape": list(feature_shape), "preprocessing": spec.to_dict(),
                "weights": bb.weights, "adjoint": ADJOINT_DESCRIPTION, MULTI_COTANGENT: True,
                "verification": "none (benchmark build)"}
        for key, value in meta.items():
            proto.metadata_props.add(key=key, value=json.dumps(value))
        tmp = path.with_suffix(".tmp")
        onnx.save(proto, str(tmp))
        tmp.replace(path)
    return net, path


def _median_times(fns: dict, repeats: int) -> dict[str, float]:
    """Run each function once to warm up, then `repeats` interleaved rounds; median seconds."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_backbone(name, arch, layer, weights, repeats, n_images, threads) -> dict:
    import torch

    from export.verify import rel_l2
    from pbv_onnx.model import Engine

    t0 = time.perf_counter()
    net, path = build_model(arch, layer, weights, threads)
    build_s = time.perf_counter() - t0
    eng = Engine(path, device="cpu", batch_size=n_images, threads=threads)
    x, desc = _images(eng.info.preprocessing, n_images)
    rng = np.random.default_rng(0)
    cot = rng.standard_normal((n_images, *eng.info.feature_shape)).astype(np.float32)
    xt = torch.from_numpy(x)
    ct = torch.from_numpy(cot)
    out: dict = {}

    def torch_vjp():
        xi = xt.clone().requires_grad_(True)
        y = net(xi)
        (g,) = torch.autograd.grad(y, xi, ct)
        out["torch"] = g

    def ort_vjp():
        out["ort"] = eng.vjp(x, cot)[1]

    def ort_fwd():
        eng.features(x)

    times = _median_times({"torch_vjp": torch_vjp, "ort_vjp": ort_vjp, "ort_forward": ort_fwd}, repeats)
    err = rel_l2(out["ort"], out["torch"].numpy())
    row = {"name": name, "arch": arch, "layer": layer,
           "weights": "shared real (file)" if weights == "shared" else "random (seed 0)",
           "feature_shape": list(eng.info.feature_shape), "images": desc, "repeats": repeats,
           "model_mb": round(path.stat().st_size / 1e6, 1), "build_s": round(build_s, 1),
           **{k: round(v, 4) for k, v in times.items()},
           "ort_over_torch": round(times["ort_vjp"] / times["torch_vjp"], 3),
           "ort_over_2fwd": round(times["ort_vjp"] / (2 * times["ort_forward"]), 3),
           "grad_rel_l2_vs_torch": float(f"{err:.2e}"), "load": _machine_load()}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="backbone names to run (default: all)")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--quick", action="store_true", help="one repeat each (smoke test)")
    ap.add_argument("--skip-explain", action="store_true")
    args = ap.parse_args()
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "load_at_start": _machine_load(), "threads": args.threads}, "backbones": []}
    for name, arch, layer, weights, repeats in BACKBONES:
        if args.only and name not in args.only:
            continue
        results["backbones"].append(bench_backbone(name, arch, layer, weights, 1 if args.quick else repeats,
                                                   args.images, args.threads))
    results["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
