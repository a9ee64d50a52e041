"""Per-channel evaluation of fitted readouts against recorded responses, and the Fig. 3a plot."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import numpy as np
import xarray as xr

from pbv_onnx.base.atomic import atomic_dir
from pbv_onnx.base.errors import InputDataError, MismatchError
from pbv_onnx.data.responses import mean_response, split_halves
from pbv_onnx.method.stats import METRICS, channel_metrics

# today's columns first (scripts read them by name or position), then the additions
COLUMNS = (
    *METRICS,
    "alpha",
    "reliability_preferred",
    "reliability_ooc",
    "ceiling_preferred",
    "r_cv_preferred_ceiled",
    "alpha_at_edge",
    "n_groups_preferred",
    "n_groups_ooc",
)
BLUE, ORANGE, BROWN = "tab:blue", "tab:orange", "tab:brown"
_log = logging.getLogger(__name__)


def evaluate(
    readouts: xr.Dataset,
    responses: xr.Dataset,
    readouts_path: str | os.PathLike | None = None,
    responses_path: str | os.PathLike | None = None,
) -> xr.Dataset:
    """Per-channel table: r of the stored predictions (held-out for preferred stimuli, full fit for
    the others) against the recorded mean responses, split-half reliability (all stimuli and per
    category), the noise ceiling, the r of each non-preferred category and critical r (its n the
    number of groups when the responses have a `group` coordinate)."""
    if "prediction" not in readouts.data_vars or "heldout" not in readouts.coords:
        raise InputDataError(readouts_path, "readouts file has no stored predictions ('prediction', 'heldout')")
    ch_r = readouts["channel"].values.astype(str)
    ch_d = responses["channel"].values.astype(str)
    missing = np.setdiff1d(ch_r, ch_d)
    if len(missing):
        raise MismatchError(responses_path, f"lacks channels of the readouts: {', '.join(missing[:3])}")
    st_r = readouts["stimulus"].values.astype(str)
    st_d = responses["stimulus"].values.astype(str)
    missing = np.setdiff1d(st_r, st_d)
    if len(missing):
        raise MismatchError(responses_path, f"lacks stimuli the readouts were evaluated on: {', '.join(missing[:3])}")
    pos_c = {c: i for i, c in enumerate(ch_d)}
    pos_s = {s: i for i, s in enumerate(st_d)}
    sub = responses.isel(channel=[pos_c[c] for c in ch_r], stimulus=[pos_s[s] for s in st_r])
    preferred = str(readouts.attrs.get("preferred_category"))
    heldout = readouts["heldout"].values.astype(bool)
    if not np.array_equal(sub["category"].values.astype(str) == preferred, heldout):
        raise MismatchError(responses_path, f"the {preferred!r} stimuli differ from those the readouts were fitted on")
    halves = split_halves(sub, responses_path)
    groups = sub["group"].values.astype(str) if "group" in sub.coords else None
    if groups is not None and readouts.attrs.get("cv_folds_by") != "group":
        _log.warning(
            "the responses group their stimuli, but the readouts were cross-validated without groups: "
            "r_cv_preferred may be inflated by related stimuli on both sides of a split; refit them"
        )
    pred = readouts["prediction"].assign_coords(channel=sub["channel"].values, stimulus=sub["stimulus"].values)
    table = channel_metrics(pred, heldout, mean_response(sub), halves, category=sub["category"].values, groups=groups)
    table = table.assign_coords(channel=readouts["channel"].values)
    for name in ("alpha", "alpha_at_edge"):
        if name in readouts:
            table[name] = ("channel", readouts[name].values)
    if "region" in readouts.coords:
        table = table.assign_coords(region=("channel", readouts["region"].values))
    table.attrs = {
        **{
            k: v
            for k, v in readouts.attrs.items()
            if k in ("model_sha256", "arch", "layer", "preferred_category", "folds", "seed", "cv", "cv_folds_by")
        },
        "r_critical_n": table.attrs["r_critical_n"],
    }
    return table


def write_csv(table: xr.Dataset, path: Path) -> None:
    """One row per channel: COLUMNS, then `r_<category>` for each non-preferred category."""
    cols = [c for c in COLUMNS if c in table]
    cats = [str(c) for c in table["ooc_category"].values] if "r_by_category" in table else []
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["channel"] + (["region"] if "region" in table.coords else []) + cols + [f"r_{c}" for c in cats])
        for i, ch in enumerate(table["channel"].values):
            row = [ch] + ([table["region"].values[i]] if "region" in table.coords else [])
            row += [_cell(table[c].values[i]) for c in cols]
            row += [_cell(table["r_by_category"].values[i, j]) for j in range(len(cats))]
            w.writerow(row)


def _cell(v) -> str:
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v)).lower()
    if isinstance(v, (np.integer, int)):
        return str(int(v))
    return "" if not np.isfinite(v) else f"{float(v):.6g}"


def fig3a(table: xr.Dataset, path: Path) -> None:
    """Per channel: held-out r on preferred images (blue), r on out-of-category images (orange),
    split-half reliability over all stimuli (brown dots), the noise ceiling of the held-out r (black
    bar over the blue one); dashed lines at the channel means and at critical r."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(-np.nan_to_num(table["r_cv_preferred"].values, nan=-np.inf), kind="stable")
    t = table.isel(channel=order)
    n = t.sizes["channel"]
    x = np.arange(n)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * n + 2), 3.6), dpi=150)
    width = 0.4
    pref = t["r_cv_preferred"].values
    ooc = t["r_ooc"].values
    rel = t["reliability"].values
    ax.bar(x - width / 2, np.nan_to_num(pref), width, color=BLUE, label="preferred (held-out)")
    ax.bar(x + width / 2, np.nan_to_num(ooc), width, color=ORANGE, label="out-of-category")
    if np.isfinite(rel).any():
        ax.plot(x, rel, "o", color=BROWN, ms=3.5, label="split-half reliability (all stimuli)")
    ceiling = t["ceiling_preferred"].values if "ceiling_preferred" in t else np.full(n, np.nan)
    if np.isfinite(ceiling).any():
        ax.hlines(ceiling, x - width, x, color="black", lw=1.5, label="noise ceiling (preferred)")
    for values, color in ((pref, BLUE), (ooc, ORANGE)):
        if np.isfinite(values).any():
            ax.axhline(np.nanmean(values), color=color, ls="--", lw=1)
    crit = t["r_critical"].values
    if np.isfinite(crit).any():
        n_of = " (n = groups)" if table.attrs.get("r_critical_n") == "groups" else ""
        ax.axhline(np.nanmean(crit), color="black", ls="--", lw=1, label=f"p = .05{n_of}")
    ax.axhline(0, color="0.6", lw=0.5)
    labels = [str(c) for c in t["channel"].values]
    if n <= 60:
        ax.set_xticks(x, labels, rotation=90, fontsize=6)
    ax.set_xlim(-0.7, n - 0.3)
    ax.set_ylim(min(-0.2, float(np.nanmin(np.r_[pref, ooc, 0.0])) - 0.05), 1.0)
    ax.set_xlabel("channel")
    ax.set_ylabel("Pearson r")
    title = f"{table.attrs.get('arch', '')} {table.attrs.get('layer', '')}".strip()
    if title:
        ax.set_title(title, fontsize=8)
    ax.legend(fontsize=6, frameon=False, ncol=3, loc="lower left")  # up to six entries, in two rows
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(table: xr.Dataset, out: str | os.PathLike, force: bool = False) -> Path:
    """The evaluation folder: channels.csv, channels.nc and fig3a.png, written as a whole."""
    out = Path(out)
    with atomic_dir(out, force) as tmp:
        write_csv(table, tmp / "channels.csv")
        table.to_netcdf(tmp / "channels.nc", engine="h5netcdf")
        fig3a(table, tmp / "fig3a.png")
    return out


def evaluate_files(
    readouts: str | os.PathLike, responses: str | os.PathLike, out: str | os.PathLike, force: bool = False
) -> xr.Dataset:
    """`pbv-onnx evaluate`: the per-channel table and Fig. 3a for fitted readouts."""
    from pbv_onnx.base.atomic import claim_output
    from pbv_onnx.data.readouts import load_readouts
    from pbv_onnx.data.responses import load_responses

    with claim_output(out, force):
        table = evaluate(load_readouts(readouts), load_responses(responses), readouts, responses)
        write_report(table, out, force)
    return table
