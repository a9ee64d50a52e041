"""Ridge readouts: dual form against a primal solve, recovery of simulated channels, I/O, predict."""

from __future__ import annotations

import numpy as np
import pytest
from simresponses import noise_ceiling, simulate
from tinymodel import build_tiny_model

from pbv_onnx.base.errors import InputDataError, MismatchError, UsageError
from pbv_onnx.data.features import load_or_compute_features
from pbv_onnx.data.readouts import fit_readouts, load_readouts, parse_alphas, predict, write_readouts
from pbv_onnx.data.responses import image_paths
from pbv_onnx.method.ridge import make_folds, ridge_cv
from pbv_onnx.runtime.engine import Engine
from pbv_onnx.runtime.modelfile import read_info


def primal_ridge(X: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, float]:
    """Textbook ridge with an unpenalised intercept: solve (Xc^T Xc + lam I) w = Xc^T yc."""
    mu = X.mean(0)
    Xc = X - mu
    w = np.linalg.solve(Xc.T @ Xc + lam * np.eye(X.shape[1]), Xc.T @ (y - y.mean()))
    return w, y.mean() - mu @ w


def test_dual_solution_equals_primal_ridge_including_intercept():
    rng = np.random.default_rng(3)
    n, d, c = 40, 60, 3
    X = np.maximum(rng.standard_normal((n, d)) + 0.5, 0)  # ReLU-like, non-zero mean
    Y = X @ rng.standard_normal((d, c)) + rng.standard_normal((n, c)) + 4.0
    fit = ridge_cv(X, Y, [0.3], folds=4, seed=7)
    Xc = X - X.mean(0)
    lam = 0.3 * np.trace(Xc @ Xc.T) / n  # relative alpha times the mean eigenvalue
    np.testing.assert_allclose(fit.penalty, lam, rtol=1e-10)
    for j in range(c):
        w, b = primal_ridge(X, Y[:, j], lam)
        np.testing.assert_allclose(fit.weight[j], w, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(fit.bias[j], b, rtol=1e-8)
    # with one penalty, the held-out predictions are plain k-fold CV: refit each fold in primal form
    folds = make_folds(n, 4, np.random.default_rng(7))
    for test in folds:
        train = np.setdiff1d(np.arange(n), test)
        Xt = X[train] - X[train].mean(0)
        lam_t = 0.3 * np.trace(Xt @ Xt.T) / len(train)
        for j in range(c):
            w, b = primal_ridge(X[train], Y[train, j], lam_t)
            np.testing.assert_allclose(fit.heldout[test, j], X[test] @ w + b, rtol=1e-8, atol=1e-8)


def test_penalty_is_chosen_per_channel_by_cross_validation():
    rng = np.random.default_rng(4)
    n, d = 60, 200
    X = rng.standard_normal((n, d))
    w = rng.standard_normal(d) / np.sqrt(d)
    clean = X @ w
    # channel 0: almost noise-free (wants a small penalty); channel 1: pure noise (wants a large one)
    Y = np.stack([clean + 0.01 * rng.standard_normal(n), rng.standard_normal(n)], axis=1)
    fit = ridge_cv(X, Y, [1e-4, 1e-2, 1.0, 100.0, 1e4], folds=5, seed=0)
    assert fit.alpha[0] < fit.alpha[1]


@pytest.fixture(scope="module")
def fitted(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sim")
    sim = simulate(folder, tiny_model, n_body=300, n_object=100, channels=4, reps=4, noise=1.0, seed=0)
    engine = Engine(tiny_model, device="cpu", batch_size=64)
    feats = load_or_compute_features(engine, image_paths(sim.ds, sim.path), sim.ds["stimulus"].values, progress=False)
    ro = fit_readouts(feats, sim.ds, "body", engine.info, folds=5, seed=0)
    return sim, feats, ro, engine


def test_readouts_recover_simulated_channels_up_to_the_noise_ceiling(fitted):
    sim, feats, ro, _ = fitted
    ceiling = noise_ceiling(sim.signal[:, sim.is_pref], sim.noise_sd, reps=4)
    r = ro["r_cv_preferred"].values
    se = (1 - ceiling**2) / np.sqrt(sim.is_pref.sum())
    assert np.all(r > 0.9 * ceiling), (r, ceiling)
    assert np.all(r < ceiling + 3 * se), (r, ceiling)
    # the fitted map reproduces the noise-free responses, bodies and objects alike
    pred = predict(ro, feats).values
    for c in range(len(r)):
        assert np.corrcoef(pred[c, sim.is_pref], sim.signal[c, sim.is_pref])[0, 1] > 0.95
    assert np.all(ro["r_cv_preferred"] > ro["r_critical"])


def test_out_of_category_r_is_high_when_one_map_drives_both_categories(fitted, tiny_model):
    sim, feats, ro, engine = fitted
    r_ooc = ro["r_ooc"].values
    assert np.all(r_ooc > 0.5) and r_ooc.mean() > 0.6, r_ooc
    assert np.all(r_ooc > ro["r_critical_ooc"].values)
    # control: objects driven by something else (responses shuffled among objects) -> r_ooc near 0
    ds = sim.ds.copy(deep=True)
    obj = np.flatnonzero(~sim.is_pref)
    shuffled = ds["response"].values.copy()
    shuffled[:, obj] = shuffled[:, np.random.default_rng(1).permutation(obj)]
    ds["response"] = (ds["response"].dims, shuffled)
    control = fit_readouts(feats, ds, "body", engine.info, folds=5, seed=0)
    assert np.all(np.abs(control["r_ooc"].values) < 0.35), control["r_ooc"].values
    np.testing.assert_allclose(control["r_cv_preferred"], ro["r_cv_preferred"])


def test_predict_is_features_times_weights_plus_bias_and_matches_stored_predictions(fitted):
    sim, feats, ro, _ = fitted
    pred = predict(ro, feats)
    assert pred.dims == ("channel", "stimulus")
    expected = feats.values.astype(np.float64) @ ro["weight"].values.T.astype(np.float64) + ro["bias"].values
    np.testing.assert_allclose(pred.values, expected.T, rtol=1e-6)
    ooc = ~ro["heldout"].values
    np.testing.assert_allclose(pred.values[:, ooc], ro["prediction"].values[:, ooc], rtol=1e-5, atol=1e-4)


def test_readouts_round_trip_and_refuse_another_model(fitted, tmp_path):
    sim, feats, ro, engine = fitted
    path = write_readouts(ro, tmp_path / "readouts.nc")
    back = load_readouts(path, engine.info)
    np.testing.assert_array_equal(back["weight"].values, ro["weight"].values)
    assert back.attrs["preferred_category"] == "body"
    assert list(back.attrs["feature_shape"]) == [6, 8, 8]
    other = read_info(build_tiny_model(tmp_path / "other.onnx", seed=1))
    with pytest.raises(MismatchError, match="readouts.nc.*another model"):
        load_readouts(path, other)
    small = ro.isel(feature=slice(0, 10))
    small.attrs = {**ro.attrs, "feature_shape": [10]}
    write_readouts(small, tmp_path / "small.nc")
    with pytest.raises(MismatchError, match="10 features"):
        load_readouts(tmp_path / "small.nc", engine.info)
    bad = tmp_path / "bad.nc"
    bad.write_bytes(b"garbage")
    with pytest.raises(InputDataError, match="bad.nc"):
        load_readouts(bad)


def test_predict_refuses_features_of_another_size(fitted):
    _, feats, ro, _ = fitted
    with pytest.raises(MismatchError):
        predict(ro, feats.isel(feature=slice(0, 5)))


def test_too_few_preferred_images_and_bad_options_are_refused(fitted):
    sim, feats, _, engine = fitted
    few = sim.ds.isel(stimulus=np.r_[0:7, 300:310])
    with pytest.raises(InputDataError, match="only 7 preferred"):
        fit_readouts(feats, few, "body", engine.info, folds=5, responses_path="r.nc")
    with pytest.raises(UsageError):
        fit_readouts(feats, sim.ds, "body", engine.info, alphas=[-1.0])
    with pytest.raises(UsageError):
        parse_alphas(["1e-3,abc"])
    assert parse_alphas(["1e-2, 1e-3", "0.1"]) == [1e-3, 1e-2, 0.1]


def test_missing_mean_response_on_a_preferred_stimulus_is_refused(fitted):
    sim, feats, _, engine = fitted
    ds = sim.ds.copy(deep=True)
    ds["response"][1, 2, :] = np.nan
    with pytest.raises(InputDataError, match="ch1.*s0002"):
        fit_readouts(feats, ds, "body", engine.info, responses_path="r.nc")


def test_features_must_cover_every_stimulus(fitted):
    sim, feats, _, engine = fitted
    with pytest.raises(MismatchError, match="s0399"):
        fit_readouts(feats.isel(stimulus=slice(0, -1)), sim.ds, "body", engine.info)


def test_readouts_of_a_study_without_groups_are_unchanged(fitted):
    # written down from this study's fit before grouped folds and the new statistics existed
    _, _, ro, _ = fitted
    np.testing.assert_allclose(
        ro["r_cv_preferred"].values,
        [0.8362296987485827, 0.8539970879631389, 0.8660152420252147, 0.8464137243078157],
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        ro["r_ooc"].values, [0.7133396379272504, 0.7805409565503778, 0.706123747838263, 0.656893401885428], rtol=1e-6
    )
    np.testing.assert_allclose(
        ro["reliability"].values,
        [0.7597837732735141, 0.7957096779296021, 0.7972809909323456, 0.7714433365346686],
        rtol=1e-9,
    )
    np.testing.assert_array_equal(ro["alpha"].values, [1.0] * 4)
    np.testing.assert_allclose(ro["r_critical"].values, 0.11326701786977905, rtol=1e-9)
    assert ro.attrs["cv_folds_by"] == "stimulus" and ro.attrs["r_critical_n"] == "stimuli"


def test_one_stimulus_per_group_fits_exactly_as_no_groups(fitted):
    sim, feats, ro, engine = fitted
    ds = sim.ds.assign_coords(group=("stimulus", [f"g{s}" for s in sim.ds["stimulus"].values]))
    grouped = fit_readouts(feats, ds, "body", engine.info, folds=5, seed=0)
    for name in ("weight", "bias", "alpha", "prediction", "r_cv_preferred", "r_ooc", "r_critical"):
        np.testing.assert_array_equal(grouped[name].values, ro[name].values, err_msg=name)
    assert grouped.attrs["cv_folds_by"] == "group"
