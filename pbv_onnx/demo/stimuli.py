"""The demo's stimulus set: seeded crops of real photos, and objects with body parts pasted in.

Every stimulus but the references is a square crop of one photograph (side 0.6-1 x the photo's
shorter side at a seeded position, optionally mirrored; variant 0 of a photo is its centred
full-height square), resized to `size` x `size`. Body crops keep the centre of the photo's part box
in view. A part is the hand-drawn part box of a body photo (a human face or head: family "face"; an
animal or bird head: family "animal"), mirrored at random, resized to a seeded longer side, and pasted
with a feathered edge: alpha rises linearly from the rectangle's border to 1 at `feather` px inside.

Roles (column `role`; `pair` links twins):
- body: a body crop (category body, the readout's training set); object: a plain object crop.
- planted: an object crop with one part; partfree: the identical crop without it (its twin).
- swap: an object crop with one part of each family (part 1 face, part 2 animal, boxes apart);
  swap_partfree: the identical crop without them.
- reference: the very part image of a swap object (same photo, box, flip, size) alone on a neutral
  grey background (the preprocessing mean), at the object's box ("aligned") or at a box that overlaps
  neither of the object's parts ("shifted"); category "part", so never a training body.
- decoy: an object crop with one part and a same-size patch cut from another object photo.
`group` is the photo a stimulus is cut from (for references: the part's photo). The same seed gives
the same stimuli.
"""

from __future__ import annotations

import csv
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image

from pbv_onnx.base.errors import InputDataError
from pbv_onnx.demo.sources import FAMILIES, Source

TABLE = "stimuli.csv"
ROLES = ("body", "object", "planted", "partfree", "swap", "swap_partfree", "reference", "decoy")
REFERENCE_CATEGORY = "part"
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Stimulus:
    """One row of the stimulus table; pixel boxes are (x0, y0, x1, y1), x1/y1 exclusive; -1 / "" unused."""

    stimulus: str
    category: str  # "body", "object" or "part" (references)
    role: str  # one of ROLES
    kind: str  # the photo's kind: "human", "animal" or "object" (references: the part photo's)
    source: str  # the photograph the stimulus is cut from (references: the part's photo)
    group: str  # related stimuli: the source photo
    file: str  # image path relative to the experiment folder
    crop_x0: int = -1  # crop square in the source photo's pixels (references: -1, grey background)
    crop_y0: int = -1
    crop_size: int = -1
    flip: int = 0  # 1: mirrored left-right after cropping
    pair: str = ""  # the twin: planted <-> partfree, swap <-> swap_partfree; reference -> its swap object
    align: str = ""  # reference: "aligned" or "shifted"
    family: str = ""  # part 1's family ("face" or "animal"); bodies: their photo's family
    part_source: str = ""  # part 1: the body photo it comes from
    part_x0: int = -1  # part 1: the part box in that photo's pixels
    part_y0: int = -1
    part_x1: int = -1
    part_y1: int = -1
    part_flip: int = 0
    paste_x0: int = -1  # part 1: where it sits in the stimulus (its mask)
    paste_y0: int = -1
    paste_x1: int = -1
    paste_y1: int = -1
    mask: str = ""  # mask PNG of part 1's rectangle, relative to the experiment folder (255 inside)
    family2: str = ""  # swap objects: part 2 (the other family)
    part2_source: str = ""
    part2_x0: int = -1
    part2_y0: int = -1
    part2_x1: int = -1
    part2_y1: int = -1
    part2_flip: int = 0
    paste2_x0: int = -1
    paste2_y0: int = -1
    paste2_x1: int = -1
    paste2_y1: int = -1
    mask2: str = ""
    decoy_source: str = ""  # decoys: the object photo the non-body patch is cut from
    decoy_x0: int = -1  # the patch in that photo's pixels
    decoy_y0: int = -1
    decoy_x1: int = -1
    decoy_y1: int = -1
    decoy_paste_x0: int = -1  # where the patch sits in the stimulus
    decoy_paste_y0: int = -1
    decoy_paste_x1: int = -1
    decoy_paste_y1: int = -1
    decoy_mask: str = ""
    body_x0: int = -1  # body: the photo's part box in stimulus pixels (clipped)
    body_y0: int = -1
    body_x1: int = -1
    body_y1: int = -1
    feather: int = 0  # width (px) of the alpha ramp at the edge of pasted parts and patches

    @property
    def planted(self) -> bool:
        return self.role == "planted"

    @property
    def body_box(self) -> Box | None:
        return None if self.body_x0 < 0 else (self.body_x0, self.body_y0, self.body_x1, self.body_y1)

    @property
    def paste_box(self) -> Box | None:
        return None if self.paste_x0 < 0 else (self.paste_x0, self.paste_y0, self.paste_x1, self.paste_y1)

    @property
    def paste2_box(self) -> Box | None:
        return None if self.paste2_x0 < 0 else (self.paste2_x0, self.paste2_y0, self.paste2_x1, self.paste2_y1)

    @property
    def decoy_box(self) -> Box | None:
        if self.decoy_paste_x0 < 0:
            return None
        return self.decoy_paste_x0, self.decoy_paste_y0, self.decoy_paste_x1, self.decoy_paste_y1

    @property
    def part_box_in_photo(self) -> Box:
        return self.part_x0, self.part_y0, self.part_x1, self.part_y1


