"""The ONNX-graph adjoint transform as a whole (runtime env, no torch): preparation (input size, cut,
folding, opset conversion), layers, pooling, the Engine on a transformed model, the float16 copy."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper
from test_graph_rules import EXACT, FD_TOL, _cnn, check_model

from pbv_onnx.base.errors import ModelError, UsageError
from pbv_onnx.export.graph import build, list_layers, transform
from pbv_onnx.export.graph.prepare import prepare
from pbv_onnx.export.graph.rules import example_model, example_weights
from pbv_onnx.method.stats import rel_l2
from pbv_onnx.runtime.engine import Engine
from pbv_onnx.runtime.fp16 import to_fp16
from pbv_onnx.runtime.images import Preprocessing
from pbv_onnx.runtime.modelfile import COTANGENT, FEATURES, FORMAT_VERSION, IMAGE, INPUT_GRAD


def _write(built, path, size=(12, 10)):
    """The transform's model with the front ends' metadata, as a model file."""
    proto = built.model
    meta = {p.key: p.value for p in proto.metadata_props}
    meta.update(
        format_version=json.dumps(FORMAT_VERSION),
        arch=json.dumps("cnn"),
        preprocessing=json.dumps(Preprocessing(resize=size).to_dict()),
    )
    del proto.metadata_props[:]
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.save(proto, str(path))
    return path


def _session(proto):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def test_engine_runs_a_transformed_model(tmp_path):
    built = build(_cnn())
    path = _write(built, tmp_path / "cnn.onnx")
    eng = Engine(path, device="cpu", batch_size=4)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 3, 12, 10)).astype(np.float32)
    cot = rng.standard_normal((3, *built.feature_shape)).astype(np.float32)
    f, g = eng.vjp(x, cot)
    ref_f, ref_g = _session(built.model).run([FEATURES, INPUT_GRAD], {IMAGE: x, COTANGENT: cot})
    ref_f = ref_f.reshape(len(x), -1)  # the Engine's features are flat
    assert rel_l2(f.reshape(len(x), -1), ref_f) < EXACT and rel_l2(g, ref_g) < EXACT
    assert rel_l2(eng.features(x).reshape(len(x), -1), ref_f) < EXACT
    cots = rng.standard_normal((3, 2, *built.feature_shape)).astype(np.float32)
    _, gm = eng.vjp_multi(x, cots)
    one = np.stack([eng.vjp(x, cots[:, j])[1] for j in range(2)], axis=1)
    assert rel_l2(gm, one) < EXACT


def test_float16_copy_tracks_float32():
    built = build(_cnn())
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 12, 10)).astype(np.float32)
    cot = rng.standard_normal((2, *built.feature_shape)).astype(np.float32)
    f32, g32 = _session(built.model).run([FEATURES, INPUT_GRAD], {IMAGE: x, COTANGENT: cot})
    f16, g16 = _session(to_fp16(built.model)).run([FEATURES, INPUT_GRAD], {IMAGE: x, COTANGENT: cot})
    assert rel_l2(f16, f32) < 5e-3 and rel_l2(g16, g32) < 2e-2


def test_cut_at_an_inner_tensor_and_unknown_names():
    errors = check_model(_cut(_cnn(), "p1"))
    assert errors["input_grad[c]"] < FD_TOL
    built = build(_cnn(), cut="p1")
    assert built.feature_shape == (4, 6, 5)
    assert json.loads({p.key: p.value for p in built.model.metadata_props}["layer"]) == "p1"
    with pytest.raises(UsageError, match="no tensor 'nope'"):
        transform(_cnn(), cut="nope")
    with pytest.raises(UsageError, match="'w1' is a constant"):
        transform(_cnn(), cut="w1")
    model = _cnn()
    model.graph.node.append(helper.make_node("Neg", ["w1"], ["negw"]))
    with pytest.raises(UsageError, match="does not depend on the image"):
        transform(model, cut="negw")


def _cut(model, name):
    """The model truncated at `name` (the float64 reference of check_model runs it whole)."""
    from onnx.utils import Extractor

    return Extractor(onnx.shape_inference.infer_shapes(model)).extract_model(["x"], [name])


def test_layers_list_image_tensors_only():
    layers = list_layers(_cnn())
    names = [n for n, _, _ in layers]
    assert names == ["c1", "b1", "r1", "p1", "c2", "s", "y"]
    assert dict((n, (op, s)) for n, op, s in layers)["p1"] == ("MaxPool", ("N", 4, 6, 5))


def test_input_size_fixed_from_the_call_when_the_model_leaves_it_open():
    model = _cnn()
    for d, v in zip(model.graph.input[0].type.tensor_type.shape.dim[2:], ("H", "W")):
        d.dim_param = v
    with pytest.raises(UsageError, match="input size"):
        prepare(model)
    built = build(model, input_size=(16, 12))
    assert built.feature_shape == (4, 8, 6)
    assert [d.dim_value for d in built.model.graph.input[0].type.tensor_type.shape.dim[1:]] == [3, 16, 12]


def test_older_opset_is_converted():
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    model = example_model(nodes, (3, 6, 6), {"w": example_weights(0, 2, 3, 3, 3, scale=0)}, opset=13)
    errors = check_model(model)
    assert errors["input_grad[c]"] < FD_TOL


def test_refuses_models_without_one_image_input():
    model = _cnn()
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 4
    with pytest.raises(ModelError, match="4 channels"):
        transform(model)
    two = _cnn()
    two.graph.input.append(helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1]))
    with pytest.raises(ModelError, match="one image input"):
        transform(two)


def test_reserved_names_in_the_forward_graph_are_kept_apart():
    """A forward tensor named like a format I/O (`features`) does not collide with the outputs."""
    nodes = [helper.make_node("Relu", ["x"], ["features"]), helper.make_node("Tanh", ["features"], ["y"])]
    errors = check_model(example_model(nodes, (3, 4, 4)))
    assert errors["input_grad[c]"] < FD_TOL and errors["multi"] < EXACT
    assert list_layers(example_model(nodes, (3, 4, 4)))[0][0] == "features"
