"""Hadamard weights, baselines, integrated gradients and display helpers against references (the
rule and path registries: test_attribution_registry.py)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from tinymodel import FEATURE_SHAPE, PREPROCESSING, SIZE, tiny_forward, tiny_weights

from pbv_onnx.method.display import display_map, shared_vmax
from pbv_onnx.method.filters import gaussian_smooth
from pbv_onnx.method.paths import PATHS
from pbv_onnx.method.saliency import black_baseline, blur_baseline, hadamard_weights
from pbv_onnx.method.similarity import similarities
from pbv_onnx.runtime.engine import Engine
from pbv_onnx.runtime.images import preprocess


def test_hadamard_weights_sum_to_the_similarity_and_vanish_where_a_feature_is_not_shared():
    rng = np.random.default_rng(0)
    w = rng.standard_normal(50)
    o, b = np.maximum(rng.standard_normal((2, 50)), 0)
    v = hadamard_weights(w, o, b)
    assert v.sum() == pytest.approx(similarities(w, o, b[None])[0], rel=1e-12)
    np.testing.assert_allclose(v, w**2 * o * b / (np.linalg.norm(w * o) * np.linalg.norm(w * b)))
    assert np.all(v[(o == 0) | (b == 0)] == 0)
    assert np.all(v >= 0)
    np.testing.assert_array_equal(hadamard_weights(w, o, np.zeros(50)), np.zeros(50))


def test_black_baseline_is_the_preprocessed_black_picture_not_the_zero_tensor():
    black = preprocess(Image.new("RGB", (40, 30)), PREPROCESSING)
    np.testing.assert_allclose(black_baseline(PREPROCESSING), black, atol=1e-6)
    assert np.all(black_baseline(PREPROCESSING) != 0)


def test_gaussian_smoothing_equals_a_direct_two_dimensional_convolution():
    rng = np.random.default_rng(2)
    a = rng.random((2, 13, 17))
    sigma = 1.7
    r = int(np.ceil(4 * sigma))
    t = np.arange(-r, r + 1)
    k2 = np.exp(-0.5 * (t[:, None] ** 2 + t[None, :] ** 2) / sigma**2)
    k2 /= k2.sum()
    padded = np.pad(a, ((0, 0), (r, r), (r, r)), mode="reflect")
    ref = np.zeros_like(a)
    for i in range(13):
        for j in range(17):
            ref[:, i, j] = (padded[:, i : i + 2 * r + 1, j : j + 2 * r + 1] * k2).sum(axis=(1, 2))
    np.testing.assert_allclose(gaussian_smooth(a, sigma), ref, rtol=1e-10)
    np.testing.assert_array_equal(gaussian_smooth(a, 0), a)


def test_blur_baseline_keeps_the_mean_colour_and_removes_detail():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    x0 = blur_baseline(x, sigma=3.0)
    assert x0.shape == x.shape
    assert x0.std() < 0.3 * x.std()
    np.testing.assert_allclose(x0.mean(axis=(2, 3)), x.mean(axis=(2, 3)), atol=0.05)


def test_integrated_gradients_match_finite_differences_along_the_path(tiny_model):
    eng = Engine(tiny_model, device="cpu")
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    x0 = np.broadcast_to(black_baseline(PREPROCESSING), x.shape).astype(np.float32)
    v = rng.random((2, *FEATURE_SHAPE)).astype(np.float32)
    steps = 4
    G = PATHS["integrated"].attribute(eng.vjp, x, v.reshape(2, -1), PREPROCESSING, steps=steps, baseline="black")
    wts = tiny_weights()
    d = rng.standard_normal(x.shape)
    e = (x - x0) * d  # <G, d> = mean_k <J(x_k)^T v, (x - x0) * d>: a directional derivative
    eps = 1e-6  # float64 reference; small enough not to cross ReLU kinks
    fd = 0.0
    for k in range(1, steps + 1):
        xk = x0.astype(np.float64) + k / steps * (x - x0)
        fd += ((tiny_forward(xk + eps * e, wts) - tiny_forward(xk - eps * e, wts)) * v).sum() / (2 * eps)
    assert np.sum(G * d) == pytest.approx(fd / steps, rel=1e-4)


@pytest.mark.parametrize("shape", [(3, 5, 7), (4, 2, 3, 9, 11), (2, 1, 6, 6)])
def test_display_map_has_the_bits_of_the_plain_numpy_sum_without_its_copy(shape):
    """float32 gradients spanning ten orders of magnitude: the colour-by-colour sum is the same
    float32 bits as np.abs(G).sum(axis=-3)."""
    rng = np.random.default_rng(len(shape))
    g = (rng.standard_normal(shape) * 10.0 ** rng.integers(-8, 3, shape)).astype(np.float32)
    S = display_map(g)
    assert S.dtype == np.float32
    np.testing.assert_array_equal(S, np.abs(g).sum(axis=-3))


def test_shared_vmax_is_the_finite_percentile_and_leaves_the_maps_as_they_were():
    rng = np.random.default_rng(7)
    maps = rng.random((5, 2, 16, 16)) ** 3  # float64: an in-place partition would reorder these
    maps[0, 0, 0, :4] = np.nan
    maps[1, 1, 2, 2] = np.inf
    kept = maps.copy()
    finite = maps[np.isfinite(maps)]
    assert shared_vmax(maps) == float(np.percentile(finite, 99.5))
    np.testing.assert_array_equal(maps, kept)


def test_display_map_is_the_colour_sum_of_absolute_gradients_and_scales_are_shared():
    rng = np.random.default_rng(5)
    g = rng.standard_normal((2, 3, 8, 8))
    S = display_map(g)
    np.testing.assert_allclose(S, np.abs(g).sum(axis=1))
    # one scale for a set of maps: scaling one map down does not raise it to the other's level
    pair = np.stack([S[0], 0.1 * S[1]])
    vmax = shared_vmax(pair)
    assert pair[1].max() / vmax < 0.5 * pair[0].max() / vmax
