"""Make tests/data/jax_vit.onnx and its JAX reference gradients (jax_vit_reference.npz).

A transformer from another framework, checked against that framework's own autodiff (issue 23): a
small vision transformer written with Flax's nnx modules (patch Conv, class token, position
embedding, two pre-norm blocks of nnx.MultiHeadAttention and a GELU MLP (erf in the first, tanh, nnx.gelu's
default, in the second), final LayerNorm, a Linear
head on the class token), NHWC image input [N,32,32,3] as JAX writes images, with seeded weights,
converted by jax2onnx (opset 17) with a dynamic batch (jax_vit.onnx) and at batch size 1
(jax_vit_b1.onnx). For a few seeded images x and cotangents c: the
head's logits and the final tokens [N,65,32], and input_grad d(c . f(x))/dx from jax.vjp.

The reference is jax.vjp of the same model written out in jax.numpy, in float64 (jax_enable_x64, the
same weights cast), so it carries no float32 rounding through the network: the modules' own float64
pass takes attention's softmax in float32 (jax.nn.dot_product_attention), and the script prints how
far their gradient is from it. It is stored rounded to float32 to keep the file small.
`fp32_floor_*`: how far the modules' float32 pass (the one exported) is from it, the floor a float32
ONNX graph can be expected to reach. The script also breaks one piece of the gradient at a time (the
stop-gradient trick: the forward values unchanged) and prints how far each broken gradient lands:
what the test's bounds must tell apart.

JAX, Flax and jax2onnx are too heavy for the project's environments and CI: run this in a separate
virtualenv, e.g.
    python3 -m venv /tmp/jaxenv && /tmp/jaxenv/bin/pip install jax flax jax2onnx onnxruntime
    /tmp/jaxenv/bin/python tests/data/make_jax_model.py
The outputs are committed (reproducible bit for bit with the versions the reference file records);
tests/runtime/test_jax_model.py uses them without JAX.
"""

from __future__ import annotations

from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)  # the float64 reference; the exported model stays float32

import flax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax2onnx  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
from flax import nnx  # noqa: E402

HERE = Path(__file__).resolve().parent
ONNX_PATH = HERE / "jax_vit.onnx"
REFERENCE_PATH = HERE / "jax_vit_reference.npz"
FIXED_PATH = HERE / "jax_vit_b1.onnx"  # the same model exported at batch size 1
SIZE, PATCH, DIM, HEADS, HIDDEN, DEPTH, N_OUT = 32, 4, 32, 4, 64, 2, 10
TOKENS = (SIZE // PATCH) ** 2 + 1
N_IMAGES = 3
K = 2  # cotangents per image at the logits
SEED = 0
OPSET = 17
LN_EPS = 1e-6

# Pieces of the gradient the script breaks one at a time (their forward values unchanged).
WRONG = (
    "attention probabilities held constant",
    "softmax gradient without its mean term",
    "LayerNorm statistics held constant",
    "GELU derivative taken as 1",
    "first block's attention branch dropped",
)


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, approximate: bool):
        self.approximate = approximate  # GELU: tanh form (nnx.gelu's default) or erf
        self.norm1 = nnx.LayerNorm(DIM, epsilon=LN_EPS, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(HEADS, DIM, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(DIM, epsilon=LN_EPS, rngs=rngs)
        self.fc1 = nnx.Linear(DIM, HIDDEN, rngs=rngs)
        self.fc2 = nnx.Linear(HIDDEN, DIM, rngs=rngs)

    def __call__(self, x):
        h = self.norm1(x)
        x = x + self.attn(h)
        h = self.norm2(x)
        return x + self.fc2(nnx.gelu(self.fc1(h), approximate=self.approximate))


class TinyViT(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.patch = nnx.Conv(3, DIM, kernel_size=(PATCH, PATCH), strides=(PATCH, PATCH), padding="VALID", rngs=rngs)
        self.cls = nnx.Param(jnp.zeros((1, 1, DIM), jnp.float32))
        self.pos = nnx.Param(jnp.zeros((1, TOKENS, DIM), jnp.float32))
        self.blocks = nnx.List([Block(rngs, approximate=i > 0) for i in range(DEPTH)])
        self.norm = nnx.LayerNorm(DIM, epsilon=LN_EPS, rngs=rngs)
        self.head = nnx.Linear(DIM, N_OUT, rngs=rngs)

    def __call__(self, image):
        """image [N, H, W, 3] -> (logits [N, 10], tokens [N, 65, 32])."""
        h = self.patch(image)
        n = h.shape[0]
        h = h.reshape(n, -1, DIM)
        cls = jnp.broadcast_to(self.cls[...], (n, 1, DIM))
        h = jnp.concatenate([cls, h], axis=1) + self.pos[...]
        for block in self.blocks:
            h = block(h)
        tokens = self.norm(h)
        return self.head(tokens[:, 0]), tokens


def seed_weights(model: TinyViT, rng: np.random.Generator) -> None:
    """Every parameter drawn from `rng`: kernels He-scaled; LayerNorm scales, offsets, biases, the
    class token and the position embedding at order 1 (unit scales and zero offsets would let an
    adjoint that ignores them pass)."""
    graphdef, state = nnx.split(model)

    def draw(path, value):
        name = str(path[-1])
        shape = value.shape
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1])) if len(shape) != 3 else int(shape[0])
            if len(shape) == 3 and "out" in str(path):  # attention's output kernel [heads, head_dim, dim]
                fan_in = int(shape[0] * shape[1])
            v = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        elif name == "scale":
            v = rng.uniform(0.5, 2.0, shape) * rng.choice([-1.0, 1.0], shape)
        elif name in ("bias", "cls", "pos"):
            v = rng.standard_normal(shape) * 0.5
        else:
            raise SystemExit(f"unexpected parameter {path}")
        return jnp.asarray(v, jnp.float32)

    flat = nnx.to_flat_state(state)
    for path, var in flat:
        var.set_value(draw(path, var.get_value()))
    nnx.update(model, nnx.from_flat_state(flat))
    del graphdef


