"""A tiny exported-format model built with onnx.helper, so runtime tests need no PyTorch.

Two conv+ReLU layers (stride 1, then stride 2) and their hand-written adjoint, in the same graph
interface the export stage writes: image [N,3,16,16], cotangent [N,6,8,8] -> features, input_grad.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pbv_onnx.runtime.images import Preprocessing

SIZE = 16
FEATURE_SHAPE = (6, SIZE // 2, SIZE // 2)
PREPROCESSING = Preprocessing(resize=(SIZE, SIZE), crop=None, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _conv_relu_adjoint(fmap: str, g: str) -> list:
    """The tiny network's hand-written adjoint, from the cotangent `g` of its last ReLU map `fmap`."""
    return [
        helper.make_node("Greater", [fmap, "zero"], ["m2b"]),
        helper.make_node("Cast", ["m2b"], ["m2"], to=TensorProto.FLOAT),
        helper.make_node("Mul", [g, "m2"], ["g2"]),
        helper.make_node(
            "ConvTranspose", ["g2", "W2"], ["g1"], pads=[1, 1, 1, 1], strides=[2, 2], output_padding=[1, 1]
        ),
        helper.make_node("Greater", ["h1", "zero"], ["m1b"]),
        helper.make_node("Cast", ["m1b"], ["m1"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["g1", "m1"], ["g1m"]),
        helper.make_node("ConvTranspose", ["g1m", "W1"], ["input_grad"], pads=[1, 1, 1, 1], strides=[1, 1]),
    ]


def _save(model, path: str | Path, arch: str, pool: str, feature_shape: list[int], seed: int) -> Path:
    """The tiny model's metadata (as the export stage writes it), checked and saved."""
    meta = {
        "format_version": 1,
        "arch": arch,
        "layer": "conv2",
        "pool": pool,
        "feature_shape": feature_shape,
        "preprocessing": PREPROCESSING.to_dict(),
        "weights": {"source": "none", "seed": seed},
        "versions": {"opset": 17},
        "verification": {"note": "hand-built test model"},
        "adjoint": "hand-written",
    }
    onnx.helper.set_model_props(model, {k: json.dumps(v) for k, v in meta.items()})
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, str(path))
    return path


def tiny_batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n standard-normal images and cotangents for the tiny model, drawn from `rng` in that order."""
    x = rng.standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)
    return x, rng.standard_normal((n, *FEATURE_SHAPE)).astype(np.float32)


def tiny_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "W1": (rng.standard_normal((4, 3, 3, 3)) * 0.4).astype(np.float32),
        "b1": (rng.standard_normal(4) * 0.1 + 0.05).astype(np.float32),
        "W2": (rng.standard_normal((6, 4, 3, 3)) * 0.4).astype(np.float32),
        "b2": (rng.standard_normal(6) * 0.1 + 0.05).astype(np.float32),
    }


def tiny_forward(x: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
    """Reference forward pass in numpy (float64), for finite differences."""

    def conv(x, W, b, stride):
        n, c, h, wd = x.shape
        xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
        oh, ow = (h - 1) // stride + 1, (wd - 1) // stride + 1
        out = np.zeros((n, W.shape[0], oh, ow))
        for i in range(3):
            for j in range(3):
                patch = xp[:, :, i : i + stride * oh : stride, j : j + stride * ow : stride]
                out += np.einsum("nchw,oc->nohw", patch, W[:, :, i, j])
        return out + b[None, :, None, None]

    h1 = np.maximum(conv(x.astype(np.float64), w["W1"].astype(np.float64), w["b1"], 1), 0)
    return np.maximum(conv(h1, w["W2"].astype(np.float64), w["b2"], 2), 0)


def build_tiny_model(path: str | Path, seed: int = 0, arch: str = "tinycnn") -> Path:
    """Write the tiny model with pbv-onnx metadata to `path`."""
    w = tiny_weights(seed)
    nodes = [
        helper.make_node("Conv", ["image", "W1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("Relu", ["c1"], ["h1"]),
        helper.make_node("Conv", ["h1", "W2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["features"]),
        # adjoint
        *_conv_relu_adjoint("features", "cotangent"),
    ]
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    inits.append(numpy_helper.from_array(np.zeros((), np.float32), "zero"))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [
            helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, SIZE, SIZE]),
            helper.make_tensor_value_info("cotangent", TensorProto.FLOAT, ["N", *FEATURE_SHAPE]),
        ],
        [
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", *FEATURE_SHAPE]),
            helper.make_tensor_value_info("input_grad", TensorProto.FLOAT, ["N", 3, SIZE, SIZE]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return _save(model, path, arch, "none", list(FEATURE_SHAPE), seed)


def build_tiny_pooled_model(path: str | Path, seed: int = 0, feature_map: bool = True) -> Path:
    """The tiny model with global average pooling at the cut (pool "avg"): features [N, 6], and, unless
    `feature_map=False` (a pooled model exported before the format had it), the map before pooling
    `feature_map` [N, 6, 8, 8] (reference: tiny_forward)."""
    w = tiny_weights(seed)
    fmap = "feature_map" if feature_map else "fmap"
    n_pos = FEATURE_SHAPE[1] * FEATURE_SHAPE[2]
    nodes = [
        helper.make_node("Conv", ["image", "W1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("Relu", ["c1"], ["h1"]),
        helper.make_node("Conv", ["h1", "W2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], [fmap]),
        helper.make_node("GlobalAveragePool", [fmap], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["features"], axis=1),
        # adjoint: the cotangent spread evenly over the positions, then as the unpooled model
        helper.make_node("Unsqueeze", ["cotangent", "axes23"], ["cot4"]),
        helper.make_node("Shape", [fmap], ["fshape"]),
        helper.make_node("Expand", ["cot4", "fshape"], ["cotx"]),
        helper.make_node("Mul", ["cotx", "inv_pos"], ["cotp"]),
        *_conv_relu_adjoint(fmap, "cotp"),
    ]
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    inits += [
        numpy_helper.from_array(np.zeros((), np.float32), "zero"),
        numpy_helper.from_array(np.array(1.0 / n_pos, np.float32), "inv_pos"),
        numpy_helper.from_array(np.array([2, 3], np.int64), "axes23"),
    ]
    outputs = [
        helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", FEATURE_SHAPE[0]]),
        helper.make_tensor_value_info("input_grad", TensorProto.FLOAT, ["N", 3, SIZE, SIZE]),
    ]
    if feature_map:
        outputs.append(helper.make_tensor_value_info("feature_map", TensorProto.FLOAT, ["N", *FEATURE_SHAPE]))
    graph = helper.make_graph(
        nodes,
        "tiny_pooled",
        [
            helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, SIZE, SIZE]),
            helper.make_tensor_value_info("cotangent", TensorProto.FLOAT, ["N", FEATURE_SHAPE[0]]),
        ],
        outputs,
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return _save(model, path, "tinycnn", "avg", [FEATURE_SHAPE[0]], seed)