@dataclass(frozen=True)
class Counts:
    """How many stimuli of each kind; the defaults give the full demo (21 object photos: 3 plain crops,
    15 planted pairs, 2 swap pairs and 2 decoys each; 4 references per swap object)."""

    body: int = 96
    object: int = 63
    planted: int = 315  # planted objects, each with its part-free copy (the gate keeps about 40% of them)
    swap: int = 42  # swap objects, each with its part-free copy and four references
    decoy: int = 42
    size: int = 224
    part_px: tuple[int, int] = (64, 96)  # longer side of a planted part
    swap_part_px: tuple[int, int] = (72, 96)  # swap and decoy objects: two parts that fit apart
    feather: int = 8


def feather_alpha(h: int, w: int, feather: int) -> np.ndarray:
    """Alpha [h, w] of a feathered paste: (d + 0.5) / feather, clipped to [0, 1], d the distance in
    pixels to the rectangle's nearest border pixel (0 on the border); 1 everywhere for feather 0."""
    if feather <= 0:
        return np.ones((h, w))

    def ramp(n: int) -> np.ndarray:
        i = np.arange(n)
        return np.clip((np.minimum(i, n - 1 - i) + 0.5) / feather, 0.0, 1.0)

    return np.minimum.outer(ramp(h), ramp(w))


def paste_feathered(img: Image.Image, patch: Image.Image, box: Box, feather: int) -> Image.Image:
    """`patch` (already box-sized) blended into a copy of `img` at `box` with a feathered edge."""
    x0, y0, x1, y1 = box
    out = np.asarray(img, np.float64).copy()
    a = feather_alpha(y1 - y0, x1 - x0, feather)[..., None]
    out[y0:y1, x0:x1] = a * np.asarray(patch, np.float64) + (1 - a) * out[y0:y1, x0:x1]
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))


def _part_box(src: Source, w: int, h: int) -> Box:
    x0, y0, x1, y1 = src.part
    return int(round(x0 * w)), int(round(y0 * h)), int(round(x1 * w)), int(round(y1 * h))


