"""Readout statistics that do not overstate: grouped CV folds, effective n, reliability per
category, the noise ceiling, r per category, penalties at the edge of the grid."""

from __future__ import annotations

import csv
import logging

import numpy as np
import pytest
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pbv_onnx.base.errors import InputDataError
from pbv_onnx.data.readouts import fit_readouts
from pbv_onnx.data.responses import from_long_csv, from_npy, make_responses, validate_responses
from pbv_onnx.method.ridge import group_ids, make_folds, make_group_folds, ridge_cv
from pbv_onnx.method.stats import channel_metrics, critical_r, noise_ceiling
from pbv_onnx.runtime.modelfile import read_info
from pbv_onnx.workflows.evaluate import evaluate, write_report

# -- grouped folds ---------------------------------------------------------------------------


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(1, 9), min_size=2, max_size=40),
    k=st.integers(2, 6),
    nested=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
    shuffle=st.integers(0, 1000),
)
def test_group_folds_never_split_a_group(sizes, k, nested, seed, shuffle):
    labels = np.repeat([f"g{i}" for i in range(len(sizes))], sizes)
    labels = labels[np.random.default_rng(shuffle).permutation(len(labels))]  # groups interleaved
    n_groups = len(sizes)
    min_train = k if nested else 1
    feasible = n_groups >= k and n_groups - min_train >= 1 and k * (n_groups - min_train) >= n_groups
    if not feasible:
        with pytest.raises(ValueError, match="groups cannot fill"):
            make_group_folds(labels, k, np.random.default_rng(seed), min_train)
        return
    folds = make_group_folds(labels, k, np.random.default_rng(seed), min_train)
    assert len(folds) == k
    together = np.concatenate(folds)
    assert np.array_equal(np.sort(together), np.arange(len(labels)))  # a partition of the stimuli
    owner = {}
    for i, f in enumerate(folds):
        assert len(f) > 0 and np.array_equal(f, np.sort(f))
        for g in set(labels[f]):
            assert owner.setdefault(g, i) == i, f"group {g} split between folds {owner[g]} and {i}"
        train = np.setdiff1d(np.arange(len(labels)), f)
        assert len(set(labels[train])) >= min_train
    again = make_group_folds(labels, k, np.random.default_rng(seed), min_train)
    assert all(np.array_equal(a, b) for a, b in zip(folds, again))  # deterministic given the seed


def test_group_folds_balance_the_stimulus_counts():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(60), rng.integers(1, 6, 60))
    folds = make_group_folds(labels, 5, np.random.default_rng(1), min_train=5)
    sizes = [len(f) for f in folds]
    # contiguous runs of whole groups cut nearest the ungrouped boundaries: off by at most a group (5)
    assert max(sizes) - min(sizes) <= 2 * 5, sizes


@pytest.mark.parametrize("n, k, seed", [(10, 5, 0), (37, 4, 3), (300, 5, 0), (11, 2, 9)])
def test_one_stimulus_per_group_gives_exactly_the_ungrouped_folds(n, k, seed):
    plain = make_folds(n, k, np.random.default_rng(seed))
    for min_train in (1, k):
        grouped = make_group_folds([f"s{i}" for i in range(n)], k, np.random.default_rng(seed), min_train)
        assert all(np.array_equal(a, b) for a, b in zip(plain, grouped))


def test_group_ids_number_groups_in_order_of_first_appearance():
    assert list(group_ids(["b", "a", "b", "c", "a"])) == [0, 1, 0, 2, 1]
    assert list(group_ids([3, 1, 3])) == [0, 1, 0]


def golden_study():
    rng = np.random.default_rng(11)
    X = np.maximum(rng.standard_normal((37, 50)) + 0.3, 0)
    Y = X @ rng.standard_normal((50, 3)) + 2 * rng.standard_normal((37, 3))
    return X, Y


