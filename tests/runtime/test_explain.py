"""Explanations end to end on the tiny model: maps = J^T v, symmetry, batching, scales, outputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from PIL import Image, ImageDraw
from tinymodel import build_tiny_model, tiny_forward, tiny_weights

from pbv_onnx.data.features import model_attrs
from pbv_onnx.data.readouts import write_readouts
from pbv_onnx.data.responses import make_responses
from pbv_onnx.method.similarity import similarities
from pbv_onnx.report import figures
from pbv_onnx.report import html as report
from pbv_onnx.runtime.engine import Engine
from pbv_onnx.runtime.images import load_batch
from pbv_onnx.workflows import explain as ex

CHANNELS = [3, 7, 11]
REGIONS = ["MSB", "MSB", "ASB"]


def _draw(kind: str, i: int, rng) -> Image.Image:
    """Bodies: limb-like bars and a blob; objects: boxes and rings. Varied, textured, 24x24."""
    im = Image.new("RGB", (24, 24), tuple(int(v) for v in rng.integers(0, 255, 3)))
    d = ImageDraw.Draw(im)
    for _ in range(3 + i % 3):
        c = tuple(int(v) for v in rng.integers(0, 255, 3))
        x, y = (int(v) for v in rng.integers(0, 18, 2))
        if kind == "body":
            d.line((x, y, x + int(rng.integers(4, 10)), y + int(rng.integers(-6, 6))), fill=c, width=3)
            d.ellipse((x, y, x + 6, y + 8), fill=c)
        else:
            d.rectangle((x, y, x + int(rng.integers(3, 8)), y + int(rng.integers(3, 8))), outline=c, width=2)
    return im


def make_study_files(
    folder: Path,
    model: Path,
    seed: int = 0,
    n_body: int = 8,
    n_obj: int = 6,
    weight: np.ndarray | None = None,
    nan_body_channel: int | None = None,
) -> dict:
    """Images, a responses file and a readouts file for the tiny model, in the documented formats."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(exist_ok=True)
    stim, cats, files = [], [], []
    for kind, n in (("body", n_body), ("object", n_obj)):
        for i in range(n):
            name = f"{kind[0]}{i:02d}"
            _draw(kind, i, rng).save(folder / "img" / f"{name}.png")
            stim.append(name)
            cats.append(kind)
            files.append(f"img/{name}.png")
    eng = Engine(model, device="cpu")
    phi = eng.features(load_batch([folder / f for f in files], eng.info.preprocessing)).reshape(len(stim), -1)
    D = phi.shape[1]
    if weight is None:
        weight = rng.standard_normal((len(CHANNELS), D)).astype(np.float32) * 0.05
    bias = rng.standard_normal(len(CHANNELS)).astype(np.float32)
    pred = phi.astype(np.float64) @ weight.T.astype(np.float64) + bias
    resp = pred.T[:, :, None] + rng.standard_normal((len(CHANNELS), len(stim), 2)) * 0.1
    resp[:, len(stim) - n_obj :] += 0.5  # distinct object and body means for the response panel
    if nan_body_channel is not None:
        resp[nan_body_channel, :n_body] = np.nan
    ds = make_responses(resp, CHANNELS, stim, cats, file=files, region=REGIONS, preferred="body", units="spikes/s")
    ds.to_netcdf(folder / "responses.nc", engine="h5netcdf")
    ro = xr.Dataset(
        {"weight": (("channel", "feature"), weight), "bias": ("channel", bias)},
        coords={"channel": CHANNELS, "region": ("channel", REGIONS)},
        attrs={**model_attrs(eng.info), "preferred_category": "body"},
    )
    write_readouts(ro, folder / "readouts.nc", force=True)
    return {
        "model": model,
        "readouts": folder / "readouts.nc",
        "responses": folder / "responses.nc",
        "images": folder / "img",
        "folder": folder,
        "weight": weight,
        "bias": bias,
        "stimuli": stim,
    }


@pytest.fixture(scope="module")
def study_files(tiny_model, tmp_path_factory) -> dict:
    return make_study_files(tmp_path_factory.mktemp("study"), tiny_model)


def open_(files, batch_size=16, **kw) -> ex.Study:
    return ex.open_study(
        files["model"], files["readouts"], files["responses"], batch_size=batch_size, device="cpu", progress=False, **kw
    )


