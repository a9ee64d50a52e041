"""Ground-truth validation on the demo: readout fit, pointing game, deletion test, reference choice."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from .. import explain as ex
from ..atomic import atomic_file
from ..errors import InputDataError
from ..images import Preprocessing, display_image, load_batch
from ..saliency import METHODS, gaussian_smooth
from .stimuli import TABLE, Stimulus, load_mask, read_table

# Fractions of pixels removed along a deletion curve (0 and 1 included: the curve is normalised
# between the intact image and the fully deleted one).
DELETION_FRACTIONS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
# Deletion ranks pixels on maps smoothed by this Gaussian (pixels): blobs, not scattered pixels.
DELETION_SIGMA = 4.0


# -- metrics on one map (pure) ----------------------------------------------------------------

def pointing_hit(smap: np.ndarray, mask: np.ndarray) -> bool:
    """Whether the map's maximum lies inside the mask (ties: any maximal pixel inside counts
    only if all of them are inside, so a constant map never scores)."""
    smap = np.asarray(smap, np.float64)
    peak = smap == smap.max()
    return bool(mask[peak].all())


def energy_share(smap: np.ndarray, mask: np.ndarray) -> float:
    """Share of the map's total (absolute) mass that falls inside the mask; NaN for a zero map."""
    a = np.abs(np.asarray(smap, np.float64))
    total = a.sum()
    return float(a[mask].sum() / total) if total > 0 else float("nan")