def _crop(
    rng: np.random.Generator, w: int, h: int, variant: int, must_contain: tuple[float, float] | None
) -> tuple[int, int, int, int]:
    """(x0, y0, side, flip) of a square crop; variant 0 is the centred largest square."""
    short = min(w, h)
    if variant == 0:
        return (w - short) // 2, (h - short) // 2, short, 0
    side = int(round(short * rng.uniform(0.6, 1.0)))
    lo_x, hi_x, lo_y, hi_y = 0, w - side, 0, h - side
    if must_contain is not None:  # keep the body part's centre inside, with a margin
        cx, cy = must_contain
        m = side // 6
        lo_x, hi_x = max(lo_x, int(cx) - side + m), min(hi_x, int(cx) - m)
        lo_y, hi_y = max(lo_y, int(cy) - side + m), min(hi_y, int(cy) - m)
        if lo_x > hi_x:
            lo_x = hi_x = int(np.clip(cx - side / 2, 0, w - side))
        if lo_y > hi_y:
            lo_y = hi_y = int(np.clip(cy - side / 2, 0, h - side))
    x0 = int(rng.integers(lo_x, hi_x + 1))
    y0 = int(rng.integers(lo_y, hi_y + 1))
    return x0, y0, side, int(rng.integers(0, 2))


def _in_crop(box: Box, x0: int, y0: int, side: int, flip: int, size: int) -> Box:
    """A box in photo pixels -> stimulus pixels after crop, resize and mirror, clipped."""
    s = size / side
    bx0, bx1 = (box[0] - x0) * s, (box[2] - x0) * s
    by0, by1 = (box[1] - y0) * s, (box[3] - y0) * s
    if flip:
        bx0, bx1 = size - bx1, size - bx0
    clip = lambda v: int(np.clip(round(v), 0, size))  # noqa: E731
    return clip(bx0), clip(by0), clip(bx1), clip(by1)


def overlaps(a: Box, b: Box, margin: int = 0) -> bool:
    """Whether two boxes overlap once `b` is grown by `margin` px."""
    return a[0] < b[2] + margin and b[0] - margin < a[2] and a[1] < b[3] + margin and b[1] - margin < a[3]


def _place(
    rng: np.random.Generator, size: int, sizes: list[tuple[int, int]], avoid: list[list[int]], margin: int = 8
) -> list[Box]:
    """Seeded boxes of the given (w, h) inside the image, box k keeping `margin` px away from the boxes
    whose indices `avoid[k]` lists (earlier ones); all drawn again until every one fits."""
    for _ in range(5000):
        boxes: list[Box] = []
        for (w, h), away in zip(sizes, avoid):
            x = int(rng.integers(0, size - w + 1))
            y = int(rng.integers(0, size - h + 1))
            box = (x, y, x + w, y + h)
            if any(overlaps(box, boxes[a], margin) for a in away):
                break
            boxes.append(box)
        if len(boxes) == len(sizes):
            return boxes
    raise InputDataError(None, f"no room for {len(sizes)} parts apart in a {size} px stimulus")


def _family_donors(bodies: list[tuple[Source, tuple[int, int]]]) -> dict[str, list[tuple[Source, tuple[int, int]]]]:
    donors = {f: [(s, wh) for s, wh in bodies if s.family == f and s.part is not None] for f in FAMILIES}
    return {f: d for f, d in donors.items() if d}


