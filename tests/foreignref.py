"""Helpers of the tests that compare a converted model from another framework with that framework's own
reference (tests/runtime/test_foreign_model.py: Keras; test_jax_model.py: JAX)."""

from __future__ import annotations

import numpy as np


def rel_per_image(a: np.ndarray, b: np.ndarray) -> float:
    """The largest relative L2 difference over the leading (image) axis."""
    a, b = np.asarray(a, np.float64).reshape(len(b), -1), np.asarray(b, np.float64).reshape(len(b), -1)
    return float(np.max(np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)))


def run(model, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
    """`outputs` of an ONNX model on onnxruntime's CPU, 2 threads, fed those of `feeds` it takes."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    # `cotangents` has an empty default: onnxruntime lists it as an overridable initializer
    names = {i.name for i in (*sess.get_inputs(), *sess.get_overridable_initializers())}
    return sess.run(outputs, {k: v for k, v in feeds.items() if k in names})
