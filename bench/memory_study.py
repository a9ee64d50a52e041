"""Peak resident memory and wall time of a whole `pbv-onnx explain` against the same study in plain torch autograd.

The study: the demo's first 12 channels x each channel's 3 most driving out-of-category stimuli (36 pairs),
mobilenet_v2 cut at features.18. Each run is a fresh process under `/usr/bin/time` (peak RSS, %M); the two
sides alternate, 3 runs each, and the medians are reported (bench/results/memory_study.md and .json).

    .venv/export/bin/python bench/memory_study.py [--runs 3] [--threads 2]

The torch side (`--torch-study`, run by this script in its own process) does what `pbv-onnx explain`
does: features of objects and candidate references (no_grad, batch 16), the reference by the weighted
cosine s_n(o, b) over the channel's top-20 preferred stimuli, one VJP for both images with the shared
Hadamard cotangent v, the map sum_c |G|, a PNG per pair, index.html and a NetCDF of gradients and maps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "build" / "demo"
MODEL = DEMO / "mobilenet_v2-features.18.onnx"
READOUTS = DEMO / "readouts.nc"
RESPONSES = DEMO / "experiment" / "responses.nc"
FEATURES = DEMO / "features.nc"
WEIGHTS = ROOT.parent / "shared" / "weights" / "mobilenet_v2_imagenet.pth"
CLI = ROOT / ".venv" / "runtime" / "bin" / "pbv-onnx"
RESULTS = ROOT / "bench" / "results"
N_CHANNELS, N_OBJECTS, TOP_K, BATCH = 12, 3, 20, 16


def _ranked(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Indices high to low, ties by ascending stimulus id (as pbv-onnx ranks)."""
    return np.lexsort((np.asarray([str(i) for i in ids]), -np.asarray(scores, np.float64)))


def study_plan() -> tuple[list[str], dict[str, list[str]], dict[str, list[str]]]:
    """The channels, each channel's top objects and its reference candidates, from readouts and responses."""
    import xarray as xr

    with xr.open_dataset(READOUTS) as ro, xr.open_dataset(RESPONSES) as ds:
        channels = [str(c) for c in ro["channel"].values[:N_CHANNELS]]
        preferred = str(ds.attrs["preferred_category"])
        mean = ds["response"].mean("repetition", skipna=True).load()
        cats = ds["category"].values.astype(str)
        stim = ds["stimulus"].values
    objects, cands = {}, {}
    for c in channels:
        for sel, k, out in ((cats != preferred, N_OBJECTS, objects), (cats == preferred, TOP_K, cands)):
            ids = stim[sel]
            resp = mean.sel(channel=c).sel(stimulus=ids).values
            keep = np.isfinite(resp)
            ids, resp = ids[keep], resp[keep]
            out[c] = [str(s) for s in ids[_ranked(resp, ids)[:k]]]
    return channels, objects, cands


# -- the torch study (runs in its own process) --------------------------------------------------------------


