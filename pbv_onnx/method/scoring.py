"""Scoring saliency maps against a known answer: one rule for every map (pointing game on block sums,
energy in a mask, block rank correlation), box means, image-only maps, occlusion, deletion and insertion.

Every function takes plain numpy maps [H, W] (any sign: scores use |map|) and boolean masks [H, W];
nothing here knows which method made a map, so methods, ground truths and controls are scored alike.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

# The scoring rule (fixed before any map is looked at): |map| summed in BLOCK x BLOCK px blocks; the
# peak block's centre scores a hit when it lies within TOLERANCE px of the mask (Zhang et al.'s
# pointing game with its 15 px tolerance, on block sums so one bright pixel or a paste seam cannot
# decide it).
BLOCK = 16
TOLERANCE = 15.0


def block_sums(smap: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """[ceil(H/block), ceil(W/block)]: |map| summed over each block (edge blocks may be smaller)."""
    a = np.abs(np.asarray(smap, np.float64))
    H, W = a.shape
    gh, gw = -(-H // block), -(-W // block)
    padded = np.zeros((gh * block, gw * block))
    padded[:H, :W] = a
    return padded.reshape(gh, block, gw, block).sum(axis=(1, 3))


def block_centre(index: tuple[int, int], shape: tuple[int, int], block: int = BLOCK) -> tuple[float, float]:
    """(y, x) in pixel coordinates (pixel i spans [i, i+1)) of the centre of block `index`, clipped to the image."""
    (by, bx), (H, W) = index, shape
    y0, x0 = by * block, bx * block
    return (y0 + min(y0 + block, H)) / 2.0, (x0 + min(x0 + block, W)) / 2.0


def distance_to_mask(point: tuple[float, float], mask: np.ndarray) -> float:
    """Euclidean distance (px) from `point` (y, x) to the nearest pixel centre of `mask`; inf for an empty mask."""
    ys, xs = np.nonzero(np.asarray(mask, bool))
    if ys.size == 0:
        return float("inf")
    return float(np.sqrt(((ys + 0.5 - point[0]) ** 2 + (xs + 0.5 - point[1]) ** 2).min()))


def pointing_hit(smap: np.ndarray, mask: np.ndarray, block: int = BLOCK, tolerance: float = TOLERANCE) -> bool:
    """The pointing game on block sums: the peak block's centre lies within `tolerance` px of the mask.

    Tied peak blocks all have to lie within it, so a flat or zero map never scores by luck of the tie."""
    sums = block_sums(smap, block)
    if not np.isfinite(sums).all() or sums.max() <= 0:
        return False
    peaks = np.argwhere(sums == sums.max())
    shape = np.shape(smap)
    return all(distance_to_mask(block_centre(tuple(p), shape, block), mask) <= tolerance for p in peaks)


def energy_in_mask(smap: np.ndarray, mask: np.ndarray) -> float:
    """Share of the map's total |mass| inside the mask; NaN for a zero map."""
    a = np.abs(np.asarray(smap, np.float64))
    total = a.sum()
    return float(a[np.asarray(mask, bool)].sum() / total) if total > 0 else float("nan")


def box_mean(smap: np.ndarray, box: Sequence[int]) -> float:
    """Mean |map| per pixel inside the box (x0, y0, x1, y1), clipped to the map; NaN for an empty box."""
    a = np.abs(np.asarray(smap, np.float64))
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    part = a[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)]
    return float(part.mean()) if part.size else float("nan")


def rankdata(a: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a flat array, ties sharing their mean rank."""
    a = np.asarray(a, np.float64).ravel()
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(a.size)
    ranks[order] = np.arange(1, a.size + 1)
    _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse.ravel(), weights=ranks)
    return sums[inverse.ravel()] / counts[inverse.ravel()]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two equally long arrays (ties: mean ranks); NaN if either is constant
    or fewer than 3 finite pairs."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return float("nan")
    ra, rb = rankdata(a[ok]), rankdata(b[ok])
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def block_rank_correlation(a: np.ndarray, b: np.ndarray, block: int = BLOCK) -> float:
    """Spearman correlation of two maps' block sums of |map| (the block-level agreement of where they point)."""
    return spearman(block_sums(a, block), block_sums(b, block))


def edge_map(image: np.ndarray) -> np.ndarray:
    """An image-only map: Sobel gradient magnitude of a [3, H, W] image, summed over colour ([H, W])."""
    x = np.asarray(image, np.float64)
    p = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode="edge")
    gx = (p[:, :-2, 2:] + 2 * p[:, 1:-1, 2:] + p[:, 2:, 2:]) - (p[:, :-2, :-2] + 2 * p[:, 1:-1, :-2] + p[:, 2:, :-2])
    gy = (p[:, 2:, :-2] + 2 * p[:, 2:, 1:-1] + p[:, 2:, 2:]) - (p[:, :-2, :-2] + 2 * p[:, :-2, 1:-1] + p[:, :-2, 2:])
    return np.sqrt(gx * gx + gy * gy).sum(0)


