"""Figures: the pair panel (object | overlay | reference | overlay, Fig. 4) and the response panel (Fig. 3b)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

CMAP = "inferno"
DPI = 150
# Pair figure geometry in inches: four square panels, a colour bar, room for a two-line title.
PANEL_IN, GAP_IN, MARGIN_IN, TITLE_IN, LABEL_IN, CBAR_IN = 2.2, 0.12, 0.25, 0.62, 0.3, 0.12


def _figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def overlay(image: np.ndarray, saliency_map: np.ndarray, vmax: float, cmap: str = CMAP) -> np.ndarray:
    """A saliency map over a greyed copy of the image: float RGB [H, W, 3] in [0, 1].

    Colour and opacity both grow with S / vmax, so zero saliency leaves the grey image and the same
    saliency value looks the same in every map drawn with the same vmax.
    """
    from matplotlib import colormaps

    rgb = np.asarray(image, np.float64) / 255.0
    grey = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2])[..., None]
    base = 0.25 + 0.6 * np.repeat(grey, 3, axis=-1)  # lightened so dark colours stay visible
    t = np.clip(np.asarray(saliency_map, np.float64) / vmax, 0.0, 1.0)
    heat = colormaps[cmap](t)[..., :3]
    alpha = (t ** 0.75)[..., None]  # faint values still show, yet zero stays transparent
    return (1 - alpha) * base + alpha * heat


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


def panel_boxes() -> dict[str, tuple[int, int, int, int]]:
    """Pixel boxes (left, top, right, bottom) of the pair figure's panels in the saved PNG."""
    (w_in, h_in), rects = pair_layout()
    W, H = round(w_in * DPI), round(h_in * DPI)
    out = {}
    for name, (l, b, w, h) in rects.items():
        out[name] = (math.ceil(l * W), math.ceil((1 - b - h) * H), math.floor((l + w) * W), math.floor((1 - b) * H))
    return out


def _fmt(v: float, digits: int = 2) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


def _short(label: str, n: int = 28) -> str:
    name = Path(label).name if ("/" in label or os.sep in label) else label
    return name if len(name) <= n else name[: n - 1] + "\u2026"


def save_pair_figure(dest: str | os.PathLike, ooc_image: np.ndarray, ref_image: np.ndarray,
                     ooc_map: np.ndarray, ref_map: np.ndarray, vmax: float, *, channel: str,
                     region: str = "", ooc: str = "", reference: str = "", similarity: float = float("nan"),
                     recorded: tuple[float, float] = (float("nan"), float("nan")),
                     predicted: tuple[float, float] = (float("nan"), float("nan")),
                     method: str = "parallel", scale_note: str = "") -> Path:
    """Write one pair figure; both overlays use the one colour scale `vmax` given."""
    from matplotlib import cm, colors

    (w_in, h_in), rects = pair_layout()
    fig = _figure(w_in, h_in)
    panels = {"ooc": (ooc_image, "object"), "reference": (ref_image, "reference")}
    maps = {"ooc": ooc_map, "reference": ref_map}
    labels = {"ooc": f"object: {_short(ooc)}", "reference": f"reference: {_short(reference)}",
              "ooc_overlay": "shared features" if method in ("parallel", "integrated") else method,
              "reference_overlay": "shared features" if method in ("parallel", "integrated") else method}
    for role in ("ooc", "reference"):
        ax = fig.add_axes(rects[role])
        ax.imshow(panels[role][0], interpolation="lanczos")
        ax_o = fig.add_axes(rects[f"{role}_overlay"])
        ax_o.imshow(overlay(panels[role][0], maps[role], vmax), interpolation="lanczos")
        for a, key in ((ax, role), (ax_o, f"{role}_overlay")):
            a.set_xticks([])
            a.set_yticks([])
            for s in a.spines.values():
                s.set_linewidth(0.5)
            a.set_xlabel(labels[key], fontsize=8, labelpad=3)
    cax = fig.add_axes(rects["colorbar"])
    sm = cm.ScalarMappable(norm=colors.Normalize(0, vmax), cmap=CMAP)
    cb = fig.colorbar(sm, cax=cax)
    cb.ax.tick_params(labelsize=7)
    cb.formatter.set_powerlimits((-2, 3))
    cb.set_label("saliency $\\Sigma_c|G|$" + (f" ({scale_note})" if scale_note else ""), fontsize=7)
    head = f"channel {channel}" + (f" ({region})" if region else "") + f"    similarity $s_n$ = {_fmt(similarity, 3)}"
    sub = (f"object: recorded {_fmt(recorded[0])}, predicted {_fmt(predicted[0])}    "
           f"reference: recorded {_fmt(recorded[1])}, predicted {_fmt(predicted[1])}")
    fig.text(MARGIN_IN / w_in, 1 - 0.2 / h_in, head, fontsize=10, weight="bold", va="top")
    fig.text(MARGIN_IN / w_in, 1 - 0.43 / h_in, sub, fontsize=8, va="top", color="0.25")
    dest = Path(dest)
    fig.savefig(dest, dpi=DPI, format="png")
    return dest


def save_response_panel(dest: str | os.PathLike, channels: Sequence[str], regions: Sequence[str],
                        objects: Sequence[Sequence[float]], mean_object: Sequence[float],
                        mean_preferred: Sequence[float], preferred: str = "body") -> Path:
    """Fig. 3b: each channel's recorded responses to its explained objects (dots) against its mean
    response to all objects and to all preferred-category images (ticks)."""
    n = len(channels)
    fig = _figure(max(4.0, 1.0 + 0.42 * n), 3.2)
    ax = fig.add_axes((0.12 if n < 8 else 0.07, 0.24, 0.84 if n < 8 else 0.9, 0.66))
    xs = np.arange(n)
    for i, vals in enumerate(objects):
        vals = np.asarray(vals, np.float64)
        vals = vals[np.isfinite(vals)]
        jitter = np.linspace(-0.12, 0.12, len(vals)) if len(vals) > 1 else np.zeros(len(vals))
        ax.scatter(i + jitter, vals, s=18, color="#e07b1a", zorder=3, edgecolor="white", linewidth=0.4,
                   label="explained objects" if i == 0 else None)
    ax.hlines(mean_object, xs - 0.3, xs + 0.3, color="0.4", linewidth=1.8, linestyles="--", zorder=2,
              label="mean, all objects")
    ax.hlines(mean_preferred, xs - 0.3, xs + 0.3, color="#1f5fa8", linewidth=1.8, zorder=2,
              label=f"mean, all {preferred}")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{c}\n{r}" if r else str(c) for c, r in zip(channels, regions)], fontsize=7,
                       rotation=0 if n <= 16 else 90)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_xlabel("channel", fontsize=8)
    ax.set_ylabel("recorded response", fontsize=8)
    ax.tick_params(labelsize=7)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.legend(fontsize=7, frameon=False, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3)
    dest = Path(dest)
    fig.savefig(dest, dpi=DPI, format="png", bbox_inches="tight", pad_inches=0.08)
    return dest