def _phi64(paths) -> np.ndarray:
    x = load_batch(paths, _spec())
    return tiny_forward(x, tiny_weights()).reshape(len(paths), -1)


def _spec():
    from tinymodel import PREPROCESSING

    return PREPROCESSING


def test_maps_are_the_vjp_of_the_hadamard_weights_for_both_images(study_files):
    study = open_(study_files)
    pairs = ex.build_pairs(study, channels=["7"], images=["o01", "o04"])
    ds = ex.explain(study, pairs)
    w = study_files["weight"][1].astype(np.float64)
    wts = tiny_weights()
    rng = np.random.default_rng(0)
    for i in range(ds.sizes["pair"]):
        paths = [Path(ds["ooc_file"].values[i]), Path(ds["reference_file"].values[i])]
        x = load_batch(paths, _spec()).astype(np.float64)
        phi = tiny_forward(x, wts).reshape(2, -1)
        u, z = w * phi[0], w * phi[1]
        v = w**2 * phi[0] * phi[1] / (np.linalg.norm(u) * np.linalg.norm(z))
        assert v.sum() == pytest.approx(float(ds["similarity"].values[i]), rel=1e-5)
        for r, role in enumerate(ex.ROLES):
            G = ds["input_grad"].sel(role=role).values[i]
            d = rng.standard_normal(G.shape)
            eps = 1e-6
            plus = tiny_forward(x[r : r + 1] + eps * d, wts).reshape(-1) @ v
            minus = tiny_forward(x[r : r + 1] - eps * d, wts).reshape(-1) @ v
            assert np.sum(G * d) == pytest.approx((plus - minus) / (2 * eps), rel=1e-3)
            np.testing.assert_allclose(ds["saliency"].sel(role=role).values[i], np.abs(G).sum(axis=0), rtol=1e-6)


def test_the_chosen_reference_is_the_best_top_k_candidate_by_brute_force(study_files):
    study = open_(study_files)
    pairs = ex.build_pairs(study, channels=["11"], top_k_objects=2, k=4)
    w = study_files["weight"][2].astype(np.float64)
    mean = study.mean.sel(channel=11)
    bodies = [s for s in study_files["stimuli"] if s.startswith("b")]
    top4 = sorted(bodies, key=lambda s: (-float(mean.sel(stimulus=s)), s))[:4]
    objects = [s for s in study_files["stimuli"] if s.startswith("o")]
    top_obj = sorted(objects, key=lambda s: (-float(mean.sel(stimulus=s)), s))[:2]
    assert [p.ooc.label for p in pairs] == top_obj
    for p in pairs:
        phi = _phi64([study.paths[s] for s in [p.ooc.label] + top4])
        s = similarities(w, phi[0], phi[1:])
        assert p.reference.label == top4[int(np.argmax(s))]
        assert p.similarity == pytest.approx(float(s.max()), rel=1e-5)


def test_study_lookups_read_what_xarray_selection_reads(study_files):
    """The numpy tables behind the per-pair lookups give, for every channel and stimulus, what
    selecting in the opened datasets gives."""
    study = open_(study_files)
    ro, mean = study.readouts, study.mean
    for c in study.channels:
        np.testing.assert_array_equal(study.weight(c), ro["weight"].sel(channel=c).values.astype(np.float64))
        assert study.bias(c) == float(ro["bias"].sel(channel=c))
        assert study.region(c) == str(study.responses["region"].sel(channel=c).values)
        for sid in study_files["stimuli"]:
            ref = study.image(sid)
            assert study.recorded(c, ref) == float(mean.sel(channel=c, stimulus=sid))
            phi = study.phi([ref])[0].astype(np.float64)
            want = float(ro["weight"].sel(channel=c).values.astype(np.float64) @ phi + float(ro["bias"].sel(channel=c)))
            assert study.predicted(c, ref) == want
    w = study.weight(study.channels[0])
    w[:] = 0.0  # the caller's own array: the readouts are not changed
    assert study.weight(study.channels[0]).any()


