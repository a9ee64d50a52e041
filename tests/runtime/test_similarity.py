"""The neuron-specific similarity: definition, ranking, candidate sets, degenerate inputs."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

from pbv_onnx.base.errors import InputDataError, UsageError
from pbv_onnx.method.similarity import candidate_ids, rank_candidates, similarities


def brute_force(w, o, b):
    """s_n(o, b) written out term by term, one candidate at a time."""
    out = []
    for cand in b:
        num = sum(w[i] ** 2 * o[i] * cand[i] for i in range(len(w)))
        nu = np.sqrt(sum((w[i] * o[i]) ** 2 for i in range(len(w))))
        nz = np.sqrt(sum((w[i] * cand[i]) ** 2 for i in range(len(w))))
        out.append(num / (nu * nz))
    return np.array(out)


def test_similarity_equals_a_per_pair_loop():
    rng = np.random.default_rng(0)
    w = rng.standard_normal(40)
    o = np.maximum(rng.standard_normal(40), 0)
    b = np.maximum(rng.standard_normal((7, 40)), 0)
    np.testing.assert_allclose(similarities(w, o, b), brute_force(w, o, b), rtol=1e-12)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 30), st.integers(1, 8))
def test_similarity_is_in_unit_interval_for_relu_features_and_one_for_identical(seed, d, m):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(d)
    o = np.abs(rng.standard_normal(d)) + 1e-3
    b = np.maximum(rng.standard_normal((m, d)), 0)
    s = similarities(w, o, b)
    assert np.all(s >= 0) and np.all(s <= 1 + 1e-12)
    assert similarities(w, o, o[None])[0] == pytest.approx(1.0, abs=1e-12)


def test_similarity_ignores_the_scale_of_the_readout_and_of_the_features():
    rng = np.random.default_rng(1)
    w, o, b = rng.standard_normal(20), rng.random(20), rng.random((4, 20))
    np.testing.assert_allclose(similarities(w, o, b), similarities(-3 * w, 5 * o, 0.1 * b), rtol=1e-12)


def test_zero_weighted_norm_gives_similarity_zero_and_refuses_ranking():
    w = np.array([1.0, 0.0, 2.0])
    o = np.array([0.0, 3.0, 0.0])  # active only where the readout does not look
    b = np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    assert similarities(w, o, b).tolist() == [0.0, 0.0]
    np.testing.assert_allclose(similarities(w, b[0], b), [1.0, 0.0], atol=1e-12)
    cand = xr.DataArray(b, dims=("stimulus", "feature"), coords={"stimulus": ["a", "b"]})
    with pytest.raises(InputDataError, match="no active feature"):
        rank_candidates(w, o, cand, source="obj.png")


def test_ranking_is_descending_and_ties_break_by_stimulus_id():
    rng = np.random.default_rng(2)
    w = rng.standard_normal(10)
    base = rng.random((3, 10))
    # b7 and b2 are identical (a tie), as are b10 and b1
    feats = np.stack([base[0], base[1], base[0], base[2], base[1]])
    ids = ["b7", "b10", "b2", "b5", "b1"]
    cand = xr.DataArray(feats, dims=("stimulus", "feature"), coords={"stimulus": ids})
    ranked = rank_candidates(w, rng.random(10), cand)
    s = ranked.values
    assert np.all(np.diff(s) <= 0)
    order = ranked["stimulus"].values.tolist()
    assert order.index("b2") == order.index("b7") - 1
    assert order.index("b1") == order.index("b10") - 1
    np.testing.assert_allclose(np.sort(s)[::-1], s)


def _responses():
    stim = ["s1", "s2", "s3", "s4", "s5", "s6"]
    cat = ["body", "body", "object", "body", "object", "body"]
    mean = xr.DataArray(
        [[5.0, 9.0, 100.0, 9.0, 50.0, np.nan], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]],
        dims=("channel", "stimulus"),
        coords={"channel": [0, 1], "stimulus": stim},
    )
    return mean, xr.DataArray(cat, dims="stimulus", coords={"stimulus": stim})


def test_top_k_candidates_are_the_channels_best_preferred_stimuli_by_recorded_response():
    mean, cat = _responses()
    # channel 0: s2 and s4 tie at 9 (id order), s1 next; objects and NaN responses excluded
    assert candidate_ids(mean, cat, "body", 0, "top-k", 2) == ["s2", "s4"]
    assert candidate_ids(mean, cat, "body", 0, "top-k", 20) == ["s2", "s4", "s1"]
    assert candidate_ids(mean, cat, "body", 1, "top-k", 2) == ["s6", "s4"]
    assert candidate_ids(mean, cat, "body", 1, "all") == ["s1", "s2", "s4", "s6"]


def test_empty_candidate_sets_and_bad_options_are_refused():
    mean, cat = _responses()
    with pytest.raises(InputDataError, match="empty candidate set"):
        candidate_ids(mean, cat, "face", 0, source="resp.nc")
    with pytest.raises(UsageError):
        candidate_ids(mean, cat, "body", 0, "some")
    with pytest.raises(UsageError):
        candidate_ids(mean, cat, "body", 0, "top-k", 0)