def test_ungrouped_fit_is_unchanged():
    # numbers written down from the fit before grouped folds existed (same data, same seed)
    X, Y = golden_study()
    fit = ridge_cv(X, Y, [1e-2, 0.1, 1.0, 10.0], folds=4, seed=5)
    np.testing.assert_array_equal(fit.alpha, [10.0, 1.0, 0.1])
    np.testing.assert_allclose(
        fit.heldout[[0, 5, 20, 36]],
        [
            [-0.42038591845435924, 6.6938574613241055, 12.03035548186386],
            [-0.5207174356017338, 8.146465254888131, 14.129530908064178],
            [-0.6344541290373803, 5.956768386419543, 5.532372177883778],
            [-0.4427138669514499, 5.864882242053115, 7.9722806616866215],
        ],
        rtol=1e-9,
    )
    np.testing.assert_allclose(
        fit.weight[:, :3],
        [
            [0.03289800097340754, 0.03335444806613173, 0.03563749555885933],
            [0.0277212097227523, -0.03444268995255589, 0.1904930000678958],
            [0.9560007497963864, 1.2405740076588911, -0.14578720019007813],
        ],
        rtol=1e-9,
    )
    np.testing.assert_allclose(fit.bias, [-0.6296014531674026, 6.197431338087593, 0.47839701168434345], rtol=1e-9)
    # one stimulus per group is the same fit, draw for draw
    same = ridge_cv(X, Y, [1e-2, 0.1, 1.0, 10.0], folds=4, seed=5, groups=[f"s{i}" for i in range(37)])
    np.testing.assert_array_equal(same.heldout, fit.heldout)
    np.testing.assert_array_equal(same.weight, fit.weight)


def near_duplicates(n_groups=24, per_group=5, d=200, channels=10, seed=0):
    """Stimuli in groups of near-copies (crops/flips as small noise on a shared feature vector);
    responses pure noise per group: nothing generalises from one group to another."""
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal((n_groups, d))
    groups = np.repeat(np.arange(n_groups), per_group)
    X = shared[groups] + 0.1 * rng.standard_normal((len(groups), d))
    Y = rng.standard_normal((n_groups, channels))[groups] + 0.05 * rng.standard_normal((len(groups), channels))
    order = rng.permutation(len(groups))  # variants of a photo are not stored next to each other
    return X[order], Y[order], groups[order]


def heldout_r(fit, Y):
    return np.array([np.corrcoef(fit.heldout[:, c], Y[:, c])[0, 1] for c in range(Y.shape[1])])


def test_shuffled_folds_overstate_and_grouped_folds_do_not():
    X, Y, groups = near_duplicates()
    alphas = [1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0]
    shuffled = heldout_r(ridge_cv(X, Y, alphas, folds=5, seed=0), Y)
    grouped = heldout_r(ridge_cv(X, Y, alphas, folds=5, seed=0, groups=groups), Y)
    # a copy of every test image sits in the shuffled training set: a clearly positive r from noise
    assert shuffled.mean() > 0.5, shuffled
    # grouped, there is nothing to learn: no positive r. (Not "near 0": a pooled held-out r under
    # the null is biased below 0, since each fold's predictions shrink toward a training mean that
    # moves against the held-out values; independent noise stimuli, ungrouped, show it too.)
    assert grouped.mean() < 0.25, grouped
    assert shuffled.mean() - grouped.mean() > 0.4


def test_ridge_refuses_fewer_groups_than_nested_cv_needs():
    X, Y, groups = near_duplicates(n_groups=9)
    with pytest.raises(ValueError, match="9 groups"):
        ridge_cv(X, Y, [1.0], folds=5, groups=groups)
    ridge_cv(X, Y, [1.0], folds=4, groups=groups)  # 9 >= 2 x 4


# -- penalties at the edge of the grid -------------------------------------------------------