def test_explain_decodes_each_image_once_and_gives_the_uncached_result(study_files, monkeypatch):
    """Pairs over several engine calls share their objects and references: each file is decoded
    once per study, and the maps are those of a study that decodes every time."""
    study = open_(study_files, batch_size=2)  # 4 pairs per call at most: several calls
    pairs = ex.build_pairs(study, images=["o00", "o01", "o02"])
    decoded = []
    real = ex.load_batch
    monkeypatch.setattr(ex, "load_batch", lambda paths, spec: decoded.extend(paths) or real(paths, spec))
    ds = ex.explain(study, pairs)
    used = {f for p in pairs for f in (p.ooc.path, p.reference.path)}
    assert sorted(map(str, decoded)) == sorted(map(str, used))
    fresh = open_(study_files, batch_size=2, image_cache_bytes=0)  # keeps nothing between calls
    decoded.clear()
    again = ex.explain(fresh, pairs)
    per_call = sum(
        len({f for j in idx for f in (pairs[j].ooc.path, pairs[j].reference.path)})
        for idx in ex._chunks(pairs, np.arange(len(pairs)), 2)
    )
    assert len(decoded) == per_call > len(used)  # once per engine call that shows it
    np.testing.assert_array_equal(ds["input_grad"].values, again["input_grad"].values)


def test_the_image_cache_keeps_the_most_recent_images_within_its_bound(study_files, monkeypatch):
    paths = [study_files["images"] / f"b0{i}.png" for i in range(4)]
    one = open_(study_files).images(paths[:1]).nbytes
    study = open_(study_files, image_cache_bytes=2 * one)
    decoded = []
    real = ex.load_batch
    monkeypatch.setattr(ex, "load_batch", lambda p, spec: decoded.extend(p) or real(p, spec))
    first = study.images(paths[:3])  # b02 pushes b00 out
    study.images([paths[1]])  # kept: no decode, now the most recent
    study.images([paths[3]])  # pushes b02 out, not b01
    study.images([paths[1], paths[0], paths[2]])  # b01 kept; b00, b02 decoded again
    assert [p.name for p in decoded] == ["b00.png", "b01.png", "b02.png", "b03.png", "b00.png", "b02.png"]
    assert sum(x.nbytes for x in study._images.values()) <= 2 * one
    np.testing.assert_array_equal(first, load_batch(paths[:3], study.engine.info.preprocessing))


def test_swapping_the_two_images_swaps_the_two_maps(study_files):
    study = open_(study_files)
    ab = ex.explain(study, ex.build_pairs(study, channels=["3"], images=["o02"], reference="b05"))
    ba = ex.explain(study, ex.build_pairs(study, channels=["3"], images=["b05"], reference="o02"))
    np.testing.assert_allclose(
        ab["input_grad"].sel(role="ooc").values, ba["input_grad"].sel(role="reference").values, rtol=1e-6, atol=1e-9
    )
    np.testing.assert_allclose(
        ab["input_grad"].sel(role="reference").values, ba["input_grad"].sel(role="ooc").values, rtol=1e-6, atol=1e-9
    )
    assert float(ab["similarity"][0]) == pytest.approx(float(ba["similarity"][0]), rel=1e-12)


def test_explain_runs_numpy_blas_on_one_thread_and_gives_the_threads_back(study_files, monkeypatch):
    # After a multithreaded BLAS call OpenBLAS's workers spin idle, taking the cores from the next
    # onnxruntime call: explain keeps BLAS (its own small products, to_dataset's too) on one thread.
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads() -> list[int]:
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    if not blas_threads():
        pytest.skip("numpy has no BLAS that threadpoolctl can see")
    seen = []
    for name in ("backprop_pairs", "to_dataset"):
        real = getattr(ex, name)
        monkeypatch.setattr(ex, name, lambda *a, _real=real, **k: (seen.append(blas_threads()), _real(*a, **k))[1])
    study = open_(study_files)
    with threadpool_limits(2, user_api="blas"):
        ex.explain(study, ex.build_pairs(study, channels=["3", "7"], images=["o02"]))
        assert blas_threads() == [2] * len(blas_threads())  # given back
    assert len(seen) == 2 and all(n == 1 for threads in seen for n in threads)


@pytest.mark.parametrize("method", ["parallel", "grad-x-act", "integrated"])
def test_batch_size_does_not_change_results(study_files, method):
    results = []
    for bs in (1, 3, 16):
        study = open_(study_files, batch_size=bs)
        pairs = ex.build_pairs(study, top_k_objects=2)
        results.append(ex.explain(study, pairs, method=method, steps=3))
    for other in results[1:]:
        np.testing.assert_allclose(other["input_grad"].values, results[0]["input_grad"].values, rtol=1e-5, atol=1e-8)
        assert other["reference"].values.tolist() == results[0]["reference"].values.tolist()


