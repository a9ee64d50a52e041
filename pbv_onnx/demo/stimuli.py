"""The demo's stimulus set: seeded crops, flips and rescales of real photos, and planted objects.

Every stimulus is a square crop of one photograph (side `scale` x the photo's shorter side, at a
seeded position, optionally mirrored), resized to `size` x `size`. Variant 0 of each photo is its
centred full-height square, unmirrored. Body crops always contain the centre of the photo's
body-part box, so the body stays in view. A planted object is an object crop with a body part (the
hand-drawn part box of a body photo, mirrored at random, longer side `part_px`) pasted at a
seeded position; its mask is the pasted rectangle. The same seed gives the same stimuli.
"""

from __future__ import annotations

import csv
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image

from pbv_onnx.base.errors import InputDataError
from pbv_onnx.demo.sources import Source

TABLE = "stimuli.csv"


@dataclass(frozen=True)
class Stimulus:
    """One row of the stimulus table; pixel boxes are (x0, y0, x1, y1), x1/y1 exclusive."""

    stimulus: str
    category: str  # "body" or "object" (planted objects are objects)
    kind: str  # "human", "animal", "object" or "planted"
    source: str  # the photograph the stimulus is cut from
    file: str  # image path relative to the experiment folder
    crop_x0: int  # crop square in the source photo's pixels
    crop_y0: int
    crop_size: int
    flip: int  # 1: mirrored left-right after cropping
    part_source: str = ""  # planted: the body photo the part comes from
    part_x0: int = -1  # planted: the part box in that photo's pixels
    part_y0: int = -1
    part_x1: int = -1
    part_y1: int = -1
    part_flip: int = 0
    paste_x0: int = -1  # planted: where the part sits in the stimulus (its mask)
    paste_y0: int = -1
    paste_x1: int = -1
    paste_y1: int = -1
    mask: str = ""  # planted: mask PNG relative to the experiment folder (255 inside)
    body_x0: int = -1  # body: the photo's body-part box in stimulus pixels (clipped)
    body_y0: int = -1
    body_x1: int = -1
    body_y1: int = -1

    @property
    def planted(self) -> bool:
        return bool(self.mask)

    @property
    def body_box(self) -> tuple[int, int, int, int] | None:
        return None if self.body_x0 < 0 else (self.body_x0, self.body_y0, self.body_x1, self.body_y1)

    @property
    def paste_box(self) -> tuple[int, int, int, int]:
        return self.paste_x0, self.paste_y0, self.paste_x1, self.paste_y1


@dataclass(frozen=True)
class Counts:
    """How many stimuli of each kind; the defaults give the full demo (~190 stimuli)."""

    body: int = 96
    object: int = 56
    planted: int = 40
    size: int = 224
    part_px: tuple[int, int] = (64, 96)


def _part_box(src: Source, w: int, h: int) -> tuple[int, int, int, int]:
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


