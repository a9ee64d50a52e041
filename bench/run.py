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
RUNTIME_ENV = ROOT / ".venv" / "runtime"  # editable, with the demo and test extras
EXPORT_ENV = ROOT / ".venv" / "export"
CORE_ENV = ROOT / ".venv" / "core"  # `pip install .`: what a rig machine installs
MNV2_WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet.pth"

# name, arch, layer, weights, repeats: torch.onnx forward + the ONNX-graph transform (export/graph/), as
# `pbv-onnx export --arch` builds it (random weights with their small parameters redrawn at order 1 by
# backbone.load_backbone, as the export has them).
BACKBONES = [
    ("mobilenet_v2", "mobilenet_v2", "features.18", "shared", 15),
    ("alexnet", "alexnet", "features", "none", 21),
    ("resnet50", "resnet50", "layer4", "none", 7),
    ("vgg16", "vgg16", "features.29", "none", 7),
    ("vit_b_16", "vit_b_16", "encoder", "none", 5),
    ("swin_t", "swin_t", "permute", "none", 5),
    ("convnext_tiny", "convnext_tiny", "features", "none", 5),
    ("efficientnet_b0", "efficientnet_b0", "features", "none", 7),
    ("densenet121", "densenet121", "features", "none", 5),
]


def _machine_load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _images(spec, n: int) -> tuple[np.ndarray, str]:
    from pbv_onnx.export.verify import smooth_images
    from pbv_onnx.runtime.images import load_batch, shared_photos

    files = shared_photos()
    if len(files) >= 1:
        chosen = [files[i % len(files)] for i in range(n)]
        return load_batch(chosen, spec), f"{n} photos from ../shared/images"
    return smooth_images(n, spec.input_size, spec), f"{n} smooth synthetic images"


def _source_hash() -> str:
    h = hashlib.sha256()
    files = ["export/backbone.py", "export/onnx_route.py"] + sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "export" / "graph").glob("*.py")
    )
    for rel in files:
        h.update((ROOT / rel).read_bytes())
    return h.hexdigest()[:12]


def build_model(arch: str, layer: str, weights: str, threads: int):
    """(truncated torch net, path of an unverified exported model): torch.onnx forward + the ONNX-graph
    transform, cached by source hash. Parity is the tests' and the export's job; here only speed is
    measured (a rough parity number is still printed for the timed outputs)."""
    import torch

    from pbv_onnx.export import backbone, onnx_route
    from pbv_onnx.runtime.fp16 import FP32_ONLY_KEY
    from pbv_onnx.runtime.modelfile import FORMAT_VERSION, MULTI_COTANGENT

    torch.set_num_threads(threads)
    if weights == "shared":
        bb = backbone.load_backbone(arch, str(MNV2_WEIGHTS))
        spec = backbone.build_preprocessing(None, "224x224", None, (0.5,) * 3, (0.5,) * 3)
    else:
        bb = backbone.load_backbone(arch, "none", 0)
        spec = backbone.build_preprocessing(None, "224x224")
    cut, net = backbone.truncate_for_graph(bb.model, layer, "none")
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{arch}-{layer}-{weights}-{_source_hash()}.onnx"
    for stale in CACHE.glob(f"{arch}-{layer}-{weights}-*.onnx"):  # built by older export code
        if stale != path:
            stale.unlink()
    if not path.is_file():
        import onnx

        forward = onnx_route.torch_forward_proto(cut, (3, *spec.input_size), 17)
        onnx_route.undo_initializer_dedup(forward)
        built = onnx_route.run_transform(forward, None, "none", tuple(spec.input_size), None)
        adjoint, fp32 = onnx_route.rules_of(built)
        proto = built.model
        del proto.metadata_props[:]
        meta = {
            "format_version": FORMAT_VERSION,
            "arch": arch,
            "layer": layer,
            "pool": "none",
            "feature_shape": list(built.feature_shape),
            "preprocessing": spec.to_dict(),
            "weights": bb.weights,
            "adjoint": adjoint,
            MULTI_COTANGENT: True,
            FP32_ONLY_KEY: fp32,
            "verification": "none (benchmark build)",
        }
        for key, value in meta.items():
            proto.metadata_props.add(key=key, value=json.dumps(value))
        tmp = path.with_suffix(".tmp")
        onnx.save(proto, str(tmp))
        tmp.replace(path)
    return net, path