def deletion_orders(smap: np.ndarray, rng: np.random.Generator, sigma: float = 0.0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Pixel indices (flattened y*W+x) by decreasing saliency (ties in random order), and a
    random order of the same pixels. With `sigma` > 0 both rankings come from maps smoothed by
    the same Gaussian (the random one from smoothed noise), so both delete blobs of similar
    size rather than scattered single pixels."""
    smap = np.asarray(smap, np.float64)
    noise = rng.random(smap.shape)
    if sigma > 0:
        smap = gaussian_smooth(smap, sigma)
        noise = gaussian_smooth(noise, sigma)
    jitter = rng.permutation(smap.size)  # random tie-breaking
    salient = np.lexsort((jitter, -smap.ravel()))
    return salient, np.lexsort((jitter, -noise.ravel()))


def deleted_images(image: np.ndarray, order: np.ndarray, fractions: Sequence[float],
                   fill: np.ndarray) -> np.ndarray:
    """[len(fractions), 3, H, W]: `image` with the first fraction*H*W pixels of `order` set to `fill`."""
    C, H, W = image.shape
    out = np.repeat(image[None], len(fractions), axis=0).reshape(len(fractions), C, H * W)
    fill = np.broadcast_to(np.asarray(fill, np.float32).reshape(C, -1), (C, H * W))
    for i, f in enumerate(fractions):
        idx = order[:int(round(f * H * W))]
        out[i][:, idx] = fill[:, idx]
    return out.reshape(len(fractions), C, H, W)


def area_between(fractions: Sequence[float], salient: np.ndarray, random: np.ndarray,
                 scale: float = 1.0) -> float:
    """Area between the random and the salient deletion curves (predicted response against the
    fraction deleted), in units of `scale`: positive when removing the most salient pixels first
    lowers the response faster than removing random ones, 0 when no better than random."""
    f = np.asarray(fractions, np.float64)
    d = np.asarray(random, np.float64) - np.asarray(salient, np.float64)
    return float(np.sum((d[1:] + d[:-1]) * np.diff(f)) / 2 / scale)


def mask_to_input(mask: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """A stimulus-pixel mask through the model's resize/crop (nearest neighbour): [H, W] bool."""
    img = Image.fromarray(np.asarray(mask, np.uint8) * 255).convert("RGB")
    return display_image(img, replace(spec, interpolation="nearest"))[..., 0] > 127


# -- the validation run --------------------------------------------------------------------------

def _mean(values) -> float:
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def planted_pairs(study: ex.Study, table: Sequence[Stimulus], per_object: int = 1) -> list[tuple[str, Stimulus]]:
    """(channel, planted stimulus): each planted object with its `per_object` most driven channels
    by recorded mean response."""
    out = []
    for s in table:
        if not s.planted or s.stimulus not in study.stimuli:
            continue
        resp = study.mean.sel(stimulus=study.stimuli[s.stimulus]).sel(channel=study.channels).values
        for j in np.argsort(-resp, kind="stable")[:per_object]:
            out.append((study.channels[j], s))
    return out


def readout_summary(readouts) -> dict:
    """Fig. 3a numbers: channel means of held-out preferred r, object r, reliability, critical r."""
    def m(name):
        return _mean(readouts[name].values) if name in readouts else float("nan")

    sig = (readouts["r_ooc"].values > readouts["r_critical_ooc"].values) if "r_critical_ooc" in readouts else None
    return {"channels": int(readouts.sizes["channel"]), "r_cv_preferred": m("r_cv_preferred"),
            "r_ooc": m("r_ooc"), "reliability": m("reliability"), "r_critical": m("r_critical"),
            "r_critical_ooc": m("r_critical_ooc"),
            "channels_r_ooc_significant": None if sig is None else int(sig.sum())}


def run_validation(model: str | os.PathLike, readouts: str | os.PathLike, experiment: str | os.PathLike,
                   methods: Sequence[str] = METHODS, per_object: int = 1, steps: int = 8,
                   top_k: int = 20, seed: int = 0, device: str = "auto", batch_size: int = 16,
                   progress: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """Every validation number on an experiment folder built by `pbv-onnx demo build`."""
    say = log or (lambda msg: None)
    experiment = Path(experiment)
    table = read_table(experiment / TABLE)
    study = ex.open_study(model, readouts, experiment / "responses.nc", features_cache=None,
                          device=device, batch_size=batch_size, progress=progress)
    spec = study.engine.info.preprocessing
    pairs_plan = planted_pairs(study, table, per_object)
    if not pairs_plan:
        raise InputDataError(experiment / TABLE, "no planted objects in the stimulus table")
    masks = {s.stimulus: mask_to_input(load_mask(experiment, s), spec) for _, s in pairs_plan}
    by_id = {s.stimulus: s for s in table}
    result: dict = {"readouts": readout_summary(study.readouts), "n_pairs": len(pairs_plan),
                    "per_object": per_object, "chance_pointing": _mean([m.mean() for m in masks.values()])}

    # Reference choice (section 2): the matched body is cut from the photo the part came from?
    sim = {}
    for mode in ("top-k", "all"):
        hits, chance = [], []
        for c, s in pairs_plan:
            ranked = ex.match(study, c, study.stimulus_ref(study.stimuli[s.stimulus]), mode, top_k)
            best = str(ranked["stimulus"].values[0])
            hits.append(by_id[best].source == s.part_source)
            cands = [by_id[str(b)].source == s.part_source for b in ranked["stimulus"].values]
            chance.append(float(np.mean(cands)))
        sim[mode] = {"hit_rate": _mean(hits), "chance": _mean(chance)}
    result["similarity"] = sim
    say(f"similarity: reference from the part's source photo {sim['top-k']['hit_rate']:.2f} "
        f"(chance {sim['top-k']['chance']:.2f})")

    # Maps: the real explain path, per method, on (channel, planted object) pairs.
    pairs = []
    for c, s in pairs_plan:
        ref = study.stimulus_ref(study.stimuli[s.stimulus])
        ranked = ex.match(study, c, ref, "top-k", top_k)
        best = study.stimulus_ref(ranked["stimulus"].values[0])
        pairs.append(ex.Pair(c, ref, best, float(ranked["similarity"].values[0])))
    rng = np.random.default_rng(seed)
    fill = np.zeros((3, *spec.input_size), np.float32)  # the preprocessing mean: a grey pixel
    fractions = np.asarray(DELETION_FRACTIONS)
    images = {p.ooc.label: load_batch([p.ooc.path], spec)[0] for p in pairs}

    def predicted(channel, x: np.ndarray) -> np.ndarray:
        f = study.engine.features(x).reshape(len(x), -1).astype(np.float64)
        return f @ study.weight(channel) + study.bias(channel)

    # Deletion areas in units of each channel's spread of recorded responses to bodies.
    pref = study.responses["category"].values.astype(str) == study.preferred
    scales = {str(c): float(np.nanstd(study.mean.sel(channel=c).values[pref])) or 1.0
              for c in study.channels}
    random_curves = {}
    rows = {}
    for method in methods:
        say(f"maps: {method} on {len(pairs)} planted objects")
        ds = ex.explain(study, pairs, method, steps=steps)
        smaps = ds["saliency"].sel(role="ooc").values
        hits, energy, abc = [], [], []
        for i, p in enumerate(pairs):
            mask = masks[p.ooc.label]
            hits.append(pointing_hit(smaps[i], mask))
            energy.append(energy_share(smaps[i], mask))
            salient, random = deletion_orders(smaps[i], rng, DELETION_SIGMA)
            key = (str(p.channel), p.ooc.label)
            if key not in random_curves:
                x_r = deleted_images(images[p.ooc.label], random, fractions, fill)
                random_curves[key] = predicted(p.channel, x_r)
            x_s = deleted_images(images[p.ooc.label], salient, fractions, fill)
            curve = predicted(p.channel, x_s)
            abc.append(area_between(fractions, curve, random_curves[key], scales[str(p.channel)]))
        rows[method] = {"pointing": _mean(hits), "energy": _mean(energy), "deletion_abc": _mean(abc),
                        "deletion_positive": _mean(np.asarray(abc) > 0)}
        say(f"  pointing {rows[method]['pointing']:.2f}, energy in mask {rows[method]['energy']:.2f}, "
            f"deletion area {rows[method]['deletion_abc']:.3f}")
    result["methods"] = rows
    result["ground_truth_pointing"] = ground_truth_pointing(experiment, table, pairs, masks)
    return result


def ground_truth_pointing(experiment: Path, table: Sequence[Stimulus], pairs, masks) -> float | None:
    """Pointing game of the ground truth's own local maps (coarse cells: the peak cell's centre
    inside the mask), when its model is beside the experiment."""
    import xarray as xr

    from ..model import Engine
    from . import synthetic

    gt_path = experiment / "ground_truth.nc"
    if not gt_path.is_file():
        return None
    with xr.open_dataset(gt_path, engine="h5netcdf") as ds:
        gt_ds = ds.load()
    model = experiment.parent / gt_ds.attrs.get("model_file", "")
    if not model.is_file():
        return None
    eng = Engine(model, device="cpu")
    gt = synthetic.GroundTruth.from_dataset(gt_ds)
    ids = sorted({p.ooc.label for p in pairs})
    feats = eng.features(load_batch([experiment / f"stimuli/{i}.png" for i in ids], eng.info.preprocessing))
    maps = synthetic.local_maps(gt, feats)
    where = {str(c): n for n, c in enumerate(gt.channel)}
    hits = []
    for p in pairs:
        m = maps[where[str(p.channel)], ids.index(p.ooc.label)]
        mask = masks[p.ooc.label]
        cy, cx = np.unravel_index(np.argmax(m), m.shape)  # the peak cell's centre, in pixels
        y = int((cy + 0.5) * mask.shape[0] / m.shape[0])
        x = int((cx + 0.5) * mask.shape[1] / m.shape[1])
        hits.append(bool(mask[y, x]))
    return _mean(hits)


# -- report ----------------------------------------------------------------------------------------

def to_markdown(res: dict) -> str:
    r = res["readouts"]
    lines = ["# pbv-onnx demo: validation against the synthetic ground truth", "",
             "## Readouts (Fig. 3a), channel means", "",
             "| channels | r held-out bodies | r objects | reliability (S-B) | critical r (bodies / objects) | channels with significant object r |",
             "|---|---|---|---|---|---|",
             f"| {r['channels']} | {r['r_cv_preferred']:.3f} | {r['r_ooc']:.3f} | {r['reliability']:.3f} | "
             f"{r['r_critical']:.3f} / {r['r_critical_ooc']:.3f} | {r['channels_r_ooc_significant']} |", "",
             f"## Planted objects: {res['n_pairs']} (object, channel) pairs "
             f"(each planted object with its {res['per_object']} most driven channel(s))", "",
             "| method | pointing game | chance | map energy in mask | chance | deletion area (salient vs random) | pairs with area > 0 |",
             "|---|---|---|---|---|---|---|"]
    ch = res["chance_pointing"]
    for method, row in res["methods"].items():
        lines.append(f"| {method} | {row['pointing']:.2f} | {ch:.2f} | {row['energy']:.2f} | {ch:.2f} | "
                     f"{row['deletion_abc']:.3f} | {row['deletion_positive']:.2f} |")
    if res.get("ground_truth_pointing") is not None:
        lines.append(f"| ground truth's own map (ceiling) | {res['ground_truth_pointing']:.2f} | {ch:.2f} | | | | |")
    s = res["similarity"]
    lines += ["", "## Reference choice", "",
              "| candidates | reference cut from the part's source photo | chance |", "|---|---|---|"]
    for mode, row in s.items():
        lines.append(f"| {mode} | {row['hit_rate']:.2f} | {row['chance']:.2f} |")
    lines += ["", "Pointing game: the peak of the object's map lies inside the pasted body part. Chance: "
              "the mask's share of the image. Deletion: pixels set to the preprocessing mean, most "
              "salient first vs in random order (both ranked on maps smoothed by a Gaussian of "
              f"sigma {DELETION_SIGMA:g} px, the random one from smoothed noise); area between the "
              "predicted-response curves, in units of the channel's response sd over bodies (0: no better than random).", ""]
    return "\n".join(lines)


def write_results(res: dict, out_md: str | os.PathLike, out_json: str | os.PathLike, force: bool = True) -> str:
    text = to_markdown(res)
    with atomic_file(out_md, force) as tmp:
        tmp.write_text(text)
    with atomic_file(out_json, force) as tmp:
        tmp.write_text(json.dumps(res, indent=2, default=float) + "\n")
    return text
