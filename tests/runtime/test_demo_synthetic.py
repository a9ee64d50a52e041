"""Synthetic ground truth: feature choice by spatial selectivity, w*, r_GT and its gradient, the gate."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from pbv_onnx.demo import synthetic
from pbv_onnx.demo.stimuli import Stimulus

SIZE, GRID, F = 64, (8, 8), 40
FACE = (3, 7, 11, 15, 19)  # respond in face part cells only
ANIMAL = (5, 9, 13, 17, 21)  # respond in animal part cells only
BROAD = 25  # responds all over body photos: selective for bodies, not for parts
COMMON = 30  # responds in face part cells but also in 20% of object cells: fails the sparsity gate


def _stim(i: int, role: str, family: str = "", box=None) -> Stimulus:
    cat = "body" if role == "body" else "object"
    kw = {}
    if box is not None and role == "body":
        kw = dict(zip(("body_x0", "body_y0", "body_x1", "body_y1"), box))
    elif box is not None:
        kw = dict(zip(("paste_x0", "paste_y0", "paste_x1", "paste_y1"), box))
    return Stimulus(f"s{i}", cat, role, "human", f"photo{i % 5}", f"photo{i % 5}", f"s{i}.png", family=family, **kw)


def constructed(seed: int = 0):
    """A stimulus table and hand-made feature maps [N, F, 8, 8] with known selective features."""
    rng = np.random.default_rng(seed)
    table, feats = [], []
    for i in range(90):
        role, family = [("body", "face"), ("body", "animal"), ("object", "")][i % 3]
        x0, y0 = (int(v) for v in rng.integers(0, SIZE - 24, 2))
        box = (x0, y0, x0 + 24, y0 + 24)
        f = rng.gamma(2.0, 0.1, (F, *GRID))
        if role == "body":
            cells = synthetic.box_cells(box, SIZE, GRID)
            for k in FACE if family == "face" else ANIMAL:
                f[k][cells] += rng.uniform(2.0, 3.0)
            if family == "face":
                f[COMMON][cells] += 6.0
            f[BROAD] += 2.0
        else:
            box = None
            f[COMMON][rng.random(GRID) < 0.2] += 6.0
        table.append(_stim(i, role, family, box))
        feats.append(f)
    return table, np.stack(feats)


def test_box_cells_marks_cells_mostly_inside():
    cells = synthetic.box_cells((8, 0, 24, 12), 64, (8, 8))  # cells are 8 px wide
    expected = np.zeros((8, 8), bool)
    expected[0:2, 1:3] = True  # row 1 is half inside (8..12 of 8..16)
    np.testing.assert_array_equal(cells, expected)
    ov = synthetic.box_overlap((8, 0, 24, 12), 64, (8, 8))
    assert ov[1, 1] == 0.5 and ov[0, 1] == 1.0 and ov[2, 1] == 0.0


def test_selection_picks_each_familys_part_features_and_refuses_broad_and_common_ones(monkeypatch):
    table, feats = constructed()
    sel, active, pool = synthetic.select_features(feats, table, SIZE, pool=6)
    assert set(pool[0].tolist()) == set(FACE) | {-1}  # five selective features, no sixth eligible
    assert set(pool[1].tolist()) == set(ANIMAL) | {-1}
    assert BROAD not in pool and COMMON not in pool
    assert sel[1, BROAD] < 0 < sel[0, COMMON]  # BROAD: more active off the parts than on them
    # COMMON is part-selective by d' but active in a fifth of plain objects' cells: the sparsity gate
    assert active[0, COMMON] == pytest.approx(0.2, abs=0.05)
    monkeypatch.setattr(synthetic, "OBJECT_ACTIVE_MAX", 1.0)
    _, _, ungated = synthetic.select_features(feats, table, SIZE, pool=6)
    assert set(ungated[0].tolist()) == set(FACE) | {COMMON}


def test_channels_read_both_families_and_are_body_selective():
    table, feats = constructed()
    gt = synthetic.design_channels(feats, table, SIZE, n_channels=6, seed=1, k=3, pool_size=5)
    for n in range(6):
        fam = dict(zip(gt.feature[n].tolist(), gt.family[n].tolist()))
        assert {c for c, f in fam.items() if f == "face"} <= set(FACE)
        assert {c for c, f in fam.items() if f == "animal"} <= set(ANIMAL)
        assert list(gt.family[n]).count("face") == list(gt.family[n]).count("animal") == 3
    rate = synthetic.gt_response(gt, feats)
    body = np.array([s.role == "body" for s in table])
    assert (rate[:, body].mean(1) > 2 * rate[:, ~body].mean(1)).all()
    assert list(gt.region).count("MSB") == 3 and list(gt.region).count("ASB") == 3


def test_w_star_is_position_invariant_and_gives_the_drive():
    table, feats = constructed()
    gt = synthetic.design_channels(feats, table, SIZE, n_channels=4, seed=0, k=2, pool_size=5)
    w = gt.w_star().reshape(4, F, -1)
    assert (w == w[..., :1]).all()  # the same weight at every position
    assert ((w[..., 0] != 0).sum(1) == 4).all()  # sparse: 2 features per family
    # the drive is the plain dot product with the flattened features (the readouts' layout)
    flat = feats.reshape(len(feats), -1).astype(np.float64)
    np.testing.assert_allclose(synthetic.drive(gt, feats), gt.w_star() @ flat.T, rtol=1e-12)
    np.testing.assert_allclose(synthetic.local_maps(gt, feats).sum((2, 3)), synthetic.drive(gt, feats), rtol=1e-12)


def test_cotangent_matches_finite_differences():
    table, feats = constructed()
    gt = synthetic.design_channels(feats, table, SIZE, n_channels=3, seed=2, k=2, pool_size=5)
    phi = feats[:4].astype(np.float64)
    rng = np.random.default_rng(0)
    for channel in (0, str(gt.channel[2])):
        n = 0 if channel == 0 else 2
        g = synthetic.gt_cotangent(gt, phi, channel).astype(np.float64)
        assert g.shape == phi.shape
        for _ in range(5):
            i, c, y, x = rng.integers(len(phi)), rng.choice(gt.feature[n]), rng.integers(8), rng.integers(8)
            eps = 1e-5
            up, down = phi.copy(), phi.copy()
            up[i, c, y, x] += eps
            down[i, c, y, x] -= eps
            fd = (synthetic.gt_response(gt, up)[n, i] - synthetic.gt_response(gt, down)[n, i]) / (2 * eps)
            assert g[i, c, y, x] == pytest.approx(fd, rel=1e-4, abs=1e-6)
        # a directional derivative along a random direction, over every coordinate at once
        d = rng.standard_normal(phi.shape)
        eps = 1e-6
        fd = (synthetic.gt_response(gt, phi + eps * d)[n] - synthetic.gt_response(gt, phi - eps * d)[n]) / (2 * eps)
        np.testing.assert_allclose((g * d).sum((1, 2, 3)), fd, rtol=1e-4)


def test_cotangent_vanishes_far_below_threshold():
    table, feats = constructed()
    gt = synthetic.design_channels(feats, table, SIZE, n_channels=2, seed=0, k=2, pool_size=5)
    g = synthetic.gt_cotangent(gt, np.zeros((1, F, *GRID)) - 1e4, 0)
    assert np.isfinite(g).all() and np.abs(g).max() == 0.0


def test_cos_w_star_matches_by_channel_id():
    table, feats = constructed()
    gt = synthetic.design_channels(feats, table, SIZE, n_channels=3, seed=0, k=2, pool_size=5)
    w = gt.w_star()
    np.testing.assert_allclose(synthetic.cos_w_star(gt, 3.0 * w), 1.0)
    ds = xr.Dataset(
        {"weight": (("channel", "feature"), w[::-1].astype(np.float32))}, coords={"channel": gt.channel[::-1]}
    )
    np.testing.assert_allclose(synthetic.cos_w_star(gt, ds), 1.0, rtol=1e-6)
    other = np.zeros_like(w)
    other[:, 0] = 1.0  # feature 0 is never part of w* (not selective)
    np.testing.assert_allclose(synthetic.cos_w_star(gt, other), 0.0)
    half = w.copy().reshape(3, F, -1)
    for n in range(3):  # w* without its animal terms
        half[n, gt.feature[n][gt.family[n] == "animal"]] = 0
    half = half.reshape(3, -1)
    expected = np.linalg.norm(half, axis=1) / np.linalg.norm(w, axis=1)  # cos of a part of w* with w*
    np.testing.assert_allclose(synthetic.cos_w_star(gt, half), expected)


def test_gate_on_hand_made_responses():
    # two channels x four pairs; body SD 2 and 4
    r_with = np.array([[10.0, 10.0, 10.0, 5.0], [20.0, 20.0, 12.0, 20.0]])
    r_free = np.array([[5.0, 5.0, 7.0, 5.0], [10.0, 10.0, 10.0, 10.0]])
    r_del = np.array([[6.0, 8.0, 7.0, 5.0], [13.0, 10.0, 10.0, 13.1]])
    g = synthetic.gate(r_with, r_free, r_del, np.array([2.0, 4.0]))
    np.testing.assert_allclose(g["rise_sd"], [[2.5, 2.5, 1.5, 0.0], [2.5, 2.5, 0.5, 2.5]])
    np.testing.assert_allclose(g["lost"][:, :3], [[0.8, 0.4, 1.0], [0.7, 1.0, 1.0]])
    assert np.isnan(g["lost"][0, 3])  # no rise: nothing to lose
    np.testing.assert_array_equal(g["passed"], [[True, False, False, False], [True, True, False, False]])
    np.testing.assert_array_equal(g["pass_rise"], [[True, True, False, False], [True, True, False, True]])


def test_trials_are_non_negative_noisy_and_split_in_two_phases():
    table, feats = constructed()
    gt = synthetic.design_channels(feats, table, SIZE, n_channels=4, seed=0, k=2, pool_size=5)
    trials, phase = synthetic.simulate(gt, feats, n_repetitions=6, seed=0)
    assert trials.shape == (4, len(table), 6) and (trials >= 0).all()
    assert list(phase) == ["1", "1", "1", "2", "2", "2"]
    assert trials.std(axis=2).mean() > 0
    rate = synthetic.gt_response(gt, feats)
    np.testing.assert_allclose(trials[..., :3].mean(), rate.mean(), rtol=0.1)
    again, _ = synthetic.simulate(gt, feats, n_repetitions=6, seed=0)
    np.testing.assert_array_equal(trials, again)


def test_ground_truth_round_trips_through_netcdf(tmp_path):
    table, feats = constructed()
    gt = synthetic.design_channels(feats, table, SIZE, n_channels=4, seed=0, k=2, pool_size=5)
    gt.to_dataset({"seed": 0}).to_netcdf(tmp_path / synthetic.GROUND_TRUTH, engine="h5netcdf")
    back = synthetic.load_ground_truth(tmp_path)
    np.testing.assert_allclose(synthetic.gt_response(back, feats), synthetic.gt_response(gt, feats))
    np.testing.assert_array_equal(back.w_star(), gt.w_star())
    assert back.feature_shape == gt.feature_shape
    np.testing.assert_array_equal(back.family_features("face"), gt.family_features("face"))


def test_refusals():
    from pbv_onnx.base.errors import InputDataError, UsageError

    table, feats = constructed()
    with pytest.raises(UsageError, match="spatial"):
        synthetic.design_channels(feats.mean((2, 3)), table, SIZE)
    gt = synthetic.design_channels(feats, table, SIZE, n_channels=2, seed=0, k=2, pool_size=5)
    with pytest.raises(UsageError, match="unpooled"):
        synthetic.gt_response(gt, feats[:, :, :4])
    with pytest.raises(UsageError, match="unknown channel"):
        synthetic.gt_cotangent(gt, feats[:1], "nope")
    with pytest.raises(InputDataError, match="only 0 features"):  # features everywhere: none selective
        synthetic.design_channels(np.ones_like(feats), table, SIZE, k=2, pool_size=5)


def test_built_experiment_is_a_valid_responses_file(tmp_path, tiny_model, monkeypatch):
    from pbv_onnx.data.responses import load_responses, preferred_category, split_halves
    from pbv_onnx.demo.build import build_experiment
    from pbv_onnx.demo.stimuli import Counts, read_table

    # the tiny random CNN has no sparse part features; the pipeline, not the choice, is under test
    monkeypatch.setattr(synthetic, "OBJECT_ACTIVE_MAX", 1.0)
    out = tmp_path / "exp"
    counts = Counts(body=14, object=6, planted=6, swap=2, decoy=2)
    m = build_experiment(out, tiny_model, counts, n_channels=4, use_shared=False, device="cpu", features_per_channel=1)
    ds = load_responses(out / "responses.nc")
    assert ds["response"].dims == ("channel", "stimulus", "repetition")
    assert preferred_category(ds) == "body" and ds.attrs["units"] == "spikes/s"
    assert set(ds["region"].values.astype(str)) == set(synthetic.REGIONS)
    assert split_halves(ds) is not None
    table = read_table(out / "stimuli.csv")
    assert [s.stimulus for s in table] == ds["stimulus"].values.astype(str).tolist()
    assert ds["group"].values.astype(str).tolist() == [s.source for s in table]
    assert set(ds["category"].values.astype(str)) == {"body", "object", "part"}
    assert all((out / f).is_file() for f in ds["file"].values.astype(str))
    assert all((out / s.mask).is_file() for s in table if s.mask)
    assert all((out / s.mask2).is_file() for s in table if s.mask2)
    assert m["n_stimuli"] == 14 + 6 + 12 + 4 + 8 + 2 == len(table)
    gate = synthetic.read_gate(out)
    assert len([r for r in gate if r["role"] == "planted"]) == 6 * 4
    assert len([r for r in gate if r["role"] == "swap"]) == 2 * 2 * 4
    assert m["gate"]["pairs"] == 6 and 0 <= m["gate"]["pass"] <= 1
    # the gate's numbers are those of gt_response on the stimuli
    gt = synthetic.load_ground_truth(out)
    from pbv_onnx.runtime.engine import Engine
    from pbv_onnx.runtime.images import load_batch

    eng = Engine(tiny_model, device="cpu")
    row = gate[0]
    ids = [row["stimulus"], row["partfree"]]
    r = synthetic.gt_response(
        gt, eng.feature_maps(load_batch([out / f"stimuli/{i}.png" for i in ids], eng.info.preprocessing))
    )
    n = [str(c) for c in gt.channel].index(row["channel"])
    assert r[n, 0] == pytest.approx(row["r_with"], rel=1e-4) and r[n, 1] == pytest.approx(row["r_partfree"], rel=1e-4)
