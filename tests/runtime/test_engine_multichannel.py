"""Several cotangents per image: Engine.vjp_multi, duplicate images routed to it, explain using it.

The reference is the tiny hand-built model (one cotangent per image, tests/tinymodel.py); the
multi-cotangent models are the same graph and weights with the backward masks read through the
[N*K] image-major layout: through `cotangent` itself (models exported before the layouts were
split), or through a second input `cotangents` beside the one-per-image pass, as the export stage
writes now.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from test_explain import make_study_files
from tinymodel import FEATURE_SHAPE, SIZE, build_tiny_model

from pbv_onnx.base.errors import UsageError
from pbv_onnx.runtime.engine import COTANGENTS, INPUT_GRADS, Engine, duplicate_groups
from pbv_onnx.runtime.modelfile import MULTI_COTANGENT, has_split_passes
from pbv_onnx.workflows import explain as ex

MASKED = {"g2": ("cotangent", "m2", FEATURE_SHAPE), "g1m": ("g1", "m1", (4, SIZE, SIZE))}


def build_multi_tiny_model(path, seed: int = 0):
    """The tiny model with each mask product g * m done as reshape(g, [N, K, ...]) * m[:, None]."""
    model = onnx.load(str(build_tiny_model(path, seed)))
    nodes = [helper.make_node("Shape", ["image"], ["n_shape"], end=1)]
    inits = []
    for node in model.graph.node:
        if node.op_type == "Mul" and node.output[0] in MASKED:
            g, m, shape = MASKED[node.output[0]]
            out = node.output[0]
            inits += [
                numpy_helper.from_array(np.array([-1, *shape], np.int64), f"{out}_flat"),
                numpy_helper.from_array(np.array([1], np.int64), f"{out}_axis"),
            ]
            nodes += [
                helper.make_node("Concat", ["n_shape", f"{out}_flat"], [f"{out}_5d"], axis=0),
                helper.make_node("Reshape", [g, f"{out}_5d"], [f"{out}_g"]),
                helper.make_node("Unsqueeze", [m, f"{out}_axis"], [f"{out}_m"]),
                helper.make_node("Mul", [f"{out}_g", f"{out}_m"], [f"{out}_p"]),
                helper.make_node("Reshape", [f"{out}_p", f"{out}_flat"], [out]),
            ]
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(inits)
    for vi in (*model.graph.input, *model.graph.output):
        if vi.name in ("cotangent", "input_grad"):
            vi.type.tensor_type.shape.dim[0].dim_param = "NK"
    model.metadata_props.add(key=MULTI_COTANGENT, value=json.dumps(True))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def build_split_tiny_model(path, seed: int = 0):
    """The tiny model plus the multi model's backward pass beside it, fed by `cotangents` (empty
    by default) into `input_grads`, both passes reading one forward pass."""
    single = onnx.load(str(build_tiny_model(path, seed)))
    multi = onnx.load(str(build_multi_tiny_model(path, seed)))
    have = {o for n in single.graph.node for o in n.output}
    backward = {"cotangent"}
    nodes = list(single.graph.node)
    for node in multi.graph.node:
        if not backward & set(node.input):
            if not set(node.output) <= have:  # forward-side helpers of the multi layout
                nodes.append(node)
            continue
        backward.update(node.output)
        renamed = onnx.NodeProto()
        renamed.CopyFrom(node)
        renamed.input[:] = [COTANGENTS if i == "cotangent" else f"{i}_k" if i in backward else i for i in node.input]
        renamed.output[:] = [INPUT_GRADS if o == "input_grad" else f"{o}_k" for o in node.output]
        nodes.append(renamed)
    del single.graph.node[:]
    single.graph.node.extend(nodes)
    single.graph.initializer.extend(
        i for i in multi.graph.initializer if i.name not in {j.name for j in single.graph.initializer}
    )
    single.graph.initializer.append(numpy_helper.from_array(np.zeros((0, *FEATURE_SHAPE), np.float32), COTANGENTS))
    single.graph.input.append(helper.make_tensor_value_info(COTANGENTS, onnx.TensorProto.FLOAT, ["NK", *FEATURE_SHAPE]))
    single.graph.output.append(
        helper.make_tensor_value_info(INPUT_GRADS, onnx.TensorProto.FLOAT, ["NK", 3, SIZE, SIZE])
    )
    single.metadata_props.add(key=MULTI_COTANGENT, value=json.dumps(True))
    onnx.checker.check_model(single)
    onnx.save(single, str(path))
    return path


@pytest.fixture(scope="module", params=["cotangent", "cotangents"])
def models(request, tmp_path_factory):
    """(one cotangent per image, K per image through `request.param`)."""
    folder = tmp_path_factory.mktemp("multi")
    build = build_multi_tiny_model if request.param == "cotangent" else build_split_tiny_model
    return build_tiny_model(folder / "single.onnx"), build(folder / "multi.onnx")


def test_a_split_model_runs_each_pass_as_its_own_part(tmp_path):
    path = build_split_tiny_model(tmp_path / "split.onnx")
    eng = Engine(path, device="cpu")
    x, cot = _inputs(2, 3, seed=5)
    eng.vjp(x, cot[:, 0])
    eng.vjp_multi(x, cot)
    assert [i.name for i in eng._vjp.get_inputs()] == ["image", "cotangent"]  # no K-layout nodes run
    assert [i.name for i in eng._multi.get_inputs()] == ["image", COTANGENTS]
    # the whole graph fed (image, cotangent) alone, as the format promises: cotangents default empty
    whole = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    f, g, gs = whole.run(None, {"image": x, "cotangent": cot[:, 0]})
    assert gs.shape == (0, 3, SIZE, SIZE)
    np.testing.assert_allclose(g, eng.vjp(x, cot[:, 0])[1], rtol=1e-6, atol=1e-7)


def _inputs(n: int, k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)
    return x, rng.standard_normal((n, k, *FEATURE_SHAPE)).astype(np.float32)


def test_k_cotangents_per_image_equal_k_single_vjps(models):
    single, multi = (Engine(p, device="cpu") for p in models)
    assert multi.multi and not single.multi
    x, cot = _inputs(3, 5)
    f, g = multi.vjp_multi(x, cot)
    assert f.shape == (3, *FEATURE_SHAPE) and g.shape == (3, 5, 3, SIZE, SIZE)
    for k in range(5):
        f1, g1 = single.vjp(x, cot[:, k])
        np.testing.assert_allclose(f, f1, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(g[:, k], g1, rtol=1e-5, atol=1e-6)
    assert np.abs(g[:, 0] - g[:, 1]).max() > 1e-3  # the cotangents are not mixed up


def test_k_larger_than_batch_size_and_flat_cotangents(models):
    single = Engine(models[0], device="cpu")
    multi = Engine(models[1], device="cpu", batch_size=3)
    x, cot = _inputs(4, 7, seed=1)
    _, g = multi.vjp_multi(x, cot.reshape(4, 7, -1))  # [N, K, D] accepted too
    for k in range(7):
        np.testing.assert_allclose(g[:, k], single.vjp(x, cot[:, k])[1], rtol=1e-5, atol=1e-6)


def test_model_without_the_layout_falls_back_to_repeated_images(models):
    single = Engine(models[0], device="cpu")
    x, cot = _inputs(2, 3, seed=2)
    f, g = single.vjp_multi(x, cot)
    for k in range(3):
        np.testing.assert_allclose(g[:, k], single.vjp(x, cot[:, k])[1], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(f, single.feature_maps(x), rtol=1e-6, atol=1e-6)


def test_bad_cotangent_shapes_are_usage_errors(models):
    multi = Engine(models[1], device="cpu")
    x, cot = _inputs(2, 3)
    with pytest.raises(UsageError, match="cotangents must be"):
        multi.vjp_multi(x, cot[:1])
    with pytest.raises(UsageError, match="cotangents must be"):
        multi.vjp_multi(x, cot[:, :, :2])


def recorded(engine: Engine) -> list[tuple[int, dict]]:
    """(id of the session, copies of the feeds) of each call `engine` makes from now on."""
    calls = []
    run = engine._run

    def recording(sess, outputs, feeds):
        calls.append((id(sess), {k: v.copy() for k, v in feeds.items()}))
        return run(sess, outputs, feeds)

    engine._run = recording
    return calls


def test_padded_calls_give_the_same_results_and_each_session_sees_one_shape(models):
    # fixed_shapes (the CUDA default): the CUDA provider plans its convolutions again whenever a
    # session's input shape changes, so calls are padded with zero rows to a few shapes, and the
    # K-per-image pass has one session per shape.
    plain = Engine(models[1], device="cpu", batch_size=4)
    padded = Engine(models[1], device="cpu", batch_size=4, fixed_shapes=True)
    calls = recorded(padded)
    x, cot = _inputs(7, 6, seed=4)
    np.testing.assert_allclose(padded.features(x), plain.features(x), rtol=1e-6, atol=1e-6)  # 4 + 3 rows
    for got, want in zip(padded.vjp(x[:5], cot[:5, 0]), plain.vjp(x[:5], cot[:5, 0])):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for k in (2, 3, 5, 6):  # padded to 2, 4, 4 (two calls) and 4 (two calls) cotangents per image
        for got, want in zip(padded.vjp_multi(x, cot[:, :k]), plain.vjp_multi(x, cot[:, :k])):
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert padded.pads and not plain.pads  # the CPU provider runs unpadded by default
    fed = {}  # session -> the input shapes it was fed
    for session, feeds in calls:
        fed.setdefault(session, set()).add(tuple(v.shape for v in feeds.values()))
    if has_split_passes(onnx.load(str(models[1]))):
        assert all(len(shapes) == 1 for shapes in fed.values()), fed
        assert len(fed) == 4  # features, one per image, and K-per-image at (2 x 2) and (1 x 4)
    by_default = Engine(models[1], device="cpu")
    by_default.features(x[:1])
    assert not by_default.pads
    by_default._on_cuda = True  # what the first session sets where it runs on CUDA
    assert by_default.pads


def test_duplicate_groups_are_bitwise_and_ordered():
    a, b = np.zeros((3, 4, 4), np.float32), np.ones((3, 4, 4), np.float32)
    c = b.copy()
    c[0, 0, 0] = np.nextafter(np.float32(1), np.float32(2))  # one ulp apart: a different image
    groups = duplicate_groups(np.stack([b, a, b, c, a, b]))
    assert [g.tolist() for g in groups] == [[0, 2, 5], [1, 4], [3]]
    # differing only where the bucket hash does not look: still told apart by the full comparison
    d = b.copy()
    d.flat[1] = 2.0
    groups = duplicate_groups(np.stack([b, d, b, d]))
    assert [g.tolist() for g in groups] == [[0, 2], [1, 3]]


def vjp_of_repeated_images(models, order: list[int], seed: int, **engine_kw) -> list[dict]:
    """vjp() of the K-per-image model on images[order] (three images), checked against the
    one-per-image model; returns the feeds of each session call it made."""
    single = Engine(models[0], device="cpu")
    multi = Engine(models[1], device="cpu", **engine_kw)
    x, _ = _inputs(3, 1, seed=seed)
    images = x[order]
    cots = np.random.default_rng(seed + 1).standard_normal((len(order), *FEATURE_SHAPE)).astype(np.float32)
    calls = recorded(multi)
    f, g = multi.vjp(images, cots)
    f1, g1 = single.vjp(images, cots)
    np.testing.assert_allclose(f, f1, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(g, g1, rtol=1e-5, atol=1e-6)
    return [feeds for _, feeds in calls]


def test_vjp_with_repeated_images_runs_each_forward_once(models):
    # image 0 four times, 1 and 2 twice each
    fed = vjp_of_repeated_images(models, [0, 1, 0, 2, 0, 1, 2, 0], seed=3, batch_size=4)
    assert sum(len(feeds["image"]) for feeds in fed) == 3  # three distinct images, one forward pass each


def test_images_seen_once_go_through_the_one_per_image_pass(models):
    fed = vjp_of_repeated_images(models, [1, 0, 2, 0], seed=5)  # image 0 twice, 1 and 2 once
    split = has_split_passes(onnx.load(str(models[1])))
    per_image = COTANGENTS if split else "cotangent"
    calls = sorted((sorted(feeds), len(feeds["image"])) for feeds in fed)
    assert calls == sorted([(["cotangent", "image"], 2), (sorted([per_image, "image"]), 1)])


def test_explain_one_object_for_several_channels_shares_its_forward_pass(models, tmp_path):
    files = make_study_files(tmp_path / "study", models[1])
    results = {}
    for multi in (True, False):
        study = ex.open_study(files["model"], files["readouts"], files["responses"], device="cpu", progress=False)
        study.engine.multi = multi
        pairs = ex.build_pairs(study, images=["o00"], reference="b01")  # 3 channels, 1 object, 1 reference
        assert len(pairs) == 3
        fed = []
        run = study.engine._run

        def counting(sess, outputs, feeds, run=run, fed=fed):
            fed.append(len(feeds["image"]))  # images whose forward pass this call runs
            return run(sess, outputs, feeds)

        study.engine._run = counting
        results[multi] = (ex.explain(study, pairs), sum(fed))
    (shared, n_shared), (separate, n_separate) = results[True], results[False]
    np.testing.assert_allclose(shared["input_grad"].values, separate["input_grad"].values, rtol=1e-5, atol=1e-7)
    assert n_shared == 2 and n_separate == 6  # forward passes: object and reference once each
