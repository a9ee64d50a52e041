"""The explain output folder: explanations.nc, one figure per pair, a response panel, index.html."""

from __future__ import annotations

import html
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import xarray as xr

from pbv_onnx.base.atomic import atomic_dir
from pbv_onnx.base.errors import UsageError
from pbv_onnx.method.display import shared_vmax
from pbv_onnx.method.filters import gaussian_smooth
from pbv_onnx.method.methods import describe
from pbv_onnx.method.shared import DEFAULT_MAP, MAP_CHOICES
from pbv_onnx.report import figures
from pbv_onnx.runtime.images import Preprocessing, display_image, load_image

SCALES = ("run", "channel", "pair")
NETCDF = "explanations.nc"


def check_display(smooth: float = 0.0, scale: str = "run") -> None:
    """UsageError for a display option a report cannot draw (checked before any computation)."""
    if scale not in SCALES:
        raise UsageError(None, f"scale must be one of {', '.join(SCALES)}, not {scale!r}", param="scale")
    if not smooth >= 0:
        raise UsageError(None, f"smooth must be non-negative, not {smooth}", param="smooth")


def chosen_map(ds: xr.Dataset, map: str | None = None) -> str:
    """The map a report of `ds` shows: `map`, else the result's own choice (attribute `map`), else pixel;
    checked against what `ds` holds."""
    choice = map if map is not None else str(ds.attrs.get("map", DEFAULT_MAP))
    if choice not in MAP_CHOICES:
        raise UsageError(None, f"map must be one of {', '.join(MAP_CHOICES)}, not {choice!r}", param="map")
    if choice != "pixel" and "shared_map" not in ds:
        why = ds.attrs.get("shared_map", "the result holds no shared_map")
        raise UsageError(None, f"map {choice!r} needs the shared maps ({why})", param="map")
    return choice


def display_maps(ds: xr.Dataset, smooth: float = 0.0, map: str = DEFAULT_MAP) -> np.ndarray:
    """The maps as drawn [pair, role, y, x]: the stored saliency (pixel), the upsampled shared map
    (shared) or their product (guided), smoothed for display if asked."""
    maps = ds["saliency"].transpose("pair", "role", "y", "x").values
    if map != "pixel":
        shared = ds["shared_map"].transpose("pair", "role", "y", "x").values
        maps = shared if map == "shared" else maps.astype(np.float64) * shared
    return gaussian_smooth(maps, smooth) if smooth > 0 else maps


def colour_scales(ds: xr.Dataset, maps: np.ndarray, scale: str = "run") -> np.ndarray:
    """One vmax per pair, shared by its two maps; pooled over the whole run, each channel, or the pair.

    Never one per image: a weakly similar pair must look weak next to its partner (and, with the
    run or channel scale, next to other pairs).
    """
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}")
    P = maps.shape[0]
    if scale == "run":
        return np.full(P, shared_vmax(maps))
    if scale == "pair":
        return np.array([shared_vmax(maps[i]) for i in range(P)])
    chans = ds["channel"].values.astype(str)
    out = np.empty(P)
    for c in np.unique(chans):
        sel = chans == c
        out[sel] = shared_vmax(maps[sel])
    return out


def _slug(text: str, n: int = 40) -> str:
    name = Path(text).stem if ("/" in text or os.sep in text) else text
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:n].strip("._") or "x"


def pair_filename(ds: xr.Dataset, i: int) -> str:
    return f"pairs/{i:04d}_ch-{_slug(str(ds['channel'].values[i]))}_{_slug(str(ds['ooc'].values[i]))}.png"