def plan_stimuli(
    sources: list[tuple[Source, tuple[int, int]]], counts: Counts = Counts(), seed: int = 0
) -> list[Stimulus]:
    """The stimulus table for photos given as (source, (width, height)); pure and deterministic."""
    rng = np.random.default_rng(seed)
    bodies = [(s, wh) for s, wh in sources if s.category == "body"]
    objects = [(s, wh) for s, wh in sources if s.category == "object"]
    if not bodies or not objects:
        raise InputDataError(
            None,
            "the demo needs at least one body photo and one object photo "
            "(install the demo extra: pip install 'pbv-onnx[demo]')",
        )
    donors = _family_donors(bodies)
    if (counts.planted or counts.swap or counts.decoy) and not donors:
        raise InputDataError(None, "the demo needs a body photo with a part of family face or animal")
    if counts.swap and len(donors) < 2:
        raise InputDataError(None, "swap objects need body photos of both part families (face and animal)")
    size, fe = counts.size, counts.feather
    out: list[Stimulus] = []
    used = {f: 0 for f in donors}

    def part(family: str, px: tuple[int, int]) -> dict:
        """The next donor of `family` (in turn), its box, a seeded size and flip."""
        src, (w, h) = donors[family][used[family] % len(donors[family])]
        used[family] += 1
        bx0, by0, bx1, by1 = _part_box(src, w, h)
        longer = int(rng.integers(px[0], px[1] + 1))
        scale = longer / max(bx1 - bx0, by1 - by0)
        pw = max(1, min(size, int(round((bx1 - bx0) * scale))))
        ph = max(1, min(size, int(round((by1 - by0) * scale))))
        return dict(src=src, box=(bx0, by0, bx1, by1), w=pw, h=ph, flip=int(rng.integers(0, 2)))

    def part_cols(p: dict, box: Box, mask: str, slot: str = "") -> dict:
        s2 = "2" if slot else ""
        return {
            f"family{s2}": p["src"].family,
            f"part{s2}_source": p["src"].name,
            **{f"part{s2}_{k}": v for k, v in zip(("x0", "y0", "x1", "y1"), p["box"])},
            f"part{s2}_flip": p["flip"],
            **{f"paste{s2}_{k}": v for k, v in zip(("x0", "y0", "x1", "y1"), box)},
            f"mask{s2}": mask,
        }

    def crop_cols(src: Source, crop: tuple[int, int, int, int]) -> dict:
        x0, y0, side, flip = crop
        return dict(kind=src.kind, source=src.name, group=src.name, crop_x0=x0, crop_y0=y0, crop_size=side, flip=flip)

    def twins(roles: tuple[str, str], sid: str, free: str, src: Source, crop, parts: list) -> list[Stimulus]:
        """An object with pasted parts [(part, paste box), at most two] and its part-free copy, each naming
        the other as its pair."""
        return [
            Stimulus(
                me,
                "object",
                role,
                file=f"stimuli/{me}.png",
                pair=twin,
                feather=fe,
                **crop_cols(src, crop),
                **{
                    k: v
                    for j, (p, box) in enumerate(parts)
                    for k, v in part_cols(p, box, f"masks/{me}{'-part2' if j else ''}.png", "2" if j else "").items()
                },
            )
            for role, me, twin in ((roles[0], sid, free), (roles[1], free, sid))
        ]

    for i in range(counts.body):
        src, (w, h) = bodies[i % len(bodies)]
        box = _part_box(src, w, h) if src.part is not None else None
        centre = None if box is None else ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        crop = _crop(rng, w, h, i // len(bodies), centre)
        body = _in_crop(box, crop[0], crop[1], crop[2], crop[3], size) if box is not None else (-1, -1, -1, -1)
        sid = f"body{i:03d}"
        out.append(
            Stimulus(
                sid,
                "body",
                "body",
                file=f"stimuli/{sid}.png",
                family=src.family,
                **{k: v for k, v in crop_cols(src, crop).items()},
                **dict(zip(("body_x0", "body_y0", "body_x1", "body_y1"), body)),
            )
        )
    for i in range(counts.object):
        src, (w, h) = objects[i % len(objects)]
        sid = f"object{i:03d}"
        crop = _crop(rng, w, h, i // len(objects), None)
        out.append(Stimulus(sid, "object", "object", file=f"stimuli/{sid}.png", **crop_cols(src, crop)))

    families = sorted(donors, key=FAMILIES.index)
    for i in range(counts.planted):
        src, (w, h) = objects[i % len(objects)]
        crop = _crop(rng, w, h, 1 + i // len(objects), None)
        p = part(families[(i // len(objects)) % len(families)], counts.part_px)
        (box,) = _place(rng, size, [(p["w"], p["h"])], [[]])
        out += twins(("planted", "partfree"), f"planted{i:03d}", f"partfree{i:03d}", src, crop, [(p, box)])
    for i in range(counts.swap):
        src, (w, h) = objects[i % len(objects)]
        crop = _crop(rng, w, h, 1 + i // len(objects), None)
        p1 = part(FAMILIES[0], counts.swap_part_px)
        p2 = part(FAMILIES[1], counts.swap_part_px)
        # the parts apart, and for each part a "shifted" reference box that overlaps neither part
        sizes = [(p1["w"], p1["h"]), (p2["w"], p2["h"])] * 2
        box1, box2, shift1, shift2 = _place(rng, size, sizes, [[], [0], [0, 1], [0, 1]])
        sid = f"swap{i:03d}"
        out += twins(("swap", "swap_partfree"), sid, f"swapfree{i:03d}", src, crop, [(p1, box1), (p2, box2)])
        for p, box, shifted in ((p1, box1, shift1), (p2, box2, shift2)):
            for align, where in (("aligned", box), ("shifted", shifted)):
                rid = f"ref{i:03d}-{p['src'].family}-{align}"
                out.append(
                    Stimulus(
                        rid,
                        REFERENCE_CATEGORY,
                        "reference",
                        p["src"].kind,
                        p["src"].name,
                        p["src"].name,
                        f"stimuli/{rid}.png",
                        pair=sid,
                        align=align,
                        feather=fe,
                        **part_cols(p, where, f"masks/{rid}.png"),
                    )
                )
    for i in range(counts.decoy):
        src, (w, h) = objects[i % len(objects)]
        crop = _crop(rng, w, h, 1 + i // len(objects), None)
        p = part(families[(i // len(objects) + 1) % len(families)], counts.swap_part_px)
        box, dbox = _place(rng, size, [(p["w"], p["h"])] * 2, [[], [0]])
        others = [o for o in objects if o[0].name != src.name] or objects
        dsrc, (dw, dh) = others[int(rng.integers(0, len(others)))]
        k = min(dw, dh) / size  # the patch at the scale of a full-height crop of its photo
        pw, ph = max(1, min(dw, int(round(p["w"] * k)))), max(1, min(dh, int(round(p["h"] * k))))
        dx, dy = int(rng.integers(0, dw - pw + 1)), int(rng.integers(0, dh - ph + 1))
        sid = f"decoy{i:03d}"
        out.append(
            Stimulus(
                sid,
                "object",
                "decoy",
                file=f"stimuli/{sid}.png",
                feather=fe,
                **crop_cols(src, crop),
                **part_cols(p, box, f"masks/{sid}.png"),
                decoy_source=dsrc.name,
                **dict(zip(("decoy_x0", "decoy_y0", "decoy_x1", "decoy_y1"), (dx, dy, dx + pw, dy + ph))),
                **dict(zip(("decoy_paste_x0", "decoy_paste_y0", "decoy_paste_x1", "decoy_paste_y1"), dbox)),
                decoy_mask=f"masks/{sid}-decoy.png",
            )
        )
    return out


def _part_image(photos: dict[str, Image.Image], name: str, box: Box, flip: int, into: Box) -> Image.Image:
    part = photos[name].crop(box).resize((into[2] - into[0], into[3] - into[1]), Image.BICUBIC)
    return part.transpose(Image.FLIP_LEFT_RIGHT) if flip else part


def _box_mask(box: Box, size: int) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[box[1] : box[3], box[0] : box[2]] = True
    return mask


def render(
    stim: Stimulus, photos: dict[str, Image.Image], size: int, grey: tuple[int, int, int] = (128, 128, 128)
) -> tuple[Image.Image, dict[str, np.ndarray]]:
    """The stimulus image (size x size RGB) and its masks by name ("part", "part2", "decoy").

    A part-free copy is rendered from the same crop without any paste, so it equals its twin outside
    the pasted rectangles; a reference is its part on a `grey` background.
    """
    if stim.role == "reference":
        img = Image.new("RGB", (size, size), tuple(grey))
    else:
        photo = photos[stim.source]
        box = (stim.crop_x0, stim.crop_y0, stim.crop_x0 + stim.crop_size, stim.crop_y0 + stim.crop_size)
        img = photo.crop(box).resize((size, size), Image.BICUBIC)
        if stim.flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
    masks: dict[str, np.ndarray] = {}
    pasted = stim.role in ("planted", "swap", "reference", "decoy")
    if stim.paste_box is not None:
        if pasted:
            patch = _part_image(photos, stim.part_source, stim.part_box_in_photo, stim.part_flip, stim.paste_box)
            img = paste_feathered(img, patch, stim.paste_box, stim.feather)
        masks["part"] = _box_mask(stim.paste_box, size)
    if stim.paste2_box is not None:
        if pasted:
            box2 = (stim.part2_x0, stim.part2_y0, stim.part2_x1, stim.part2_y1)
            patch = _part_image(photos, stim.part2_source, box2, stim.part2_flip, stim.paste2_box)
            img = paste_feathered(img, patch, stim.paste2_box, stim.feather)
        masks["part2"] = _box_mask(stim.paste2_box, size)
    if stim.decoy_box is not None:
        dbox = (stim.decoy_x0, stim.decoy_y0, stim.decoy_x1, stim.decoy_y1)
        patch = _part_image(photos, stim.decoy_source, dbox, 0, stim.decoy_box)
        img = paste_feathered(img, patch, stim.decoy_box, stim.feather)
        masks["decoy"] = _box_mask(stim.decoy_box, size)
    return img, masks


MASK_COLUMNS = {"part": "mask", "part2": "mask2", "decoy": "decoy_mask"}


def write_stimuli(
    folder: str | os.PathLike,
    table: list[Stimulus],
    photos: dict[str, Image.Image],
    size: int,
    grey: tuple[int, int, int] = (128, 128, 128),
) -> Path:
    """Render every stimulus (and its masks) into `folder` and write the table; returns the table path."""
    folder = Path(folder)
    (folder / "stimuli").mkdir(parents=True, exist_ok=True)
    for stim in table:
        img, masks = render(stim, photos, size, grey)
        img.save(folder / stim.file)
        for name, mask in masks.items():
            rel = getattr(stim, MASK_COLUMNS[name])
            (folder / rel).parent.mkdir(exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(folder / rel)
    path = folder / TABLE
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(Stimulus)])
        writer.writeheader()
        for stim in table:
            writer.writerow(asdict(stim))
    return path


def read_table(path: str | os.PathLike) -> list[Stimulus]:
    """Read a stimulus table written by `write_stimuli`."""
    path = Path(path)
    if not path.is_file():
        raise InputDataError(path, "stimulus table not found (build the demo first: pbv-onnx demo build)")
    types = {fl.name: fl.type for fl in fields(Stimulus)}
    rows = []
    try:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                rows.append(Stimulus(**{k: (v if types[k] == "str" else int(v)) for k, v in row.items()}))
    except (KeyError, ValueError, TypeError) as exc:
        raise InputDataError(path, f"malformed stimulus table ({exc})") from None
    return rows


def load_mask(folder: str | os.PathLike, stim: Stimulus, which: str = "part") -> np.ndarray:
    """One of a stimulus's masks ("part", "part2" or "decoy") as a boolean [H, W] array."""
    rel = getattr(stim, MASK_COLUMNS[which])
    if not rel:
        raise InputDataError(None, f"stimulus {stim.stimulus} has no {which} mask")
    path = Path(folder) / rel
    if not path.is_file():
        raise InputDataError(path, "mask file not found")
    with Image.open(path) as im:
        return np.asarray(im.convert("L")) > 127
