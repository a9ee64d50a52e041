"""Map scoring (pbv_onnx.method.scoring) on hand-made maps with known answers, and the clustered
bootstrap and McNemar's test (pbv_onnx.method.stats) on cases with exact answers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pbv_onnx.method import scoring as sc
from pbv_onnx.method.stats import binomial_two_sided, clustered_bootstrap, mcnemar_exact


def box(shape, x0, y0, x1, y1):
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


def test_block_sums_add_absolute_values_per_block_edge_blocks_smaller():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(40, 35))
    s = sc.block_sums(m, 16)
    assert s.shape == (3, 3)
    for by, bx in itertools.product(range(3), range(3)):
        assert s[by, bx] == pytest.approx(np.abs(m[16 * by : 16 * by + 16, 16 * bx : 16 * bx + 16]).sum())


def test_pointing_hits_within_15px_of_the_mask_and_misses_beyond():
    mask = box((224, 224), 100, 100, 120, 120)  # pixel centres 100.5 .. 119.5
    m = np.zeros((224, 224))
    m[96:112, 96:112] = 1.0  # peak block (6, 6), centre (104, 104): inside the mask
    assert sc.pointing_hit(m, mask)
    m = np.zeros((224, 224))
    m[128:144, 128:144] = 1.0  # centre (136, 136): 16.5 px from the corner pixel centre (119.5) per axis
    assert not sc.pointing_hit(m, mask)
    assert sc.pointing_hit(m, mask, tolerance=np.hypot(16.5, 16.5) + 1e-9)
    m = np.zeros((224, 224))
    m[128:144, 96:112] = 1.0  # centre (136, 104): 16.5 px below the mask's last row of centres
    assert not sc.pointing_hit(m, mask)
    m = np.zeros((224, 224))
    m[112:128, 96:112] = 1.0  # centre (120, 104): 0.5 px below
    assert sc.pointing_hit(m, mask)


def test_pointing_uses_block_sums_not_the_brightest_pixel():
    mask = box((64, 64), 0, 0, 16, 16)
    m = np.zeros((64, 64))
    m[48, 48] = 10.0  # one bright pixel far away (a seam)
    m[0:16, 0:16] = 0.1  # 25.6 in total inside the mask's block
    assert sc.pointing_hit(m, mask)
    assert not sc.pointing_hit(m, mask, block=1)  # the raw-pixel rule is fooled


def test_pointing_ties_and_flat_maps_never_score_by_luck():
    mask = box((64, 64), 0, 0, 16, 16)
    assert not sc.pointing_hit(np.ones((64, 64)), mask)  # every block ties: most are far away
    assert not sc.pointing_hit(np.zeros((64, 64)), mask)
    assert sc.pointing_hit(np.ones((64, 64)), np.ones((64, 64), bool))
    assert not sc.pointing_hit(np.ones((64, 64)), np.zeros((64, 64), bool))


def test_energy_in_mask_and_box_mean():
    mask = box((20, 20), 5, 5, 10, 10)
    m = np.ones((20, 20))
    m[mask] = -3.0  # the sign does not matter
    assert sc.energy_in_mask(m, mask) == pytest.approx(75 / (75 + 375))
    assert np.isnan(sc.energy_in_mask(np.zeros((20, 20)), mask))
    assert sc.box_mean(m, (5, 5, 10, 10)) == 3.0
    assert sc.box_mean(m, (0, 0, 20, 5)) == 1.0
    assert sc.box_mean(m, (18, 18, 30, 30)) == 1.0  # clipped to the map
    assert np.isnan(sc.box_mean(m, (5, 5, 5, 9)))


def brute_ranks(a):
    a = np.asarray(a, float)
    return np.array([(a < x).sum() + ((a == x).sum() + 1) / 2 for x in a])


def test_spearman_equals_pearson_of_brute_force_ranks_with_ties():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 5, 30).astype(float)  # many ties
    b = a + rng.integers(0, 3, 30)
    np.testing.assert_allclose(sc.rankdata(a), brute_ranks(a))
    ref = np.corrcoef(brute_ranks(a), brute_ranks(b))[0, 1]
    assert sc.spearman(a, b) == pytest.approx(ref, abs=1e-12)
    assert sc.spearman(np.arange(10), np.exp(np.arange(10))) == pytest.approx(1.0)
    assert sc.spearman(np.arange(10), -np.arange(10)) == pytest.approx(-1.0)
    assert np.isnan(sc.spearman(np.ones(5), np.arange(5)))


def test_block_rank_correlation_of_a_map_and_its_rescaled_copy_is_one():
    rng = np.random.default_rng(1)
    m = rng.uniform(size=(64, 64))
    assert sc.block_rank_correlation(m, 5 * m) == pytest.approx(1.0)
    assert sc.block_rank_correlation(m, -m) == pytest.approx(1.0)  # scores use |map|
    inv = 1.0 / (sc.block_sums(m) + 1)
    assert sc.block_rank_correlation(m, sc.upsample_blocks(inv, (64, 64), 16)) == pytest.approx(-1.0)


def test_edge_map_is_zero_on_flat_images_and_4h_beside_a_step():
    assert np.abs(sc.edge_map(np.full((3, 12, 12), 0.7))).max() == 0
    img = np.zeros((3, 12, 12))
    img[:, :, 6:] = 2.0  # a vertical step of height 2 in every colour
    e = sc.edge_map(img)
    np.testing.assert_allclose(e[:, 5], 3 * 4 * 2.0)  # Sobel x: (1 + 2 + 1) * 2 per colour, 3 colours
    np.testing.assert_allclose(e[:, 6], 3 * 4 * 2.0)
    assert np.abs(e[:, :5]).max() == 0 and np.abs(e[:, 7:]).max() == 0


def test_occlusion_map_of_a_region_sum_is_the_region_mass_per_block():
    rng = np.random.default_rng(2)
    img = rng.uniform(0.5, 1, (3, 32, 32)).astype(np.float32)
    region = box((32, 32), 4, 8, 20, 24)

    def resp(x):
        return (x[:, :, region]).sum(axis=(1, 2))

    occ = sc.occluded_images(img, np.zeros_like(img), 8)
    m = sc.occlusion_map(resp(img[None])[0], resp(occ), (32, 32), 8)
    for by, bx in itertools.product(range(4), range(4)):
        sl = (slice(8 * by, 8 * by + 8), slice(8 * bx, 8 * bx + 8))
        expect = img[:, sl[0], sl[1]][:, region[sl]].sum()
        assert m[sl].ravel() == pytest.approx(np.full(64, expect), rel=1e-5, abs=1e-3)  # float32 sums


def test_deletion_and_insertion_images_are_complements():
    rng = np.random.default_rng(0)
    img = rng.uniform(1, 2, (3, 32, 48)).astype(np.float32)
    fill = np.zeros_like(img)
    order = rng.permutation(6)
    d = sc.perturbed_images(img, order, [0.0, 0.5, 1.0], fill, block=16)
    i = sc.perturbed_images(img, order, [0.0, 0.5, 1.0], fill, block=16, insert=True)
    np.testing.assert_array_equal(d + i, np.repeat(img[None], 3, 0))
    np.testing.assert_array_equal(d[0], img)
    assert (i[0] == 0).all() and (d[2] == 0).all()
    gone = (d[1, 0] == 0).reshape(2, 16, 3, 16).all(axis=(1, 3)).ravel()
    assert set(np.nonzero(gone)[0]) == set(order[:3])


def test_perturbation_areas_reward_the_true_map_and_punish_its_opposite():
    rng = np.random.default_rng(1)
    img = rng.uniform(0.5, 1.0, (3, 64, 64)).astype(np.float32)
    region = box((64, 64), 0, 0, 32, 16)

    def read(x):
        r = x[:, :, region].sum(axis=(1, 2))
        return {"r": r, "twice": 2 * r}

    maps = {"true": region.astype(float), "opposite": (~region).astype(float)}
    out = sc.perturbation_areas(read, img, maps, rng, np.zeros_like(img), {"twice": 2.0}, n_random=3)
    for kind in ("deletion", "insertion"):
        assert out["true"][kind]["r"] > 0 > out["opposite"][kind]["r"]
        assert out["true"][kind]["twice"] == pytest.approx(out["true"][kind]["r"])  # scale divides
    # the true map removes the whole region within the first 2 of 16 blocks (fraction 0.125 < 0.2)
    f = np.array([0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0])
    total = read(img[None])["r"][0]
    # deletion: by 0.2 every true block is gone; the random curve is at most linear: area > what 0.2..1 gives
    assert out["true"]["deletion"]["r"] > 0.2 * total
    with pytest.raises(ValueError):
        sc.perturbation_areas(read, img, maps, rng, np.zeros_like(img), fractions=f[1:])


def test_area_between_is_the_trapezoid_integral():
    f = np.linspace(0, 1, 11)
    assert sc.area_between(f, 1 - f, np.ones_like(f)) == pytest.approx(0.5)
    assert sc.area_between(f, 1 - f, np.ones_like(f), scale=2.0) == pytest.approx(0.25)


def test_clustered_bootstrap_treats_a_group_as_one_unit():
    rng = np.random.default_rng(0)
    vals = rng.normal(size=12)
    groups = np.arange(12)
    once = clustered_bootstrap(vals, groups, np.random.default_rng(5), 500)
    # each value repeated 10 times inside its own group: the same groups, the same resamples, the same interval
    rep = clustered_bootstrap(np.repeat(vals, 10), np.repeat(groups, 10), np.random.default_rng(5), 500)
    np.testing.assert_allclose(rep, once)
    # ... while treating the 120 copies as independent would narrow it about sqrt(10)-fold
    naive = clustered_bootstrap(np.repeat(vals, 10), np.arange(120), np.random.default_rng(5), 500)
    assert (naive[2] - naive[1]) < 0.5 * (once[2] - once[1])
    assert once[1] < vals.mean() < once[2] and once[0] == pytest.approx(vals.mean())


def test_clustered_bootstrap_drops_nan_and_checks_lengths():
    m, lo, hi = clustered_bootstrap([1.0, np.nan, 1.0], ["a", "b", "c"], np.random.default_rng(0), 50)
    assert (m, lo, hi) == (1.0, 1.0, 1.0)
    assert np.isnan(clustered_bootstrap([np.nan], ["a"], np.random.default_rng(0))[0])
    with pytest.raises(ValueError):
        clustered_bootstrap([1.0, 2.0], ["a"], np.random.default_rng(0))


def test_mcnemar_counts_discordant_pairs_and_gives_the_exact_binomial_p():
    a = np.array([1, 1, 1, 1, 1, 0, 0, 1], bool)
    b = np.array([0, 0, 0, 0, 1, 0, 1, 1], bool)
    t = mcnemar_exact(a, b)
    assert (t["a_only"], t["b_only"], t["n"]) == (4, 1, 8)
    # P(X <= 1 | n=5, 1/2) = 6/32, two-sided 12/32
    assert t["p"] == pytest.approx(12 / 32)
    assert binomial_two_sided(0, 0) == 1.0
    assert binomial_two_sided(5, 10) == 1.0
    assert binomial_two_sided(0, 10) == pytest.approx(2 / 1024)
    with pytest.raises(ValueError):
        mcnemar_exact([1, 0], [1])
