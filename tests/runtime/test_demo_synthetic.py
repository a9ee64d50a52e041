"""Synthetic ground-truth channels: feature choice, body selectivity, trials, the built experiment."""

from __future__ import annotations

import numpy as np
import pytest

from pbv_onnx.demo import synthetic
from pbv_onnx.demo.stimuli import Stimulus

SIZE, GRID, F = 64, (8, 8), 40
# The features that respond to body parts, by construction: as many as the widest feature pool.
PART_FEATURES = tuple(range(1, 40, 40 // 16))[:16]


def constructed(seed: int = 0):
    """A stimulus table and ground-truth feature maps [N, F, 8, 8] in which only PART_FEATURES
    respond, and only inside body-part boxes (of bodies) and pasted parts (of planted objects)."""
    rng = np.random.default_rng(seed)
    table, feats = [], []
    for i in range(60):
        kind = ("human", "object", "planted")[i % 3]
        x0, y0 = (int(v) for v in rng.integers(0, SIZE - 16, 2))
        x1, y1 = x0 + 16, y0 + 16
        f = rng.gamma(2.0, 0.3, (F, *GRID))
        if kind == "human":
            s = Stimulus(
                f"s{i}",
                "body",
                kind,
                "photo",
                f"s{i}.png",
                0,
                0,
                SIZE,
                0,
                body_x0=x0,
                body_y0=y0,
                body_x1=x1,
                body_y1=y1,
            )
        elif kind == "planted":
            s = Stimulus(
                f"s{i}",
                "object",
                kind,
                "photo",
                f"s{i}.png",
                0,
                0,
                SIZE,
                0,
                "photo",
                0,
                0,
                1,
                1,
                0,
                x0,
                y0,
                x1,
                y1,
                f"m{i}.png",
            )
        else:
            s = Stimulus(f"s{i}", "object", kind, "photo", f"s{i}.png", 0, 0, SIZE, 0)
        if kind != "object":
            cells = synthetic.box_cells((x0, y0, x1, y1), SIZE, GRID)
            for k in PART_FEATURES:
                f[k][cells] += rng.uniform(2.0, 3.0)
        table.append(s)
        feats.append(f)
    return table, np.stack(feats)


def test_box_cells_marks_cells_mostly_inside():
    cells = synthetic.box_cells((8, 0, 24, 12), 64, (8, 8))  # cells are 8 px wide
    expected = np.zeros((8, 8), bool)
    expected[0:2, 1:3] = True  # row 1 is half inside (8..12 of 8..16)
    np.testing.assert_array_equal(cells, expected)


def test_channels_read_body_part_features_and_are_body_selective():
    table, feats = constructed()
    gt = synthetic.design_channels(feats, table, SIZE, n_channels=6, seed=1)
    assert set(np.argsort(-gt.scores)[: len(PART_FEATURES)].tolist()) == set(PART_FEATURES)
    assert set(gt.feature[gt.feature >= 0].tolist()) <= set(PART_FEATURES)
    rate = synthetic.mean_rate(gt, feats)
    body = np.array([s.category == "body" for s in table])
    plain = np.array([s.kind == "object" for s in table])
    planted = np.array([s.kind == "planted" for s in table])
    assert (rate[:, body].mean(1) > 2 * rate[:, plain].mean(1)).all()
    # pasted parts drive the channels above plain objects
    assert (
        rate[:, planted].mean(1) > rate[:, plain].mean(1) + 0.5 * (rate[:, body].mean(1) - rate[:, plain].mean(1))
    ).all()
    assert list(gt.region).count("MSB") == 3 and list(gt.region).count("ASB") == 3


def test_local_maps_peak_on_the_pasted_part():
    table, feats = constructed()
    gt = synthetic.design_channels(feats, table, SIZE, n_channels=4, seed=0)
    maps = synthetic.local_maps(gt, feats)
    for i, s in enumerate(table):
        if s.planted:
            cells = synthetic.box_cells(s.paste_box, SIZE, GRID)
            for n in range(4):
                assert cells.ravel()[maps[n, i].argmax()]


def test_trials_are_non_negative_noisy_and_split_in_two_phases():
    table, feats = constructed()
    gt = synthetic.design_channels(feats, table, SIZE, n_channels=4, seed=0)
    trials, phase = synthetic.simulate(gt, feats, n_repetitions=6, seed=0)
    assert trials.shape == (4, len(table), 6) and (trials >= 0).all()
    assert list(phase) == ["1", "1", "1", "2", "2", "2"]
    assert trials.std(axis=2).mean() > 0
    rate = synthetic.mean_rate(gt, feats)
    # phase-1 trials scatter around the noiseless rate
    np.testing.assert_allclose(trials[..., :3].mean(), rate.mean(), rtol=0.1)
    again, _ = synthetic.simulate(gt, feats, n_repetitions=6, seed=0)
    np.testing.assert_array_equal(trials, again)


def test_ground_truth_round_trips_through_netcdf(tmp_path):
    table, feats = constructed()
    gt = synthetic.design_channels(feats, table, SIZE, n_channels=4, seed=0)
    path = tmp_path / "gt.nc"
    gt.to_dataset({"seed": 0}).to_netcdf(path, engine="h5netcdf")
    import xarray as xr

    with xr.open_dataset(path, engine="h5netcdf") as ds:
        back = synthetic.GroundTruth.from_dataset(ds.load())
    np.testing.assert_allclose(synthetic.drive(back, feats), synthetic.drive(gt, feats))


def test_pooled_model_is_refused():
    from pbv_onnx.base.errors import UsageError

    table, feats = constructed()
    with pytest.raises(UsageError, match="spatial"):
        synthetic.design_channels(feats.mean((2, 3)), table, SIZE)


def test_built_experiment_is_a_valid_responses_file(tmp_path, tiny_model):
    from pbv_onnx.data.responses import load_responses, preferred_category, split_halves
    from pbv_onnx.demo.build import build_experiment
    from pbv_onnx.demo.stimuli import Counts, read_table

    out = tmp_path / "exp"
    m = build_experiment(
        out, tiny_model, Counts(body=12, object=6, planted=4), n_channels=4, use_shared=False, device="cpu"
    )
    ds = load_responses(out / "responses.nc")
    assert ds["response"].dims == ("channel", "stimulus", "repetition")
    assert preferred_category(ds) == "body" and ds.attrs["units"] == "spikes/s"
    assert set(ds["region"].values.astype(str)) == set(synthetic.REGIONS)
    assert split_halves(ds) is not None
    table = read_table(out / "stimuli.csv")
    assert [s.stimulus for s in table] == ds["stimulus"].values.astype(str).tolist()
    assert all((out / f).is_file() for f in ds["file"].values.astype(str))
    assert all((out / s.mask).is_file() for s in table if s.planted)
    assert m["n_stimuli"] == 22 and (out / "ground_truth.nc").is_file()