def upsample_blocks(cells: np.ndarray, shape: tuple[int, int], block: int) -> np.ndarray:
    """A block grid [gh, gw] spread back over [H, W] pixels, each pixel taking its block's value."""
    ys = np.minimum(np.arange(shape[0]) // block, cells.shape[0] - 1)
    xs = np.minimum(np.arange(shape[1]) // block, cells.shape[1] - 1)
    return np.asarray(cells)[np.ix_(ys, xs)]


def occluded_images(image: np.ndarray, fill: np.ndarray, block: int) -> np.ndarray:
    """[n_blocks, 3, H, W]: `image` with one block (row-major) replaced by `fill` in each."""
    C, H, W = image.shape
    gh, gw = -(-H // block), -(-W // block)
    fill = np.broadcast_to(np.asarray(fill, np.float32), image.shape)
    out = np.repeat(np.asarray(image, np.float32)[None], gh * gw, axis=0)
    for j in range(gh * gw):
        y, x = divmod(j, gw)
        sl = (slice(None), slice(y * block, (y + 1) * block), slice(x * block, (x + 1) * block))
        out[j][sl] = fill[sl]
    return out


def occlusion_map(intact: float, occluded: np.ndarray, shape: tuple[int, int], block: int) -> np.ndarray:
    """The occlusion map [H, W]: the response's drop (intact - occluded) when each block is greyed, per pixel
    of the block; negative drops (occluding raises the response) kept as they are (scores take |map|)."""
    H, W = shape
    grid = (intact - np.asarray(occluded, np.float64)).reshape(-(-H // block), -(-W // block))
    return upsample_blocks(grid, shape, block)


# -- deletion and insertion ---------------------------------------------------------------------------


def salient_order(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Block indices (flattened row-major) by decreasing score, ties in random order."""
    s = np.asarray(scores, np.float64).ravel()
    return np.lexsort((rng.permutation(s.size), -s))


def perturbed_images(
    image: np.ndarray,
    order: np.ndarray,
    fractions: Sequence[float],
    fill: np.ndarray,
    block: int = BLOCK,
    insert: bool = False,
) -> np.ndarray:
    """[len(fractions), 3, H, W]: deletion (the first round(f * n_blocks) blocks of `order` set to `fill`)
    or insertion (`fill` everywhere but those blocks, which show `image`)."""
    C, H, W = image.shape
    gw = -(-W // block)
    n = -(-H // block) * gw
    image = np.asarray(image, np.float32)
    fill = np.broadcast_to(np.asarray(fill, np.float32), image.shape)
    start, put = (fill, image) if insert else (image, fill)
    out = np.repeat(np.asarray(start)[None], len(fractions), axis=0)
    for i, f in enumerate(fractions):
        for j in np.asarray(order)[: int(round(f * n))]:
            y, x = divmod(int(j), gw)
            sl = (slice(None), slice(y * block, (y + 1) * block), slice(x * block, (x + 1) * block))
            out[i][sl] = put[sl]
    return out


def area_between(fractions: Sequence[float], salient: np.ndarray, random: np.ndarray, scale: float = 1.0) -> float:
    """Trapezoid area of (random - salient) over the fraction of blocks, in units of `scale`: > 0 when the
    salient-first deletion curve falls below the random one. Insertion: pass (salient, random) swapped."""
    f = np.asarray(fractions, np.float64)
    d = np.asarray(random, np.float64) - np.asarray(salient, np.float64)
    return float(np.sum((d[1:] + d[:-1]) * np.diff(f)) / 2 / scale)


def perturbation_areas(
    read: Callable[[np.ndarray], dict[str, np.ndarray]],
    image: np.ndarray,
    maps: dict[str, np.ndarray],
    rng: np.random.Generator,
    fill: np.ndarray,
    scales: dict[str, float] | None = None,
    block: int = BLOCK,
    fractions: Sequence[float] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0),
    n_random: int = 2,
) -> dict[str, dict[str, dict[str, float]]]:
    """Deletion and insertion areas of each map on one image, for every measure `read` returns.

    `read(x [N, 3, H, W]) -> {measure: [N]}` is called once for all curves. Returns
    {map: {"deletion" | "insertion": {measure: area}}}, each area against the mean of `n_random` random
    block orders, in units of scales[measure] (default 1), positive when the map beats random.
    """
    fr = np.asarray(fractions, np.float64)
    if fr[0] != 0.0 or fr[-1] != 1.0:
        raise ValueError("fractions must start at 0 and end at 1")
    inner = fr[1:-1]  # the intact and the fully replaced image are the same for every order
    n_blocks = block_sums(np.zeros(image.shape[1:]), block).size
    orders = [rng.permutation(n_blocks) for _ in range(n_random)]
    orders += [salient_order(block_sums(m, block), rng) for m in maps.values()]
    fill_img = np.broadcast_to(np.asarray(fill, np.float32), image.shape)
    x = np.concatenate(
        [np.stack([np.asarray(image, np.float32), fill_img])]
        + [perturbed_images(image, o, inner, fill, block, insert) for insert in (False, True) for o in orders]
    )
    resp = read(x.astype(np.float32))
    out: dict[str, dict[str, dict[str, float]]] = {name: {"deletion": {}, "insertion": {}} for name in maps}
    k = len(orders) * len(inner)
    for measure, r in resp.items():
        r = np.asarray(r, np.float64)
        scale = (scales or {}).get(measure, 1.0)
        intact, blank = r[0], r[1]
        for j, kind in enumerate(("deletion", "insertion")):
            body = r[2 + j * k : 2 + (j + 1) * k].reshape(len(orders), len(inner))
            first, last = (intact, blank) if kind == "deletion" else (blank, intact)
            full = np.concatenate([np.full((len(orders), 1), first), body, np.full((len(orders), 1), last)], axis=1)
            random = full[:n_random].mean(0)
            for name, curve in zip(maps, full[n_random:]):
                # insertion: the salient-first curve should rise above random
                a = (
                    area_between(fr, curve, random, scale)
                    if kind == "deletion"
                    else area_between(fr, random, curve, scale)
                )
                out[name][kind][measure] = a
    return out