def edge_study():
    """Channels whose best penalty is known: features iid N(0, 1), n = 200 > d = 100, so the mean
    eigenvalue of the centred Gram matrix is about d and a relative alpha shrinks each direction by
    about n / (n + alpha d). A noise-free channel wants no shrinkage; a pure-noise channel as much as
    possible (at alpha 0.1 its predictions carry noise variance ~0.45 sd^2, at 1 ~0.22, at 100 ~0);
    a channel with signal and noise of equal variance is best near alpha = sd^2 / (signal var / d) / d = 1."""
    rng = np.random.default_rng(4)
    n, d = 200, 100
    X = rng.standard_normal((n, d))
    clean = X @ (rng.standard_normal(d) / np.sqrt(d))
    return X, np.stack(
        [clean + 0.05 * rng.standard_normal(n), rng.standard_normal(n), clean + rng.standard_normal(n)], axis=1
    )


def test_alpha_at_edge_flags_the_smallest_and_largest_penalty():
    X, Y = edge_study()
    fit = ridge_cv(X, Y[:, :2], [0.01, 0.1, 1.0], folds=5, seed=0)
    assert list(fit.alpha) == [0.01, 1.0] and list(fit.at_edge) == [True, True]
    wide = ridge_cv(X, Y[:, 2:], [1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4], folds=5, seed=0)
    assert 1e-2 <= wide.alpha[0] <= 100.0 and not wide.at_edge[0], wide.alpha
    assert not ridge_cv(X, Y, [1.0], folds=5).at_edge.any()  # one penalty is no choice


