"""Demo stimuli: deterministic crops and plants, feathered pastes, part-free twins, masks, the table."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pbv_onnx.demo.sources import Source, available_sources
from pbv_onnx.demo.stimuli import (
    Counts,
    feather_alpha,
    load_mask,
    overlaps,
    paste_feathered,
    plan_stimuli,
    read_table,
    render,
    write_stimuli,
)

SMALL = Counts(
    body=10, object=6, planted=8, swap=3, decoy=3, size=64, part_px=(16, 28), swap_part_px=(14, 20), feather=3
)


def fake_photos(seed: int = 0):
    """Random-texture 'photos' of different sizes: bodies of both part families, three objects."""
    rng = np.random.default_rng(seed)
    spec = [
        ("b1", "body", "human", "face", (0.2, 0.1, 0.6, 0.5), (120, 90)),
        ("b2", "body", "animal", "animal", (0.5, 0.5, 0.9, 0.95), (80, 140)),
        ("b3", "body", "animal", "", (0.1, 0.1, 0.4, 0.4), (90, 90)),
        ("o1", "object", "object", "", None, (100, 100)),
        ("o2", "object", "object", "", None, (150, 70)),
        ("o3", "object", "object", "", None, (90, 110)),
    ]
    out = []
    for name, cat, kind, family, part, (w, h) in spec:
        src = Source(name, cat, kind, "test", part, family)
        out.append((src, Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))))
    return out


def _table(seed: int = 0, counts: Counts = SMALL):
    return plan_stimuli([(s, im.size) for s, im in fake_photos()], counts, seed=seed)


def test_plan_is_deterministic_and_counts_every_role():
    a = _table(3)
    assert a == _table(3)
    assert a != _table(4)
    roles = [s.role for s in a]
    assert roles.count("body") == SMALL.body and roles.count("object") == SMALL.object
    assert roles.count("planted") == roles.count("partfree") == SMALL.planted
    assert roles.count("swap") == roles.count("swap_partfree") == SMALL.swap
    assert roles.count("reference") == 4 * SMALL.swap and roles.count("decoy") == SMALL.decoy
    assert len({s.stimulus for s in a}) == len(a)
    assert {s.category for s in a if s.role == "reference"} == {"part"}
    assert {s.category for s in a if s.role not in ("body", "reference")} == {"object"}


def test_group_is_the_source_photo():
    for s in _table(1):
        assert s.group == s.source
        if s.role == "reference":
            assert s.source == s.part_source  # a reference shows nothing but its part's photo
        else:
            assert s.source in {"b1", "b2", "b3"} if s.category == "body" else s.source in {"o1", "o2", "o3"}


def test_twins_pairs_and_families():
    table = _table(2)
    by_id = {s.stimulus: s for s in table}
    for s in table:
        if s.role in ("planted", "partfree", "swap", "swap_partfree"):
            twin = by_id[s.pair]
            assert twin.pair == s.stimulus
            # the twin is the same crop with the same boxes
            for col in ("source", "crop_x0", "crop_y0", "crop_size", "flip", "paste_x0", "paste_y1", "paste2_x0"):
                assert getattr(twin, col) == getattr(s, col)
        if s.role in ("planted", "decoy"):
            assert s.family in ("face", "animal") and s.part_source in {"b1", "b2"}  # b3 lends no part
        if s.role in ("swap", "swap_partfree"):
            assert (s.family, s.family2) == ("face", "animal")
            assert (s.part_source, s.part2_source) == ("b1", "b2")
            assert not overlaps(s.paste_box, s.paste2_box)
        if s.role == "reference":
            swap = by_id[s.pair]
            slot = "" if s.family == swap.family else "2"
            assert s.part_source == getattr(swap, f"part{slot}_source")
            size = (s.paste_x1 - s.paste_x0, s.paste_y1 - s.paste_y0)
            box = swap.paste_box if slot == "" else swap.paste2_box
            assert size == (box[2] - box[0], box[3] - box[1])
            if s.align == "aligned":
                assert s.paste_box == box
            else:
                assert s.align == "shifted"
                assert not overlaps(s.paste_box, swap.paste_box) and not overlaps(s.paste_box, swap.paste2_box)
        if s.role == "decoy":
            assert s.decoy_source != s.source and s.decoy_source in {"o1", "o2", "o3"}
            assert not overlaps(s.paste_box, s.decoy_box)
            d = s.decoy_box
            assert (d[2] - d[0], d[3] - d[1]) == (s.paste_x1 - s.paste_x0, s.paste_y1 - s.paste_y0)


def test_crops_and_pastes_lie_inside_their_images():
    photos = fake_photos()
    sizes = {s.name: im.size for s, im in photos}
    for s in _table(1):
        if s.role != "reference":
            w, h = sizes[s.source]
            assert 0 <= s.crop_x0 and s.crop_x0 + s.crop_size <= w and 0 <= s.crop_y0 and s.crop_y0 + s.crop_size <= h
        for box in (s.paste_box, s.paste2_box, s.decoy_box):
            if box is not None:
                x0, y0, x1, y1 = box
                assert 0 <= x0 < x1 <= SMALL.size and 0 <= y0 < y1 <= SMALL.size
        if s.role == "planted":
            assert SMALL.part_px[0] <= max(s.paste_x1 - s.paste_x0, s.paste_y1 - s.paste_y0) <= SMALL.part_px[1]
        if s.role == "body":
            x0, y0, x1, y1 = s.body_box
            assert 0 <= x0 < x1 <= SMALL.size and 0 <= y0 < y1 <= SMALL.size  # the part's centre stays in view


def test_feather_alpha_profile():
    a = feather_alpha(10, 12, 3)
    # along the middle row: (d + 0.5) / 3 for d = distance to the nearest border pixel, clipped at 1
    d = np.minimum(np.arange(12), 11 - np.arange(12))
    np.testing.assert_allclose(a[5], np.clip((d + 0.5) / 3, 0, 1))
    assert a[0, 0] == pytest.approx(0.5 / 3) and a[5, 6] == 1.0
    np.testing.assert_allclose(a, a[::-1, ::-1])  # symmetric
    assert (np.diff(a[5, :6]) >= 0).all()  # rises from the border inwards
    np.testing.assert_array_equal(feather_alpha(4, 5, 0), np.ones((4, 5)))  # feather 0: a hard paste


def test_paste_feathered_blends_by_alpha():
    bg = Image.fromarray(np.full((20, 20, 3), 200, np.uint8))
    patch = Image.fromarray(np.full((8, 10, 3), 0, np.uint8))
    out = np.asarray(paste_feathered(bg, patch, (4, 6, 14, 14), 3)).astype(float)
    expected = np.full((20, 20, 3), 200.0)
    expected[6:14, 4:14] = np.round(200 * (1 - feather_alpha(8, 10, 3)))[..., None]
    np.testing.assert_array_equal(out, expected)


def test_rendered_pixels_twins_and_masks(tmp_path):
    photos = fake_photos()
    by_name = {s.name: im for s, im in photos}
    table = _table(2)
    write_stimuli(tmp_path, table, by_name, SMALL.size, grey=(120, 121, 122))
    back = read_table(tmp_path / "stimuli.csv")
    assert back == table  # the table round-trips with every new column
    img = {s.stimulus: np.asarray(Image.open(tmp_path / s.file)).astype(int) for s in back}
    assert all(v.shape == (SMALL.size, SMALL.size, 3) for v in img.values())
    for s in back:
        if s.role in ("planted", "swap"):
            twin = img[s.pair]
            inside = load_mask(tmp_path, s)
            if s.role == "swap":
                inside |= load_mask(tmp_path, s, "part2")
            # the part-free copy is identical outside the part boxes, and differs inside
            np.testing.assert_array_equal(img[s.stimulus][~inside], twin[~inside])
            assert (img[s.stimulus][inside] != twin[inside]).any()
            x0, y0, x1, y1 = s.paste_box
            expected = np.zeros_like(inside)
            expected[y0:y1, x0:x1] = True
            np.testing.assert_array_equal(load_mask(tmp_path, s), expected)
            # the part's centre pixels (alpha 1) are the resized, mirrored part box
            part = by_name[s.part_source].crop((s.part_x0, s.part_y0, s.part_x1, s.part_y1))
            part = part.resize((x1 - x0, y1 - y0), Image.BICUBIC)
            if s.part_flip:
                part = part.transpose(Image.FLIP_LEFT_RIGHT)
            a = feather_alpha(y1 - y0, x1 - x0, s.feather)
            np.testing.assert_array_equal(img[s.stimulus][y0:y1, x0:x1][a == 1], np.asarray(part)[a == 1])
        if s.role == "reference":
            outside = ~load_mask(tmp_path, s)
            assert (img[s.stimulus][outside] == np.array([120, 121, 122])).all()
        if s.role == "decoy":
            assert load_mask(tmp_path, s, "decoy").sum() == load_mask(tmp_path, s).sum()
    with pytest.raises(Exception, match="no part2 mask"):
        load_mask(tmp_path, next(s for s in back if s.role == "planted"), "part2")


def test_writing_twice_gives_identical_files(tmp_path):
    photos = fake_photos()
    by_name = {s.name: im for s, im in photos}
    table = _table(0)
    for d in ("a", "b"):
        write_stimuli(tmp_path / d, table, by_name, SMALL.size)
    for s in table:
        assert (tmp_path / "a" / s.file).read_bytes() == (tmp_path / "b" / s.file).read_bytes()
    assert (tmp_path / "a" / "stimuli.csv").read_bytes() == (tmp_path / "b" / "stimuli.csv").read_bytes()


def test_packaged_photos_give_bodies_of_both_families_and_objects_without_shared():
    srcs = available_sources(use_shared=False)
    cats = {s.category for s, _ in srcs}
    assert cats == {"body", "object"}, [s.name for s, _ in srcs]
    assert {s.family for s, _ in srcs if s.category == "body"} == {"face", "animal"}
    assert len({s.name for s, _ in srcs}) == len(srcs)  # each photo once
    for s, im in srcs:
        assert im.mode == "RGB" and min(im.size) >= 64
        if s.category == "body":
            x0, y0, x1, y1 = s.part
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1


def test_plans_without_bodies_or_a_family_are_refused():
    from pbv_onnx.base.errors import InputDataError

    objs = [(s, im.size) for s, im in fake_photos() if s.category == "object"]
    with pytest.raises(InputDataError, match="body photo"):
        plan_stimuli(objs, SMALL)
    faces_only = [(s, im.size) for s, im in fake_photos() if s.family != "animal"]
    with pytest.raises(InputDataError, match="both part families"):
        plan_stimuli(faces_only, SMALL)
    table = _table(0)
    img, masks = render(table[0], {x.name: i for x, i in fake_photos()}, SMALL.size)
    assert masks == {} and img.size == (SMALL.size, SMALL.size)