# A spinning session's workers ran on for tens of milliseconds after its call, slowing the next
# (another session's forward pass 43 -> 74 ms); the runtime's sessions no longer spin, torch's
# OpenMP workers still do.
PAUSE_S = 0.05
ORT_ROUNDS_S = 15.0  # time for the extra rounds of ORT fwd+VJP against forward alone, per backbone


def _median_times(fns: dict, repeats: int) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Run each function once to warm up, then `repeats` interleaved rounds (the order rotating
    each round); median seconds, and every round's times (for paired ratios). Each timed call
    starts after a pause of PAUSE_S, so that threads the previous call left spinning (torch's
    OpenMP workers, BLAS) are not timed with it."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            time.sleep(PAUSE_S)
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}, times


def _paired(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of a/b within each round: runs close in time share the machine's state
    (on a shared machine its speed drifts by tens of per cent within minutes)."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def bench_backbone(name, arch, layer, weights, repeats, n_images, threads) -> dict:
    import torch

    from pbv_onnx.export.verify import rel_l2
    from pbv_onnx.runtime.engine import Engine

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

    def torch_fwd():  # torch's own fwd+VJP / fwd, beside onnxruntime's (an input-only VJP ~ one forward)
        with torch.no_grad():
            net(xt)

    def ort_vjp():
        out["ort"] = eng.vjp(x, cot)[1]

    def ort_fwd():
        eng.features(x)

    times, rounds = _median_times(
        {"torch_vjp": torch_vjp, "torch_forward": torch_fwd, "ort_vjp": ort_vjp, "ort_forward": ort_fwd}, repeats
    )
    # fwd+VJP against forward alone, also in rounds of their own: the ratio of two short runs
    # moves with the shared machine's load, so the cheap backbones get more rounds (up to
    # ORT_ROUNDS_S seconds; the torch-interleaved value is kept as ort_over_2fwd_beside_torch)
    ort_repeats = (
        repeats
        if repeats == 1
        else max(  # (--quick: one round)
            repeats, min(40, int(ORT_ROUNDS_S / (times["ort_vjp"] + times["ort_forward"])))
        )
    )
    _, ort_rounds = _median_times({"ort_vjp": ort_vjp, "ort_forward": ort_fwd}, ort_repeats)
    err = rel_l2(out["ort"], out["torch"].numpy())
    row = {
        "name": name,
        "arch": arch,
        "layer": layer,
        "weights": "shared real (file)" if weights == "shared" else "random (seed 0)",
        "feature_shape": list(eng.info.feature_shape),
        "images": desc,
        "repeats": repeats,
        "ort_repeats": ort_repeats,
        "model_mb": round(path.stat().st_size / 1e6, 1),
        "build_s": round(build_s, 1),
        **{k: round(v, 4) for k, v in times.items()},
        "ort_over_torch": round(_paired(rounds, "ort_vjp", "torch_vjp"), 3),
        "ort_over_2fwd": round(_paired(ort_rounds, "ort_vjp", "ort_forward") / 2, 3),
        "ort_over_2fwd_beside_torch": round(_paired(rounds, "ort_vjp", "ort_forward") / 2, 3),
        "torch_over_2fwd": round(_paired(rounds, "torch_vjp", "torch_forward") / 2, 3),
        "ort_fwd_over_torch_fwd": round(_paired(rounds, "ort_forward", "torch_forward"), 3),
        "grad_rel_l2_vs_torch": float(f"{err:.2e}"),
        "load": _machine_load(),
    }
    print(json.dumps(row), flush=True)
    return row


OBJECTS = {"sunflower", "hot_dog", "missvickie_potato_chips", "kite_and_cold", "dragonfly"}


def make_study(folder: Path, model: Path, channels: int = 16, seed: int = 0) -> dict:
    """Responses and readouts for the shared photos (objects: sunflower, hot dog, chips, kite,
    dragonfly; the rest bodies), `channels` synthetic channels = random readouts + noise."""
    import xarray as xr

    from pbv_onnx.data.features import model_attrs
    from pbv_onnx.data.readouts import write_readouts
    from pbv_onnx.data.responses import make_responses
    from pbv_onnx.runtime.engine import Engine
    from pbv_onnx.runtime.images import load_batch, shared_photos

    files = shared_photos()
    stim = [p.stem for p in files]
    cats = ["object" if s in OBJECTS else "body" for s in stim]
    eng = Engine(model, device="cpu")
    phi = eng.features(load_batch(files, eng.info.preprocessing)).reshape(len(files), -1).astype(np.float64)
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((channels, phi.shape[1])) / np.sqrt(phi.shape[1])
    resp = (phi @ w.T).T[:, :, None] + rng.standard_normal((channels, len(files), 2)) * 0.1
    ds = make_responses(resp, list(range(channels)), stim, cats, file=[str(f) for f in files], preferred="body")
    folder.mkdir(parents=True, exist_ok=True)
    ds.to_netcdf(folder / "responses.nc", engine="h5netcdf")
    ro = xr.Dataset(
        {"weight": (("channel", "feature"), w.astype(np.float32)), "bias": ("channel", np.zeros(channels, np.float32))},
        coords={"channel": list(range(channels))},
        attrs={**model_attrs(eng.info), "preferred_category": "body"},
    )
    write_readouts(ro, folder / "readouts.nc", force=True)
    obj = next(s for s in stim if s in OBJECTS)
    return {
        "model": model,
        "readouts": folder / "readouts.nc",
        "responses": folder / "responses.nc",
        "object": obj,
        "bodies": [s for s, c in zip(stim, cats) if c == "body"],
        "folder": folder,
    }


def bench_multichannel(study_files: dict, threads: int, repeats: int = 5, k: int = 16) -> dict:
    """One object explained for K channels (one call) vs the same K pairs one call each; with a
    reference per channel and with one shared reference; and the K pairs with sharing switched off."""
    from pbv_onnx.runtime.engine import Engine
    from pbv_onnx.workflows import explain as ex

    eng = Engine(study_files["model"], device="cpu", threads=threads)
    study = ex.open_study(
        study_files["model"],
        study_files["readouts"],
        study_files["responses"],
        device="cpu",
        progress=False,
        engine=eng,
    )
    channels = [str(c) for c in study.channels[:k]]
    forced = ex.build_pairs(study, channels, [study_files["object"]], reference=study_files["bodies"][0])
    # Each channel with its own reference where there are enough bodies (matching on random
    # readouts picks the same body for all): the object is the only image shared.
    bodies = [study.image(b) for b in study_files["bodies"]]
    matched = [ex.Pair(p.channel, p.ooc, bodies[i % len(bodies)], p.similarity) for i, p in enumerate(forced)]
    out = {
        "k": len(channels),
        "object": study_files["object"],
        "distinct_references_matched": len({p.reference.key for p in matched}),
    }

    def shared(pairs):
        return lambda: ex.explain(study, pairs)

    def separate(pairs):
        return lambda: [ex.explain(study, [p]) for p in pairs]

    def unshared(pairs):
        def run():
            eng.multi = False
            try:
                ex.explain(study, pairs)
            finally:
                eng.multi = True

        return run

    times, rounds = _median_times(
        {
            "matched_shared": shared(matched),
            "matched_separate": separate(matched),
            "matched_no_multi": unshared(matched),
            "forced_shared": shared(forced),
            "forced_separate": separate(forced),
        },
        repeats,
    )
    out.update({name: round(v, 3) for name, v in times.items()})
    out["ratio_matched"] = round(_paired(rounds, "matched_shared", "matched_separate"), 3)
    out["ratio_forced"] = round(_paired(rounds, "forced_shared", "forced_separate"), 3)
    out["load"] = _machine_load()
    print(json.dumps(out), flush=True)
    return out


def bench_study(study_files: dict, threads: int, repeats: int = 3) -> dict:
    """A whole study, as `pbv-onnx explain` runs it: every channel x every object, each matched to
    its reference (features cached), then explained; the time in onnxruntime's calls and outside."""
    from pbv_onnx.runtime.engine import Engine
    from pbv_onnx.workflows import explain as ex

    eng = Engine(study_files["model"], device="cpu", threads=threads)
    inside = [0.0]
    run = eng._run

    def timed(*a, **kw):
        t = time.perf_counter()
        try:
            return run(*a, **kw)
        finally:
            inside[0] += time.perf_counter() - t

    eng._run = timed
    match_s, explain_s, ort_s = [], [], []
    for _ in range(repeats + 1):  # the first: sessions, features and caches warm up, not counted
        study = ex.open_study(
            study_files["model"],
            study_files["readouts"],
            study_files["responses"],
            device="cpu",
            progress=False,
            engine=eng,
        )
        objects = [s for s in study.paths if s in OBJECTS]
        study.phi([study.image(s) for s in study.paths])  # the feature cache of a real run
        time.sleep(PAUSE_S)
        t = time.perf_counter()
        pairs = ex.build_pairs(study, images=objects)
        match_s.append(time.perf_counter() - t)
        inside[0] = 0.0
        time.sleep(PAUSE_S)
        t = time.perf_counter()
        ex.explain(study, pairs)
        explain_s.append(time.perf_counter() - t)
        ort_s.append(inside[0])
    match_s, explain_s, ort_s = match_s[1:], explain_s[1:], ort_s[1:]
    i = int(np.argsort(explain_s)[len(explain_s) // 2])  # the median run, its own split
    out = {
        "pairs": len(pairs),
        "channels": len(study.channels),
        "objects": len(objects),
        "distinct_references": len({p.reference.key for p in pairs}),
        "repeats": repeats,
        "match_s": round(statistics.median(match_s), 3),
        "explain_s": round(explain_s[i], 3),
        "onnxruntime_s": round(ort_s[i], 3),
        "onnxruntime_share": round(ort_s[i] / explain_s[i], 3),
        "outside_ms_per_pair": round(1e3 * (explain_s[i] - ort_s[i]) / len(pairs), 1),
        "ms_per_pair": round(1e3 * explain_s[i] / len(pairs), 1),
        "load": _machine_load(),
    }
    print(json.dumps(out), flush=True)
    return out


COLD_PROBE = """
import json, sys, time
t0 = time.perf_counter()
import pbv_onnx.cli.main  # everything `pbv-onnx explain` imports
t1 = time.perf_counter()
from pbv_onnx.runtime.engine import Engine
engine = Engine(sys.argv[1], device="cpu")
engine._vjp  # the session explain runs (made on first use), so that explain_s holds no session creation
t2 = time.perf_counter()
from pbv_onnx.workflows import explain as ex
study = ex.open_study(sys.argv[1], sys.argv[2], sys.argv[3], features_cache=sys.argv[4], device="cpu",
                      progress=False, engine=engine)
ds = ex.explain(study, ex.build_pairs(study, ["0"], [sys.argv[5]]))
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "engine_s": t2 - t1, "explain_s": t3 - t2}))
"""


def bench_cold(study_files: dict, repeats: int = 5) -> dict:
    """`pbv-onnx explain` of one pair in a fresh process of the installed (non-editable, core-only)
    environment: wall time with the session cache filled by an earlier run, and without any cache
    (a model's first run on a machine); peak RSS; and, in separate probe processes, how much is
    imports, reading the model and making its session, and study + matching + VJP."""
    env_dir = CORE_ENV if (CORE_ENV / "bin" / "pbv-onnx").is_file() else RUNTIME_ENV
    exe, py = env_dir / "bin" / "pbv-onnx", env_dir / "bin" / "python"
    if not exe.is_file():
        return {"skipped": f"{exe} not found"}
    folder = study_files["folder"]
    args = [
        str(exe),
        "explain",
        "--model",
        str(study_files["model"]),
        "--readouts",
        str(study_files["readouts"]),
        "--responses",
        str(study_files["responses"]),
        "--features",
        str(folder / "features.nc"),
        "--channel",
        "0",
        "--image",
        study_files["object"],
        "--device",
        "cpu",
        "--force",
    ]
    cached = {**os.environ, "PBV_ONNX_CACHE": str(folder / "session-cache")}
    uncached = {**os.environ, "PBV_ONNX_CACHE": "off"}
    subprocess.run(
        args + ["--out", str(folder / "warm")], check=True, capture_output=True, env=cached
    )  # fills both caches
    timer = ["/usr/bin/time", "-f", "%M", "-o", str(folder / "rss.txt")] if Path("/usr/bin/time").is_file() else []
    walls: dict[str, list[float]] = {"cached": [], "uncached": []}
    rss = []
    for i in range(repeats):  # interleaved, so that load changes hit both alike
        for name, env in (("cached", cached), ("uncached", uncached)):
            t0 = time.perf_counter()
            subprocess.run(timer + args + ["--out", str(folder / f"cold{i}")], check=True, capture_output=True, env=env)
            walls[name].append(time.perf_counter() - t0)
            if timer:  # the child's own peak (getrusage would count the pages it shared with us at fork)
                rss.append(int((folder / "rss.txt").read_text().split()[-1]))
    probe = [
        str(py),
        "-c",
        COLD_PROBE,
        str(study_files["model"]),
        str(study_files["readouts"]),
        str(study_files["responses"]),
        str(folder / "features.nc"),
        study_files["object"],
    ]
    probes = [
        json.loads(
            subprocess.run(
                probe,
                cwd=folder if env_dir == CORE_ENV else ROOT,
                check=True,
                capture_output=True,
                text=True,
                env=cached,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        for _ in range(repeats)
    ]
    out = {
        "env": env_dir.name,
        "wall_s": round(statistics.median(walls["cached"]), 2),
        "wall_no_cache_s": round(statistics.median(walls["uncached"]), 2),
        "wall_range_s": [round(min(walls["cached"]), 2), round(max(walls["cached"]), 2)],
        **{k: round(statistics.median(p[k] for p in probes), 2) for k in ("import_s", "engine_s", "explain_s")},
        "peak_rss_mb": round(max(rss) / 1024, 1) if rss else None,
        "repeats": repeats,
        "load": _machine_load(),
    }
    out["report_and_rest_s"] = round(out["wall_s"] - out["import_s"] - out["engine_s"] - out["explain_s"], 2)
    print(json.dumps(out), flush=True)
    return out


def _du_mb(path: Path) -> float | None:
    if not path.is_dir():
        return None
    out = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True)
    return round(int(out.stdout.split()[0]) / 1024, 1) if out.returncode == 0 else None


def env_sizes() -> dict:
    """Disk size of the core install a rig machine needs (`pip install .`), of the development
    runtime environment (editable, with the demo/test extras) and of the export environment."""
    core, runtime, export = _du_mb(CORE_ENV), _du_mb(RUNTIME_ENV), _du_mb(EXPORT_ENV)
    return {
        "core_mb": core,
        "runtime_mb": runtime,
        "export_mb": export,
        "core_over_export": round(core / export, 3) if core and export else None,
        "runtime_over_export": round(runtime / export, 3) if runtime and export else None,
    }


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# pbv-onnx benchmark (bench/run.py)",
        "",
        f"Machine: {m['cpus']} CPUs, {m['platform']}; onnxruntime {m['onnxruntime']}, torch {m['torch']}, "
        f"{m['threads']} threads for both; load average at start {m['load_at_start']} (a shared machine: "
        "times move with other jobs, so every ratio is the median over rounds of the ratio within a round, "
        "runs interleaved in one process; ORT/(2 x fwd) from rounds of those two runs alone, the torch-"
        "interleaved value beside it).",
        "",
        "## Forward + VJP, 8 images 224x224 (real photos), one call",
        "",
        "| backbone | weights | torch autograd (s) | ORT fwd+VJP (s) | ORT fwd only (s) | ORT/torch |"
        " ORT/(2 x fwd) | ORT/(2 x fwd), interleaved with torch | grad rel. L2 vs torch"
        " | rounds (with torch / ORT alone) | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["backbones"]:
        lines.append(
            f"| {r['arch']} {r['layer']} | {r['weights']} | {r['torch_vjp']:.3f} | {r['ort_vjp']:.3f} | "
            f"{r['ort_forward']:.3f} | **{r['ort_over_torch']:.2f}** | **{r['ort_over_2fwd']:.2f}** | "
            f"{r['ort_over_2fwd_beside_torch']:.2f} | "
            f"{r['grad_rel_l2_vs_torch']:.1e} | {r['repeats']} / {r['ort_repeats']} | "
            f"{r['load'][0]} |"
        )
    same = [r for r in results["backbones"] if "torch_forward" in r]  # (results before it lack it)
    if same:
        lines += [
            "",
            "## The same ratios for torch, from the rounds above",
            "",
            "The forward pass sets both targets' scale: fwd+VJP / (2 x fwd) is measured against each "
            "runtime's own forward pass, and ORT/torch for fwd+VJP follows from how fast each runs the "
            "forward pass and how fast the backward one. The backward pass alone, each runtime's fwd+VJP "
            "less its forward pass (medians of the rows above), compares the two backward passes without "
            "either forward pass's speed in it.",
            "",
            "| backbone | torch forward (s) | torch/(2 x torch fwd) | ORT/(2 x ORT fwd) | "
            "ORT forward / torch forward | ORT fwd+VJP / torch fwd+VJP | ORT backward / torch backward |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in same:
            backward = (r["ort_vjp"] - r["ort_forward"]) / (r["torch_vjp"] - r["torch_forward"])
            lines.append(
                f"| {r['arch']} {r['layer']} | {r['torch_forward']:.3f} | {r['torch_over_2fwd']:.2f} | "
                f"{r['ort_over_2fwd_beside_torch']:.2f} | {r['ort_fwd_over_torch_fwd']:.2f} | "
                f"{r['ort_over_torch']:.2f} | {backward:.2f} |"
            )
    mc = results.get("multichannel")
    if mc:
        lines += [
            "",
            f"## Multi-channel explain: one object ({mc['object']}) for K={mc['k']} channels, mobilenet_v2 features.18",
            "",
            "| references | K pairs, one `explain` (s) | K pairs, one `explain` each (s) | ratio |"
            " sharing off, one `explain` (s) |",
            "|---|---|---|---|---|",
            f"| one per channel ({mc['distinct_references_matched']} distinct) | {mc['matched_shared']:.2f} | "
            f"{mc['matched_separate']:.2f} | **{mc['ratio_matched']:.2f}** | {mc['matched_no_multi']:.2f} |",
            f"| one forced reference | {mc['forced_shared']:.2f} | {mc['forced_separate']:.2f} | "
            f"**{mc['ratio_forced']:.2f}** | |",
        ]
    st = results.get("study")
    if st:
        lines += [
            "",
            f"## A whole study: {st['channels']} channels x {st['objects']} objects = {st['pairs']} pairs, "
            "mobilenet_v2 features.18 (median of "
            f"{st['repeats']} runs)",
            "",
            "| matching all pairs (s) | `explain` (s) | per pair (ms) | in onnxruntime (s) | share in onnxruntime | "
            "outside onnxruntime, per pair (ms) | distinct references |",
            "|---|---|---|---|---|---|---|",
            f"| {st['match_s']:.2f} | {st['explain_s']:.2f} | {st['ms_per_pair']:.1f} | {st['onnxruntime_s']:.2f} | "
            f"**{st['onnxruntime_share']:.0%}** | {st['outside_ms_per_pair']:.1f} | {st['distinct_references']} |",
        ]
    cold = results.get("cold")
    if cold and "wall_s" in cold:
        lines += [
            "",
            f"## Cold `pbv-onnx explain`, one pair, mobilenet_v2 (.venv/{cold['env']}, feature cache present)",
            "",
            "| wall (s) | wall range (s) | wall, no session cache (s) | imports (s) | model + session (s) | "
            "study + matching + VJP (s) | report: NetCDF, figures, HTML, and the rest (s) | peak RSS (MB) |",
            "|---|---|---|---|---|---|---|---|",
            f"| **{cold['wall_s']:.2f}** | {cold['wall_range_s'][0]:.2f}-{cold['wall_range_s'][1]:.2f} | "
            f"{cold['wall_no_cache_s']:.2f} | {cold['import_s']:.2f} | {cold['engine_s']:.2f} | "
            f"{cold['explain_s']:.2f} | {cold['report_and_rest_s']:.2f} | {cold['peak_rss_mb']} |",
        ]
    env = results.get("env")
    if env:
        lines += [
            "",
            "## Environments on disk",
            "",
            "| .venv/core: `pip install .` (MB) | .venv/export (MB) | core/export | "
            ".venv/runtime: editable + demo/test extras (MB) | runtime/export |",
            "|---|---|---|---|---|",
            f"| {env['core_mb']} | {env['export_mb']} | **{env['core_over_export']}** | "
            f"{env['runtime_mb']} | {env['runtime_over_export']} |",
        ]
    lines += [
        "",
        f"Peak RSS of the benchmark process: {results['peak_rss_mb']:.0f} MB. "
        f"Total benchmark time: {results['seconds']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    import onnxruntime
    import torch

    t_start = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="backbone names to run (default: all)")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--quick", action="store_true", help="one repeat each (smoke test)")
    ap.add_argument("--skip-explain", action="store_true", help="backbone timings only")
    ap.add_argument("--out", type=Path, default=RESULTS / "latest")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # the benchmark's own session cache (pbv_onnx/sessions.py), not the user's
    os.environ.setdefault("PBV_ONNX_CACHE", str(CACHE / "session-cache"))
    results = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_at_start": _machine_load(),
            "threads": args.threads,
            "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__,
        },
        "backbones": [],
    }
    for name, arch, layer, weights, repeats in BACKBONES:
        if args.only and name not in args.only:
            continue
        results["backbones"].append(
            bench_backbone(name, arch, layer, weights, 1 if args.quick else repeats, args.images, args.threads)
        )
    if not args.skip_explain and MNV2_WEIGHTS.is_file():
        _, model = build_model("mobilenet_v2", "features.18", "shared", args.threads)
        with tempfile.TemporaryDirectory() as tmp:
            files = make_study(Path(tmp), model)
            results["multichannel"] = bench_multichannel(files, args.threads, 1 if args.quick else 5)
            results["study"] = bench_study(files, args.threads, 1 if args.quick else 3)
            results["cold"] = bench_cold(files, 1 if args.quick else 5)
    results["env"] = env_sizes()
    results["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    text = markdown(results)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
