"""The rewrite of onnxruntime's optimised K-per-image graph (pbv_onnx/layout.py): mask products and
residual sums run in the blocked NCHWc layout and compute what onnxruntime's own graph computes; a
product broadcast within a sample is left as written; a rewrite that would change the numbers, or
fails, is not used."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pbv_onnx.runtime import layout, sessions
from pbv_onnx.runtime.engine import COTANGENTS, FEATURES, IMAGE, INPUT_GRADS

C, S = 16, 8  # one whole NCHWc block of channels (the rewrite's condition), 8x8 maps


def build_graph(gate: bool = False) -> onnx.ModelProto:
    """Two forward conv + ReLU layers with their 0/1 masks (HardSigmoid steps, as the exporter
    writes them), and a K-per-image backward pass over `cotangents` [N*K, C, S, S] as the exporter
    writes it: conv, product with the second mask through [N, K, ...] and [N, 1, ...] views, conv,
    residual sum with that product, product with the first mask, conv. With `gate`, the second
    product's factor is the first mask's per-channel mean [N, C, 1, 1]: a broadcast within each
    sample."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((C, C, 3, 3)) * 0.2).astype(np.float32), f"W{i}") for i in range(5)
    ]
    inits += [
        numpy_helper.from_array(np.array(v, np.int64), name)
        for name, v in (("grads", [-1, C, S, S]), ("per_image", [1, C, S, S]), ("per_channel", [1, C, 1, 1]))
    ]
    conv = dict(pads=[1, 1, 1, 1])
    step = dict(alpha=2.0**60, beta=0.0)
    nodes = [
        helper.make_node("Conv", [IMAGE, "W0"], ["pre1"], **conv),
        helper.make_node("Relu", ["pre1"], ["h1"]),
        helper.make_node("Conv", ["h1", "W4"], ["pre2"], **conv),
        helper.make_node("Relu", ["pre2"], [FEATURES]),
        helper.make_node("HardSigmoid", ["h1"], ["mask1"], **step),
        helper.make_node("HardSigmoid", [FEATURES], ["mask2"], **step),
        helper.make_node("Shape", [IMAGE], ["n"], end=1),
        helper.make_node("Concat", ["n", "grads"], ["view_k"], axis=0),
        helper.make_node("Concat", ["n", "per_image"], ["view_1"], axis=0),
        helper.make_node("Concat", ["n", "per_channel"], ["view_c"], axis=0),
        helper.make_node("Conv", [COTANGENTS, "W1"], ["g1"], **conv),
    ]

    def product(g: str, m: str, view: str, out: str) -> list:
        return [
            helper.make_node("Reshape", [g, "view_k"], [f"{out}_g"]),
            helper.make_node("Reshape", [m, view], [f"{out}_m"]),
            helper.make_node("Mul", [f"{out}_g", f"{out}_m"], [f"{out}_p"]),
            helper.make_node("Reshape", [f"{out}_p", "grads"], [out]),
        ]

    nodes += product("g1", "mask2", "view_1", "p1")
    nodes += [helper.make_node("Conv", ["p1", "W2"], ["g2"], **conv), helper.make_node("Add", ["g2", "p1"], ["s2"])]
    if gate:
        nodes += [helper.make_node("GlobalAveragePool", ["mask1"], ["gate"])]
    nodes += product("s2", "gate" if gate else "mask1", "view_c" if gate else "view_1", "p2")
    nodes += [helper.make_node("Conv", ["p2", "W3"], [INPUT_GRADS], **conv)]
    graph = helper.make_graph(
        nodes,
        "blocked",
        [
            helper.make_tensor_value_info(IMAGE, TensorProto.FLOAT, ["N", C, S, S]),
            helper.make_tensor_value_info(COTANGENTS, TensorProto.FLOAT, ["NK", C, S, S]),
        ],
        [
            helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["N", C, S, S]),
            helper.make_tensor_value_info(INPUT_GRADS, TensorProto.FLOAT, ["NK", C, S, S]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def feeds(n: int, k: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        IMAGE: rng.standard_normal((n, C, S, S)).astype(np.float32),
        COTANGENTS: rng.standard_normal((n * k, C, S, S)).astype(np.float32),
    }


def reference(model: onnx.ModelProto, f: dict) -> list[np.ndarray]:
    """onnxruntime's own optimised graph, without the rewrite."""
    sess = ort.InferenceSession(
        model.SerializeToString(), sessions.session_options(), providers=["CPUExecutionProvider"]
    )
    return sess.run([FEATURES, INPUT_GRADS], f)


def numpy_reference(model: onnx.ModelProto, f: dict) -> np.ndarray:
    """input_grads of the ungated graph in float64 numpy, independent of onnxruntime."""
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}

    def conv(x, W):
        xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
        return sum(
            np.einsum("nchw,oc->nohw", xp[:, :, i : i + S, j : j + S], W[:, :, i, j])
            for i in range(3)
            for j in range(3)
        )

    x, cot = f[IMAGE].astype(np.float64), f[COTANGENTS].astype(np.float64)
    n = len(x)
    h1 = np.maximum(conv(x, w["W0"]), 0)
    masks = [(v > 0).astype(np.float64)[:, None] for v in (h1, conv(h1, w["W4"]))]  # [N, 1, C, S, S]

    def product(g, mask):
        return (g.reshape(n, -1, C, S, S) * mask).reshape(-1, C, S, S)

    p1 = product(conv(cot, w["W1"]), masks[1])
    return conv(product(conv(p1, w["W2"]) + p1, masks[0]), w["W3"])


def rewrite(apply=None) -> sessions.Rewrite:
    model = build_graph()
    return sessions.Rewrite(
        "test-rewrite",
        lambda: feeds(2, 2, seed=9),
        apply or (lambda m: layout.blocked_products(m, layout.sample_shapes(model))),
    )


def reorders(path: Path) -> int:
    return sum(n.op_type.startswith("Reorder") for n in onnx.load(str(path)).graph.node)


def cached_graph(folder: Path) -> Path:
    (entry,) = folder.glob("*.onnx")
    return entry


def optimised_reorders(model: onnx.ModelProto, tmp_path: Path) -> int:
    opts = sessions.session_options()
    opts.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return reorders(tmp_path / "optimised.onnx")


def test_blocked_products_and_sums_compute_what_onnxruntime_computes(tmp_path, monkeypatch):
    monkeypatch.setenv(sessions.CACHE_ENV, str(tmp_path / "cache"))
    model = build_graph()
    sess, status = sessions.create_session(
        model.SerializeToString(),
        sessions.session_options(),
        ["CPUExecutionProvider"],
        "sha-of-test-graph",
        "multi",
        rewrite(),
    )
    assert status == "stored"
    # onnxruntime converted the gradient out of and back into the blocked layout around each
    # product, and computed the sum unblocked; the rewritten graph converts only its two inputs in
    # and its two outputs out
    assert optimised_reorders(model, tmp_path) == 10
    assert reorders(cached_graph(tmp_path / "cache")) == 4
    for n, k in ((1, 5), (3, 4), (2, 1)):
        f = feeds(n, k)
        got = sess.run([FEATURES, INPUT_GRADS], f)
        for want, have in zip(reference(model, f), got):
            np.testing.assert_array_equal(have, want)
        exact = numpy_reference(model, f)
        assert np.linalg.norm(got[1] - exact) <= 1e-5 * np.linalg.norm(exact)


def test_the_rewrite_counts_its_products_and_sums_and_touches_nothing_without_shapes(tmp_path):
    model = build_graph()
    opts = sessions.session_options()
    opts.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    optimised = onnx.load(str(tmp_path / "optimised.onnx"))
    assert layout.blocked_products(optimised, layout.sample_shapes(model)) == 3  # two products, one sum
    again = onnx.load(str(tmp_path / "optimised.onnx"))
    assert layout.blocked_products(again, {}) == 0  # shapes unknown: nothing is touched
    untouched = onnx.load(str(tmp_path / "optimised.onnx"))
    assert list(again.graph.node) == list(untouched.graph.node)


def test_a_product_broadcast_within_a_sample_is_left_as_written(tmp_path, monkeypatch):
    monkeypatch.setenv(sessions.CACHE_ENV, str(tmp_path / "cache"))
    model = build_graph(gate=True)
    shapes = layout.sample_shapes(model)
    assert shapes["gate"] == (C, 1, 1)
    opts = sessions.session_options()
    opts.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    optimised = onnx.load(str(tmp_path / "optimised.onnx"))
    assert layout.blocked_products(optimised, shapes) == 2  # the mask product and the sum only
    sess, _ = sessions.create_session(
        model.SerializeToString(),
        sessions.session_options(),
        ["CPUExecutionProvider"],
        "sha-of-gated-graph",
        "multi",
        sessions.Rewrite("t", lambda: feeds(2, 2, seed=9), lambda m: layout.blocked_products(m, shapes)),
    )
    f = feeds(3, 2)
    for want, have in zip(reference(model, f), sess.run([FEATURES, INPUT_GRADS], f)):
        np.testing.assert_array_equal(have, want)


def test_a_rewrite_that_changes_the_numbers_is_not_used(tmp_path, monkeypatch):
    """Told that the per-channel gate has the mask's shape, the rewrite pairs the gate's blocked
    values with the wrong gradient values; the probe shows it, and onnxruntime's graph is used."""
    monkeypatch.setenv(sessions.CACHE_ENV, str(tmp_path / "cache"))
    model = build_graph(gate=True)
    lie = {**layout.sample_shapes(model), "gate": (C, S, S)}
    applied = []

    def wrong(m):
        applied.append(layout.blocked_products(m, lie))
        return applied[-1]

    sess, status = sessions.create_session(
        model.SerializeToString(),
        sessions.session_options(),
        ["CPUExecutionProvider"],
        "sha-of-gated-graph",
        "multi",
        sessions.Rewrite("t", lambda: feeds(2, 2, seed=9), wrong),
    )
    assert applied == [3] and status == "stored"
    assert reorders(cached_graph(tmp_path / "cache")) == optimised_reorders(model, tmp_path)
    f = feeds(2, 3)
    for want, have in zip(reference(model, f), sess.run([FEATURES, INPUT_GRADS], f)):
        np.testing.assert_array_equal(have, want)


@pytest.mark.parametrize("cache", ["folder", "off"])
def test_a_failing_rewrite_leaves_onnxruntimes_graph(tmp_path, monkeypatch, cache):
    monkeypatch.setenv(sessions.CACHE_ENV, str(tmp_path / "cache") if cache == "folder" else "off")
    model = build_graph()

    def broken(m):
        raise ValueError("unexpected graph")

    sess, _ = sessions.create_session(
        model.SerializeToString(),
        sessions.session_options(),
        ["CPUExecutionProvider"],
        "sha-of-test-graph",
        "multi",
        rewrite(broken),
    )
    f = feeds(2, 2)
    for want, have in zip(reference(model, f), sess.run([FEATURES, INPUT_GRADS], f)):
        np.testing.assert_array_equal(have, want)


def test_the_rewrite_applies_with_the_cache_off(tmp_path, monkeypatch):
    monkeypatch.setenv(sessions.CACHE_ENV, "off")
    model = build_graph()
    loaded = []
    real = sessions._load_optimised
    monkeypatch.setattr(sessions, "_load_optimised", lambda *a: loaded.append(a) or real(*a))
    sess, status = sessions.create_session(
        model.SerializeToString(),
        sessions.session_options(),
        ["CPUExecutionProvider"],
        "sha-of-test-graph",
        "multi",
        rewrite(),
    )
    assert status == "off" and len(loaded) == 1  # the rewritten graph, loaded from a temporary file
    assert not list(tmp_path.iterdir())
    f = feeds(2, 3)
    for want, have in zip(reference(model, f), sess.run([FEATURES, INPUT_GRADS], f)):
        np.testing.assert_array_equal(have, want)
