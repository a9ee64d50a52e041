"""The validation study's building blocks on the tiny model and hand-made data with known answers
(pbv_onnx/demo/validation); the metrics themselves are tested in test_scoring.py."""

from __future__ import annotations

import numpy as np
import pytest
from tinymodel import FEATURE_SHAPE, SIZE, tiny_forward, tiny_weights

from pbv_onnx.demo.validation import experiments as xp
from pbv_onnx.demo.validation import maps as mp
from pbv_onnx.demo.validation.lab import box_mask, mask_box, similarity
from pbv_onnx.runtime.engine import Engine


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine(tiny_model, batch_size=4)


def weighted_cosine(w, a, b):
    u, z = w * a, w * b
    return float((u * z).sum() / (np.linalg.norm(u) * np.linalg.norm(z)))


def test_pooled_cotangent_gives_the_pooled_models_gradient(engine):
    """d/dx of v . mean_p phi(x), by central differences of the float64 numpy forward pass, equals the
    unpooled engine's VJP with v_c / P at every position."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, SIZE, SIZE))
    v = rng.standard_normal(FEATURE_SHAPE[0])
    wts = tiny_weights(0)

    def f(xx):
        return float((tiny_forward(xx, wts).mean(axis=(2, 3))[0] * v).sum())

    cot = mp.pooled_cotangent(v, FEATURE_SHAPE[1:])
    g = engine.vjp(x.astype(np.float32), cot[None].astype(np.float32))[1][0].astype(np.float64)
    for _ in range(3):
        d = rng.standard_normal(x.shape)
        eps = 1e-4
        fd = (f(x + eps * d) - f(x - eps * d)) / (2 * eps)
        assert (g * d[0]).sum() == pytest.approx(fd, rel=2e-3, abs=1e-5)


@pytest.mark.parametrize("pooled", [False, True])
def test_parallel_maps_shared_sum_is_the_similarity_and_guided_is_the_product(engine, pooled):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    a = engine.feature_maps(x).astype(np.float64)
    w = rng.standard_normal(FEATURE_SHAPE[:1] if pooled else FEATURE_SHAPE)
    out = mp.parallel_maps(engine.vjp, w[None], x[:1], a[:1], a[1:], pooled, x_b=x[1:])
    if pooled:
        ref = weighted_cosine(w, a[0].mean(axis=(1, 2)), a[1].mean(axis=(1, 2)))
    else:
        ref = weighted_cosine(w, a[0], a[1])
    assert out["similarity"][0] == pytest.approx(ref, rel=1e-9)
    assert out["shared"][0].sum() == pytest.approx(ref, rel=1e-9)  # 16/8 is an integer: the sum is kept
    np.testing.assert_allclose(out["guided"], out["pixel"] * out["shared"])
    np.testing.assert_allclose(out["ref_guided"], out["ref_pixel"] * out["ref_shared"])
    # the pixel map is S of the VJP with the Hadamard cotangent (pooled: spread over positions)
    cot = mp.cotangent("parallel", w, a[0], a[1], pooled)
    g = engine.vjp(x[:1], cot[None].astype(np.float32))[1]
    np.testing.assert_allclose(out["pixel"][0], np.abs(g[0]).sum(0), rtol=1e-5)


def test_baseline_maps_ignore_the_reference_and_follow_their_rules(engine):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    a = engine.feature_maps(x).astype(np.float64)
    w = rng.standard_normal(FEATURE_SHAPE)
    out = mp.baseline_maps(engine.vjp, np.stack([w, w]), x, a)
    g = engine.vjp(x, np.stack([w, w]).astype(np.float32))[1]
    np.testing.assert_allclose(out["gradient"], np.abs(g).sum(1), rtol=1e-5)
    gx = engine.vjp(x, (w * a).astype(np.float32))[1]
    np.testing.assert_allclose(out["grad-x-act"], np.abs(gx).sum(1), rtol=1e-5)
    with pytest.raises(ValueError):
        mp.cotangent("nonsense", w, a[0], None, False)


def test_similarity_against_one_or_paired_references():
    rng = np.random.default_rng(3)
    w = rng.standard_normal(FEATURE_SHAPE)
    a = np.abs(rng.standard_normal((3, *FEATURE_SHAPE)))
    s = similarity(w, a, a[0])
    assert s[0] == pytest.approx(1.0)
    assert s[1] == pytest.approx(weighted_cosine(w, a[1], a[0]))
    np.testing.assert_allclose(similarity(w, a, a[::-1]), [weighted_cosine(w, a[i], a[2 - i]) for i in range(3)])


def test_cell_overlap_is_the_share_of_each_cells_pixels_in_the_mask():
    mask = box_mask((0, 0, 48, 32), (224, 224))  # cells are 32 px: one and a half cells wide, one high
    ov = xp.cell_overlap(mask, (7, 7))
    assert ov[0, 0] == 1.0 and ov[0, 1] == 0.5 and ov[1, 0] == 0.0 and ov.sum() == pytest.approx(1.5)
    assert mask_box(mask) == (0, 0, 48, 32)


def test_ridge_at_equals_the_primal_centred_ridge():
    rng = np.random.default_rng(4)
    X = rng.standard_normal((12, 30))
    y = rng.standard_normal(12)
    lam = 0.7
    Xc = X - X.mean(0)
    primal = np.linalg.solve(Xc.T @ Xc + lam * np.eye(30), Xc.T @ (y - y.mean()))
    np.testing.assert_allclose(xp.ridge_at(X, y, lam), primal, rtol=1e-8, atol=1e-10)
    # several channels with their own penalties share one Gram matrix
    Y = np.stack([y, 2 * y + 1], axis=1)
    both = xp.ridge_at(X, Y, [lam, 3.0])
    np.testing.assert_allclose(both[:, 0], primal, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(both[:, 1], xp.ridge_at(X, 2 * y, 3.0), rtol=1e-8, atol=1e-10)


def test_gate_table_keeps_one_channel_per_object_the_one_its_part_raises_most(tmp_path):
    (tmp_path / "gate.csv").write_text(
        "stimulus,partfree,channel,role,part,rise_sd,pass_rise,pass_delete,pass\n"
        "p1,f1,A,planted,,3.0,True,True,True\n"
        "p1,f1,B,planted,,5.0,True,True,True\n"
        "p1,f1,C,planted,,9.0,True,False,False\n"
        "p2,f2,A,planted,,1.0,False,True,False\n"
        "s1,sf1,A,swap,1,4.0,True,True,True\n"
        "s1,sf1,A,swap,2,4.0,True,False,False\n"
        "s1,sf1,B,swap,1,4.0,True,True,True\n"
        "s1,sf1,B,swap,2,4.0,True,True,True\n"
    )
    pairs, swap, counts = xp.gate_table(tmp_path)
    assert pairs == [("p1", "f1", "B")]
    assert swap == {("s1", "A"): False, ("s1", "B"): True}
    assert counts["planted_objects"] == 2 and counts["planted_objects_pass"] == 1
    assert counts["planted_rows"] == 4 and counts["planted_rows_pass"] == 2
    assert counts["pass_rise"] == 3 and counts["pass_delete"] == 3


def test_interval_is_clustered_and_counts_finite_values():
    rng = np.random.default_rng(0)
    d = xp.interval([1.0, 1.0, 0.0, np.nan], ["a", "a", "b", "c"], rng, 200)
    assert d["n"] == 3 and d["mean"] == pytest.approx(2 / 3)
    assert d["lo"] == 0.0 and d["hi"] == 1.0  # groups a (mean 1) and b (mean 0) resampled whole


def test_the_whole_study_runs_on_a_tiny_experiment(tmp_path, tiny_model, monkeypatch):
    """The study end to end on the tiny model: a demo experiment built by the demo's own code (its feature
    choice replaced by a fixed one, since the tiny model's random features select nothing), readouts fitted
    by `pbv-onnx fit`, every planted pair let through the gate, a second tiny model as the 'randomised'
    cascade. Checks the report's structure and the numbers' ranges, not their values."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from tinymodel import build_tiny_model

    from pbv_onnx.demo import synthetic
    from pbv_onnx.demo.build import build_experiment
    from pbv_onnx.demo.stimuli import Counts
    from pbv_onnx.demo.validate import run_validation, write_results

    F = FEATURE_SHAPE[0]

    def fixed_features(feats, table, size, pool_size):
        pool = np.full((2, pool_size), -1)
        pool[0, :3], pool[1, :3] = [0, 1, 2], [3, 4, 5]
        return np.zeros((2, F)), np.zeros((2, F)), pool

    monkeypatch.setattr(synthetic, "select_features", fixed_features)
    exp = tmp_path / "experiment"
    counts = Counts(body=20, object=4, planted=6, swap=2, decoy=2)
    build_experiment(exp, tiny_model, counts, n_channels=2, use_shared=False, features_per_channel=1, device="cpu")
    gate = (exp / "gate.csv").read_text().splitlines()
    head = gate[0].split(",")
    rows = [dict(zip(head, line.split(","))) for line in gate[1:]]
    with (exp / "gate.csv").open("w") as f:  # let every pair through: the study's code is under test here
        f.write(",".join(head) + "\n")
        for r in rows:
            r.update({"pass": "1", "rise_sd": r.get("rise_sd") or "1"})
            f.write(",".join(r[h] for h in head) + "\n")
    readouts = tmp_path / "readouts.nc"
    pbv = Path(sys.executable).parent / "pbv-onnx"
    subprocess.run(
        [str(pbv), "-q", "fit", "--model", str(tiny_model), "--responses", str(exp / "responses.nc"),
         "--out", str(readouts), "--folds", "2"],
        check=True,
    )  # fmt: skip
    cascade = tmp_path / "cascade"
    cascade.mkdir()
    build_tiny_model(cascade / "cascade-1.onnx", seed=7)
    (cascade / "cascade.json").write_text(json.dumps({"levels": [{"model": "cascade-1.onnx", "randomised": ["x"]}]}))
    st = xp.Settings(bootstrap=50, refits=1, ig_pairs=2, ig_more_pairs=1, top_k=5)
    res = run_validation(tiny_model, readouts, exp, cascade, st, device="cpu")
    text = write_results(res, tmp_path / "v.md", tmp_path / "v.json")
    assert json.loads((tmp_path / "v.json").read_text())["planted"]["n_pairs"] == res["planted"]["n_pairs"] > 0
    assert text.startswith("# pbv-onnx demo: validation study")
    for t in res["targets"]:
        assert t["pass"] in (True, False, None) and t["measured"]
    rows = res["planted"]["rows"]
    assert {"ground truth (pixel)", "pixel (fitted)", "shared (w*)", "pixel, random readout"} <= set(rows)
    for row in rows.values():
        assert 0 <= row["pointing"]["mean"] <= 1 and row["pointing"]["lo"] <= row["pointing"]["hi"]
    assert res["swap"]["n_objects"] == 2 and "fitted, pooled, shifted" in res["swap"]["rows"]
    for cond in res["swap"]["rows"].values():
        assert cond["gradient"]["swap"]["mean"] == 0.0  # the reference-blind maps cannot swap
    assert res["sanity"]["cascade"] == ["randomised: x"]
    assert res["decoy"]["n"] == 2
    assert 0 <= res["faithfulness"]["completeness"]["within_5pct"] <= 1
    assert "## Reference swap" in text and "## Sanity checks" in text