def _in_crop(
    box: tuple[int, int, int, int], x0: int, y0: int, side: int, flip: int, size: int
) -> tuple[int, int, int, int]:
    """A box in photo pixels -> stimulus pixels after crop, resize and mirror, clipped."""
    s = size / side
    bx0, bx1 = (box[0] - x0) * s, (box[2] - x0) * s
    by0, by1 = (box[1] - y0) * s, (box[3] - y0) * s
    if flip:
        bx0, bx1 = size - bx1, size - bx0
    clip = lambda v: int(np.clip(round(v), 0, size))  # noqa: E731
    return clip(bx0), clip(by0), clip(bx1), clip(by1)


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
    out: list[Stimulus] = []

    def crop_rows(pool, n, prefix):
        for i in range(n):
            src, (w, h) = pool[i % len(pool)]
            centre = None
            if src.part is not None:
                px0, py0, px1, py1 = _part_box(src, w, h)
                centre = ((px0 + px1) / 2, (py0 + py1) / 2)
            x0, y0, side, flip = _crop(rng, w, h, i // len(pool), centre)
            sid = f"{prefix}{i:03d}"
            body = (-1, -1, -1, -1)
            if src.part is not None:
                body = _in_crop((px0, py0, px1, py1), x0, y0, side, flip, counts.size)
            out.append(
                Stimulus(
                    sid,
                    src.category,
                    src.kind,
                    src.name,
                    f"stimuli/{sid}.png",
                    x0,
                    y0,
                    side,
                    flip,
                    body_x0=body[0],
                    body_y0=body[1],
                    body_x1=body[2],
                    body_y1=body[3],
                )
            )

    crop_rows(bodies, counts.body, "body")
    crop_rows(objects, counts.object, "object")
    for i in range(counts.planted):
        src, (w, h) = objects[i % len(objects)]
        x0, y0, side, flip = _crop(rng, w, h, 1 + i // len(objects), None)
        part_src, (pw, ph) = bodies[i % len(bodies)]
        bx0, by0, bx1, by1 = _part_box(part_src, pw, ph)
        longer = int(rng.integers(counts.part_px[0], counts.part_px[1] + 1))
        scale = longer / max(bx1 - bx0, by1 - by0)
        pw_px = max(1, int(round((bx1 - bx0) * scale)))
        ph_px = max(1, int(round((by1 - by0) * scale)))
        px = int(rng.integers(0, counts.size - pw_px + 1))
        py = int(rng.integers(0, counts.size - ph_px + 1))
        sid = f"planted{i:03d}"
        out.append(
            Stimulus(
                sid,
                "object",
                "planted",
                src.name,
                f"stimuli/{sid}.png",
                x0,
                y0,
                side,
                flip,
                part_src.name,
                bx0,
                by0,
                bx1,
                by1,
                int(rng.integers(0, 2)),
                px,
                py,
                px + pw_px,
                py + ph_px,
                f"masks/{sid}.png",
            )
        )
    return out


def render(stim: Stimulus, photos: dict[str, Image.Image], size: int) -> tuple[Image.Image, np.ndarray | None]:
    """The stimulus image (size x size RGB) and, for planted objects, its boolean mask."""
    photo = photos[stim.source]
    box = (stim.crop_x0, stim.crop_y0, stim.crop_x0 + stim.crop_size, stim.crop_y0 + stim.crop_size)
    img = photo.crop(box).resize((size, size), Image.BICUBIC)
    if stim.flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if not stim.planted:
        return img, None
    part = photos[stim.part_source].crop((stim.part_x0, stim.part_y0, stim.part_x1, stim.part_y1))
    x0, y0, x1, y1 = stim.paste_box
    part = part.resize((x1 - x0, y1 - y0), Image.BICUBIC)
    if stim.part_flip:
        part = part.transpose(Image.FLIP_LEFT_RIGHT)
    img = img.copy()
    img.paste(part, (x0, y0))
    mask = np.zeros((size, size), bool)
    mask[y0:y1, x0:x1] = True
    return img, mask


def write_stimuli(folder: str | os.PathLike, table: list[Stimulus], photos: dict[str, Image.Image], size: int) -> Path:
    """Render every stimulus (and mask) into `folder` and write the table; returns the table path."""
    folder = Path(folder)
    (folder / "stimuli").mkdir(parents=True, exist_ok=True)
    if any(s.planted for s in table):
        (folder / "masks").mkdir(exist_ok=True)
    for stim in table:
        img, mask = render(stim, photos, size)
        img.save(folder / stim.file)
        if mask is not None:
            Image.fromarray(mask.astype(np.uint8) * 255).save(folder / stim.mask)
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


def load_mask(folder: str | os.PathLike, stim: Stimulus) -> np.ndarray:
    """A planted stimulus's mask as a boolean [H, W] array in stimulus pixels."""
    path = Path(folder) / stim.mask
    if not path.is_file():
        raise InputDataError(path, "mask file not found")
    with Image.open(path) as im:
        return np.asarray(im.convert("L")) > 127