def test_baseline_methods_backpropagate_each_image_on_its_own(study_files):
    study = open_(study_files)
    pairs = ex.build_pairs(study, channels=["3"], images=["o00"])
    grad = ex.explain(study, pairs, method="gradient")
    # the readout gradient of the object does not depend on which reference was chosen
    forced = ex.explain(
        study, ex.build_pairs(study, channels=["3"], images=["o00"], reference="b00"), method="gradient"
    )
    np.testing.assert_allclose(
        grad["input_grad"].sel(role="ooc").values, forced["input_grad"].sel(role="ooc").values, rtol=1e-6
    )
    par = ex.explain(study, pairs, method="parallel")
    assert not np.allclose(grad["input_grad"].values, par["input_grad"].values)


def _high_and_low_pairs(study, channel="7"):
    """The most and least similar (object, body) pairs available for a channel."""
    w = study.weight(study.channel(channel))
    objs = [study.image(s) for s in study.stimuli if s.startswith("o")]
    bodies = [study.image(s) for s in study.stimuli if s.startswith("b")]
    phi_o, phi_b = study.phi(objs), study.phi(bodies)
    S = np.stack([similarities(w, p, phi_b) for p in phi_o])
    hi = np.unravel_index(np.argmax(S), S.shape)
    lo = np.unravel_index(np.argmin(S), S.shape)
    return (objs[hi[0]].label, bodies[hi[1]].label), (objs[lo[0]].label, bodies[lo[1]].label), S.max(), S.min()


@pytest.fixture(scope="module")
def contrast_files(tiny_model, tmp_path_factory) -> dict:
    """A readout that weighs only a few features, so pairs span a wide range of similarity."""
    folder = tmp_path_factory.mktemp("contrast")
    D = int(np.prod(Engine(tiny_model, device="cpu").info.feature_shape))
    rng = np.random.default_rng(5)
    w = np.zeros((len(CHANNELS), D), np.float32)
    for c in range(len(CHANNELS)):
        idx = rng.choice(D, 12, replace=False)
        w[c, idx] = rng.standard_normal(12)
    return make_study_files(folder, tiny_model, seed=3, weight=w)


def test_a_weakly_similar_pair_shows_a_weaker_map_in_data_and_in_the_figure(contrast_files, tmp_path):
    study = open_(contrast_files)
    (ho, hb), (lo, lb), s_hi, s_lo = _high_and_low_pairs(study)
    assert s_hi > 0.8 and s_lo < 0.4, (s_hi, s_lo)  # the fixture provides contrasting pairs
    pairs = ex.build_pairs(study, channels=["7"], images=[ho], reference=hb) + ex.build_pairs(
        study, channels=["7"], images=[lo], reference=lb
    )
    ds = ex.explain(study, pairs)
    sal = ds["saliency"].values  # (pair, role, y, x)
    assert sal[1].mean() < 0.5 * sal[0].mean()
    out = tmp_path / "out"
    report.write_output(ds, out, ex.channel_summary(study), smooth=0.0, scale="run")
    boxes = figures.panel_boxes()
    res = xr.open_dataset(out / report.NETCDF, engine="h5netcdf")
    heat = []
    for i in range(2):
        png = np.asarray(Image.open(out / report.pair_filename(res, i)).convert("HSV"), np.float64)
        # the overlays are grey images plus colour: mean saturation measures the drawn saliency
        heat.append(
            [png[b[1] : b[3], b[0] : b[2], 1].mean() for b in (boxes["ooc_overlay"], boxes["reference_overlay"])]
        )
    heat = np.array(heat)
    assert np.all(heat[1] < 0.6 * heat[0]), heat
    res.close()


