"""The Pillow-drawn figures: matplotlib's colour map, panels where panel_boxes says, readable ticks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pbv_onnx.report import figures


def test_the_colour_map_matches_matplotlibs_inferno():
    colormaps = pytest.importorskip("matplotlib").colormaps
    t = np.linspace(0, 1, 1001)
    ours = figures.colormap(t)
    theirs = colormaps["inferno"](t)[:, :3]
    assert np.abs(ours - theirs).max() <= 2 / 255


def test_the_overlay_is_the_grey_image_where_saliency_is_zero_and_the_colour_map_at_vmax():
    img = np.full((4, 4, 3), 200, np.uint8)
    smap = np.zeros((4, 4))
    smap[0, 0] = 5.0  # at vmax: fully the top colour
    out = figures.overlay(img, smap, vmax=5.0)
    assert np.allclose(out[1:, 1:], 0.25 + 0.6 * 200 / 255)
    assert np.allclose(out[0, 0], figures.colormap(np.array(1.0)))


def test_pair_figure_draws_each_image_inside_its_panel_box(tmp_path):
    rng = np.random.default_rng(0)
    red, blue = np.zeros((20, 20, 3), np.uint8), np.zeros((30, 30, 3), np.uint8)
    red[..., 0], blue[..., 2] = 220, 220
    maps = rng.random((2, 20, 20)), rng.random((2, 30, 30))
    dest = figures.save_pair_figure(
        tmp_path / "p.png", red, blue, maps[0][0], maps[1][0], 1.0, channel="c1", ooc="o", reference="r", similarity=0.5
    )
    png = np.asarray(Image.open(dest).convert("RGB"), np.float64)
    assert png.shape[1::-1] == figures.pair_size()
    boxes = figures.panel_boxes()
    for name, colour in (("ooc", (220, 0, 0)), ("reference", (0, 0, 220))):
        l, t, r, b = boxes[name]
        assert np.abs(png[t + 2 : b - 2, l + 2 : r - 2].mean(axis=(0, 1)) - colour).max() < 3
    l, t, r, b = boxes["colorbar"]
    bar = png[t + 1 : b - 1, (l + r) // 2]
    assert np.abs(bar[0] - 255 * figures.colormap(np.array(1.0))).max() < 6  # vmax on top
    assert np.abs(bar[-1] - 255 * figures.colormap(np.array(0.0))).max() < 6  # zero at the bottom


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (37, 5), (487, 1590)])
def test_png_bytes_decode_to_the_same_pixels_in_pillow(tmp_path, shape):
    """The figures' own PNG writer: Pillow reads back every pixel, for photo-like and random content."""
    rng = np.random.default_rng(shape[0])
    y, x = np.mgrid[: shape[0], : shape[1]]
    smooth = np.stack([(x * 7 + y * 3) % 256, (x * y) % 256, np.full(shape, 255)], axis=-1)
    for rgb in (smooth.astype(np.uint8), rng.integers(0, 256, (*shape, 3), dtype=np.uint8)):
        path = tmp_path / "x.png"
        path.write_bytes(figures.png_bytes(rgb))
        with Image.open(path) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(im), rgb)
    with pytest.raises(ValueError):
        figures.png_bytes(np.zeros((4, 4), np.uint8))


@pytest.mark.parametrize("lo, hi", [(0.0, 0.0325), (0.0, 7.0), (12.0, 131.0), (-3.5, 2.0), (0.0, 4.2e-6)])
def test_ticks_are_round_cover_the_range_and_their_labels_read_back(lo, hi):
    ticks = figures.nice_ticks(lo, hi, target=7)
    assert 3 <= len(ticks) <= 12
    assert ticks[0] >= lo - 1e-12 and ticks[-1] <= hi + 1e-12
    assert ticks[0] - lo < (hi - lo) / 2 and hi - ticks[-1] < (hi - lo) / 2
    labels, offset = figures.tick_labels(ticks)
    scale = 10.0 ** int(offset.replace("\u2212", "-")[2:]) if offset else 1.0
    back = np.array([float(s.replace("\u2212", "-")) for s in labels]) * scale
    assert np.allclose(back, ticks, rtol=1e-9, atol=1e-12 * scale)
    assert len(set(labels)) == len(labels)
