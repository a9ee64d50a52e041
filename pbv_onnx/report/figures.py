"""Figures: the pair panel (object | overlay | reference | overlay, Fig. 4) and the response panel (Fig. 3b).

Drawn with Pillow and numpy, not matplotlib: a cold `pbv-onnx explain` of one pair spent more time
importing matplotlib and laying out its artists than on the explanation itself.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pbv_onnx.method.methods import panel_label

CMAP = "inferno"
DPI = 150
# Pair figure geometry in inches: four square panels, a colour bar, room for a two-line title.
PANEL_IN, GAP_IN, MARGIN_IN, TITLE_IN, LABEL_IN, CBAR_IN = 2.2, 0.12, 0.25, 0.62, 0.3, 0.12

# matplotlib's 256-entry inferno table sampled at round(linspace(0, 255, 33)); linear
# interpolation between these anchors reproduces it within 1.6/255 per channel.
_INFERNO_ANCHORS = (
    "000004 040312 0b0724 150b37 210c4a 2f0a5b 3d0965 4a0c6b 57106e 64156e 71196e "
    "7d1e6d 8a226a 972766 a32c61 b0315b bc3754 c63d4d d04545 da4e3c e35933 eb6429 "
    "f1711f f67e14 f98c0a fb9b06 fcaa0f fbba1f f9c932 f5d949 f2e865 f3f586 fcffa4"
)

# zlib level for the PNGs: with the "Up" filter on every row and run-length matches, a pair figure
# encodes much faster than with Pillow's encoder (which tries all five filters on each row), for
# slightly larger files; the figures, not the gradients, were most of a large explain run's time
# (docs/performance.md).
PNG_COMPRESSION = 1

BLACK, WHITE = (0, 0, 0), (255, 255, 255)
SUBTITLE_GREY = (64, 64, 64)  # matplotlib "0.25"
MEAN_OBJECT_GREY = (102, 102, 102)  # matplotlib "0.4"
OBJECT_ORANGE, PREFERRED_BLUE = (224, 123, 26), (31, 95, 168)


def _lut(anchors: str, n: int = 256) -> np.ndarray:
    rgb = np.array([[int(h[i : i + 2], 16) for i in (0, 2, 4)] for h in anchors.split()], np.float64) / 255.0
    at = np.round(np.linspace(0, n - 1, len(rgb)))
    return np.stack([np.interp(np.arange(n), at, rgb[:, c]) for c in range(3)], axis=1)


COLORMAPS = {"inferno": _lut(_INFERNO_ANCHORS)}


def colormap(t: np.ndarray, cmap: str = CMAP) -> np.ndarray:
    """Values in [0, 1] -> RGB [..., 3] (float32 for float32 values, else float64), picked from the
    256-entry table as matplotlib does."""
    t = np.asarray(t)
    dtype = np.float32 if t.dtype == np.float32 else np.float64
    lut = COLORMAPS[cmap].astype(dtype, copy=False)
    t = np.nan_to_num(t.astype(dtype, copy=False), nan=0.0)
    idx = np.clip((t * len(lut)).astype(np.int64), 0, len(lut) - 1)
    return lut[idx]


def overlay(image: np.ndarray, saliency_map: np.ndarray, vmax: float, cmap: str = CMAP) -> np.ndarray:
    """A saliency map over a greyed copy of the image: float RGB [H, W, 3] in [0, 1].

    Colour and opacity both grow with S / vmax, so zero saliency leaves the grey image and the same
    saliency value looks the same in every map drawn with the same vmax.
    """
    # float32 throughout: faster than float64, the same 8-bit pixels to within rounding
    rgb = np.asarray(image, np.float32) / np.float32(255.0)
    grey = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    base = (0.25 + 0.6 * grey)[..., None]  # lightened so dark colours stay visible
    t = np.clip(np.nan_to_num(np.asarray(saliency_map, np.float64) / vmax), 0.0, 1.0).astype(np.float32)
    heat = colormap(t, cmap)
    alpha = (t**0.75)[..., None]  # faint values still show, yet zero stays transparent
    return (1 - alpha) * base + alpha * heat


# -- text ---------------------------------------------------------------------------------
def _font_dirs() -> list[Path]:
    """Folders holding DejaVu Sans: matplotlib's copy (found without importing matplotlib), then
    the system's."""
    dirs = []
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.submodule_search_locations:
        dirs += [Path(p) / "mpl-data" / "fonts" / "ttf" for p in spec.submodule_search_locations]
    return dirs + [Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/dejavu")]


@functools.lru_cache(maxsize=None)
def _font(points: float, bold: bool = False, italic: bool = False, scale: int = 1) -> ImageFont.ImageFont:
    """DejaVu Sans (as matplotlib draws) at `points` for DPI * scale; Pillow's own font otherwise."""
    size = max(1, round(points * DPI * scale / 72))
    name = "DejaVuSans" + ("-Bold" if bold else "") + ("Oblique" if italic and bold else "-Oblique" if italic else "")
    for folder in _font_dirs():
        path = folder / f"{name}.ttf"
        if path.is_file():
            try:
                return ImageFont.truetype(str(path), size)
            except OSError:
                continue
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except TypeError:
        return ImageFont.load_default()


def _has_sigma(font) -> bool:
    """Pillow's fallback font has no Greek: draw "sum" there instead of an empty box."""
    return "DejaVu" in str(getattr(font, "path", ""))


# A run of rich text: (text, points, bold, italic, baseline shift in ems (positive: down)).
Run = tuple[str, float, bool, bool, float]


def _run_width(runs: Sequence[Run], scale: int = 1) -> float:
    return sum(_font(pt, b, i, scale).getlength(t) for t, pt, b, i, _ in runs)


def _draw_runs(
    draw: ImageDraw.ImageDraw, x: float, baseline: float, runs: Sequence[Run], fill=BLACK, scale: int = 1
) -> float:
    """Draw runs left to right on one baseline; returns the x after the last."""
    for text, pt, bold, italic, shift in runs:
        font = _font(pt, bold, italic, scale)
        draw.text((x, baseline + shift * pt * DPI * scale / 72), text, font=font, fill=fill, anchor="ls")
        x += font.getlength(text)
    return x


def _rotated_runs(runs: Sequence[Run], fill=BLACK, scale: int = 1) -> Image.Image:
    """The runs drawn on a transparent strip, turned 90 degrees anticlockwise (an axis label)."""
    pt = max(r[1] for r in runs)
    font = _font(pt, scale=scale)
    ascent, descent = font.getmetrics()
    w = math.ceil(_run_width(runs, scale)) + 2
    strip = Image.new("LA", (w, ascent + descent + 4), (0, 0))
    _draw_runs(ImageDraw.Draw(strip), 1, ascent + 2, runs, fill=(fill[0], 255), scale=scale)
    return strip.rotate(90, expand=True)


def _paste_text(canvas: Image.Image, strip: Image.Image, xy: tuple[int, int], fill=BLACK) -> None:
    colour = Image.new("RGB", strip.size, fill)
    canvas.paste(colour, xy, strip.getchannel("A"))


# -- ticks --------------------------------------------------------------------------------
def nice_ticks(lo: float, hi: float, target: int = 6) -> np.ndarray:
    """Round tick values (steps 1, 2, 2.5 or 5 x 10^k) covering [lo, hi], about `target` of them."""
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi <= lo:
        return np.array([lo if np.isfinite(lo) else 0.0])
    raw = (hi - lo) / max(1, target)
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    first = math.ceil(lo / step - 1e-9)
    last = math.floor(hi / step + 1e-9)
    return np.arange(first, last + 1) * step


def tick_labels(ticks: np.ndarray, sci: tuple[int, int] = (-2, 3)) -> tuple[list[str], str]:
    """Labels with just enough decimals, and a "1e-k" offset text when the largest tick's order
    of magnitude is at most sci[0] or at least sci[1] (as matplotlib's set_powerlimits)."""
    top = float(np.max(np.abs(ticks))) if len(ticks) else 0.0
    exp = 0
    if top > 0:
        e = math.floor(math.log10(top))
        if e <= sci[0] or e >= sci[1]:
            exp = e
    vals = np.asarray(ticks, np.float64) / 10.0**exp
    step = float(np.min(np.diff(vals))) if len(vals) > 1 else 1.0
    decimals = 0
    while decimals < 6 and np.any(np.abs(vals - np.round(vals, decimals)) > 1e-6 * max(step, 1e-300)):
        decimals += 1
    labels = [f"{v:.{decimals}f}".replace("-", "\u2212") for v in vals + 0.0]
    return labels, (f"1e{exp}".replace("-", "\u2212") if exp else "")


# -- the pair figure ----------------------------------------------------------------------
def pair_layout() -> tuple[tuple[float, float], dict[str, tuple[float, float, float, float]]]:
    """Figure size (inches) and panel rectangles (left, bottom, width, height in figure fractions)."""
    width = 2 * MARGIN_IN + 4 * PANEL_IN + 3 * GAP_IN + 0.15 + GAP_IN + CBAR_IN + 0.55
    height = MARGIN_IN / 2 + LABEL_IN + PANEL_IN + TITLE_IN
    rects = {}
    names = ("ooc", "ooc_overlay", "reference", "reference_overlay")
    left = MARGIN_IN
    for i, name in enumerate(names):
        extra = 0.15 if i >= 2 else 0.0  # a wider gap between the object and the reference halves
        x = left + i * (PANEL_IN + GAP_IN) + extra
        rects[name] = (x / width, (MARGIN_IN / 2 + LABEL_IN) / height, PANEL_IN / width, PANEL_IN / height)
    cx = MARGIN_IN + 4 * PANEL_IN + 3 * GAP_IN + 0.15 + GAP_IN
    rects["colorbar"] = (cx / width, (MARGIN_IN / 2 + LABEL_IN) / height, CBAR_IN / width, PANEL_IN / height)
    return (width, height), rects


def pair_size() -> tuple[int, int]:
    """The pair figure's PNG size in pixels (width, height)."""
    (w_in, h_in), _ = pair_layout()
    return round(w_in * DPI), round(h_in * DPI)


def panel_boxes() -> dict[str, tuple[int, int, int, int]]:
    """Pixel boxes (left, top, right, bottom) of the pair figure's panels in the saved PNG."""
    _, rects = pair_layout()
    W, H = pair_size()
    out = {}
    for name, (l, b, w, h) in rects.items():
        out[name] = (math.ceil(l * W), math.ceil((1 - b - h) * H), math.floor((l + w) * W), math.floor((1 - b) * H))
    return out


def format_number(v: float | None, digits: int = 2) -> str:
    """`digits` decimals, or n/a for a missing or non-finite number."""
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


def _short(label: str, n: int = 28) -> str:
    name = Path(label).name if ("/" in label or os.sep in label) else label
    return name if len(name) <= n else name[: n - 1] + "\u2026"


def png_bytes(rgb: np.ndarray, level: int = PNG_COMPRESSION) -> bytes:
    """An 8-bit RGB image [H, W, 3] as a PNG file: each row "Up"-filtered (minus the row above,
    modulo 256), then one zlib stream; numpy and zlib both work without the GIL, so figures drawn
    in threads encode in parallel."""
    rgb = np.ascontiguousarray(rgb, np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
        raise ValueError(f"need an RGB image [H, W, 3], got {rgb.shape}")
    h, w, _ = rgb.shape
    rows = rgb.reshape(h, 3 * w)
    raw = np.empty((h, 1 + 3 * w), np.uint8)
    raw[:, 0] = 2  # filter type Up (the first row's "above" is zeros)
    raw[:, 1:] = rows
    raw[1:, 1:] -= rows[:-1]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits, truecolour, no interlace
    # run-length matches only: on filtered figure rows faster than zlib's default search, and the
    # files smaller (docs/performance.md)
    z = zlib.compressobj(level, zlib.DEFLATED, 15, 8, zlib.Z_RLE)
    data = z.compress(raw) + z.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def save_png(dest: str | os.PathLike, image: Image.Image) -> Path:
    """Write a Pillow image as an RGB PNG (png_bytes)."""
    dest = Path(dest)
    dest.write_bytes(png_bytes(np.asarray(image.convert("RGB"))))
    return dest


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    return np.clip(np.round(rgb * rgb.dtype.type(255.0)), 0, 255).astype(np.uint8)


def _panel(
    canvas: Image.Image, draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], rgb: np.ndarray, label: str
) -> None:
    """One image resampled (Lanczos) into its box, a hairline frame, its label below."""
    l, t, r, b = box
    img = Image.fromarray(np.ascontiguousarray(rgb))
    canvas.paste(img.resize((r - l, b - t), Image.LANCZOS), (l, t))
    draw.rectangle((l - 1, t - 1, r, b), outline=BLACK, width=1)
    draw.text(((l + r) / 2, b + round(6 * DPI / 72)), label, font=_font(8), fill=BLACK, anchor="ma")


def _colorbar(
    canvas: Image.Image,
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    vmax: float,
    label: Sequence[Run],
    cmap: str = CMAP,
) -> None:
    """A vertical colour bar for 0..vmax with ticks, an offset text where needed, and its label."""
    l, t, r, b = box
    h = b - t
    ramp = colormap((h - 0.5 - np.arange(h)) / h, cmap)  # top row: vmax
    bar = np.repeat(_to_uint8(ramp)[:, None, :], r - l, axis=1)
    canvas.paste(Image.fromarray(bar), (l, t))
    draw.rectangle((l - 1, t - 1, r, b), outline=BLACK, width=1)
    ticks = nice_ticks(0.0, vmax, target=max(3, h // 40))
    labels, offset = tick_labels(ticks)
    font, tick_len, pad = _font(7), round(3.5 * DPI / 72), round(3.5 * DPI / 72)
    widest = 0.0
    for v, text in zip(ticks, labels):
        y = b - v / vmax * h
        draw.line((r, y, r + tick_len, y), fill=BLACK, width=max(1, round(0.8 * DPI / 72)))
        draw.text((r + tick_len + pad, y), text, font=font, fill=BLACK, anchor="lm")
        widest = max(widest, font.getlength(text))
    if offset:
        draw.text((l, t - 5), offset, font=_font(9), fill=BLACK, anchor="ld")
    strip = _rotated_runs(label)
    x = round(r + tick_len + pad + widest + 4)
    _paste_text(canvas, strip, (x, round((t + b) / 2 - strip.height / 2)))


def save_pair_figure(
    dest: str | os.PathLike,
    ooc_image: np.ndarray,
    ref_image: np.ndarray,
    ooc_map: np.ndarray,
    ref_map: np.ndarray,
    vmax: float,
    *,
    channel: str,
    region: str = "",
    ooc: str = "",
    reference: str = "",
    similarity: float = float("nan"),
    recorded: tuple[float, float] = (float("nan"), float("nan")),
    predicted: tuple[float, float] = (float("nan"), float("nan")),
    method: str = "parallel",
    scale_note: str = "",
    map: str = "pixel",
) -> Path:
    """Write one pair figure; both overlays use the one colour scale `vmax` given. `map` names the
    maps drawn: pixel (the saliency), shared (the upsampled shared map) or guided (their product)."""
    vmax = float(vmax) if np.isfinite(vmax) and vmax > 0 else 1.0
    canvas = Image.new("RGB", pair_size(), WHITE)
    draw = ImageDraw.Draw(canvas)
    boxes = panel_boxes()
    shared = {"pixel": panel_label(method), "shared": "shared map", "guided": "guided (saliency x shared)"}[map]
    for role, img, smap, label in (
        ("ooc", ooc_image, ooc_map, f"object: {_short(ooc)}"),
        ("reference", ref_image, ref_map, f"reference: {_short(reference)}"),
    ):
        img = np.asarray(img, np.uint8)
        _panel(canvas, draw, boxes[role], img, label)
        _panel(canvas, draw, boxes[f"{role}_overlay"], _to_uint8(overlay(img, smap, vmax)), shared)
    sigma = "\u03a3" if _has_sigma(_font(7)) else "sum "
    note = f" ({scale_note})" if scale_note else ""
    label: list[Run] = [
        (f"saliency {sigma}", 7, False, False, 0.0),
        ("c", 5, False, False, 0.25),
        ("|G|" + note, 7, False, False, 0.0),
    ]
    if map == "shared":
        label = [("shared map M per pixel" + note, 7, False, False, 0.0)]
    elif map == "guided":
        label = [
            (f"guided {sigma}", 7, False, False, 0.0),
            ("c", 5, False, False, 0.25),
            ("|G| x M" + note, 7, False, False, 0.0),
        ]
    _colorbar(canvas, draw, boxes["colorbar"], vmax, label)
    head: list[Run] = [
        ("channel " + str(channel) + (f" ({region})" if region else "") + "    similarity ", 10, True, False, 0.0),
        ("s", 10, True, True, 0.0),
        ("n", 7, True, True, 0.3),
        (f" = {format_number(similarity, 3)}", 10, True, False, 0.0),
    ]
    sub = (
        f"object: recorded {format_number(recorded[0])}, predicted {format_number(predicted[0])}    "
        f"reference: recorded {format_number(recorded[1])}, predicted {format_number(predicted[1])}"
    )
    x0 = round(MARGIN_IN * DPI)
    _draw_runs(draw, x0, round(0.2 * DPI) + _font(10, True).getmetrics()[0], head)
    draw.text((x0, round(0.43 * DPI)), sub, font=_font(8), fill=SUBTITLE_GREY, anchor="la")
    return save_png(dest, canvas)


# -- the response panel -------------------------------------------------------------------
def _dashed_hline(
    draw: ImageDraw.ImageDraw, x0: float, x1: float, y: float, width: int, fill, on: float, off: float
) -> None:
    x = x0
    while x < x1:
        draw.line((x, y, min(x + on, x1), y), fill=fill, width=width)
        x += on + off


def save_response_panel(
    dest: str | os.PathLike,
    channels: Sequence[str],
    regions: Sequence[str],
    objects: Sequence[Sequence[float]],
    mean_object: Sequence[float],
    mean_preferred: Sequence[float],
    preferred: str = "body",
) -> Path:
    """Fig. 3b: each channel's recorded responses to its explained objects (dots) against its mean
    response to all objects and to all preferred-category images (ticks)."""
    S = 2  # drawn at twice the size, then halved: smooth dots and lines without an antialiasing rasteriser
    px = lambda pt: pt * DPI * S / 72  # noqa: E731  (points -> pixels of the drawing)
    n = len(channels)
    objects = [np.asarray(v, np.float64)[np.isfinite(np.asarray(v, np.float64))] for v in objects]
    mean_object = np.asarray(mean_object, np.float64)
    mean_preferred = np.asarray(mean_preferred, np.float64)
    values = np.concatenate([*objects, mean_object, mean_preferred])
    values = values[np.isfinite(values)]
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 1.0, hi + 1.0
    lo, hi = lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)  # matplotlib's default data margins

    tick_font, label_font = _font(7, scale=S), _font(8, scale=S)
    xlabels = [f"{c}\n{r}" if r else str(c) for c, r in zip(channels, regions)]
    vertical = n > 16
    yt = nice_ticks(lo, hi, target=8)
    yt = yt[(yt >= lo) & (yt <= hi)]
    ylabels, yoffset = tick_labels(yt, sci=(-5, 6))  # matplotlib's default limits
    tick_len, pad = px(3.5), px(3.5)
    scratch = ImageDraw.Draw(Image.new("L", (1, 1)))
    xl_boxes = [scratch.multiline_textbbox((0, 0), t, font=tick_font, align="center", spacing=px(1)) for t in xlabels]
    if vertical:  # one line each, turned upright
        xl_h = max((tick_font.getlength(t.replace("\n", " ")) for t in xlabels), default=0)
    else:
        xl_h = max((bb[3] - bb[1] for bb in xl_boxes), default=0)
    yl_w = max((tick_font.getlength(t) for t in ylabels), default=0)
    asc, desc = label_font.getmetrics()

    plot_w = px(72) * (max(4.0, 1.0 + 0.42 * n) * (0.84 if n < 8 else 0.9))
    plot_h = px(72) * 3.2 * 0.66
    legend_h = px(16)
    left = px(6) + asc + desc + px(4) + yl_w + pad + tick_len
    top = legend_h + px(8) + (px(10) if yoffset else 0)
    bottom = tick_len + pad + xl_h + px(4) + asc + desc + px(6)
    items = [("dot", "explained objects"), ("dash", "mean, all objects"), ("line", f"mean, all {preferred}")]
    key_w, gap = px(20), px(14)
    widths = [key_w + px(6) + tick_font.getlength(t) for _, t in items]
    legend_w = sum(widths) + gap * (len(items) - 1)
    W = math.ceil(max(left + plot_w + px(10), legend_w + px(16)))
    H = math.ceil(top + plot_h + bottom)
    W += W % 2
    H += H % 2
    canvas = Image.new("RGB", (W, H), WHITE)
    draw = ImageDraw.Draw(canvas)

    def X(v):
        return left + (v + 0.6) / n * plot_w if n else left

    def Y(v):
        return top + (hi - v) / (hi - lo) * plot_h

    lw = round(px(1.8))
    for i in range(n):
        if np.isfinite(mean_object[i]):
            _dashed_hline(
                draw,
                X(i - 0.3),
                X(i + 0.3),
                Y(mean_object[i]),
                lw,
                MEAN_OBJECT_GREY,
                on=px(3.7 * 1.8),
                off=px(1.6 * 1.8),
            )
        if np.isfinite(mean_preferred[i]):
            draw.line(
                (X(i - 0.3), Y(mean_preferred[i]), X(i + 0.3), Y(mean_preferred[i])), fill=PREFERRED_BLUE, width=lw
            )
    r_dot = px(math.sqrt(18)) / 2
    for i, vals in enumerate(objects):
        jitter = np.linspace(-0.12, 0.12, len(vals)) if len(vals) > 1 else np.zeros(len(vals))
        for dx, v in zip(jitter, vals):
            cx, cy = X(i + dx), Y(v)
            draw.ellipse(
                (cx - r_dot, cy - r_dot, cx + r_dot, cy + r_dot),
                fill=OBJECT_ORANGE,
                outline=WHITE,
                width=max(1, round(px(0.4))),
            )

    spine = max(1, round(px(0.8)))
    x_axis, y_axis = top + plot_h, left
    draw.line((y_axis, top, y_axis, x_axis), fill=BLACK, width=spine)
    draw.line((y_axis, x_axis, left + plot_w, x_axis), fill=BLACK, width=spine)
    for v, text in zip(yt, ylabels):
        y = Y(v)
        draw.line((y_axis - tick_len, y, y_axis, y), fill=BLACK, width=spine)
        draw.text((y_axis - tick_len - pad, y), text, font=tick_font, fill=BLACK, anchor="rm")
    if yoffset:
        draw.text((y_axis, top - px(4)), yoffset, font=tick_font, fill=BLACK, anchor="ld")
    for i, text in enumerate(xlabels):
        x = X(i)
        draw.line((x, x_axis, x, x_axis + tick_len), fill=BLACK, width=spine)
        if vertical:
            strip = _rotated_runs([(text.replace("\n", " "), 7, False, False, 0.0)], scale=S)
            _paste_text(canvas, strip, (round(x - strip.width / 2), round(x_axis + tick_len + pad)))
        else:
            draw.multiline_text(
                (x, x_axis + tick_len + pad),
                text,
                font=tick_font,
                fill=BLACK,
                anchor="ma",
                align="center",
                spacing=px(1),
            )
    draw.text(
        (left + plot_w / 2, x_axis + tick_len + pad + xl_h + px(4)), "channel", font=label_font, fill=BLACK, anchor="ma"
    )
    strip = _rotated_runs([("recorded response", 8, False, False, 0.0)], scale=S)
    _paste_text(canvas, strip, (round(px(6)), round(top + plot_h / 2 - strip.height / 2)))

    # the legend, centred above the axes
    x = min(max(px(8), left + plot_w / 2 - legend_w / 2), W - px(8) - legend_w)
    y = legend_h / 2 + px(4)
    for (kind, text), w in zip(items, widths):
        if kind == "dot":
            cx = x + key_w / 2
            draw.ellipse(
                (cx - r_dot, y - r_dot, cx + r_dot, y + r_dot),
                fill=OBJECT_ORANGE,
                outline=WHITE,
                width=max(1, round(px(0.4))),
            )
        elif kind == "dash":
            _dashed_hline(draw, x, x + key_w, y, lw, MEAN_OBJECT_GREY, on=px(3.7 * 1.8), off=px(1.6 * 1.8))
        else:
            draw.line((x, y, x + key_w, y), fill=PREFERRED_BLUE, width=lw)
        draw.text((x + key_w + px(6), y), text, font=tick_font, fill=BLACK, anchor="lm")
        x += w + gap

    dest = Path(dest)
    save_png(dest, canvas.reduce(S))
    return dest