def test_both_maps_of_a_pair_share_one_scale_and_none_is_normalised_per_image(contrast_files):
    study = open_(contrast_files)
    (ho, hb), (lo, lb), _, _ = _high_and_low_pairs(study)
    ds = ex.explain(study, ex.build_pairs(study, channels=["7"], images=[ho, lo], reference=hb))
    maps = report.display_maps(ds, smooth=1.0)
    for scale in report.SCALES:
        vmax = report.colour_scales(ds, maps, scale)
        assert vmax.shape == (2,)
        if scale != "pair":
            assert vmax[0] == vmax[1]
    # the stored maps are the raw sums: their ratio is the ratio of the gradients, not 1
    s = ds["saliency"].values
    ratio = s[:, 0].max(axis=(1, 2)) / s[:, 1].max(axis=(1, 2))
    assert not np.allclose(ratio, 1.0)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a.ravel())).astype(float)
    rb = np.argsort(np.argsort(b.ravel())).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def _maps(files, **kw) -> np.ndarray:
    study = open_(files)
    pairs = ex.build_pairs(study, channels=["3", "7"], images=["o00", "o03"], reference="b02")
    return ex.explain(study, pairs, **kw)["saliency"].values


def test_sanity_checks_randomising_readout_or_backbone_changes_the_maps(study_files, tmp_path, capsys):
    """Adebayo et al.: maps must depend on the readout and on the backbone's weights."""
    base = _maps(study_files)
    again = _maps(study_files)
    rng = np.random.default_rng(11)
    shuffled = make_study_files(
        tmp_path / "rand_readout",
        study_files["model"],
        weight=rng.standard_normal(study_files["weight"].shape).astype(np.float32) * 0.05,
    )
    other_model = build_tiny_model(tmp_path / "seed1.onnx", seed=1)
    rebuilt = make_study_files(tmp_path / "rand_backbone", other_model, weight=study_files["weight"])
    rand_readout, rand_backbone = _maps(shuffled), _maps(rebuilt)
    flat = lambda m: m.reshape(-1, *m.shape[-2:])  # noqa: E731
    same = [_spearman(a, b) for a, b in zip(flat(base), flat(again))]
    r_ro = [_spearman(a, b) for a, b in zip(flat(base), flat(rand_readout))]
    r_bb = [_spearman(a, b) for a, b in zip(flat(base), flat(rand_backbone))]
    with capsys.disabled():
        print(
            f"\nsanity (Spearman of saliency maps): unchanged {np.mean(same):.3f}, random readout "
            f"{np.mean(r_ro):.3f} (max {np.max(r_ro):.3f}), "
            f"random backbone {np.mean(r_bb):.3f} (max {np.max(r_bb):.3f})"
        )
    assert np.min(same) == pytest.approx(1.0)
    # v = w^2 phi(o) phi(b) keeps only the magnitude of w, and on this two-layer model the product
    # phi(o) phi(b) shapes much of v: a random readout moves the maps less than a random backbone
    # (measured: ~0.65 vs ~0.1 mean rank correlation), yet both far from the unchanged 1.
    assert np.mean(r_ro) < 0.8, r_ro
    assert np.mean(r_bb) < 0.4, r_bb