def as_float64(model: TinyViT) -> TinyViT:
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), state))


def features_and_grads(model, x: np.ndarray, c: np.ndarray, which: int, dtype, wrong: str | None = None):
    """Output `which` (0 logits, 1 tokens) at x [N, H, W, 3], and d(c_k . f(x))/dx for each of the K
    cotangents in c [N, K, ...] through jax.vjp."""
    xj = jnp.asarray(x, dtype)
    fn = (lambda v: by_hand(model, v, wrong or None)[which]) if wrong is not None else (lambda v: model(v)[which])
    f, pullback = jax.vjp(fn, xj)
    grads = [np.asarray(pullback(jnp.asarray(c[:, k], dtype))[0]) for k in range(c.shape[1])]
    return np.asarray(f), np.stack(grads, axis=1)


def by_hand(model: TinyViT, image, wrong: str | None):
    """The model's forward pass written out in jax.numpy with its weights; `wrong` (one of WRONG) breaks
    one piece of its gradient and leaves the forward values as they are (sg(f) + g - sg(g) has f's
    value and g's gradient). Unbroken it must agree with the modules' own gradient."""
    sg = jax.lax.stop_gradient

    def swap(f, g):
        return sg(f) + g - sg(g)

    def ln(mod, h):
        mean = h.mean(-1, keepdims=True)
        var = ((h - mean) ** 2).mean(-1, keepdims=True)
        if wrong == "LayerNorm statistics held constant":
            mean, var = sg(mean), sg(var)
        return (h - mean) / jnp.sqrt(var + LN_EPS) * mod.scale[...] + mod.bias[...]

    def lin(mod, h):
        return h @ mod.kernel[...] + mod.bias[...]

    def softmax(s):
        p = jax.nn.softmax(s, axis=-1)
        if wrong == "softmax gradient without its mean term":
            # d p = p * d s, the - p (p . d s) term dropped
            return swap(p, sg(p) * s)
        return p

    def attention(mod, h):
        q = jnp.einsum("ntd,dhk->nthk", h, mod.query.kernel[...]) + mod.query.bias[...]
        k = jnp.einsum("ntd,dhk->nthk", h, mod.key.kernel[...]) + mod.key.bias[...]
        v = jnp.einsum("ntd,dhk->nthk", h, mod.value.kernel[...]) + mod.value.bias[...]
        s = jnp.einsum("nqhk,nshk->nhqs", q / jnp.sqrt(q.shape[-1]).astype(q.dtype), k)
        p = softmax(s)
        if wrong == "attention probabilities held constant":
            p = sg(p)
        o = jnp.einsum("nhqs,nshk->nqhk", p, v)
        return jnp.einsum("nqhk,hkd->nqd", o, mod.out.kernel[...]) + mod.out.bias[...]

    def gelu(h, approximate):
        y = jax.nn.gelu(h, approximate=approximate)
        return swap(y, h) if wrong == "GELU derivative taken as 1" else y

    h = (
        jax.lax.conv_general_dilated(
            image, model.patch.kernel[...], (PATCH, PATCH), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        + model.patch.bias[...]
    )
    n = h.shape[0]
    h = h.reshape(n, -1, DIM)
    cls = jnp.broadcast_to(model.cls[...], (n, 1, DIM))
    h = jnp.concatenate([cls, h], axis=1) + model.pos[...]
    for i, b in enumerate(model.blocks):
        a = attention(b.attn, ln(b.norm1, h))
        h = h + (sg(a) if wrong == "first block's attention branch dropped" and i == 0 else a)
        h = h + lin(b.fc2, gelu(lin(b.fc1, ln(b.norm2, h)), b.approximate))
    tokens = ln(model.norm, h)
    return lin(model.head, tokens[:, 0]), tokens


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64).reshape(len(b), -1), np.asarray(b, np.float64).reshape(len(b), -1)
    return float(np.max(np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)))


