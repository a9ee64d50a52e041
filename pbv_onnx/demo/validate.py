"""Ground-truth validation on the demo: readout fit, pointing game, deletion test, reference choice."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
from PIL import Image

from pbv_onnx.base.atomic import atomic_file
from pbv_onnx.base.errors import InputDataError
from pbv_onnx.demo.stimuli import TABLE, Stimulus, load_mask, read_table
from pbv_onnx.method.methods import METHODS, resolve
from pbv_onnx.runtime.images import Preprocessing, display_image, load_batch
from pbv_onnx.workflows import explain as ex

if TYPE_CHECKING:
    from pbv_onnx.demo.synthetic import GroundTruth
    from pbv_onnx.runtime.engine import Engine

# Deletion test: the image is cut into DELETION_PATCH x DELETION_PATCH blocks, ranked by the map's
# summed saliency; blocks are set to the preprocessing mean (grey), most salient first or in a
# random order, and the channel's response is read after each fraction of blocks is gone. Blocks,
# not pixels: scattered grey pixels barely move a late CNN layer until most of the image is gone.
DELETION_PATCH = 16
# Fractions of blocks removed (0 and 1 included); dense where a planted part (~10% of the image)
# is being removed.
DELETION_FRACTIONS = (0.0, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
# Random deletion orders per pair; their mean curve is the reference every method is compared to.
DELETION_RANDOM_ORDERS = 3
BOOTSTRAP_SAMPLES = 2000
# Integration steps of the integrated method during validation (the explain default is higher;
# 4 steps keep `make validate` short and already separate the methods).
VALIDATION_STEPS = 4


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


def patch_scores(smap: np.ndarray, patch: int) -> np.ndarray:
    """[ceil(H/patch), ceil(W/patch)]: the map's absolute mass summed over each block (edge blocks
    may be smaller)."""
    a = np.abs(np.asarray(smap, np.float64))
    H, W = a.shape
    gh, gw = -(-H // patch), -(-W // patch)
    padded = np.zeros((gh * patch, gw * patch))
    padded[:H, :W] = a
    return padded.reshape(gh, patch, gw, patch).sum(axis=(1, 3))


def deletion_order(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Block indices (flattened row-major) by decreasing score, ties in random order."""
    s = np.asarray(scores, np.float64).ravel()
    return np.lexsort((rng.permutation(s.size), -s))


