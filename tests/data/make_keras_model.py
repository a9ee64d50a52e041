"""Make tests/data/keras_small.onnx and its TensorFlow reference gradients (keras_small_reference.npz).

A model from another framework, checked against that framework's own autodiff (issue 23): a small
Keras CNN with seeded weights, converted by tf2onnx (opset 17, NCHW image input [N,3,64,64]), and for a
few seeded images x and cotangents c, features f(x) and input_grad d(c . f(x))/dx from tf.GradientTape.
Two cuts: the graph's output (logits [N,10], K=2 cotangents per image) and the last ReLU map
[N,24,14,14] averaged over space (`pool="avg"`, which is the model's own GlobalAveragePooling).

The reference runs a float64 copy of the same Keras model (same weights, cast), so it carries no
float32 rounding through the network; it is stored rounded to float32 (relative 6e-8 per element) to
keep the file small. `fp32_floor_*`: how far TensorFlow's own float32 pass is from it, the floor a
float32 ONNX graph can be expected to reach. The script also writes the forward pass out by hand in
TensorFlow ops (it must agree with Keras' gradient) and breaks one op's adjoint at a time in it, and
prints how far each broken gradient lands: what the test's bounds must tell apart.

TensorFlow and tf2onnx are too heavy for the project's environments and CI: run this in a separate
virtualenv, e.g.
    python3 -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu tf2onnx onnxruntime
    /tmp/tfenv/bin/python tests/data/make_keras_model.py
The outputs are committed; tests/runtime/test_foreign_model.py uses them without TensorFlow. The
reference file is reproducible bit for bit; tf2onnx's graph is not quite (the generated names of its
folded constants change run to run, and its optimizer now and then drops the Reshape in the
LayerNorm), so the test reads the committed graph and never regenerates it.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# oneDNN reorders float32 sums run to run; off, the float32 numbers below are reproducible.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf2onnx  # noqa: E402

HERE = Path(__file__).resolve().parent
ONNX_PATH = HERE / "keras_small.onnx"
REFERENCE_PATH = HERE / "keras_small_reference.npz"
SIZE = 64
N_IMAGES = 3
K = 2  # cotangents per image at the output cut
N_OUT = 10
RELU_MAP = "keras_small_1/head_relu_1/Relu:0"  # the tf2onnx name of head_relu's output, [N,24,14,14]
SEED = 0
OPSET = 17


def build(dtype: str) -> keras.Model:
    """The CNN in NHWC (Keras' layout): Conv+BN+ReLU, a depthwise/pointwise block with a residual Add,
    MaxPool, Conv+LayerNorm+ReLU, global average pooling, Dense."""
    L = keras.layers
    inp = keras.Input((SIZE, SIZE, 3), dtype=dtype, name="image")
    h = L.Conv2D(16, 3, strides=2, padding="same", dtype=dtype, name="stem_conv")(inp)
    h = L.BatchNormalization(dtype=dtype, name="stem_bn")(h)
    h = L.ReLU(dtype=dtype, name="stem_relu")(h)
    r = L.DepthwiseConv2D(3, padding="same", dtype=dtype, name="dw_conv")(h)
    r = L.BatchNormalization(dtype=dtype, name="dw_bn")(r)
    r = L.ReLU(dtype=dtype, name="dw_relu")(r)
    r = L.Conv2D(16, 1, dtype=dtype, name="pw_conv")(r)
    h = L.Add(dtype=dtype, name="residual")([h, r])
    h = L.MaxPooling2D(3, strides=2, padding="same", dtype=dtype, name="pool")(h)
    h = L.Conv2D(24, 3, padding="valid", dtype=dtype, name="head_conv")(h)
    h = L.LayerNormalization(axis=-1, dtype=dtype, name="head_ln")(h)
    h = L.ReLU(dtype=dtype, name="head_relu")(h)
    h = L.GlobalAveragePooling2D(dtype=dtype, name="gap")(h)
    pooled = h
    out = L.Dense(N_OUT, dtype=dtype, name="logits")(h)
    return keras.Model(inp, [out, pooled], name="keras_small")


def seeded_weights(model: keras.Model, rng: np.random.Generator) -> list[np.ndarray]:
    """Every weight drawn from `rng`: kernels He-scaled; norm affines and BatchNorm statistics at
    order 1 (a unit scale and zero offset would let an adjoint that ignores them pass)."""
    out = []
    for layer in model.layers:
        for w in layer.weights:
            shape, name = tuple(w.shape), w.path.split("/")[-1]
            if name in ("kernel", "depthwise_kernel"):
                fan_in = int(np.prod(shape[:-1])) if name == "kernel" else int(np.prod(shape[:2]))
                value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
            elif name == "gamma":
                value = rng.uniform(0.5, 2.0, shape) * rng.choice([-1.0, 1.0], shape)
            elif name in ("beta", "bias"):
                value = rng.standard_normal(shape) * 0.5
            elif name == "moving_mean":
                value = rng.standard_normal(shape) * 0.5
            elif name == "moving_variance":
                value = rng.uniform(0.5, 2.0, shape)
            else:
                raise SystemExit(f"unexpected weight {w.path}")
            out.append(value)
    return out


def features_and_grad(model: keras.Model, x_nchw: np.ndarray, c: np.ndarray, which: int, dtype):
    """Output `which` of the model, f(x), and d(c . f(x))/dx through tf.GradientTape, x in NCHW (the
    ONNX model's layout); c is [N, K, *f.shape[1:]]: K cotangents per image, one tape each."""
    x = tf.constant(x_nchw.astype(dtype))
    grads = []
    for k in range(c.shape[1]):
        with tf.GradientTape() as tape:
            tape.watch(x)
            f = model(tf.transpose(x, [0, 2, 3, 1]), training=False)[which]
            y = tf.reduce_sum(f * tf.constant(c[:, k].astype(dtype)))
        grads.append(tape.gradient(y, x).numpy())
    return f.numpy(), np.stack(grads, axis=1)


WRONG_ADJOINTS = (
    "BatchNorm scale ignored",
    "residual branch dropped",
    "max-pool gradient spread over its window",
    "LayerNorm statistics held constant",
    "LayerNorm scale ignored",
)


def by_hand(model: keras.Model, x_nhwc, wrong: str | None = None):
    """The model's forward pass written out in TensorFlow ops with its weights; `wrong` (one of
    WRONG_ADJOINTS) breaks one op's adjoint and leaves the forward values as they are (the
    stop_gradient trick: sg(f) + g - sg(g) has f's value and g's gradient). How far such gradients
    land from the reference shows what the test's bounds can tell apart."""
    w = {v.path: v for v in model.weights}
    sg = tf.stop_gradient

    def swap(f, g):  # f's value, g's gradient
        return sg(f) + g - sg(g)

    def bn(h, name):
        g, b, m, v = (w[f"{name}/{k}"] for k in ("gamma", "beta", "moving_mean", "moving_variance"))
        y = (h - m) * (g / tf.sqrt(v + 1e-3)) + b
        return swap(y, h) if wrong == "BatchNorm scale ignored" and name == "stem_bn" else y

    h = tf.nn.conv2d(x_nhwc, w["stem_conv/kernel"], 2, "SAME") + w["stem_conv/bias"]
    h = tf.nn.relu(bn(h, "stem_bn"))
    r = tf.nn.depthwise_conv2d(h, w["dw_conv/kernel"], [1, 1, 1, 1], "SAME") + w["dw_conv/bias"]
    r = tf.nn.relu(bn(r, "dw_bn"))
    r = tf.nn.conv2d(r, w["pw_conv/kernel"], 1, "VALID") + w["pw_conv/bias"]
    h = h + (sg(r) if wrong == "residual branch dropped" else r)
    pooled = tf.nn.max_pool2d(h, 3, 2, "SAME")
    if wrong == "max-pool gradient spread over its window":
        pooled = swap(pooled, tf.nn.avg_pool2d(h, 3, 2, "SAME"))
    h = tf.nn.conv2d(pooled, w["head_conv/kernel"], 1, "VALID") + w["head_conv/bias"]
    mean, var = tf.nn.moments(h, axes=[-1], keepdims=True)
    if wrong == "LayerNorm statistics held constant":
        mean, var = sg(mean), sg(var)
    xhat = (h - mean) / tf.sqrt(var + 1e-3)
    h = xhat * w["head_ln/gamma"] + w["head_ln/beta"]
    if wrong == "LayerNorm scale ignored":
        h = swap(h, xhat)
    h = tf.nn.relu(h)
    return tf.reduce_mean(h, axis=[1, 2]) @ w["logits/kernel"] + w["logits/bias"]


def wrong_adjoint_errors(model: keras.Model, x_nchw: np.ndarray, c: np.ndarray, g_ref: np.ndarray) -> dict:
    """Relative L2 (largest over images) of each broken gradient from the reference; "" is the
    by-hand pass unbroken, which must agree with Keras' own gradient."""
    x = tf.constant(x_nchw.astype(np.float64))
    out = {}
    for wrong in ("", *WRONG_ADJOINTS):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(by_hand(model, tf.transpose(x, [0, 2, 3, 1]), wrong or None) * c)
        d = (tape.gradient(y, x).numpy() - g_ref).reshape(len(x), -1)
        out[wrong] = float(np.max(np.linalg.norm(d, axis=1) / np.linalg.norm(g_ref.reshape(len(x), -1), axis=1)))
    return out


def main() -> None:
    keras.utils.set_random_seed(SEED)
    model32, model64 = build("float32"), build("float64")
    weights = seeded_weights(model32, np.random.default_rng(SEED))
    model32.set_weights([w.astype(np.float32) for w in weights])
    model64.set_weights(weights)

    rng = np.random.default_rng(SEED + 1)
    x = rng.standard_normal((N_IMAGES, 3, SIZE, SIZE)).astype(np.float32)
    c = rng.standard_normal((N_IMAGES, K, N_OUT)).astype(np.float32)
    c_avg = rng.standard_normal((N_IMAGES, 1, 24)).astype(np.float32)
    f64, g64 = features_and_grad(model64, x, c, 0, np.float64)
    f32, g32 = features_and_grad(model32, x, c, 0, np.float32)
    a64, h64 = features_and_grad(model64, x, c_avg, 1, np.float64)
    a32, h32 = features_and_grad(model32, x, c_avg, 1, np.float32)

    # tf2onnx converts a tf.function; inputs_as_nchw makes the image input [N,3,H,W] (it inserts the
    # NCHW->NHWC Transpose and its optimizer pushes it into the convolutions).
    spec = (tf.TensorSpec((None, SIZE, SIZE, 3), tf.float32, name="image"),)
    fn = tf.function(lambda image: model32(image, training=False)[0])
    proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=OPSET, inputs_as_nchw=["image"])
    onnx.checker.check_model(proto, full_check=True)
    (inp,) = proto.graph.input
    dims = [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim]
    assert dims[1:] == [3, SIZE, SIZE] and isinstance(dims[0], str), dims
    assert RELU_MAP in {o for n in proto.graph.node for o in n.output}, RELU_MAP

    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    # The converted graph against TensorFlow's float32 forward pass, before anything is written.
    import onnxruntime as ort

    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (f_onnx,) = sess.run(None, {inp.name: x})
    if rel(f_onnx, f32) > 1e-5:
        raise SystemExit(f"tf2onnx's graph is {rel(f_onnx, f32):.1e} off TensorFlow's forward pass")

    versions = (
        f"tensorflow {tf.__version__}; keras {keras.__version__}; tf2onnx {tf2onnx.__version__}; "
        f"onnx {onnx.__version__}; numpy {np.__version__}"
    )
    onnx.save(proto, ONNX_PATH)
    np.savez_compressed(
        REFERENCE_PATH,
        x=x,
        c=c,
        features=f64.astype(np.float32),
        input_grad=g64.astype(np.float32),
        c_avg=c_avg[:, 0],
        features_avg=a64.astype(np.float32),
        input_grad_avg=h64[:, 0].astype(np.float32),
        fp32_floor_features=np.float64(max(rel(f32, f64), rel(a32, a64))),
        fp32_floor_input_grad=np.float64(max(rel(g32, g64), rel(h32, h64))),
        relu_map=np.array(RELU_MAP),
        input_name=np.array(inp.name),
        versions=np.array(versions),
    )
    ops = sorted({n.op_type for n in proto.graph.node})
    print(versions)
    print(f"ONNX ops: {', '.join(ops)}")
    print(f"onnx features vs tf float32: {rel(f_onnx, f32):.2e}; vs tf float64: {rel(f_onnx, f64):.2e}")
    print(f"tf float32 vs float64: features {rel(f32, f64):.2e}, input_grad {rel(g32, g64):.2e}")
    print(f"tf float32 vs float64 (avg-pooled map): features {rel(a32, a64):.2e}, input_grad {rel(h32, h64):.2e}")
    errors = wrong_adjoint_errors(model64, x, c[:, 0].astype(np.float64), g64[:, 0])
    print(f"by-hand TensorFlow pass vs Keras' gradient: {errors.pop(''):.1e}")
    for wrong, err in errors.items():
        print(f"  a wrong adjoint ({wrong}): input_grad off by {err:.2e}")
    for path in (ONNX_PATH, REFERENCE_PATH):
        print(f"{path.name}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