@pytest.fixture()
def pbv_log():
    """Records of the 'pbv_onnx' logger (the CLI may have stopped its propagation to the root)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("pbv_onnx")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def as_study(X, Y, categories, groups=None, reps=None, seed=0):
    """Features (stimulus, feature) and a responses Dataset whose mean responses are Y [n, C]."""
    n, c = Y.shape
    stim = [f"s{i:03d}" for i in range(n)]
    feats = xr.DataArray(X.astype(np.float32), dims=("stimulus", "feature"), coords={"stimulus": stim})
    if reps is None:
        values = Y.T
    else:
        rng = np.random.default_rng(seed)
        values = Y.T[..., None] + rng.standard_normal((c, n, reps))
    ds = make_responses(
        values,
        [f"ch{j}" for j in range(c)],
        stim,
        categories,
        group=groups,
        file=[f"{s}.png" for s in stim],
        preferred="body",
    )
    return feats, validate_responses(ds, "r.nc")


def test_fit_warns_once_naming_the_edge(tiny_model, pbv_log):
    X, Y = edge_study()
    feats, ds = as_study(X, Y, ["body"] * len(Y))
    ro = fit_readouts(feats, ds, "body", read_info(tiny_model), alphas=[0.01, 0.1, 1.0])
    # the third channel's best penalty (about 1) is the largest of this grid too
    assert list(ro["alpha_at_edge"].values) == [True, True, True]
    warnings = [r for r in pbv_log if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].getMessage() == (
        "3 of 3 channels chose a penalty at the edge of the grid "
        "(1 at the smallest, 0.01; 2 at the largest, 1); widen alphas"
    )
    assert warnings[0].params == ("alphas",)  # the CLI shows it as --alphas
    pbv_log.clear()
    wide = [1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4]
    ro = fit_readouts(feats, ds.isel(channel=[2]), "body", read_info(tiny_model), alphas=wide)
    assert not ro["alpha_at_edge"].values.any()
    assert not [r for r in pbv_log if r.levelno == logging.WARNING]
    fit_readouts(feats, ds, "body", read_info(tiny_model), alphas=[1.0])
    assert not [r for r in pbv_log if r.levelno == logging.WARNING]


# -- reliability per category, ceiling, r per category, effective n ---------------------------


def hand_made(seed=3, channels=3, reps=6):
    """Three categories with a large difference in mean response between them and moderate
    within-category signal, in groups of 3 stimuli; predictions a noisy copy of the signal."""
    rng = np.random.default_rng(seed)
    cats = np.array(["body"] * 30 + ["object"] * 18 + ["tool"] * 12)
    offset = np.where(cats == "body", 10.0, 0.0)  # the category difference that inflates pooled reliability
    signal = rng.standard_normal((channels, len(cats))) + offset
    trials = signal[..., None] + 1.5 * rng.standard_normal((channels, len(cats), reps))
    groups = np.repeat([f"p{i}" for i in range(20)], 3)
    ds = make_responses(
        trials,
        ["a", "b", "c"],
        [f"s{i}" for i in range(len(cats))],
        cats,
        group=groups,
        repetition=range(reps),
        preferred="body",
    )
    pred = signal + 0.8 * rng.standard_normal(signal.shape)
    return ds, pred, trials, cats, groups


def sb(a, b):
    r = np.corrcoef(a, b)[0, 1]
    return 2 * r / (1 + r)


def test_reliability_per_category_ceiling_and_r_by_category_against_numpy():
    from pbv_onnx.data.responses import mean_response, split_halves

    ds, pred, trials, cats, groups = hand_made()
    pref = cats == "body"
    p = xr.DataArray(pred, dims=("channel", "stimulus"), coords={"channel": ds["channel"], "stimulus": ds["stimulus"]})
    m = channel_metrics(p, pref, mean_response(ds), split_halves(ds), category=cats, groups=groups)
    h0, h1 = trials[..., 0::2].mean(-1), trials[..., 1::2].mean(-1)
    mean = trials.mean(-1)
    for c in range(3):
        rel_pref = sb(h0[c, pref], h1[c, pref])
        assert m["reliability_preferred"].values[c] == pytest.approx(rel_pref, rel=1e-12)
        assert m["reliability_ooc"].values[c] == pytest.approx(sb(h0[c, ~pref], h1[c, ~pref]), rel=1e-12)
        assert m["reliability"].values[c] == pytest.approx(sb(h0[c], h1[c]), rel=1e-12)
        # the body/object offset inflates the pooled reliability well above the within-category one
        assert m["reliability"].values[c] > m["reliability_preferred"].values[c] + 0.1
        assert m["ceiling_preferred"].values[c] == pytest.approx(np.sqrt(rel_pref))
        r = np.corrcoef(pred[c, pref], mean[c, pref])[0, 1]
        assert m["r_cv_preferred_ceiled"].values[c] == pytest.approx(r / np.sqrt(rel_pref))
        for j, cat in enumerate(["object", "tool"]):
            sel = cats == cat
            assert m["r_by_category"].values[c, j] == pytest.approx(np.corrcoef(pred[c, sel], mean[c, sel])[0, 1])
            assert m["n_by_category"].values[c, j] == sel.sum()
            assert m["r_critical_by_category"].values[c, j] == pytest.approx(critical_r(sel.sum() // 3))
    assert list(m["ooc_category"].values) == ["object", "tool"]
    # effective n: 10 groups of 3 among the bodies, 10 among the rest
    assert list(m["n_groups_preferred"].values) == [10] * 3 and list(m["n_groups_ooc"].values) == [10] * 3
    np.testing.assert_allclose(m["r_critical"].values, critical_r(10))
    np.testing.assert_allclose(m["r_critical_ooc"].values, critical_r(10))
    assert m.attrs["r_critical_n"] == "groups"
    plain = channel_metrics(p, pref, mean_response(ds), split_halves(ds))
    np.testing.assert_allclose(plain["r_critical"].values, critical_r(30))
    assert plain.attrs["r_critical_n"] == "stimuli" and "n_groups_preferred" not in plain


def test_effective_n_counts_only_groups_with_a_response():
    from pbv_onnx.data.responses import mean_response

    ds, pred, trials, cats, groups = hand_made(reps=2)
    pred = pred.copy()
    pred[1, :6] = np.nan  # channel b: the first two body groups have no prediction
    p = xr.DataArray(pred, dims=("channel", "stimulus"), coords={"channel": ds["channel"], "stimulus": ds["stimulus"]})
    m = channel_metrics(p, cats == "body", mean_response(ds), None, groups=groups)
    assert list(m["n_groups_preferred"].values) == [10, 8, 10]
    assert list(m["n_preferred"].values) == [30, 24, 30]
    assert m["r_critical"].values[1] == pytest.approx(critical_r(8))


def test_noise_ceiling_is_nan_without_positive_reliability():
    np.testing.assert_array_equal(np.isnan(noise_ceiling([0.81, 0.0, -0.2, np.nan])), [False, True, True, True])
    assert noise_ceiling([0.81])[0] == pytest.approx(0.9)


def test_without_repetitions_the_ceiling_and_ceiled_r_are_nan():
    from pbv_onnx.data.responses import mean_response

    ds, pred, trials, cats, groups = hand_made()
    single = make_responses(trials[..., 0], ["a", "b", "c"], ds["stimulus"].values, cats)
    p = xr.DataArray(pred, dims=("channel", "stimulus"), coords={"channel": ds["channel"], "stimulus": ds["stimulus"]})
    m = channel_metrics(p, cats == "body", mean_response(single), None, category=cats)
    for name in (
        "reliability",
        "reliability_preferred",
        "reliability_ooc",
        "ceiling_preferred",
        "r_cv_preferred_ceiled",
    ):
        assert np.isnan(m[name].values).all(), name
    assert np.isfinite(m["r_by_category"].values).all()


# -- fit and evaluate with groups ------------------------------------------------------------


@pytest.fixture(scope="module")
def grouped_fit(tiny_model):
    rng = np.random.default_rng(5)
    n_groups, per = 16, 3
    d = 40
    shared = rng.standard_normal((n_groups, d))
    groups = np.repeat([f"photo{i}" for i in range(n_groups)], per)
    X = np.maximum(shared[np.repeat(np.arange(n_groups), per)] + 0.3 * rng.standard_normal((n_groups * per, d)), 0)
    Y = X @ rng.standard_normal((d, 2)) * 0.3 + 5
    cats = ["body"] * 30 + ["object"] * 12 + ["tool"] * 6
    feats, ds = as_study(X, Y, cats, groups=groups, reps=4)
    info = read_info(tiny_model)
    return feats, ds, info, fit_readouts(feats, ds, "body", info, folds=5, seed=0)


def test_fit_with_groups_reports_the_effective_n_and_new_statistics(grouped_fit):
    feats, ds, info, ro = grouped_fit
    assert ro.attrs["cv_folds_by"] == "group" and ro.attrs["r_critical_n"] == "groups"
    assert list(ro["n_groups_preferred"].values) == [10, 10]
    np.testing.assert_allclose(ro["r_critical"].values, critical_r(10))
    assert list(ro["group"].values[:4]) == ["photo0"] * 3 + ["photo1"]
    assert list(ro["ooc_category"].values) == ["object", "tool"]
    mean = ds["response"].values.mean(-1)
    pred = ro["prediction"].values.astype(np.float64)
    sel = ro["category"].values == "tool"
    assert ro["r_by_category"].values[0, 1] == pytest.approx(np.corrcoef(pred[0, sel], mean[0, sel])[0, 1], rel=1e-5)
    assert ro["alpha_at_edge"].dtype == bool
    for name in ("reliability_preferred", "ceiling_preferred", "r_cv_preferred_ceiled"):
        assert np.isfinite(ro[name].values).all(), name
    # the same study without groups: stimulus folds and n
    plain = fit_readouts(feats, ds.drop_vars("group"), "body", info, folds=5, seed=0)
    assert plain.attrs["cv_folds_by"] == "stimulus" and plain.attrs["r_critical_n"] == "stimuli"
    np.testing.assert_allclose(plain["r_critical"].values, critical_r(30))
    assert "group" not in plain.coords and "n_groups_preferred" not in plain


def test_fit_refuses_fewer_groups_than_folds_need(grouped_fit):
    feats, ds, info, _ = grouped_fit
    few = ds.assign_coords(group=("stimulus", np.repeat(["a", "b", "c", "d", "e", "f"], 8)))
    with pytest.raises(InputDataError, match=r"r.nc: only 4 groups among the 30 preferred.*folds=3 needs at least 6"):
        fit_readouts(feats, few, "body", info, folds=3, responses_path="r.nc")


def test_evaluate_shows_ceiling_groups_and_categories(grouped_fit, tmp_path, pbv_log):
    feats, ds, info, ro = grouped_fit
    table = evaluate(ro, ds)
    for name in (
        "r_cv_preferred",
        "reliability_preferred",
        "ceiling_preferred",
        "r_cv_preferred_ceiled",
        "r_critical",
        "r_by_category",
        "alpha_at_edge",
    ):
        np.testing.assert_allclose(table[name].values, ro[name].values, rtol=1e-5, err_msg=name)
    assert table.attrs["r_critical_n"] == "groups"
    out = write_report(table, tmp_path / "eval")
    with open(out / "channels.csv") as f:
        rows = list(csv.DictReader(f))
    head = list(rows[0])
    assert head[:9] == [
        "channel",
        "r_cv_preferred",
        "r_ooc",
        "reliability",
        "r_critical",
        "r_critical_ooc",
        "n_preferred",
        "n_ooc",
        "alpha",
    ]  # today's columns stay first, in order
    assert head[-2:] == ["r_object", "r_tool"]
    assert float(rows[1]["ceiling_preferred"]) == pytest.approx(float(table["ceiling_preferred"].values[1]), rel=1e-5)
    assert rows[0]["alpha_at_edge"] in ("true", "false") and rows[0]["n_groups_preferred"] == "10"
    back = xr.open_dataset(out / "channels.nc", engine="h5netcdf").load()
    np.testing.assert_allclose(back["ceiling_preferred"].values, table["ceiling_preferred"].values)
    np.testing.assert_allclose(back["r_by_category"].values, table["r_by_category"].values)
    assert (out / "fig3a.png").stat().st_size > 1000
    # readouts fitted without groups, evaluated on grouped responses: warned that r_cv may be inflated
    pbv_log.clear()
    plain = fit_readouts(feats, ds.drop_vars("group"), "body", info, folds=5, seed=0)
    evaluate(plain, ds)
    assert any("cross-validated without groups" in r.getMessage() for r in pbv_log)


# -- the group coordinate in responses files ---------------------------------------------------


def test_long_csv_and_npy_stimulus_table_carry_the_group(tmp_path):
    path = tmp_path / "long.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["channel", "stimulus", "category", "file", "group", "response"])
        for ch in ("a", "b"):
            for s, g in (("s1", "p1"), ("s2", "p1"), ("s3", "p2")):
                w.writerow([ch, s, "body", f"{s}.png", g, 1.0])
    ds = from_long_csv(path)
    assert list(ds["group"].values) == ["p1", "p1", "p2"] and ds["group"].dims == ("stimulus",)
    np.save(tmp_path / "r.npy", np.ones((2, 3)))
    with open(tmp_path / "stim.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["stimulus", "category", "file", "group"])
        w.writerows([["s1", "body", "1.png", "7"], ["s2", "body", "2.png", "7"], ["s3", "object", "3.png", "8"]])
    ds = from_npy(tmp_path / "r.npy", tmp_path / "stim.csv")
    assert list(ds["group"].values) == [7, 7, 8]
    no_group = from_npy(tmp_path / "r.npy", tmp_path / "stim.csv").drop_vars("group")
    assert "group" not in no_group.coords


def test_a_group_must_be_given_for_every_stimulus_and_lie_on_the_stimulus_dim(tmp_path):
    path = tmp_path / "long.csv"
    path.write_text("channel,stimulus,category,file,group,response\na,s1,body,1.png,p1,1\na,s2,body,2.png,,1\n")
    with pytest.raises(InputDataError, match="long.csv: empty 'group' for some stimuli"):
        from_long_csv(path)
    path.write_text("channel,stimulus,category,file,group,response\na,s1,body,1.png,p1,1\nb,s1,body,1.png,p2,1\n")
    with pytest.raises(InputDataError, match="stimulus 's1' has two different group values"):
        from_long_csv(path)
    ds = make_responses(np.ones((2, 3)), ["a", "b"], ["s1", "s2", "s3"], ["body"] * 3)
    ds = ds.assign_coords(group=("channel", ["x", "y"]))
    with pytest.raises(InputDataError, match="'group' must lie on the stimulus dimension"):
        validate_responses(ds, "r.nc")