def test_output_folder_holds_the_netcdf_the_figures_and_an_offline_report(study_files, tmp_path):
    study = open_(study_files)
    pairs = ex.build_pairs(study, top_k_objects=2)
    ds = ex.explain(study, pairs, save_inputs=True, options={"candidates": "top-k"})
    out = tmp_path / "expl"
    report.write_output(ds, out, ex.channel_summary(study), smooth=1.0, scale="channel")
    res = xr.open_dataset(out / report.NETCDF, engine="h5netcdf").load()
    assert res["input_grad"].dims == ("pair", "role", "color", "y", "x")
    assert res["input_grad"].dtype == np.float32
    assert res["saliency"].dims == ("pair", "role", "y", "x")
    assert res["image"].dims == ("pair", "role", "color", "y", "x")
    assert res["role"].values.tolist() == ["ooc", "reference"]
    assert res.sizes["pair"] == 2 * len(CHANNELS)
    for name in (
        "channel",
        "ooc",
        "reference",
        "similarity",
        "predicted_ooc",
        "predicted_reference",
        "recorded_ooc",
        "recorded_reference",
        "method",
    ):
        assert res[name].dims == ("pair",)
    assert res.attrs["model_sha256"] == study.engine.info.sha256
    assert res.attrs["arch"] == "tinycnn" and res.attrs["layer"] == "conv2"
    assert json.loads(res.attrs["options"])["candidates"] == "top-k"
    # stored maps are unsmoothed sums of |G|; predicted responses are the readout's
    np.testing.assert_allclose(res["saliency"].values, np.abs(res["input_grad"].values).sum(axis=2), rtol=1e-6)
    i = 0
    ch = int(res["channel"].values[i])
    w = study_files["weight"][CHANNELS.index(ch)].astype(np.float64)
    phi = study.phi([study.image(str(res["ooc"].values[i]))])[0].astype(np.float64)
    assert float(res["predicted_ooc"].values[i]) == pytest.approx(
        w @ phi + study_files["bias"][CHANNELS.index(ch)], rel=1e-5
    )
    assert float(res["recorded_ooc"].values[i]) == pytest.approx(
        float(study.mean.sel(channel=ch, stimulus=str(res["ooc"].values[i])))
    )
    html = (out / "index.html").read_text()
    links = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert links and not [u for u in links if re.match(r"[a-z]+:|/", u)]
    for u in links:
        if not u.startswith("#"):
            assert (out / u).is_file(), u
    assert len(list((out / "pairs").glob("*.png"))) == res.sizes["pair"]
    assert (out / "responses.png").is_file()
    for r in ("MSB", "ASB"):
        assert f"Region {r}" in html
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_the_report_counts_its_figures_on_a_progress_bar(study_files, tmp_path, monkeypatch):
    import tqdm.auto

    bars = []

    class Bar:
        def __init__(self, total, disable, **kw):
            self.total, self.disable, self.n = total, disable, 0
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, k):
            self.n += k

    study = open_(study_files)
    ds = ex.explain(study, ex.build_pairs(study, images=["o00", "o01"]))
    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    report.write_output(ds, tmp_path / "a", progress=True)
    report.write_output(ds, tmp_path / "b")
    assert [(b.total, b.n, b.disable) for b in bars] == [
        (ds.sizes["pair"], ds.sizes["pair"], None),
        (ds.sizes["pair"], ds.sizes["pair"], True),
    ]


def test_an_outside_image_path_gets_nan_recorded_responses(study_files, tmp_path):
    src = Image.open(study_files["images"] / "o03.png").transpose(Image.FLIP_LEFT_RIGHT)
    src.save(tmp_path / "new.png")
    study = open_(study_files)
    ds = ex.explain(study, ex.build_pairs(study, channels=["3"], images=[str(tmp_path / "new.png")]))
    assert np.isnan(float(ds["recorded_ooc"][0])) and np.isfinite(float(ds["recorded_reference"][0]))
    # a recorded stimulus given by its path is recognised as that stimulus
    ds2 = ex.build_pairs(study, channels=["3"], images=[str(study_files["images"] / "o03.png")])
    assert ds2[0].ooc.label == "o03"


def test_each_pair_carries_its_readouts_held_out_r_and_the_report_states_it(study_files, tmp_path):
    study = open_(study_files)
    r = np.linspace(-0.2, 0.6, len(CHANNELS))
    study.readouts = study.readouts.assign(r_cv_preferred=("channel", r))
    study.readouts.attrs["cv_folds_by"] = "group"
    pairs = ex.build_pairs(study, top_k_objects=1)
    ds = ex.explain(study, pairs)
    expected = [r[CHANNELS.index(int(c))] for c in ds["channel"].values]
    np.testing.assert_allclose(ds["readout_r_cv"].values, expected)
    assert ds.attrs["readout_cv_folds_by"] == "group"
    out = tmp_path / "expl"
    report.write_output(ds, out, ex.channel_summary(study))
    html = (out / "index.html").read_text()
    shown = np.unique(expected)
    assert f"mean over the {len(pairs)} explained channels {np.mean(expected):.2f}" in html
    assert f"range {shown.min():.2f} to {shown.max():.2f}; folds by group" in html
    assert f"(readout: held-out r {expected[0]:.2f})" in html


def test_readouts_without_held_out_r_are_reported_as_not_recorded(study_files, tmp_path):
    study = open_(study_files)
    study.readouts = study.readouts.drop_vars("r_cv_preferred", errors="ignore")
    ds = ex.explain(study, ex.build_pairs(study, top_k_objects=1))
    assert np.isnan(ds["readout_r_cv"].values).all()
    report.write_output(ds, tmp_path / "expl", ex.channel_summary(study))
    assert "<td>not recorded</td>" in (tmp_path / "expl" / "index.html").read_text().replace("\n", "")