def torch_study(out: Path, threads: int) -> None:
    """The 36-pair study in plain torch autograd, writing figures, index.html and explanations.nc to `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    import torchvision
    import xarray as xr
    from PIL import Image

    torch.set_num_threads(threads)
    net = torchvision.models.mobilenet_v2(weights=None)
    net.load_state_dict(torch.load(WEIGHTS, map_location="cpu"))
    model = net.features[:19].eval()
    for p in model.parameters():
        p.requires_grad_(False)

    channels, objects, cands = study_plan()
    with xr.open_dataset(RESPONSES) as ds:
        files = dict(zip(ds["stimulus"].values.astype(str), ds["file"].values.astype(str)))
    with xr.open_dataset(READOUTS) as ro:
        weights = {c: ro["weight"].sel(channel=c).values.astype(np.float32) for c in channels}

    def load(sid: str) -> torch.Tensor:
        im = Image.open(RESPONSES.parent / files[sid]).convert("RGB").resize((224, 224), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(im, np.float32) / 255.0).permute(2, 0, 1)
        return (x - 0.5) / 0.5

    needed = sorted({s for c in channels for s in objects[c] + cands[c]})
    phi = {}
    with torch.no_grad():
        for i in range(0, len(needed), BATCH):
            ids = needed[i : i + BATCH]
            f = model(torch.stack([load(s) for s in ids])).flatten(1).numpy()
            phi.update(zip(ids, f))

    pairs, grads, maps, sims = [], [], [], []
    for c in channels:
        w2 = weights[c].astype(np.float64) ** 2
        for o in objects[c]:
            refs = [b for b in cands[c] if b != o]
            po = phi[o].astype(np.float64)
            pb = np.stack([phi[b] for b in refs]).astype(np.float64)
            norm_o = np.sqrt(w2 @ po**2)
            norm_b = np.sqrt((pb**2) @ w2)
            s = (pb @ (w2 * po)) / (norm_o * norm_b)
            j = _ranked(s, np.asarray(refs))[0]
            b = refs[j]
            v = torch.from_numpy((w2 * po * pb[j] / (norm_o * norm_b[j])).astype(np.float32))
            x = torch.stack([load(o), load(b)]).requires_grad_(True)
            (g,) = torch.autograd.grad((model(x).flatten(1) * v).sum(), x)
            pairs.append((c, o, b))
            sims.append(float(s[j]))
            grads.append(g.numpy())
            maps.append(g.abs().sum(1).numpy())

    figs = out / "figures"
    figs.mkdir(parents=True)
    vmax = float(max(m.max() for m in maps)) or 1.0  # one colour scale for the run
    rows = []
    for k, ((c, o, b), m) in enumerate(zip(pairs, maps)):
        fig, ax = plt.subplots(1, 4, figsize=(12, 3.2))
        for a, (img, title) in zip(
            ax,
            (
                (Image.open(RESPONSES.parent / files[o]).convert("RGB").resize((224, 224)), f"object {o}"),
                (m[0], "map"),
                (Image.open(RESPONSES.parent / files[b]).convert("RGB").resize((224, 224)), f"reference {b}"),
                (m[1], "map"),
            ),
        ):
            if isinstance(img, np.ndarray):
                a.imshow(img, cmap="inferno", vmin=0.0, vmax=vmax)
            else:
                a.imshow(img)
            a.set_title(title)
            a.axis("off")
        fig.suptitle(f"channel {c}: s = {sims[k]:.3f}")
        name = f"pair{k:03d}_{c}_{o}.png"
        fig.savefig(figs / name, dpi=80)
        plt.close(fig)
        cells = "".join(f"<td>{t}</td>" for t in (c, o, b, f"{sims[k]:.4f}", f"<img src='figures/{name}'>"))
        rows.append(f"<tr>{cells}</tr>")
    (out / "index.html").write_text(
        "<html><body><table><tr><th>channel</th><th>object</th><th>reference</th><th>s</th><th></th></tr>\n"
        + "\n".join(rows)
        + "\n</table></body></html>\n"
    )
    xr.Dataset(
        {
            "gradient": (("pair", "side", "color", "y", "x"), np.stack(grads)),
            "map": (("pair", "side", "y", "x"), np.stack(maps)),
            "similarity": ("pair", np.asarray(sims)),
        },
        coords={
            "channel": ("pair", [p[0] for p in pairs]),
            "object": ("pair", [p[1] for p in pairs]),
            "reference": ("pair", [p[2] for p in pairs]),
            "side": ["object", "reference"],
        },
    ).to_netcdf(out / "explanations.nc")


# -- the driver ------------------------------------------------------------------------------------------------


def timed(cmd: list[str], log: Path, env: dict) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of `cmd` in a fresh process under /usr/bin/time."""
    rss = log.with_suffix(".rss")
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(rss), *cmd], stdout=fh, stderr=fh, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"{cmd[0]} failed (exit {proc.returncode}); see {log}:\n{log.read_text()[-2000:]}")
    return wall, int(rss.read_text().split()[-1]) / 1024.0