def main() -> None:
    model32 = TinyViT(nnx.Rngs(SEED))
    seed_weights(model32, np.random.default_rng(SEED))
    model64 = as_float64(model32)

    rng = np.random.default_rng(SEED + 1)
    x = rng.standard_normal((N_IMAGES, SIZE, SIZE, 3)).astype(np.float32)
    c = rng.standard_normal((N_IMAGES, K, N_OUT)).astype(np.float32)
    c_tok = rng.standard_normal((N_IMAGES, 1, TOKENS, DIM)).astype(np.float32)
    # The reference: the by-hand pass in float64. The modules' own float64 pass is not float64
    # throughout: jax.nn.dot_product_attention, which nnx.MultiHeadAttention calls, takes its
    # softmax in float32 (printed below: the modules' float64 gradient against the reference).
    f64, g64 = features_and_grads(model64, x, c, 0, jnp.float64, wrong="")
    t64, h64 = features_and_grads(model64, x, c_tok, 1, jnp.float64, wrong="")
    _, m64 = features_and_grads(model64, x, c, 0, jnp.float64)
    f32, g32 = features_and_grads(model32, x, c, 0, jnp.float32)
    t32, h32 = features_and_grads(model32, x, c_tok, 1, jnp.float32)

    proto = jax2onnx.to_onnx(
        lambda image: model32(image),
        [("B", SIZE, SIZE, 3)],
        model_name="jax_vit",
        opset=OPSET,
        input_names=["image"],
        output_names=["logits", "tokens"],
    )
    onnx.checker.check_model(proto, full_check=True)
    # jax2onnx given a fixed batch bakes it into Reshape shapes, the class token's broadcast and the
    # Slice of x[:, 0]: what a lab is sent when the exporter was not told the batch is free
    fixed = jax2onnx.to_onnx(
        lambda image: model32(image),
        [(1, SIZE, SIZE, 3)],
        model_name="jax_vit_b1",
        opset=OPSET,
        input_names=["image"],
        output_names=["logits", "tokens"],
    )
    onnx.checker.check_model(fixed, full_check=True)
    (inp,) = proto.graph.input
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT, "the exported model must be float32"
    dims = [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim]
    assert dims[1:] == [SIZE, SIZE, 3] and isinstance(dims[0], str), dims

    import onnxruntime as ort

    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    f_onnx, t_onnx = sess.run(["logits", "tokens"], {inp.name: x})
    one = ort.InferenceSession(fixed.SerializeToString(), providers=["CPUExecutionProvider"])
    f_one = np.concatenate([one.run(["logits"], {inp.name: x[i : i + 1]})[0] for i in range(len(x))])
    for name, a, b in (("logits", f_onnx, f32), ("tokens", t_onnx, t32), ("logits, batch 1", f_one, f32)):
        if rel(a, b) > 1e-5:
            raise SystemExit(f"jax2onnx's graph is {rel(a, b):.1e} off JAX's forward pass ({name})")

    versions = (
        f"jax {jax.__version__}; flax {flax.__version__}; jax2onnx {getattr(jax2onnx, '__version__', '?')}; "
        f"onnx {onnx.__version__}; numpy {np.__version__}"
    )
    try:
        from importlib.metadata import version

        versions = versions.replace("jax2onnx ?", f"jax2onnx {version('jax2onnx')}")
    except Exception:  # noqa: BLE001 -- only the label
        pass
    onnx.save(proto, ONNX_PATH)
    onnx.save(fixed, FIXED_PATH)
    np.savez_compressed(
        REFERENCE_PATH,
        x=x,
        c=c,
        features=f64.astype(np.float32),
        input_grad=g64.astype(np.float32),
        c_tokens=c_tok[:, 0],
        tokens=t64.astype(np.float32),
        input_grad_tokens=h64[:, 0].astype(np.float32),
        fp32_floor_features=np.float64(max(rel(f32, f64), rel(t32, t64))),
        fp32_floor_input_grad=np.float64(max(rel(g32, g64), rel(h32, h64))),
        input_name=np.array(inp.name),
        versions=np.array(versions),
    )
    ops = sorted({n.op_type for n in proto.graph.node})
    print(versions)
    print(f"ONNX ops: {', '.join(ops)}")
    print(f"onnx logits vs jax float32: {rel(f_onnx, f32):.2e}; vs float64: {rel(f_onnx, f64):.2e}")
    print(f"jax float32 vs float64: logits {rel(f32, f64):.2e}, input_grad {rel(g32, g64):.2e}")
    print(f"jax float32 vs float64 (tokens): {rel(t32, t64):.2e}, input_grad {rel(h32, h64):.2e}")
    print(f"the modules' float64 gradient vs the by-hand reference: {rel(m64, g64):.1e}")
    for wrong in WRONG:
        _, gw = features_and_grads(model64, x, c[:, :1], 0, jnp.float64, wrong=wrong)
        print(f"  a wrong gradient ({wrong}): input_grad off by {rel(gw[:, 0], g64[:, 0]):.2e}")
    for path in (ONNX_PATH, FIXED_PATH, REFERENCE_PATH):
        print(f"{path.name}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