def deleted_images(
    image: np.ndarray, order: np.ndarray, fractions: Sequence[float], fill: np.ndarray, patch: int = 1
) -> np.ndarray:
    """[len(fractions), 3, H, W]: `image` with the first round(fraction * n_blocks) blocks of
    `order` (patch x patch blocks, row-major; patch 1: pixels) replaced by `fill`."""
    C, H, W = image.shape
    gw = -(-W // patch)
    n = -(-H // patch) * gw
    fill = np.broadcast_to(np.asarray(fill, np.float32), image.shape)
    out = np.repeat(np.asarray(image, np.float32)[None], len(fractions), axis=0)
    for i, f in enumerate(fractions):
        for j in np.asarray(order)[: int(round(f * n))]:
            y, x = divmod(int(j), gw)
            sl = (slice(None), slice(y * patch, (y + 1) * patch), slice(x * patch, (x + 1) * patch))
            out[i][sl] = fill[sl]
    return out


def area_between(fractions: Sequence[float], salient: np.ndarray, random: np.ndarray, scale: float = 1.0) -> float:
    """Area between the random and the salient deletion curves (response against the fraction
    deleted), in units of `scale`: positive when removing the most salient blocks first lowers
    the response faster than removing random ones, 0 when no better than random."""
    f = np.asarray(fractions, np.float64)
    d = np.asarray(random, np.float64) - np.asarray(salient, np.float64)
    return float(np.sum((d[1:] + d[:-1]) * np.diff(f)) / 2 / scale)


def bootstrap_ci(
    values: Sequence[float], rng: np.random.Generator, samples: int = BOOTSTRAP_SAMPLES, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of the finite `values` (NaN, NaN if none)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    means = v[rng.integers(0, v.size, (samples, v.size))].mean(1)
    tail = 100 * (1 - level) / 2
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def upsample_cells(cells: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A coarse [h, w] map spread over [H, W] pixels, each pixel taking its cell's value."""
    h, w = cells.shape
    ys = np.minimum((np.arange(shape[0]) * h) // shape[0], h - 1)
    xs = np.minimum((np.arange(shape[1]) * w) // shape[1], w - 1)
    return np.asarray(cells)[np.ix_(ys, xs)]


def mask_to_input(mask: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """A stimulus-pixel mask through the model's resize/crop (nearest neighbour): [H, W] bool."""
    img = Image.fromarray(np.asarray(mask, np.uint8) * 255).convert("RGB")
    return display_image(img, replace(spec, interpolation="nearest"))[..., 0] > 127


def cell_pointing_hit(cells: np.ndarray, mask: np.ndarray) -> bool:
    """Pointing game for a coarse [h, w] map: the centre of its peak cell lies inside the mask."""
    cy, cx = np.unravel_index(np.argmax(cells), cells.shape)
    y = int((cy + 0.5) * mask.shape[0] / cells.shape[0])
    x = int((cx + 0.5) * mask.shape[1] / cells.shape[1])
    return bool(mask[y, x])


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
    return {
        "channels": int(readouts.sizes["channel"]),
        "r_cv_preferred": m("r_cv_preferred"),
        "r_ooc": m("r_ooc"),
        "reliability": m("reliability"),
        "r_critical": m("r_critical"),
        "r_critical_ooc": m("r_critical_ooc"),
        "channels_r_ooc_significant": None if sig is None else int(sig.sum()),
    }


@dataclass
class Truth:
    """The experiment's ground truth and the engine that computes its features."""

    model: GroundTruth
    engine: Engine  # the study's own when it is the same model file
    index: dict  # channel id (text) -> row of the ground truth

    def rates(self, feats: np.ndarray) -> np.ndarray:
        from pbv_onnx.demo import synthetic

        return synthetic.mean_rate(self.model, feats)

    def maps(self, feats: np.ndarray) -> np.ndarray:
        from pbv_onnx.demo import synthetic

        return synthetic.local_maps(self.model, feats)


def load_truth(experiment: Path, study: ex.Study, device: str = "auto") -> Truth | None:
    """The ground truth beside an experiment, when its model is there too (else None)."""
    from pbv_onnx.base.netcdf import read_netcdf
    from pbv_onnx.demo import synthetic
    from pbv_onnx.runtime.engine import Engine

    gt_path = experiment / "ground_truth.nc"
    if not gt_path.is_file():
        return None
    gt_ds = read_netcdf(gt_path, "ground-truth")
    if gt_ds.attrs.get("model_sha256") == study.engine.info.sha256:
        engine = study.engine  # same model: one set of features serves readout and ground truth
    else:
        model = experiment.parent / str(gt_ds.attrs.get("model_file", ""))
        if not model.is_file():
            return None
        engine = Engine(model, device=device)
    gt = synthetic.GroundTruth.from_dataset(gt_ds)
    return Truth(gt, engine, {str(c): n for n, c in enumerate(gt.channel)})


MEASURES = ("readout", "ground truth")


def responses_to(study: ex.Study, truth: Truth | None, channel, x: np.ndarray) -> dict[str, np.ndarray]:
    """The channel's response to preprocessed images [N, 3, H, W]: the fitted readout's prediction
    and (when known) the ground truth's noiseless rate."""
    feats = study.engine.feature_maps(x)
    out = {"readout": feats.reshape(len(x), -1).astype(np.float64) @ study.weight(channel) + study.bias(channel)}
    if truth is not None:
        g = feats if truth.engine is study.engine else truth.engine.feature_maps(x)
        out["ground truth"] = truth.rates(g)[truth.index[str(channel)]]
    return out


def deletion_areas(
    read: Callable[[np.ndarray], dict[str, np.ndarray]],
    image: np.ndarray,
    maps: dict[str, np.ndarray],
    rng: np.random.Generator,
    scale: float,
    fill: np.ndarray,
    patch: int = DELETION_PATCH,
    fractions: Sequence[float] = DELETION_FRACTIONS,
    n_random: int = DELETION_RANDOM_ORDERS,
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """For one image: each map's area between the mean random-order curve and its salient-first
    curve, per measure, in units of `scale`; and the drop from the intact to the fully deleted
    image, per measure, in the same units. One call of `read` for all curves."""
    fr = np.asarray(fractions, np.float64)
    inner = fr[1:-1]  # the intact and the fully deleted image are the same for every order
    n_blocks = patch_scores(np.zeros(image.shape[1:]), patch).size
    orders = [rng.permutation(n_blocks) for _ in range(n_random)]
    orders += [deletion_order(patch_scores(m, patch), rng) for m in maps.values()]
    x = np.concatenate(
        [np.stack([image, np.broadcast_to(fill, image.shape)])]
        + [deleted_images(image, o, inner, fill, patch) for o in orders]
    )
    resp = read(x.astype(np.float32))
    areas: dict[str, dict[str, float]] = {name: {} for name in maps}
    drop = {}
    for measure, r in resp.items():
        ends = r[:2]
        curves = r[2:].reshape(len(orders), len(inner))
        full = np.concatenate(
            [np.repeat(ends[:1], len(orders))[:, None], curves, np.repeat(ends[1:], len(orders))[:, None]], axis=1
        )
        random = full[:n_random].mean(0)
        for name, curve in zip(maps, full[n_random:]):
            areas[name][measure] = area_between(fr, curve, random, scale)
        drop[measure] = float((ends[0] - ends[1]) / scale)
    return areas, drop


def run_validation(
    model: str | os.PathLike,
    readouts: str | os.PathLike,
    experiment: str | os.PathLike,
    methods: Sequence[str] = tuple(METHODS),
    per_object: int = 1,
    steps: int = VALIDATION_STEPS,
    top_k: int = 20,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 16,
    progress: bool = True,
) -> dict:
    """Every validation number on an experiment folder built by `pbv-onnx demo build`."""
    # each a method name or a "rule+path" label (e.g. parallel+smooth), checked before any computation
    attributions = {m: resolve(m, steps=steps) for m in methods}
    say = logging.getLogger(__name__).info  # progress notes: shown by the command line, not by default
    experiment = Path(experiment)
    table = read_table(experiment / TABLE)
    study = ex.open_study(
        model,
        readouts,
        experiment / "responses.nc",
        features_cache=None,
        device=device,
        batch_size=batch_size,
        progress=progress,
    )
    spec = study.engine.info.preprocessing
    pairs_plan = planted_pairs(study, table, per_object)
    if not pairs_plan:
        raise InputDataError(experiment / TABLE, "no planted objects in the stimulus table")
    masks = {s.stimulus: mask_to_input(load_mask(experiment, s), spec) for _, s in pairs_plan}
    by_id = {s.stimulus: s for s in table}
    truth = load_truth(experiment, study, device)
    result: dict = {
        "readouts": readout_summary(study.readouts),
        "n_pairs": len(pairs_plan),
        "per_object": per_object,
        "chance_pointing": _mean([m.mean() for m in masks.values()]),
        "steps": steps,
        "deletion": {
            "patch": DELETION_PATCH,
            "fractions": list(DELETION_FRACTIONS),
            "random_orders": DELETION_RANDOM_ORDERS,
            "fill": "preprocessing mean",
        },
        "ground_truth_layer": None if truth is None else truth.engine.info.layer,
        "readout_layer": study.engine.info.layer,
    }

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
    say(
        f"similarity: reference from the part's source photo {sim['top-k']['hit_rate']:.2f} "
        f"(chance {sim['top-k']['chance']:.2f})"
    )

    # Maps: the real explain path, per method, on (channel, planted object) pairs.
    pairs = [
        ex.best_match(study, c, study.stimulus_ref(study.stimuli[s.stimulus]), "top-k", top_k) for c, s in pairs_plan
    ]
    maps: dict[str, np.ndarray] = {}
    for method in methods:
        say(f"maps: {method} on {len(pairs)} planted objects")
        maps[method] = ex.explain(study, pairs, attributions[method])["saliency"].sel(role="ooc").values
    images = load_batch([p.ooc.path for p in pairs], spec)
    rows: dict[str, dict] = {
        m: {
            "pointing": _mean([pointing_hit(maps[m][i], masks[p.ooc.label]) for i, p in enumerate(pairs)]),
            "energy": _mean([energy_share(maps[m][i], masks[p.ooc.label]) for i, p in enumerate(pairs)]),
        }
        for m in methods
    }
    truth_name, mask_name = "ground truth's own map", "planted mask (known answer)"
    if truth is not None:  # the ground truth's local map, spread over pixels: its ceiling
        where = [truth.index[str(p.channel)] for p in pairs]
        cells = truth.maps(truth.engine.feature_maps(images))[where, np.arange(len(pairs))]
        maps[truth_name] = np.stack([upsample_cells(m, images.shape[-2:]) for m in cells])
        rows[truth_name] = {
            "pointing": _mean([cell_pointing_hit(m, masks[p.ooc.label]) for m, p in zip(cells, pairs)]),
            "energy": _mean([energy_share(maps[truth_name][i], masks[p.ooc.label]) for i, p in enumerate(pairs)]),
        }
    maps[mask_name] = np.stack([masks[p.ooc.label].astype(np.float64) for p in pairs])
    rows[mask_name] = {"pointing": None, "energy": None}

    # Deletion, in units of each channel's spread of recorded responses to bodies.
    say(f"deletion: {len(maps)} maps on {len(pairs)} planted objects")
    pref = study.responses["category"].values.astype(str) == study.preferred
    scales = {str(c): float(np.nanstd(study.mean.sel(channel=c).values[pref])) or 1.0 for c in study.channels}
    rng = np.random.default_rng(seed)
    fill = np.zeros((3, *spec.input_size), np.float32)  # the preprocessing mean: a grey block
    areas = {name: {k: [] for k in MEASURES} for name in maps}
    drops: dict[str, list] = {k: [] for k in MEASURES}
    for i, p in enumerate(pairs):
        a, d = deletion_areas(
            lambda x: responses_to(study, truth, p.channel, x),
            images[i],
            {name: m[i] for name, m in maps.items()},
            rng,
            scales[str(p.channel)],
            fill,
        )
        for name in maps:
            for k, value in a[name].items():
                areas[name][k].append(value)
        for k, value in d.items():
            drops[k].append(value)
    for name in maps:
        rows[name]["deletion"] = {
            k: {"area": _mean(v), "ci": bootstrap_ci(v, rng), "positive": _mean(np.asarray(v) > 0)}
            for k, v in areas[name].items()
            if v
        }
    result["methods"] = rows
    result["deletion_drop"] = {k: _mean(v) for k, v in drops.items() if v}
    for name, row in rows.items():
        dl = row["deletion"]
        say(
            f"  {name}: pointing {row['pointing'] if row['pointing'] is not None else float('nan'):.2f}, "
            + ", ".join(f"deletion ({k}) {v['area']:.3f}" for k, v in dl.items())
        )
    return result


# -- report ----------------------------------------------------------------------------------------


def _num(v, fmt=".2f") -> str:
    return "–" if v is None or not np.isfinite(v) else format(v, fmt)


def _deletion_cell(row: dict, measure: str) -> tuple[str, str]:
    d = row.get("deletion", {}).get(measure)
    if d is None:
        return "–", "–"
    lo, hi = d["ci"]
    return f"{d['area']:+.3f} [{lo:+.3f}, {hi:+.3f}]", _num(d["positive"])


def to_markdown(res: dict) -> str:
    r = res["readouts"]
    dl = res["deletion"]
    lines = [
        "# pbv-onnx demo: validation against the synthetic ground truth",
        "",
        f"Readouts fitted on {res.get('readout_layer', '?')}; ground truth generated from "
        f"{res.get('ground_truth_layer') or '?'} (a sparse, nonlinear, spatially pooled map: not the readout).",
        "",
        "## Readouts (Fig. 3a), channel means",
        "",
        "| channels | r held-out bodies | r objects | reliability (S-B) | critical r (bodies / objects) "
        "| channels with significant object r |",
        "|---|---|---|---|---|---|",
        f"| {r['channels']} | {r['r_cv_preferred']:.3f} | {r['r_ooc']:.3f} | {r['reliability']:.3f} | "
        f"{r['r_critical']:.3f} / {r['r_critical_ooc']:.3f} | {r['channels_r_ooc_significant']} |",
        "",
        f"## Planted objects: {res['n_pairs']} (object, channel) pairs "
        f"(each planted object with its {res['per_object']} most driven channel(s))",
        "",
        "| map | pointing game | map energy in mask | deletion area, readout [95% CI] | pairs > 0 | "
        "deletion area, ground truth [95% CI] | pairs > 0 |",
        "|---|---|---|---|---|---|---|",
    ]
    ch = res["chance_pointing"]
    lines.append(f"| chance / random order | {ch:.2f} | {ch:.2f} | 0 | 0.50 | 0 | 0.50 |")
    for name, row in res["methods"].items():
        ro, ro_pos = _deletion_cell(row, "readout")
        gt, gt_pos = _deletion_cell(row, "ground truth")
        lines.append(
            f"| {name} | {_num(row['pointing'])} | {_num(row['energy'])} | {ro} | {ro_pos} | {gt} | {gt_pos} |"
        )
    drop = res.get("deletion_drop", {})
    s = res["similarity"]
    lines += [
        "",
        "## Reference choice",
        "",
        "| candidates | reference cut from the part's source photo | chance |",
        "|---|---|---|",
    ]
    for mode, row in s.items():
        lines.append(f"| {mode} | {row['hit_rate']:.2f} | {row['chance']:.2f} |")
    lines += [
        "",
        "Notes:",
        "",
        "- Pointing game: the peak of the object's map lies inside the pasted body part (the ground "
        "truth's own map: the centre of its peak feature-map cell; not a ceiling, since a late layer's "
        "cell also sees the object around the part). Chance: the mask's share of the image. "
        f"Integrated gradients use {res.get('steps', '?')} steps (black baseline).",
        f"- Deletion: the image is cut into {dl['patch']}x{dl['patch']} px blocks ranked by the map's "
        "summed |saliency|; blocks are set to the preprocessing mean (grey) most salient first, and in "
        f"{dl['random_orders']} random orders whose mean curve is the reference. The response is read at "
        f"block fractions {', '.join(f'{f:g}' for f in dl['fractions'])}. Area between the random and the "
        "salient-first curve (trapezoid over the fraction deleted), in units of the channel's sd of "
        "recorded responses to bodies: > 0 when removing the map's blocks first lowers the response faster "
        "than removing random ones. Mean over pairs, 95% percentile-bootstrap interval over pairs, and "
        "the fraction of pairs with area > 0.",
        "- Two responses are read: the fitted readout's prediction (is the map faithful to the model "
        "that produced it?) and the ground truth's noiseless rate (does the map find what really drives "
        "the channel?). For scale, deleting every block lowers the readout by "
        f"{_num(drop.get('readout'), '.3f')} and the ground truth by {_num(drop.get('ground truth'), '.3f')} "
        "(same units, mean over pairs): a readout fitted on bodies only predicts close to its mean body "
        "response for any non-body image, a grey one included, so its deletion curves are nearly flat "
        "whatever the order.",
        "- Planted mask (known answer): the pasted rectangle itself as the map, the best a map can point "
        "at; its deletion areas show what the test can detect.",
        "",
    ]
    return "\n".join(lines)


def write_results(res: dict, out_md: str | os.PathLike, out_json: str | os.PathLike, force: bool = True) -> str:
    text = to_markdown(res)
    with atomic_file(out_md, force) as tmp:
        tmp.write_text(text)
    with atomic_file(out_json, force) as tmp:
        tmp.write_text(json.dumps(res, indent=2, default=float) + "\n")
    return text