def write_output(
    ds: xr.Dataset,
    out: str | os.PathLike,
    summary: xr.Dataset | None = None,
    smooth: float = 0.0,
    scale: str = "run",
    force: bool = False,
    progress: bool = False,
    map: str | None = None,
) -> Path:
    """Write the whole output folder atomically: nothing appears unless everything was written.

    `map`: the map the figures show (pixel, shared or guided; default: the result's attribute
    `map`); explanations.nc holds the same maps whatever it is. `progress`: a bar over the pair
    figures on a terminal (the largest part of a big run after the gradients)."""
    from tqdm.auto import tqdm

    check_display(smooth, scale)
    choice = chosen_map(ds, map)
    spec = Preprocessing.from_dict(json.loads(ds.attrs["preprocessing"]))
    maps = display_maps(ds, smooth, choice)
    vmax = colour_scales(ds, maps, scale)
    ds = ds.assign_coords(display_vmax=("pair", vmax))
    ds.attrs.update(display_smooth_sigma=float(smooth), display_scale=scale, map=choice)
    out = Path(out)

    # each distinct image decoded and resized once, however many pairs show it
    paths = {str(f) for r in ("ooc", "reference") for f in ds[f"{r}_file"].values}
    shown = {f: display_image(load_image(f), spec) for f in sorted(paths)}

    def draw(tmp: Path, i: int) -> str:
        imgs = [shown[str(ds[f"{r}_file"].values[i])] for r in ("ooc", "reference")]
        name = pair_filename(ds, i)
        figures.save_pair_figure(
            tmp / name,
            imgs[0],
            imgs[1],
            maps[i, 0],
            maps[i, 1],
            float(vmax[i]),
            channel=str(ds["channel"].values[i]),
            region=str(ds["region"].values[i]),
            ooc=str(ds["ooc"].values[i]),
            reference=str(ds["reference"].values[i]),
            similarity=float(ds["similarity"].values[i]),
            recorded=(float(ds["recorded_ooc"].values[i]), float(ds["recorded_reference"].values[i])),
            predicted=(float(ds["predicted_ooc"].values[i]), float(ds["predicted_reference"].values[i])),
            method=str(ds["method"].values[i]),
            scale_note=f"{scale} scale",
            map=choice,
        )
        return name

    with atomic_dir(out, force) as tmp:
        (tmp / "pairs").mkdir()
        # Figures are drawn in worker threads while this one writes the NetCDF file: Pillow
        # releases the GIL while it PNG-encodes, h5py while HDF5 writes.
        pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))
        try:
            drawn = [pool.submit(draw, tmp, i) for i in range(ds.sizes["pair"])]
            ds.to_netcdf(tmp / NETCDF, engine="h5netcdf")
            files = []
            with tqdm(
                total=len(drawn),
                desc="figures",
                unit="pair",
                file=sys.stderr,
                dynamic_ncols=True,
                disable=None if progress else True,
            ) as bar:
                for f in drawn:
                    files.append(f.result())
                    bar.update(1)
        finally:  # on an error or Ctrl-C: drop the figures not started, wait for the running ones
            pool.shutdown(wait=True, cancel_futures=True)
        panel = _response_panel(ds, summary, tmp)
        (tmp / "index.html").write_text(render_index(ds, files, panel), encoding="utf-8")
    return out


def _response_panel(ds: xr.Dataset, summary: xr.Dataset | None, folder: Path) -> str | None:
    """Fig. 3b for the channels explained, where their objects are recorded stimuli."""
    if summary is None or not np.isfinite(ds["recorded_ooc"].values).any():
        return None
    chans = list(dict.fromkeys(ds["channel"].values.astype(str)))
    all_ch = summary["channel"].values.astype(str)
    idx = [int(np.flatnonzero(all_ch == c)[0]) for c in chans]
    objects = []
    for c in chans:
        sel = ds["channel"].values.astype(str) == c
        # one dot per distinct object: the same object may appear with several references
        seen = dict(zip(ds["ooc"].values[sel], ds["recorded_ooc"].values[sel]))
        objects.append(list(seen.values()))
    name = "responses.png"
    figures.save_response_panel(
        folder / name,
        chans,
        [str(summary["region"].values[i]) for i in idx],
        objects,
        summary["mean_object"].values[idx],
        summary["mean_preferred"].values[idx],
        preferred=str(summary.attrs.get("preferred_category", "preferred")),
    )
    return name


_MAP_TEXT = {
    "pixel": "pixel: the saliency, sum over colour of |input gradient|",
    "shared": "shared: the similarity decomposed over the cut layer's positions, upsampled (shared_map)",
    "guided": "guided: the saliency times the upsampled shared map",
}

_MAP_INTRO = {
    "pixel": "the summed absolute input gradients of the channel's similarity-weighted features",
    "shared": "the similarity decomposed over the positions of the cut layer, upsampled to the image",
    "guided": "the summed absolute input gradients times the upsampled shared map",
}

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
 color:#222;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ccc}
