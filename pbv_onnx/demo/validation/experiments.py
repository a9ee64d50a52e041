"""The validation study's experiments (issue 21 items 3-9), each a function of the opened experiment.

Designs are fixed here, before any map is looked at; every number goes out with a bootstrap interval
clustered by source photo (`group`). Results are plain dicts (JSON-ready).
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pbv_onnx.demo.validation import maps as mp
from pbv_onnx.demo.validation.lab import Lab, best_reference, similarity
from pbv_onnx.method import scoring as sc
from pbv_onnx.method.paths import PATHS
from pbv_onnx.method.stats import clustered_bootstrap, mcnemar_exact

say = logging.getLogger(__name__).info

PARALLEL = ("pixel", "shared", "guided")  # the parallel maps (the paper's pixel map, the shared map, their product)
BASELINES = ("gradient", "grad-x-act")  # the reference-blind controls
OCCLUSION_BLOCK = 32  # occlusion maps grey one 32 px block at a time (7 x 7 at 224: the cut's grid)
FRACTIONS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)  # deletion / insertion: fractions of 16 px blocks
SATURATION = 6.0  # ReLU6's ceiling: where an activation sits there, every gradient through it is zero


@dataclass
class Settings:
    """Repetitions (what `make validate` may cut to stay within its time), never rows."""

    top_k: int = 20  # reference candidates: the channel's top-k bodies by recorded response
    bootstrap: int = 2000  # clustered bootstrap resamples per interval
    refits: int = 5  # bootstrap refits of the readout (sanity checks' reference level)
    random_orders: int = 2  # random block orders per deletion / insertion curve
    ig_pairs: int = 0  # pairs for the integrated-gradients completeness check (0: all)
    ig_more_pairs: int = 12  # of those, pairs also checked at 32 and 64 steps
    seed: int = 0


def interval(values, groups, rng: np.random.Generator, samples: int) -> dict:
    """{"mean", "lo", "hi", "n"}: mean of the finite values and its group-clustered 95% bootstrap interval."""
    v = np.asarray(values, np.float64)
    m, lo, hi = clustered_bootstrap(v, np.asarray(groups), rng, samples)
    return {"mean": m, "lo": lo, "hi": hi, "n": int(np.isfinite(v).sum())}


def score_maps(maps: dict[str, np.ndarray], masks: list[np.ndarray], gt_maps: np.ndarray | None = None) -> dict:
    """Per map name: per-pair pointing hits, energy in mask and (given the GT maps) block rank correlation."""
    out = {}
    for name, m in maps.items():
        out[name] = {
            "hit": np.array([sc.pointing_hit(m[i], masks[i]) for i in range(len(masks))]),
            "energy": np.array([sc.energy_in_mask(m[i], masks[i]) for i in range(len(masks))]),
            "rank_gt": np.array(
                [sc.block_rank_correlation(m[i], gt_maps[i]) for i in range(len(masks))]
                if gt_maps is not None
                else [np.nan] * len(masks)
            ),
        }
    return out


def occlusion(lab: Lab, ids: list[str], channels: list) -> tuple[np.ndarray, np.ndarray]:
    """Occlusion maps [N, H, W] of the fitted readout and of r_GT: each 32 px block greyed in turn."""
    x = lab.x(ids)
    fill = np.zeros_like(x[0])  # the preprocessing mean
    ro, gt = [], []
    for i, c in enumerate(channels):
        occ = sc.occluded_images(x[i], fill, OCCLUSION_BLOCK)
        a = lab.engine.feature_maps(np.concatenate([x[i : i + 1], occ]))
        r, g = lab.readout(a, c), lab.gt_response(a, c)
        ro.append(sc.occlusion_map(r[0], r[1:], lab.size, OCCLUSION_BLOCK))
        gt.append(sc.occlusion_map(g[0], g[1:], lab.size, OCCLUSION_BLOCK))
    return np.stack(ro), np.stack(gt)


def gt_pixel_maps(lab: Lab, ids: list[str], channels: list) -> np.ndarray:
    """The ground truth's pixel map: S of the engine's VJP with cotangent d r_GT / d phi."""
    a = lab.a(ids)
    cots = np.concatenate([lab.gt_cotangent(a[i : i + 1], c) for i, c in enumerate(channels)])
    return mp.pixel_maps(lab.engine.vjp, lab.x(ids), cots)


def readout_maps(
    lab: Lab, ids: list[str], refs: list[str | np.ndarray], w: np.ndarray, baselines: bool = True
) -> dict[str, np.ndarray]:
    """Parallel (pixel, shared, guided) and (optionally) baseline maps of objects `ids` with references
    (stimulus ids or feature arrays: mean features) and per-pair readouts w [N, *feature_shape]."""
    a_o = lab.a(ids)
    a_b = np.stack([lab.a([r])[0] if isinstance(r, str) else r for r in refs])
    out = mp.parallel_maps(lab.engine.vjp, w, lab.x(ids), a_o, a_b)
    if baselines:
        out.update(mp.baseline_maps(lab.engine.vjp, w, lab.x(ids), a_o))
    return out


# -- items 3, 5, 7, 9: pointing on gated planted pairs, controls, magnitude, McNemar, saturation ----------------


def planted_study(lab: Lab, pairs: list[tuple[str, str, str]], st: Settings) -> dict:
    """Every map on every gated (planted, part-free, channel) pair, scored on the planted part's mask; the
    same maps of the part-free copies give each map's chance level."""
    rng = np.random.default_rng(st.seed)
    planted = [p for p, _, _ in pairs]
    free = [f for _, f, _ in pairs]
    chans = [c for _, _, c in pairs]
    groups = [lab.group(p) for p in planted]
    masks = [lab.mask(p) for p in planted]
    both = planted + free
    chans2 = chans + chans
    masks2 = masks + masks
    n = len(pairs)
    say(f"planted: {n} gated pairs from {len(set(groups))} photos")
    maps: dict[str, np.ndarray] = {}
    t0 = time.perf_counter()
    maps["ground truth (pixel)"] = gt_pixel_maps(lab, both, chans2)
    occ_ro, occ_gt = occlusion(lab, both, chans2)
    maps["occlusion (ground truth)"], maps["occlusion (readout)"] = occ_gt, occ_ro
    maps["edge magnitude (image only)"] = np.stack([sc.edge_map(x) for x in lab.x(both)])
    refs: dict[str, list[str]] = {}
    extra: dict[str, dict] = {}
    for rname in ("w*", "fitted"):
        w = np.stack([lab.w_star(c) if rname == "w*" else lab.weight[lab.index(c)] for c in chans])
        refs[rname] = [best_reference(lab, w[i], planted[i], chans[i], st.top_k) for i in range(n)]
        m = readout_maps(lab, both, refs[rname] * 2, np.concatenate([w, w]))
        for k in PARALLEL + BASELINES:
            maps[f"{k} ({rname})"] = m[k]
        extra[rname] = {"similarity": m["similarity"][:n], "w": w}
    say(f"planted: method maps in {time.perf_counter() - t0:.0f} s")
    # controls (fitted readout): a random body and the mean body as reference; a random readout
    w = extra["fitted"]["w"]
    bodies = sorted(s.stimulus for s in lab.role("body"))
    rand_ref = [bodies[i] for i in rng.integers(0, len(bodies), n)]
    mean_body = lab.a(bodies).mean(0)
    m_rand = readout_maps(lab, both, rand_ref * 2, np.concatenate([w, w]), baselines=False)
    m_mean = readout_maps(lab, both, [mean_body] * (2 * n), np.concatenate([w, w]), baselines=False)
    w_rand = (
        rng.standard_normal(w.shape)
        * np.linalg.norm(w.reshape(n, -1), axis=1)[:, None, None, None]
        / np.sqrt(w[0].size)
    )
    m_rr = readout_maps(lab, both, refs["fitted"] * 2, np.concatenate([w_rand, w_rand]), baselines=False)
    for k in PARALLEL:
        maps[f"{k}, random body reference (fitted)"] = m_rand[k]
        maps[f"{k}, mean body reference (fitted)"] = m_mean[k]
    maps["pixel, random readout"] = m_rr["pixel"]
    # score: planted rows against the part, part-free rows against the same (planted) part region
    gt_map = maps["ground truth (pixel)"]
    scored = score_maps({k: v[:n] for k, v in maps.items()}, masks, gt_map[:n])
    chance = score_maps({k: v[n:] for k, v in maps.items()}, masks2[n:])
    rows = {}
    for k in maps:
        rows[k] = {
            "pointing": interval(scored[k]["hit"], groups, rng, st.bootstrap),
            "chance": interval(chance[k]["hit"], groups, rng, st.bootstrap),
            "energy": interval(scored[k]["energy"], groups, rng, st.bootstrap),
            "energy_chance": interval(chance[k]["energy"], groups, rng, st.bootstrap),
            "rank_gt": interval(scored[k]["rank_gt"], groups, rng, st.bootstrap),
        }
    # McNemar on pointing, each pair of methods within a readout, and each vs the ground truth's map
    tests = []
    for rname in ("w*", "fitted"):
        names = [f"{k} ({rname})" for k in PARALLEL + BASELINES]
        for a, b in itertools.combinations(names, 2):
            tests.append({"a": a, "b": b, **mcnemar_exact(scored[a]["hit"], scored[b]["hit"])})
    # drop in pointing with a random / mean body reference (paired, clustered)
    drops = {}
    for k in PARALLEL:
        base = scored[f"{k} (fitted)"]["hit"].astype(float)
        for ctl in ("random body", "mean body"):
            d = base - scored[f"{k}, {ctl} reference (fitted)"]["hit"].astype(float)
            drops[f"{k}, {ctl}"] = interval(d, groups, rng, st.bootstrap)
    # magnitude (Fig. 5c): similarity against total pixel-map energy, all explained planted pairs
    sims = np.concatenate(
        [extra["fitted"]["similarity"], m_rand["similarity"][:n], m_mean["similarity"][:n], extra["w*"]["similarity"]]
    )
    energy = np.concatenate(
        [maps["pixel (fitted)"][:n], m_rand["pixel"][:n], m_mean["pixel"][:n], maps["pixel (w*)"][:n]]
    ).sum(axis=(1, 2))
    order = np.argsort(sims)
    dec = max(1, len(sims) // 10)
    magnitude = {
        "spearman": sc.spearman(sims, energy),
        "n": int(len(sims)),
        "weakest_decile_energy": float(energy[order[:dec]].mean()),
        "strongest_decile_energy": float(energy[order[-dec:]].mean()),
        "weakest_decile_similarity": float(sims[order[:dec]].mean()),
        "strongest_decile_similarity": float(sims[order[-dec:]].mean()),
    }
    # ReLU6 saturation of features.18 in part cells (every gradient through a saturated unit is zero)
    a = lab.a(planted)
    C, h, wd = a.shape[1:]
    chosen = np.unique(np.concatenate([np.asarray(lab.gt.family_features(f)) for f in ("face", "animal")]))
    sat_part, sat_other, sat_chosen = [], [], []
    for i in range(n):
        cells = cell_overlap(masks[i], (h, wd)) >= 0.25
        sat = a[i] >= SATURATION - 1e-4
        sat_part.append(sat[:, cells].mean() if cells.any() else np.nan)
        sat_other.append(sat[:, ~cells].mean())
        sat_chosen.append(sat[chosen][:, cells].mean() if cells.any() else np.nan)
    saturation = {
        "part_cells": interval(sat_part, groups, rng, st.bootstrap),
        "other_cells": interval(sat_other, groups, rng, st.bootstrap),
        "part_cells_gt_features": interval(sat_chosen, groups, rng, st.bootstrap),
    }
    return {
        "n_pairs": n,
        "n_photos": len(set(groups)),
        "rows": rows,
        "mcnemar": tests,
        "reference_drop": drops,
        "magnitude": magnitude,
        "saturation": saturation,
        "_maps": maps,
        "_refs": refs,
        "_extra": extra,
        "_hits": {k: scored[k]["hit"] for k in maps},
        "_groups": groups,
    }


def cell_overlap(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """[h, w]: the share of each latent cell's pixels that lie inside the mask."""
    H, W = mask.shape
    ys = np.minimum(np.arange(H) * grid[0] // H, grid[0] - 1)
    xs = np.minimum(np.arange(W) * grid[1] // W, grid[1] - 1)
    tot = np.zeros(grid)
    inside = np.zeros(grid)
    np.add.at(tot, (ys[:, None], xs[None, :]), 1.0)
    np.add.at(inside, (ys[:, None], xs[None, :]), mask.astype(float))
    return inside / tot


# -- item 4: the reference swap --------------------------------------------------------------------------------


def swap_study(lab: Lab, st: Settings, gate: dict | None = None) -> dict:
    """Swap objects (one part of each family) explained with a reference showing only part 1, then only
    part 2; readouts w* and fitted, features unpooled (the demo model) and average-pooled, references aligned
    and shifted. A swap: the object's map is stronger (mean per pixel) in part 1's box than in part 2's with
    reference 1, and the reverse with reference 2."""
    rng = np.random.default_rng(st.seed + 1)
    swaps = sorted(s.stimulus for s in lab.role("swap"))
    refs = lab.role("reference")
    by_obj: dict[str, dict] = {}
    for r in refs:
        by_obj.setdefault(r.pair, {})[(r.family, r.align)] = r.stimulus
    objs, chans = [], []
    for s in swaps:
        r_gt = [lab.gt_response(lab.a([s]), c)[0] for c in lab.channels]
        c = lab.channels[int(np.argmax(r_gt))]  # the channel the object drives most (known answer)
        objs.append(s)
        chans.append(c)
    # every swap object is scored; the subset whose two parts both pass the gate for its channel (each part
    # raises r_GT by >= 2 body SD, deleting it removes >= 70% of its rise) is reported beside it
    gated = np.array([bool(gate.get((s, c), False)) if gate is not None else True for s, c in zip(objs, chans)])
    say(f"swap: {len(objs)} swap objects, {int(gated.sum())} with both parts passing the gate")
    groups = [lab.group(s) for s in objs]
    fitted_pooled = pooled_readout(lab)
    results, ref_scores, trials = {}, {}, {}
    for rname, pooled, align in itertools.product(("w*", "fitted"), (False, True), ("aligned", "shifted")):
        key = f"{rname}, {'pooled' if pooled else 'unpooled'}, {align}"
        succ = {m: [] for m in PARALLEL + BASELINES}
        per_trial = {m: [] for m in PARALLEL + BASELINES}
        toward = {m: [] for m in PARALLEL + BASELINES}
        ref_hit = {m: [] for m in PARALLEL}
        for s, c in zip(objs, chans):
            fam1 = lab.table[s].family
            fam2 = lab.table[s].family2
            r1, r2 = by_obj.get(s, {}).get((fam1, align)), by_obj.get(s, {}).get((fam2, align))
            if r1 is None or r2 is None:
                continue
            if rname == "w*":
                w = lab.w_star(c)
                w = w.mean(axis=(1, 2)) if pooled else w  # w* is the same at every position
            else:
                w = fitted_pooled[lab.index(c)] if pooled else lab.weight[lab.index(c)]
            box1, box2 = lab.box(s, "part"), lab.box(s, "part2")
            x = lab.x([s, s])
            a_o = lab.a([s, s])
            a_b = lab.a([r1, r2])
            out = mp.parallel_maps(lab.engine.vjp, np.stack([w, w]), x, a_o, a_b, pooled, x_b=lab.x([r1, r2]))
            out.update(mp.baseline_maps(lab.engine.vjp, np.stack([w, w]), x, a_o, pooled))
            for m in PARALLEL + BASELINES:
                q1 = sc.box_mean(out[m][0], box1) / max(sc.box_mean(out[m][0], box2), 1e-300)
                q2 = sc.box_mean(out[m][1], box1) / max(sc.box_mean(out[m][1], box2), 1e-300)
                succ[m].append(float(q1 > 1 and q2 < 1))
                per_trial[m].append(0.5 * (float(q1 > 1) + float(q2 < 1)))
                toward[m].append(float(q1 > q2))
            for m in PARALLEL:
                for k, r in enumerate((r1, r2)):
                    ref_hit[m].append(float(sc.pointing_hit(out[f"ref_{m}"][k], lab.mask(r))))
        kept = [i for i, s in enumerate(objs) if s in by_obj]
        g = [groups[i] for i in kept]
        g2 = [x for x in g for _ in (0, 1)]
        sub = np.array([gated[i] for i in kept], bool)
        gg = [x for x, ok in zip(g, sub) if ok]
        results[key] = {
            m: {
                "swap": interval(succ[m], g, rng, st.bootstrap),
                "per_trial": interval(per_trial[m], g, rng, st.bootstrap),
                "toward": interval(toward[m], g, rng, st.bootstrap),
                "swap_gated": interval(np.asarray(succ[m])[sub] if sub.any() else [], gg, rng, st.bootstrap),
            }
            for m in PARALLEL + BASELINES
        }
        ref_scores[key] = {m: interval(ref_hit[m], g2, rng, st.bootstrap) for m in PARALLEL}
        trials[key] = len(succ["pixel"])
    return {
        "n_objects": len(objs),
        "n_gated": int(gated.sum()),
        "n_photos": len(set(groups)),
        "rows": results,
        "reference_maps": ref_scores,
        "n_by_condition": trials,
    }


def pooled_readout(lab: Lab) -> np.ndarray:
    """Readouts [C, C_features] refitted on the average-pooled features of the bodies (ridge, grouped CV)."""
    from pbv_onnx.method.ridge import DEFAULT_ALPHAS, ridge_cv

    bodies = sorted(s.stimulus for s in lab.role("body"))
    X = lab.a(bodies).mean(axis=(2, 3))
    Y = lab.mean.sel(stimulus=bodies).sel(channel=lab.channels).values.T
    groups = [lab.group(b) for b in bodies]
    n_groups = len(set(groups))
    # `fit`'s 5 folds where there are photos enough (each fold needs two groups), fewer otherwise
    folds = max(2, min(5, n_groups // 2))
    fit = ridge_cv(X, Y, DEFAULT_ALPHAS, folds=folds, groups=groups if n_groups >= 2 * folds else None)
    return np.asarray(fit.weight, np.float64)


# -- item 5: decoys ---------------------------------------------------------------------------------------------


def decoy_study(lab: Lab, st: Settings) -> dict:
    """Objects with a part and a same-size non-body patch: does each map prefer the part (mean |map| per
    pixel in its box above the decoy's)? Chance 0.5."""
    rng = np.random.default_rng(st.seed + 2)
    ids = sorted(s.stimulus for s in lab.role("decoy"))
    if not ids:
        return {"n": 0}
    a = lab.a(ids)
    chans = [
        lab.channels[int(np.argmax([lab.gt_response(a[i : i + 1], c)[0] for c in lab.channels]))]
        for i in range(len(ids))
    ]
    w = np.stack([lab.weight[lab.index(c)] for c in chans])
    refs = [best_reference(lab, w[i], ids[i], chans[i], st.top_k) for i in range(len(ids))]
    m = readout_maps(lab, ids, refs, w)
    m = {k: m[k] for k in PARALLEL + BASELINES}
    m["ground truth (pixel)"] = gt_pixel_maps(lab, ids, chans)
    m["edge magnitude (image only)"] = np.stack([sc.edge_map(x) for x in lab.x(ids)])
    groups = [lab.group(i) for i in ids]
    rows = {}
    for k, maps in m.items():
        pref = [
            float(sc.box_mean(maps[i], lab.box(s)) > sc.box_mean(maps[i], lab.box(s, "decoy")))
            for i, s in enumerate(ids)
        ]
        rows[k] = interval(pref, groups, rng, st.bootstrap)
    return {"n": len(ids), "n_photos": len(set(groups)), "rows": rows}


# -- item 6: sanity checks --------------------------------------------------------------------------------------


def ridge_at(X: np.ndarray, y: np.ndarray, penalty) -> np.ndarray:
    """Ridge weights at a fixed penalty (centred, dual form): X^T (K + lambda I)^-1 (y - mean y).

    y [n] with one penalty, or [n, C] with one penalty per column (one Gram matrix for all): [D] or [D, C]."""
    Xc = X - X.mean(0)
    K = Xc @ Xc.T
    y = np.asarray(y, np.float64)
    Y = y.reshape(len(y), -1) - y.reshape(len(y), -1).mean(0)
    pen = np.broadcast_to(np.asarray(penalty, np.float64), (Y.shape[1],))
    dual = np.stack([np.linalg.solve(K + p * np.eye(len(K)), Y[:, j]) for j, p in enumerate(pen)], axis=1)
    W = Xc.T @ dual
    return W[:, 0] if y.ndim == 1 else W


def sanity_study(lab: Lab, planted: dict, pairs, st: Settings, cascade_dir: Path | None) -> dict:
    """Block rank correlation of the fitted readout's parallel maps with themselves after: permuting the
    readout's weights; randomising the backbone's top blocks (cascading); and, as the reference level,
    refitting the readout on a bootstrap resample of body photos."""
    from pbv_onnx.runtime.engine import Engine

    rng = np.random.default_rng(st.seed + 3)
    ids = [p for p, _, _ in pairs]
    chans = [c for _, _, c in pairs]
    n = len(ids)
    groups = planted["_groups"]
    refs = planted["_refs"]["fitted"]
    w = planted["_extra"]["fitted"]["w"]
    orig = {k: planted["_maps"][f"{k} (fitted)"][:n] for k in PARALLEL}

    def corr_rows(new: dict) -> dict:
        return {
            k: interval([sc.block_rank_correlation(orig[k][i], new[k][i]) for i in range(n)], groups, rng, st.bootstrap)
            for k in PARALLEL
        }

    rows = {}
    perm = np.stack([wi.ravel()[rng.permutation(wi.size)].reshape(wi.shape) for wi in w])
    rows["readout weights permuted"] = corr_rows(readout_maps(lab, ids, refs, perm, baselines=False))
    # bootstrap refits: body photos resampled with replacement, the readout refit at its chosen penalty
    bodies = sorted(s.stimulus for s in lab.role("body"))
    X = lab.a(bodies).reshape(len(bodies), -1)
    bg = np.array([lab.group(b) for b in bodies])
    photos = np.unique(bg)
    Y = lab.mean.sel(stimulus=bodies).sel(channel=lab.channels).values
    pen = np.asarray(lab.readouts["penalty"].values, np.float64)
    refit_rows = []
    for _ in range(st.refits):
        pick = np.concatenate([np.nonzero(bg == g)[0] for g in rng.choice(photos, len(photos))])
        W = ridge_at(X[pick], Y[:, pick].T, pen)  # [D, channels]: one Gram matrix per resample
        wb = np.stack([W[:, lab.index(c)].reshape(w[0].shape) for c in chans])
        refit_rows.append(readout_maps(lab, ids, refs, wb, baselines=False))
    rows["readout refit on a bootstrap resample (reference level)"] = {
        k: interval(
            [np.mean([sc.block_rank_correlation(orig[k][i], r[k][i]) for r in refit_rows]) for i in range(n)],
            groups,
            rng,
            st.bootstrap,
        )
        for k in PARALLEL
    }
    levels = []
    if cascade_dir is not None and (cascade_dir / "cascade.json").is_file():
        import json

        manifest = json.loads((cascade_dir / "cascade.json").read_text())
        for lvl in manifest["levels"]:
            eng = Engine(cascade_dir / lvl["model"], batch_size=lab.engine.batch_size)
            x, xb = lab.x(ids), lab.x(refs)
            a_o, a_b = eng.feature_maps(x).astype(np.float64), eng.feature_maps(xb).astype(np.float64)
            new = mp.parallel_maps(eng.vjp, w, x, a_o, a_b)
            name = "randomised: " + ", ".join(lvl["randomised"])
            rows[name] = corr_rows(new)
            levels.append(name)
    return {"n": n, "rows": rows, "cascade": levels, "refits": st.refits}


# -- item 8: faithfulness --------------------------------------------------------------------------------------


def faithfulness_study(lab: Lab, planted: dict, pairs, st: Settings) -> dict:
    """Deletion and insertion (16 px blocks, grey) of each map's blocks, most salient first against random
    orders, read on the fitted readout r, on r_GT and on the similarity s(o', b) to the pair's reference;
    and integrated gradients' completeness at the default steps."""
    rng = np.random.default_rng(st.seed + 4)
    ids = [p for p, _, _ in pairs]
    chans = [c for _, _, c in pairs]
    n = len(ids)
    groups = planted["_groups"]
    refs = planted["_refs"]["fitted"]
    names = [f"{k} (fitted)" for k in PARALLEL + BASELINES] + ["ground truth (pixel)", "occlusion (readout)"]
    x = lab.x(ids)
    fill = np.zeros_like(x[0])
    pref_bodies = sorted(s.stimulus for s in lab.role("body"))
    a_bod = lab.a(pref_bodies)
    per = {k: {"deletion": {}, "insertion": {}} for k in names}
    for i in range(n):
        c = chans[i]
        a_b = lab.a([refs[i]])[0]
        sd_r = float(np.std(lab.readout(a_bod, c))) or 1.0
        sd_gt = float(np.std(lab.gt_response(a_bod, c))) or 1.0
        w = lab.weight[lab.index(c)]

        def read(xx, c=c, a_b=a_b, w=w):
            a = lab.engine.feature_maps(xx)
            return {"r": lab.readout(a, c), "r_GT": lab.gt_response(a, c), "s(o',b)": similarity(w, a, a_b)}

        res = sc.perturbation_areas(
            read,
            x[i],
            {k: planted["_maps"][k][i] for k in names},
            rng,
            fill,
            {"r": sd_r, "r_GT": sd_gt},
            fractions=FRACTIONS,
            n_random=st.random_orders,
        )
        for k in names:
            for kind in ("deletion", "insertion"):
                for meas, v in res[k][kind].items():
                    per[k][kind].setdefault(meas, []).append(v)
    rows = {
        k: {kind: {meas: interval(v, groups, rng, st.bootstrap) for meas, v in d.items()} for kind, d in per[k].items()}
        for k in names
    }
    # integrated gradients: sum G against v . (phi(x) - phi(x0)) at the default steps
    ig = PATHS["integrated"]
    opts = ig.defaults()
    m = n if st.ig_pairs <= 0 else min(n, st.ig_pairs)
    w = planted["_extra"]["fitted"]["w"][:m]
    a_o = lab.a(ids[:m])
    a_b = lab.a(refs[:m])
    cots = np.stack([mp.cotangent("parallel", w[i], a_o[i], a_b[i], False) for i in range(m)])
    G = ig.attribute(lab.engine.vjp, x[:m], cots.astype(np.float32), lab.spec, **opts)
    from pbv_onnx.method.saliency import baseline_images

    x0 = baseline_images(x[:m], opts["baseline"], lab.spec)
    a0 = lab.engine.feature_maps(np.asarray(x0, np.float32)).astype(np.float64)
    target = np.array([(cots[i] * (a_o[i] - a0[i])).sum() for i in range(m)])
    total = np.asarray(G, np.float64).reshape(m, -1).sum(1)
    rel = np.abs(total - target) / np.maximum(np.abs(target), 1e-12)
    # the same check at more steps on the first pairs: how many steps completeness needs
    more = {}
    k = min(m, st.ig_more_pairs)
    for steps in (32, 64):
        if k == 0:
            break
        Gk = ig.attribute(lab.engine.vjp, x[:k], cots[:k].astype(np.float32), lab.spec, **{**opts, "steps": steps})
        rk = np.abs(np.asarray(Gk, np.float64).reshape(k, -1).sum(1) - target[:k]) / np.maximum(
            np.abs(target[:k]), 1e-12
        )
        more[str(steps)] = {"n": k, "within_5pct": float(np.mean(rk <= 0.05)), "median_rel_error": float(np.median(rk))}
    # the integrated map (S of G) scored by the same rule, planted images only (no part-free chance: cost)
    S = mp.display(G)
    ig_hits = [sc.pointing_hit(S[i], lab.mask(ids[i])) for i in range(m)]
    completeness = {
        "pointing": interval(ig_hits, groups[:m], rng, st.bootstrap),
        "more_steps": more,
        "steps": int(opts["steps"]),
        "baseline": opts["baseline"],
        "n": m,
        "within_5pct": float(np.mean(rel <= 0.05)),
        "median_rel_error": float(np.median(rel)),
        "max_rel_error": float(rel.max()),
    }
    return {
        "n": n,
        "fractions": list(FRACTIONS),
        "random_orders": st.random_orders,
        "rows": rows,
        "completeness": completeness,
    }


def gate_table(folder: Path) -> tuple[list[tuple[str, str, str]], dict, dict]:
    """(gated planted pairs, {(swap id, channel): both parts pass}, counts) from the experiment's gate.csv."""
    import csv

    path = folder / "gate.csv"
    rows = list(csv.DictReader(path.open())) if path.is_file() else []

    def ok(r):
        return str(r.get("pass", "")).strip().lower() in ("1", "true", "yes")

    planted = [r for r in rows if r.get("role", "planted") in ("", "planted")]
    # one channel per planted object (fixed before looking at maps): of the channels that pass its gate,
    # the one the part raises most (largest rise in body SDs)
    best: dict = {}
    for r in planted:
        if ok(r) and (r["stimulus"] not in best or float(r["rise_sd"]) > float(best[r["stimulus"]]["rise_sd"])):
            best[r["stimulus"]] = r
    pairs = [(r["stimulus"], r["partfree"], str(r["channel"])) for r in best.values()]
    swap: dict = {}
    for r in rows:
        if r.get("role") == "swap":
            key = (r["stimulus"], str(r["channel"]))
            swap[key] = swap.get(key, True) and ok(r)
    counts = {
        "planted_rows": len(planted),
        "planted_rows_pass": sum(ok(r) for r in planted),
        "planted_objects": len({r["stimulus"] for r in planted}),
        "planted_objects_pass": len(pairs),
        "pass_rise": sum(str(r.get("pass_rise", "")).lower() in ("1", "true") for r in planted),
        "pass_delete": sum(str(r.get("pass_delete", "")).lower() in ("1", "true") for r in planted),
    }
    return pairs, (swap or None), counts
