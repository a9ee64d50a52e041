"""The cotangent rules and the paths, driven by their registries: each entry against its own definition
written here in float64, every (rule, path) through explain, the CLI's flags, and explain_pair.

A new rule or path is tested by registering it: the parametrised tests below fail until its
independent definition is added to REFERENCE_RULES or REFERENCE_PATHS.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from test_explain import make_study_files
from tinymodel import PREPROCESSING, tiny_forward, tiny_weights

from pbv_onnx.base.errors import UsageError
from pbv_onnx.method import methods
from pbv_onnx.method.cotangents import RULES, CotangentRule, register_rule
from pbv_onnx.method.methods import METHODS, resolve
from pbv_onnx.method.paths import PATHS, AttributionPath, Option, register_path
from pbv_onnx.method.saliency import backprop, blur_baseline
from pbv_onnx.method.similarity import similarities
from pbv_onnx.runtime.images import Preprocessing, load_batch
from pbv_onnx.workflows import explain as ex
from pbv_onnx.workflows.checkpoint import Checkpoints, work_folder
from pbv_onnx.workflows.pair import explain_pair

PBV = Path(sys.executable).parent / "pbv-onnx"


# -- rules ------------------------------------------------------------------------------------------


def _parallel(w, o, b):
    num = w * w * o * b
    den = np.sqrt(np.sum((w * o) ** 2)) * np.sqrt(np.sum((w * b) ** 2))
    v = num / den if den > 0 else np.zeros_like(num)
    return v, v


REFERENCE_RULES = {  # each rule's definition (docs/method.md sections 3-4), float64
    "parallel": _parallel,
    "gradient": lambda w, o, b: (w, w),
    "grad-x-act": lambda w, o, b: (w * o, w * b),
}


@pytest.mark.parametrize("name", sorted(RULES))
def test_every_rule_follows_its_definition(name):
    assert name in REFERENCE_RULES, f"rule {name!r} has no independent definition in this test"
    rule = RULES[name]
    assert rule.name == name and rule.description and "\n" not in rule.description
    rng = np.random.default_rng(0)
    w = rng.standard_normal(40)
    o, b = np.maximum(rng.standard_normal((2, 40)), 0).astype(np.float32)
    got, want = rule.cotangents(w, o, b), REFERENCE_RULES[name](w, o.astype(np.float64), b.astype(np.float64))
    for g, r in zip(got, want):
        assert g.dtype == np.float64 and g.shape == (40,)
        np.testing.assert_allclose(g, r, rtol=1e-12, atol=0)


def test_the_parallel_rule_shares_one_v_summing_to_the_similarity_and_zero_without_shared_features():
    rng = np.random.default_rng(1)
    w = rng.standard_normal(30)
    o, b = np.maximum(rng.standard_normal((2, 30)), 0)
    v_o, v_b = RULES["parallel"].cotangents(w, o, b)
    np.testing.assert_array_equal(v_o, v_b)
    assert v_o.sum() == pytest.approx(similarities(w, o, b[None])[0], rel=1e-12)
    # a weighted norm of 0 (the readout weighs only features the reference lacks): v = 0
    w0 = np.where(b > 0, 0.0, w)
    for v in RULES["parallel"].cotangents(w0, o, b):
        np.testing.assert_array_equal(v, np.zeros(30))
    for v in RULES["parallel"].cotangents(w, o, np.zeros(30)):
        np.testing.assert_array_equal(v, np.zeros(30))


# -- paths on models with a known Jacobian ------------------------------------------------------------

SPEC = Preprocessing(resize=(4, 4), crop=None, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
SHAPE = (3, 4, 4)
N_IN = int(np.prod(SHAPE))


class Linear:
    """phi(x) = A x: J^T v = A^T v everywhere."""

    def __init__(self, rng):
        self.A = rng.standard_normal((10, N_IN))

    def phi(self, x):
        return x.reshape(len(x), -1) @ self.A.T

    def jt(self, x, v):
        return (v @ self.A).reshape(x.shape)


class Quadratic:
    """phi(x) = A (x * x): J^T v = 2 x * (A^T v)."""

    def __init__(self, rng):
        self.A = rng.standard_normal((10, N_IN))

    def phi(self, x):
        return (x * x).reshape(len(x), -1) @ self.A.T

    def jt(self, x, v):
        return 2 * x * (v @ self.A).reshape(x.shape)


class FakeVjp:
    """engine.vjp over a numpy model (float32 out, as the engine's, computed in float64); records
    the batch of every call."""

    def __init__(self, model):
        self.model, self.batches = model, []

    def __call__(self, images, cotangents):
        self.batches.append(len(images))
        x = np.asarray(images, np.float64)
        g = self.model.jt(x, np.asarray(cotangents, np.float64))
        return self.model.phi(x).astype(np.float32), g.astype(np.float32)


def _black(spec):
    return ((0.0 - np.array(spec.mean)) / np.array(spec.std))[:, None, None] * np.ones(SHAPE)


def _integrated_ref(model, x, v, spec, steps, baseline):
    x0 = np.broadcast_to(_black(spec), x.shape) if baseline == "black" else blur_baseline(x).astype(np.float64)
    xf = x.astype(np.float64)
    acc = sum(model.jt(x0 + k / steps * (xf - x0), v) for k in range(1, steps + 1))
    return (xf - x0) * acc / steps


def _smooth_ref(model, x, v, spec, noise, samples, seed):
    draws = list(PATHS["smooth"].draws(x, noise=noise, samples=samples, seed=seed))
    return np.mean([model.jt(d.astype(np.float64), v) for d in draws], axis=0)


REFERENCE_PATHS = {  # each path's definition (docs/method.md section 4), float64, given the model's J^T v
    "plain": lambda model, x, v, spec: model.jt(x.astype(np.float64), v),
    "integrated": _integrated_ref,
    "smooth": _smooth_ref,
}
# calls of vjp per path (each on the whole batch)
CALLS = {"plain": lambda o: 1, "integrated": lambda o: o["steps"], "smooth": lambda o: o["samples"]}


def _batch(rng, n=3):
    x = rng.standard_normal((n, *SHAPE)).astype(np.float32)
    v = rng.standard_normal((n, 10)).astype(np.float32)
    return x, v


@pytest.mark.parametrize("model_cls", [Linear, Quadratic])
@pytest.mark.parametrize("name", sorted(PATHS))
def test_every_path_matches_its_definition_on_a_known_jacobian(name, model_cls):
    assert name in REFERENCE_PATHS, f"path {name!r} has no independent definition in this test"
    path = PATHS[name]
    assert path.name == name and path.description and "\n" not in path.description
    rng = np.random.default_rng(2)
    model = model_cls(rng)
    x, v = _batch(rng)
    opts = {**path.defaults(), **{k: 3 for k in ("steps", "samples") if k in path.defaults()}}
    vjp = FakeVjp(model)
    got = path.attribute(vjp, x, v, SPEC, **opts)
    want = REFERENCE_PATHS[name](model, x, v.astype(np.float64), SPEC, **opts)
    assert got.shape == x.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6 * np.abs(want).max())
    # memory: every VJP call takes the one batch given, never more
    assert vjp.batches == [len(x)] * CALLS[name](opts)


def test_plain_is_the_single_vjp_and_smooth_of_a_linear_map_is_its_gradient():
    rng = np.random.default_rng(3)
    model = Linear(rng)
    x, v = _batch(rng)
    np.testing.assert_array_equal(PATHS["plain"].attribute(FakeVjp(model), x, v, SPEC), backprop(FakeVjp(model), x, v))
    # the Jacobian of a linear map is constant: neither noise nor the integral changes it
    smooth = PATHS["smooth"].attribute(FakeVjp(model), x, v, SPEC, noise=0.5, samples=4, seed=0)
    np.testing.assert_allclose(smooth, model.jt(x, v.astype(np.float64)), rtol=1e-5)
    x0 = np.broadcast_to(_black(SPEC), x.shape)
    ig = PATHS["integrated"].attribute(FakeVjp(model), x, v, SPEC, steps=2, baseline="black")
    np.testing.assert_allclose(ig, (x - x0) * model.jt(x, v.astype(np.float64)), rtol=1e-5, atol=1e-6)


def test_integrated_gradients_are_complete_on_the_quadratic():
    """sum(G) = f(x) - f(x0) for f = v . phi; the right Riemann sum over m steps of a quadratic
    overshoots by exactly sum(d^2 A^T v) / m, d = x - x0."""
    rng = np.random.default_rng(4)
    model = Quadratic(rng)
    x, v = _batch(rng, 2)
    v64 = v.astype(np.float64)
    x0 = np.broadcast_to(_black(SPEC), x.shape)
    f = lambda z: np.sum(model.phi(np.asarray(z, np.float64)) * v64, axis=1)  # noqa: E731
    d = x - x0
    for steps in (1, 4, 200):
        G = PATHS["integrated"].attribute(FakeVjp(model), x, v, SPEC, steps=steps, baseline="black")
        overshoot = np.sum(d * d * (v64 @ model.A).reshape(x.shape), axis=(1, 2, 3)) / steps
        np.testing.assert_allclose(G.sum(axis=(1, 2, 3)), f(x) - f(x0) + overshoot, rtol=1e-5)


def test_smoothgrad_noise_is_scaled_seeded_and_independent_of_the_batch():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 3, 32, 32)).astype(np.float32)
    x[1] *= 4.0  # a wider range: a wider noise
    smooth = PATHS["smooth"]
    draws = np.stack(list(smooth.draws(x, noise=0.1, samples=8, seed=0)))  # [samples, N, 3, H, W]
    assert draws.dtype == np.float32 and draws.shape == (8, *x.shape)
    for i in range(3):
        sigma = 0.1 * (x[i].max() - x[i].min())
        assert np.std(draws[:, i] - x[i]) == pytest.approx(sigma, rel=0.02)
        assert abs(np.mean(draws[:, i] - x[i])) < 0.01 * sigma
    again = np.stack(list(smooth.draws(x, noise=0.1, samples=8, seed=0)))
    np.testing.assert_array_equal(again, draws)
    alone = np.stack(list(smooth.draws(x[2:], noise=0.1, samples=8, seed=0)))  # another batch
    np.testing.assert_array_equal(alone[:, 0], draws[:, 2])
    other = np.stack(list(smooth.draws(x, noise=0.1, samples=8, seed=1)))
    assert not np.allclose(other, draws)
    assert not np.allclose(draws[:, 0] - x[0], draws[:, 2] - x[2])  # each image its own noise
    np.testing.assert_array_equal(next(smooth.draws(x, noise=0.0, samples=1, seed=0)), x)


# -- resolving a request -------------------------------------------------------------------------------


def test_method_names_keep_their_meaning_and_any_rule_takes_any_path():
    assert {m: (resolve(m).rule, resolve(m).path) for m in METHODS} == {
        "parallel": ("parallel", "plain"),
        "gradient": ("gradient", "plain"),
        "grad-x-act": ("grad-x-act", "plain"),
        "integrated": ("parallel", "integrated"),
    }
    assert all(resolve(m).label == m for m in METHODS)
    for rule, path in itertools.product(RULES, PATHS):
        method = next(m for m, (r, _) in methods.method_table().items() if r == rule)
        a = resolve(method, path)
        assert (a.rule, a.path, dict(a.options)) == (rule, path, PATHS[path].defaults())
        assert resolve(a.label) == a  # a label as outputs record it resolves to the same
    ig = resolve("gradient", "integrated", steps="5", baseline="blur", noise=0.3)
    assert ig.label == "gradient+integrated" and dict(ig.options) == {"steps": 5, "baseline": "blur"}
    assert resolve("integrated", "plain") == resolve("parallel")


@pytest.mark.parametrize(
    "kwargs, param, words",
    [
        (
            {"method": "magic"},
            "method",
            "method must be one of parallel, gradient, grad-x-act, integrated, not 'magic'",
        ),
        ({"path": "x"}, "path", "path must be one of plain, integrated, smooth, not 'x'"),
        ({"steps": 0}, "steps", "steps must be at least 1, not 0"),
        ({"path": "smooth", "samples": 0}, "samples", "samples must be at least 1"),
        ({"path": "smooth", "noise": -0.1}, "noise", "noise must be at least 0"),
        ({"path": "smooth", "noise": "loud"}, "noise", "noise must be a number"),
        ({"path": "smooth", "samples": 2.5}, "samples", "samples must be an integer"),
        ({"baseline": "grey"}, "baseline", "baseline must be one of black, blur"),
        ({"path": "smooth", "seed": -1}, "seed", "seed must be at least 0"),
    ],
)
def test_bad_requests_name_the_parameter(kwargs, param, words):
    with pytest.raises(UsageError) as err:
        resolve(**kwargs)
    assert err.value.param == param and words in str(err.value) and "--" not in str(err.value)


def test_unknown_options_are_refused_and_describe_names_what_was_computed():
    with pytest.raises(UsageError, match="unknown path option 'sigma'"):
        resolve("parallel", "smooth", sigma=1)
    a = resolve("grad-x-act", "smooth", noise=0.2, samples=3)
    text = methods.describe(a.attrs())
    assert text.startswith("grad-x-act+smooth: rule grad-x-act") and "noise 0.2" in text and "samples 3" in text
    assert methods.panel_label("parallel+smooth") == methods.panel_label("integrated") == "shared features"
    assert methods.panel_label("gradient+integrated") == "gradient"


# -- end to end on the tiny model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def study_files(tiny_model, tmp_path_factory) -> dict:
    return make_study_files(tmp_path_factory.mktemp("attr"), tiny_model)


def _open(files, batch_size=16) -> ex.Study:
    return ex.open_study(
        files["model"], files["readouts"], files["responses"], batch_size=batch_size, device="cpu", progress=False
    )


SMALL = {"steps": 2, "samples": 2}  # few VJPs per pair: the combinations stay quick


@pytest.mark.parametrize("rule, path", list(itertools.product(sorted(RULES), sorted(PATHS))))
def test_every_rule_and_path_runs_through_explain(study_files, rule, path):
    study = _open(study_files, batch_size=3)
    pairs = ex.build_pairs(study, channels=["3", "7"], images=["o01", "o02"])
    method = next(m for m, (r, _) in methods.method_table().items() if r == rule)
    a = resolve(method, path, **SMALL)
    ds = ex.explain(study, pairs, method, path=path, **SMALL)
    assert ds["method"].values.tolist() == [a.label] * len(pairs)
    assert (ds.attrs["method"], ds.attrs["rule"], ds.attrs["path"]) == (a.label, rule, path)
    assert json.loads(ds.attrs["path_options"]) == dict(a.options)
    # each pair on its own, features from the float64 reference model: the rule's cotangents
    # along the path, image by image
    wts = tiny_weights()
    for i, p in enumerate(pairs):
        x = load_batch([p.ooc.path, p.reference.path], PREPROCESSING)
        phi = tiny_forward(x.astype(np.float64), wts).reshape(2, -1)
        v = REFERENCE_RULES[rule](study.weight(p.channel), phi[0], phi[1])
        for r in range(2):
            want = PATHS[path].attribute(study.engine.vjp, x[r : r + 1], v[r][None], PREPROCESSING, **a.options)[0]
            np.testing.assert_allclose(ds["input_grad"].values[i, r], want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_the_checkpoint_key_tells_paths_and_options_apart(study_files):
    study = _open(study_files)
    pairs = ex.build_pairs(study, channels=["3"], images=["o01"])
    requests = [
        ("parallel", None, {}),
        ("parallel", "smooth", {}),
        ("parallel", "smooth", {"noise": 0.3}),
        ("parallel", "smooth", {"samples": 4}),
        ("parallel", "smooth", {"seed": 1}),
        ("integrated", None, {}),
        ("integrated", None, {"steps": 3}),
        ("integrated", None, {"baseline": "blur"}),
        ("gradient", "integrated", {}),
        ("gradient", None, {}),
    ]
    keys = [json.dumps(ex.run_description(study, pairs, m, False, path=p, **o), sort_keys=True) for m, p, o in requests]
    assert len(set(keys)) == len(keys)
    same = ex.run_description(study, pairs, "parallel", False, path="integrated", steps=16)
    assert same == ex.run_description(study, pairs, "integrated", False)


class _Interrupt:
    """engine.vjp that raises KeyboardInterrupt on call `stop_at` (as Ctrl-C would)."""

    def __init__(self, vjp, stop_at=None):
        self.vjp, self.stop_at, self.calls = vjp, stop_at, 0

    def __call__(self, images, cotangents):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return self.vjp(images, cotangents)


def test_a_resumed_smooth_run_gives_the_same_bits(study_files, tmp_path, monkeypatch):
    study = _open(study_files, batch_size=2)  # one pair per engine call
    pairs = ex.build_pairs(study, channels=["3", "7"], top_k_objects=2)
    a = resolve("parallel", "smooth", samples=2, noise=0.2)
    full = ex.explain(study, pairs, a)
    desc = ex.run_description(study, pairs, a, False)
    out = tmp_path / "out"
    monkeypatch.setattr(study.engine, "vjp", _Interrupt(study.engine.vjp, stop_at=4))  # in the 2nd pair
    with pytest.raises(KeyboardInterrupt):
        ex.explain(study, pairs, a, checkpoint=Checkpoints(out, desc, log=lambda m: None))
    assert len(list(work_folder(out).glob("chunk-*.npz"))) == 1
    monkeypatch.undo()
    resumed = ex.explain(study, pairs, a, checkpoint=Checkpoints(out, desc, resume=True, log=lambda m: None))
    np.testing.assert_array_equal(resumed["input_grad"].values, full["input_grad"].values)
    # and another batch size draws the same noise
    other = ex.explain(_open(study_files, batch_size=16), pairs, a)
    np.testing.assert_allclose(other["input_grad"].values, full["input_grad"].values, rtol=1e-5, atol=1e-8)


@pytest.fixture
def twice_path():
    """A path registered by a test: one class, nothing else."""

    @register_path("twice")
    class Twice(AttributionPath):
        description = "the plain gradient times a factor"
        options = (Option("factor", 2.0, "the factor"),)

        def attribute(self, vjp, images, cotangents, spec, *, factor, **options):
            return factor * backprop(vjp, images, cotangents)

    yield Twice
    del PATHS["twice"]


@pytest.fixture
def ones_rule():
    """A rule registered by a test: one class, nothing else."""

    @register_rule("ones")
    class Ones(CotangentRule):
        description = "v = 1 on each image (the gradient of the summed features)"

        def cotangents(self, weight, phi_o, phi_b):
            return np.ones(len(phi_o)), np.ones(len(phi_b))

    yield Ones
    del RULES["ones"]


def test_a_new_rule_is_one_registered_class(study_files, ones_rule):
    study = _open(study_files)
    pairs = ex.build_pairs(study, channels=["7"], images=["o03"])
    ds = ex.explain(study, pairs, "ones", path="smooth", samples=2)
    assert ds.attrs["method"] == "ones+smooth" and resolve("ones").label == "ones"
    x = load_batch([pairs[0].ooc.path, pairs[0].reference.path], PREPROCESSING)
    want = PATHS["smooth"].attribute(
        study.engine.vjp, x, np.ones((2, study.engine.info.n_features)), PREPROCESSING, noise=0.15, samples=2, seed=0
    )
    np.testing.assert_allclose(ds["input_grad"].values[0], want, rtol=1e-5, atol=1e-8)
    assert "ones" in methods.help_text() and methods.panel_label("ones+plain") == "ones"


def test_a_new_path_is_one_registered_class(study_files, twice_path):
    study = _open(study_files)
    pairs = ex.build_pairs(study, channels=["7"], images=["o03"])
    plain = ex.explain(study, pairs, "gradient")
    twice = ex.explain(study, pairs, "gradient", path="twice", factor=3)
    np.testing.assert_allclose(twice["input_grad"].values, 3 * plain["input_grad"].values, rtol=1e-6)
    assert twice.attrs["method"] == "gradient+twice" and json.loads(twice.attrs["path_options"]) == {"factor": 3.0}
    assert "twice (factor)" in methods.path_help()


# -- the command line -----------------------------------------------------------------------------------


def pbv(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(PBV), *map(str, args)], capture_output=True, text=True, timeout=300)


def _common(f) -> list:
    return [
        "--model",
        f["model"],
        "--readouts",
        f["readouts"],
        "--responses",
        f["responses"],
        "--device",
        "cpu",
        "--channel",
        "3",
        "--image",
        "o00",
    ]


def test_the_cli_takes_a_path_and_its_options(study_files, tmp_path):
    out = tmp_path / "smooth"
    res = pbv(
        "explain",
        *_common(study_files),
        "--out",
        out,
        "--path",
        "smooth",
        "--noise",
        "0.2",
        "--samples",
        "2",
        "--seed",
        "3",
    )
    assert res.returncode == 0, res.stderr
    with xr.open_dataset(out / "explanations.nc", engine="h5netcdf") as ds:
        assert ds["method"].values.tolist() == ["parallel+smooth"]
        assert json.loads(ds.attrs["path_options"]) == {"noise": 0.2, "samples": 2, "seed": 3}
        assert json.loads(ds.attrs["options"])["samples"] == 2
        cli = ds["input_grad"].values
    study = _open(study_files)
    want = ex.explain(
        study,
        ex.build_pairs(study, channels=["3"], images=["o00"]),
        "parallel",
        path="smooth",
        noise=0.2,
        samples=2,
        seed=3,
    )
    np.testing.assert_allclose(cli, want["input_grad"].values, rtol=1e-5, atol=1e-8)
    assert "parallel+smooth: rule parallel" in (out / "index.html").read_text()
    res = pbv(
        "explain",
        *_common(study_files),
        "--out",
        tmp_path / "ig",
        "--method",
        "gradient",
        "--path",
        "integrated",
        "--steps",
        "2",
    )
    assert res.returncode == 0, res.stderr
    with xr.open_dataset(tmp_path / "ig" / "explanations.nc", engine="h5netcdf") as ds:
        assert ds.attrs["rule"] == "gradient" and ds.attrs["path"] == "integrated"
        assert ds["method"].values.tolist() == ["gradient+integrated"]


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--path", "wobbly"], "--path must be one of plain, integrated, smooth, not 'wobbly'"),
        (["--path", "smooth", "--noise", "-1"], "--noise must be at least 0"),
        (["--path", "smooth", "--samples", "0"], "--samples must be at least 1"),
        (["--path-option", "seed"], "--path-option must be NAME=VALUE"),
        (["--path", "smooth", "--seed", "-2"], "--seed must be at least 0"),
        (["--path-option", "steps=0"], "--steps must be at least 1"),
    ],
)
def test_the_cli_refuses_bad_paths_and_options_with_nothing_written(study_files, tmp_path, args, flag):
    res = pbv("explain", *_common(study_files), "--out", tmp_path / "out", *args)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pbv-onnx: error: ") and flag in lines[0], res.stderr
    assert list(tmp_path.iterdir()) == []


# -- explain_pair ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, path", [("parallel", None), ("grad-x-act", "smooth"), ("integrated", None)])
def test_explain_pair_agrees_with_the_batch_explain(study_files, method, path):
    study = _open(study_files)
    pairs = ex.build_pairs(study, channels=["7"], images=["o01"])
    batch = ex.explain(study, pairs, method, path=path, **SMALL)
    p = pairs[0]
    x = load_batch([p.ooc.path, p.reference.path], study.engine.info.preprocessing)
    one = explain_pair(study.engine, study.weight(p.channel), x[0], x[1:], method, path, **SMALL)
    assert one["input_grad"].dims == ("role", "color", "y", "x") and one["saliency"].dims == ("role", "y", "x")
    assert one["role"].values.tolist() == ["ooc", "reference"]
    np.testing.assert_allclose(one["input_grad"].values, batch["input_grad"].values[0], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(one["saliency"].values, batch["saliency"].values[0], rtol=1e-5, atol=1e-8)
    assert one.attrs["similarity"] == pytest.approx(float(batch["similarity"].values[0]), rel=1e-6)
    for k in ("method", "rule", "path", "path_options"):
        assert one.attrs[k] == batch.attrs[k]


def test_explain_pair_refuses_bad_input_before_any_computation(study_files):
    class NoEngine:  # any computation would fail loudly
        info = _open(study_files).engine.info

    x = np.zeros(NoEngine.info.input_shape, np.float32)
    w = np.zeros(NoEngine.info.n_features)
    for kwargs, param in [
        ({"method": "magic"}, "method"),
        ({"path": "smooth", "samples": 0}, "samples"),
        ({"w": w[:-1]}, "w"),
        ({"x_obj": x[:, :-1]}, "x_obj"),
        ({"x_ref": x[None, None]}, "x_ref"),
    ]:
        args = {"w": w, "x_obj": x, "x_ref": x, **kwargs}
        with pytest.raises(UsageError) as err:
            explain_pair(NoEngine(), **args)
        assert err.value.param == param