h3{font-size:1em;margin:1.4em 0 .4em}table{border-collapse:collapse;font-size:.85em}
td,th{padding:.15em .8em .15em 0;text-align:left;vertical-align:top}
figure{margin:.4em 0 1.2em}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.85em;color:#444}.meta{color:#555;font-size:.9em}nav a{margin-right:1em}
"""


def _readout_fit(ds: xr.Dataset) -> str:
    """One line on how well the explained channels' readouts predict held-out preferred images."""
    if "readout_r_cv" not in ds:
        return "not recorded"
    per_channel = dict(zip(ds["channel"].values.astype(str), ds["readout_r_cv"].values.astype(float)))
    r = np.array(list(per_channel.values()))
    if not np.isfinite(r).any():
        return "not recorded"
    folds = ds.attrs.get("readout_cv_folds_by") or "stimulus (related stimuli may be split)"
    return (
        f"held-out r on preferred images, mean over the {len(r)} explained channels "
        f"{figures.format_number(float(np.nanmean(r)), 2)} (range {figures.format_number(float(np.nanmin(r)), 2)} "
        f"to {figures.format_number(float(np.nanmax(r)), 2)}; folds by {folds}). A readout that does not predict "
        "held-out images gives maps that show what the two images share in the backbone, not the channel"
    )


def render_index(ds: xr.Dataset, files: list[str], panel: str | None) -> str:
    """An offline, self-contained HTML page: relative links only, no external assets."""
    e = html.escape
    a = ds.attrs
    chans = list(dict.fromkeys(ds["channel"].values.astype(str)))
    regions = ds["region"].values.astype(str)
    by_region: dict[str, list[str]] = {}
    for c in chans:
        r = regions[ds["channel"].values.astype(str) == c][0] or "(no region)"
        by_region.setdefault(r, []).append(c)
    opts = json.loads(a.get("options", "{}"))
    rows = [
        ("model", f"{a['arch']} cut at {a['layer']} (sha256 {a['model_sha256'][:12]}\u2026)"),
        ("weights", a.get("weights", "not recorded")),
        ("method", describe(a)),
        ("readouts", a["readouts"]),
        ("readout fit", _readout_fit(ds)),
        ("responses", a["responses"]),
        ("preferred category", a["preferred_category"]),
        ("maps shown", _MAP_TEXT[a.get("map", DEFAULT_MAP)]),
        ("colour scale", f"{a['display_scale']} (shared by both maps of a pair; never per image)"),
        ("display smoothing", f"Gaussian sigma {a['display_smooth_sigma']} px (display only)"),
        ("pairs", str(ds.sizes["pair"])),
    ] + [(k, "-" if v is None else str(v)) for k, v in opts.items()]
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>pbv-onnx explanations</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Shared-feature explanations</h1>",
        '<p class="meta">Each figure: the object, its map, the most similar preferred-category '
        f"reference and its map. Maps are {_MAP_INTRO[a.get('map', DEFAULT_MAP)]}; both maps of a pair "
        "share one colour scale.</p>",
        "<table>" + "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in rows) + "</table>",
        f'<p><a href="{NETCDF}">{NETCDF}</a> (raw input gradients and maps)</p>',
    ]
    if panel:
        out += [
            "<h2>Recorded responses</h2>",
            f'<figure><a href="{e(panel)}"><img src="{e(panel)}" alt="recorded responses"></a>'
            "<figcaption>Recorded responses to the explained objects (dots) against each channel's "
            "mean response to all objects and to all preferred-category images.</figcaption></figure>",
        ]
    out.append("<nav>" + " ".join(f'<a href="#region-{e(_slug(r))}">{e(r)}</a>' for r in by_region) + "</nav>")
    for r, cs in by_region.items():
        out.append(f'<h2 id="region-{e(_slug(r))}">Region {e(r)}</h2>')
        for c in cs:
            r = ds["readout_r_cv"].values[ds["channel"].values.astype(str) == c][0] if "readout_r_cv" in ds else None
            fit = "" if r is None else f" <small>(readout: held-out r {figures.format_number(float(r), 2)})</small>"
            out.append(f'<h3 id="channel-{e(_slug(c))}">Channel {e(c)}{fit}</h3>')
            for i in np.flatnonzero(ds["channel"].values.astype(str) == c):
                f = files[i]
                cap = (
                    f"object {e(str(ds['ooc'].values[i]))} \u2192 reference {e(str(ds['reference'].values[i]))}; "
                    f"similarity {figures.format_number(float(ds['similarity'].values[i]), 3)}; recorded "
                    f"{figures.format_number(float(ds['recorded_ooc'].values[i]))} / "
                    f"{figures.format_number(float(ds['recorded_reference'].values[i]))}, "
                    f"predicted {figures.format_number(float(ds['predicted_ooc'].values[i]))} / "
                    f"{figures.format_number(float(ds['predicted_reference'].values[i]))} (object / reference)"
                )
                out.append(
                    f'<figure><a href="{e(f)}"><img src="{e(f)}" alt="pair {i}" loading="lazy"></a>'
                    f"<figcaption>{cap}</figcaption></figure>"
                )
    out.append("</body></html>")
    return "\n".join(out)
