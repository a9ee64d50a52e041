"""Demo stimuli: deterministic crops and plants, masks inside the image and matching the paste."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pbv_onnx.demo.sources import Source, available_sources
from pbv_onnx.demo.stimuli import Counts, load_mask, plan_stimuli, read_table, render, write_stimuli

SMALL = Counts(body=10, object=6, planted=8, size=64, part_px=(16, 28))


def fake_photos(seed: int = 0):
    """Random-texture 'photos' of different sizes: two bodies with part boxes, two objects."""
    rng = np.random.default_rng(seed)
    spec = [
        ("b1", "body", (0.2, 0.1, 0.6, 0.5), (120, 90)),
        ("b2", "body", (0.5, 0.5, 0.9, 0.95), (80, 140)),
        ("o1", "object", None, (100, 100)),
        ("o2", "object", None, (150, 70)),
    ]
    out = []
    for name, cat, part, (w, h) in spec:
        src = Source(name, cat, "human" if cat == "body" else "object", "test", part)
        out.append((src, Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))))
    return out


def test_plan_is_deterministic_and_seeded():
    sizes = [(s, im.size) for s, im in fake_photos()]
    a = plan_stimuli(sizes, SMALL, seed=3)
    assert a == plan_stimuli(sizes, SMALL, seed=3)
    assert a != plan_stimuli(sizes, SMALL, seed=4)
    kinds = [s.kind for s in a]
    assert kinds.count("planted") == SMALL.planted
    assert sum(s.category == "body" for s in a) == SMALL.body
    assert sum(s.kind == "object" for s in a) == SMALL.object
    assert len({s.stimulus for s in a}) == len(a)


def test_crops_and_pastes_lie_inside_their_images():
    photos = fake_photos()
    sizes = {s.name: im.size for s, im in photos}
    for s in plan_stimuli([(s, im.size) for s, im in photos], SMALL, seed=1):
        w, h = sizes[s.source]
        assert 0 <= s.crop_x0 and s.crop_x0 + s.crop_size <= w and 0 <= s.crop_y0 and s.crop_y0 + s.crop_size <= h
        if s.planted:
            x0, y0, x1, y1 = s.paste_box
            assert 0 <= x0 < x1 <= SMALL.size and 0 <= y0 < y1 <= SMALL.size
            assert SMALL.part_px[0] <= max(x1 - x0, y1 - y0) <= SMALL.part_px[1]
            assert s.part_source in {"b1", "b2"}
        if s.category == "body":
            x0, y0, x1, y1 = s.body_box
            assert 0 <= x0 <= x1 <= SMALL.size and 0 <= y0 <= y1 <= SMALL.size
            assert x1 > x0 and y1 > y0  # crops keep the part's centre in view


def test_planted_pixels_are_the_resized_part_and_mask_is_the_paste(tmp_path):
    photos = fake_photos()
    by_name = {s.name: im for s, im in photos}
    table = plan_stimuli([(s, im.size) for s, im in photos], SMALL, seed=2)
    write_stimuli(tmp_path, table, by_name, SMALL.size)
    back = read_table(tmp_path / "stimuli.csv")
    assert back == table
    for s in back:
        img = np.asarray(Image.open(tmp_path / s.file))
        assert img.shape == (SMALL.size, SMALL.size, 3)
        if not s.planted:
            continue
        mask = load_mask(tmp_path, s)
        x0, y0, x1, y1 = s.paste_box
        expected = np.zeros_like(mask)
        expected[y0:y1, x0:x1] = True
        np.testing.assert_array_equal(mask, expected)
        part = by_name[s.part_source].crop((s.part_x0, s.part_y0, s.part_x1, s.part_y1))
        part = part.resize((x1 - x0, y1 - y0), Image.BICUBIC)
        if s.part_flip:
            part = part.transpose(Image.FLIP_LEFT_RIGHT)
        np.testing.assert_array_equal(img[y0:y1, x0:x1], np.asarray(part))


def test_writing_twice_gives_identical_files(tmp_path):
    photos = fake_photos()
    by_name = {s.name: im for s, im in photos}
    table = plan_stimuli([(s, im.size) for s, im in photos], SMALL, seed=0)
    for d in ("a", "b"):
        write_stimuli(tmp_path / d, table, by_name, SMALL.size)
    for s in table:
        assert (tmp_path / "a" / s.file).read_bytes() == (tmp_path / "b" / s.file).read_bytes()
    assert (tmp_path / "a" / "stimuli.csv").read_bytes() == (tmp_path / "b" / "stimuli.csv").read_bytes()


def test_packaged_photos_give_bodies_and_objects_without_shared():
    srcs = available_sources(use_shared=False)
    cats = {s.category for s, _ in srcs}
    assert cats == {"body", "object"}, [s.name for s, _ in srcs]
    for s, im in srcs:
        assert im.mode == "RGB" and min(im.size) >= 64
        if s.category == "body":
            x0, y0, x1, y1 = s.part
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1


def test_render_without_body_photos_is_refused():
    from pbv_onnx.base.errors import InputDataError

    objs = [(s, im.size) for s, im in fake_photos() if s.category == "object"]
    with pytest.raises(InputDataError, match="body photo"):
        plan_stimuli(objs, SMALL)
    s, im = fake_photos()[0]
    table = plan_stimuli([(x, i.size) for x, i in fake_photos()], SMALL)
    img, mask = render(table[0], {x.name: i for x, i in fake_photos()}, SMALL.size)
    assert mask is None and img.size == (SMALL.size, SMALL.size)