def _pairs_written(path: Path) -> int:
    """The number of pairs in an explanations file (0 if there is none), so that a short run cannot pass."""
    import xarray as xr

    if not path.exists():
        return 0
    with xr.open_dataset(path) as ds:
        return int(ds.sizes.get("pair", 0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[16, 4], help="explain --batch-size values, one row each"
    )
    ap.add_argument("--torch-study", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch_study:
        torch_study(args.torch_study, args.threads)
        return 0
    missing = [p for p in (MODEL, READOUTS, RESPONSES, FEATURES) if not p.exists()]
    if missing:
        print(f"{missing[0]} is missing: run make demo first", file=sys.stderr)
        return 1
    if not CLI.exists() or not WEIGHTS.exists():
        print(f"{CLI if not CLI.exists() else WEIGHTS} is missing (make envs; shared weights)", file=sys.stderr)
        return 1

    channels, objects, _ = study_plan()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    load_before = os.getloadavg()
    sides = [f"pbv-onnx, batch {b}" for b in args.batch_sizes]
    runs: dict[str, list[tuple[float, float]]] = {**{k: [] for k in sides}, "torch": []}
    with tempfile.TemporaryDirectory(prefix="pbv-memory-") as tmp:
        tmp = Path(tmp)
        pairs_csv = tmp / "pairs.csv"
        pairs_csv.write_text("channel,object\n" + "".join(f"{c},{o}\n" for c in channels for o in objects[c]))
        n_pairs = len(pairs_csv.read_text().splitlines()) - 1
        cache = tmp / "features.nc"  # a copy: explain updates its cache, the demo's stays untouched
        shutil.copyfile(FEATURES, cache)
        for i in range(args.runs):
            # alternate the two sides so that drift in the machine's load hits both alike
            for side, b in zip(sides, args.batch_sizes):
                cmd = [str(CLI), "explain", "--model", str(MODEL), "--readouts", str(READOUTS), "--responses"]
                cmd += [str(RESPONSES), "--features", str(cache), "--pairs", str(pairs_csv), "--out", str(tmp / "onnx")]
                cmd += ["--device", "cpu", "--batch-size", str(b), "--force"]
                runs[side].append(timed(cmd, tmp / f"onnx{i}-{b}.log", env))
            shutil.rmtree(tmp / "torch", ignore_errors=True)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--threads", str(args.threads)]
            runs["torch"].append(timed([*cmd, "--torch-study", str(tmp / "torch")], tmp / f"torch{i}.log", env))
            done = ", ".join(f"{k} {v[-1][0]:.1f} s {v[-1][1]:.0f} MB" for k, v in runs.items())
            print(f"run {i + 1}/{args.runs}: {done}", flush=True)
        outs = {"pbv-onnx": tmp / "onnx", "torch": tmp / "torch"}
        written = {k: _pairs_written(d / "explanations.nc") for k, d in outs.items()}
        if any(n != n_pairs for n in written.values()):
            sys.exit(f"expected {n_pairs} pairs written by each study, found {written}")
    load_after = os.getloadavg()

    med = {k: (statistics.median(w for w, _ in v), statistics.median(m for _, m in v)) for k, v in runs.items()}
    ratio = {k: (med[k][0] / med["torch"][0], med[k][1] / med["torch"][1]) for k in sides}
    lines = [
        f"# Memory study: {n_pairs} pairs ({len(channels)} channels x {N_OBJECTS} objects), mobilenet_v2 features.18",
        "",
        f"Median of {args.runs} fresh processes each, alternating; peak RSS from /usr/bin/time %M. "
        f"{args.threads} threads for torch (set_num_threads) and OMP/MKL; pbv-onnx explain has no thread option "
        f"and uses onnxruntime's default (one intra-op thread per physical core; {os.cpu_count()} CPUs here), "
        "--device cpu, features cache copied from build/demo/features.nc.",
        "",
        "| study | wall s | peak RSS MB | wall / torch | peak RSS / torch |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {k} | {w:.1f} | {m:.0f} | " + (f"{ratio[k][0]:.2f} | {ratio[k][1]:.2f} |" if k in ratio else "1 | 1 |")
            for k, (w, m) in med.items()
        ),
        "",
        f"Load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
        f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}. "
        f"Target (issue 23): peak RSS ratio at most 1.0. {platform.processor() or platform.machine()}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "memory_study.md").write_text(text)
    result = {
        "pairs": n_pairs,
        "threads": args.threads,
        "runs": {k: [{"wall_s": w, "peak_rss_mb": m} for w, m in v] for k, v in runs.items()},
        "median": {k: {"wall_s": w, "peak_rss_mb": m} for k, (w, m) in med.items()},
        "ratio": {k: {"wall": w, "peak_rss": m} for k, (w, m) in ratio.items()},
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "cpus": os.cpu_count(),
        "pairs_written": written,
    }
    (RESULTS / "memory_study.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
