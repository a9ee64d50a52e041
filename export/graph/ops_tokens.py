"""Adjoints of the transformer ops: LayerNormalization, Softmax, MatMul, Gemm, Einsum, Gelu,
ReduceMean, ReduceSum, ReduceMax.

Reductions in the adjoints are ReduceSum with the axes as an input (valid from opset 13 on) times
1/n, never ReduceMean, whose axes moved from attribute to input at opset 18: the emitted graph is
the same at every opset the transform accepts."""

from __future__ import annotations

import math
import string

import numpy as np
import onnx
from onnx import helper

from pbv_onnx.export.graph.builder import broadcast_shapes
from pbv_onnx.export.graph.fuse_gelu import gelu_derivative
from pbv_onnx.export.graph.ops_shape import attr, const_ints, is_static, norm_axis, reshape_to, shaped
from pbv_onnx.export.graph.rules import GraphRule, example_model, example_weights, register, unsupported


def _i64(*v) -> np.ndarray:
    return np.array(v, dtype=np.int64)


def _sum(ctx, g: str, axes, keepdims: int = 1) -> str:
    return ctx.emit("ReduceSum", [g, ctx.const(np.array(sorted(axes), np.int64), "axes")], keepdims=keepdims)


def _unbroadcast_if(ctx, g: str, g_shape, x: str) -> str:
    """ctx.unbroadcast only where the shapes differ (saves a ReduceSum and a Reshape per node)."""
    shape = tuple(ctx.shape(x))
    if tuple(g_shape) == shape:
        return g
    return ctx.unbroadcast(g, shape, tuple(g_shape))


def _reduce_axes(ctx, node: onnx.NodeProto, rank: int) -> list[int] | None:
    """The axes a Reduce* node reduces (None: it is the identity, noop_with_empty_axes)."""
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = const_ints(ctx, node, 1)
    axes = [] if axes is None else [norm_axis(int(a), rank) for a in axes]
    if not axes:
        return None if attr(node, "noop_with_empty_axes", 0) else list(range(rank))
    return sorted(set(axes))


def _kept_output(ctx, node: onnx.NodeProto, axes: list[int]) -> tuple[list, str]:
    """A reduction's input shape with the reduced axes 1, and its output with them kept (a forward
    tensor that broadcasts against the input, as the adjoints of ReduceMax and ReduceL2 read it)."""
    kept = [1 if i in axes else d for i, d in enumerate(ctx.shape(node.input[0]))]
    y = node.output[0]
    if not attr(node, "keepdims", 1):
        y = ctx.forward("Unsqueeze", [y, ctx.const(np.array(axes, np.int64), "axes")], _shape=kept)
    return kept, y


def _expand_back(ctx, g: str, node: onnx.NodeProto, x: str, axes: list[int]) -> str:
    """A reduction's cotangent (keepdims or not) broadcast back to the input's shape."""
    if not attr(node, "keepdims", 1):
        g = ctx.emit("Unsqueeze", [g, ctx.const(np.array(axes, np.int64), "axes")])
    shape = list(ctx.shape(x))
    if all(is_static(d) for d in shape):
        target = ctx.const(np.array(shape, np.int64), "shape")
    elif all(is_static(shape[a]) for a in axes):
        # the batch axis kept: 1 there (Expand broadcasts, keeping the cotangent's batch size)
        target = ctx.const(np.array([d if is_static(d) else 1 for d in shape], np.int64), "shape")
    else:
        target = ctx.dynamic_shape(x)
    return ctx.emit("Expand", [g, target])


# --- normalisation ------------------------------------------------------------------------------------
def _normalised(ctx, x: str, axis: int, eps: float) -> tuple[str, str]:
    """(xhat, 1/sigma) of x normalised over its axes from `axis` on, as forward tensors (read through fwd):
    from onnxruntime's fused LayerNormalization kernel on the forward input, made once for both passes
    (K-tiled in the K pass); InvStdDev is float32 (stash_type) whatever x's type: CastLike keeps a float16
    copy typed."""
    shape = list(ctx.shape(x))
    dims = [int(d) for d in shape[axis:]]
    xhat, _, rstd = ctx.forward("LayerNormalization", [x, ctx.const(np.ones(dims), "ones")], n_out=3, axis=axis,
                                epsilon=eps)  # fmt: skip
    ctx.set_shape(xhat, shape)
    rstd = ctx.forward("CastLike", [rstd, xhat], _shape=shape[:axis] + [1] * len(dims))
    return ctx.fwd(xhat), ctx.fwd(rstd)


def _normalised_adjoint(ctx, gs: str, xhat: str, rstd: str, axes: list[int], n: int) -> str:
    """The input's cotangent of a normalisation over `axes` (n elements), from g' = g * scale:
    (1/sigma)(g' - mean g' - xhat mean(g' xhat))."""
    inv_n = ctx.const(np.array(1.0 / n), "inv_n")
    m1 = ctx.emit("Mul", [_sum(ctx, gs, axes), inv_n])
    m2 = ctx.emit("Mul", [_sum(ctx, ctx.emit("Mul", [gs, xhat]), axes), inv_n])
    centred = ctx.emit("Sub", [gs, ctx.emit("Add", [m1, ctx.emit("Mul", [xhat, m2])])])
    return ctx.emit("Mul", [centred, rstd])


@register
class LayerNormalization(GraphRule):
    op_type = "LayerNormalization"
    description = "LayerNormalization: (1/sigma)(g' - mean g' - xhat mean(g' xhat)), g' = g*scale"

    @shaped
    def vjp(self, ctx, node, grads):
        g = grads[0]
        out = [None] * len(node.input)
        if g is None:
            return out
        x, scale = node.input[0], node.input[1]
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        shape = list(ctx.shape(x))
        rank = len(shape)
        axis = norm_axis(attr(node, "axis", -1), rank)
        axes = list(range(axis, rank))
        if not all(is_static(shape[a]) for a in axes):
            raise unsupported(node, "normalising over the batch axis")
        xhat, rstd = _normalised(ctx, x, axis, float(attr(node, "epsilon", 1e-5)))
        if ctx.on_path(scale):
            out[1] = _unbroadcast_if(ctx, ctx.emit("Mul", [g, xhat]), ctx.shape(node.output[0]), scale)
        if bias is not None and ctx.on_path(bias):
            out[2] = _unbroadcast_if(ctx, g, ctx.shape(node.output[0]), bias)
        if not ctx.on_path(x):
            return out
        sv = ctx.value(scale)
        gs = g if sv is not None and np.all(sv == 1) else ctx.emit("Mul", [g, ctx.fwd(scale)])
        out[0] = _normalised_adjoint(ctx, gs, xhat, rstd, axes, int(np.prod([shape[a] for a in axes])))
        return out

    @classmethod
    def examples(cls):
        d = 6
        scale, bias = example_weights(1, d), example_weights(2, d)
        scale2 = example_weights(3, 3, d)
        ln = helper.make_node
        return [
            example_model(
                [ln("LayerNormalization", ["x", "s", "b"], ["y"], axis=-1, epsilon=1e-5)],
                (4, d),
                {"s": scale, "b": bias},
                name="layernorm_last",
            ),
            example_model(
                [ln("LayerNormalization", ["x", "s"], ["y"], axis=2, epsilon=1e-3)],
                (4, 3, d),
                {"s": scale2},
                name="layernorm_two_axes_no_bias",
            ),
            # ConvNeXt's LayerNorm2d: channels moved last, normalised, moved back
            example_model(
                [
                    ln("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]),
                    ln("LayerNormalization", ["t", "s", "b"], ["u"], axis=-1, epsilon=1e-6),
                    ln("Transpose", ["u"], ["y"], perm=[0, 3, 1, 2]),
                ],
                (d, 2, 3),
                {"s": scale, "b": bias},
                name="layernorm_channels",
            ),
        ]


@register
class Softmax(GraphRule):
    op_type = "Softmax"
    description = "Softmax: y * (g - sum(g * y)) along the axis"

    @shaped
    def vjp(self, ctx, node, grads):
        x, g = node.input[0], grads[0]
        if g is None or not ctx.on_path(x):
            return [None]
        axis = norm_axis(attr(node, "axis", -1), len(ctx.shape(x)))
        # y (g - sum(g y)): both products through ctx.mul, so the K pass reads y as a view, not a K-tiled copy
        y, shape = node.output[0], ctx.shape(node.output[0])
        gy = ctx.mul(g, y, shape)
        return [ctx.mul(ctx.emit("Sub", [g, _sum(ctx, gy, [axis])], _shape=shape), y, shape)]

    @classmethod
    def examples(cls):
        mk = helper.make_node
        return [
            example_model([mk("Softmax", ["x"], ["y"])], (3, 5), name="softmax_last"),
            example_model([mk("Softmax", ["x"], ["y"], axis=1)], (4, 3), name="softmax_axis1"),
        ]


# --- products -----------------------------------------------------------------------------------------


def swap_last_perm(rank: int) -> list[int]:
    """The Transpose perm that swaps the last two of `rank` axes."""
    perm = list(range(rank))
    perm[-2], perm[-1] = perm[-1], perm[-2]
    return perm


def _swap_last(ctx, name: str, rank: int) -> str:
    """name with its last two axes swapped (a constant swapped at build time)."""
    v = ctx.value(name)
    if v is not None and not ctx.on_path(name):
        return ctx.const(np.swapaxes(np.asarray(v), -1, -2), "t")
    return ctx.emit("Transpose", [ctx.fwd(name)], perm=swap_last_perm(rank))


@register
class MatMul(GraphRule):
    op_type = "MatMul"
    description = "MatMul: g B^T and A^T g, summed over broadcast batch axes"

    @shaped
    def vjp(self, ctx, node, grads):
        g = grads[0]
        a, b = node.input
        live_a, live_b = ctx.on_path(a), ctx.on_path(b)
        if g is None or not (live_a or live_b):
            return [None, None]
        sa, sb, sy = list(ctx.shape(a)), list(ctx.shape(b)), list(ctx.shape(node.output[0]))
        if len(sa) == 1 or len(sb) == 1:
            return self._vector(ctx, node, g, sa, sb, sy)
        ga = gb = None
        if live_a and len(sb) == 2 and not live_b and ctx.value(b) is not None:
            # a constant weight [k, n]: g [.., n] @ W^T as Gemm(transB=1) on the rows, so the model holds W
            # once (a transposed copy would double a transformer's weights in the file and the session)
            rows = g if len(sy) == 2 else reshape_to(ctx, g, ["N", sy[-1]])
            ga = ctx.emit("Gemm", [rows, b], transB=1)
            ga = ga if len(sy) == 2 else reshape_to(ctx, ga, sy[:-1] + [sb[-2]], like=a)
            ga = _unbroadcast_if(ctx, ga, sy[:-1] + [sb[-2]], a)
        elif live_a:  # g [.., m, n] @ B^T [.., n, k]
            ga = ctx.emit("MatMul", [g, _swap_last(ctx, b, len(sb))])
            ga = _unbroadcast_if(ctx, ga, sy[:-1] + [sb[-2]], a)
        if live_b:  # A^T [.., k, m] @ g [.., m, n]
            gb = ctx.emit("MatMul", [_swap_last(ctx, a, len(sa)), g])
            gb = _unbroadcast_if(ctx, gb, sy[:-2] + [sa[-1], sy[-1]], b)
        return [ga, gb]

    def _vector(self, ctx, node, g, sa, sb, sy):
        """A 1-D operand: made 2-D ([k] -> [1, k] or [k, 1]) and the result's axis restored."""
        a, b = node.input
        sa2 = [1] + sa if len(sa) == 1 else sa
        sb2 = sb + [1] if len(sb) == 1 else sb
        a2 = ctx.emit("Unsqueeze", [ctx.fwd(a), ctx.const(_i64(0), "axes")]) if len(sa) == 1 else ctx.fwd(a)
        b2 = ctx.emit("Unsqueeze", [ctx.fwd(b), ctx.const(_i64(1), "axes")]) if len(sb) == 1 else ctx.fwd(b)
        g2 = g
        if len(sb) == 1:
            g2 = ctx.emit("Unsqueeze", [g2, ctx.const(_i64(-1), "axes")])
        if len(sa) == 1:
            g2 = ctx.emit("Unsqueeze", [g2, ctx.const(_i64(-2), "axes")])
        batch = list(broadcast_shapes(tuple(sa2[:-2]), tuple(sb2[:-2])))
        ga = gb = None
        if ctx.on_path(a):
            ga = ctx.emit("MatMul", [g2, ctx.emit("Transpose", [b2], perm=swap_last_perm(len(sb2)))])
            ga_shape = batch + [sa2[-2], sa2[-1]]
            if len(sa) == 1:
                ga = ctx.emit("Squeeze", [ga, ctx.const(_i64(-2), "axes")])
                ga_shape = batch + [sa2[-1]]
            ga = _unbroadcast_if(ctx, ga, ga_shape, a)
        if ctx.on_path(b):
            perm_a = list(range(len(sa2)))
            perm_a[-2], perm_a[-1] = perm_a[-1], perm_a[-2]
            gb = ctx.emit("MatMul", [ctx.emit("Transpose", [a2], perm=perm_a), g2])
            gb_shape = batch + [sb2[-2], sb2[-1]]
            if len(sb) == 1:
                gb = ctx.emit("Squeeze", [gb, ctx.const(_i64(-1), "axes")])
                gb_shape = batch + [sb2[-2]]
            gb = _unbroadcast_if(ctx, gb, gb_shape, b)
        return [ga, gb]

    @classmethod
    def examples(cls):
        mk = helper.make_node
        w = example_weights(4, 5, 3, scale=0)
        return [
            # a linear layer on tokens: [N, T, D] @ [D, E]
            example_model([mk("MatMul", ["x", "w"], ["y"])], (4, 5), {"w": w}, name="matmul_weight"),
            # a constant on the left: [E, T] @ [N, T, D]
            example_model(
                [mk("MatMul", ["w", "x"], ["y"])], (3, 2), {"w": example_weights(5, 4, 3)}, name="matmul_left_const"
            ),
            # attention scores: both operands on the image path, Q K^T per head
            example_model(
                [
                    mk("MatMul", ["x", "wq"], ["q"]),
                    mk("MatMul", ["x", "wk"], ["k"]),
                    mk("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
                    mk("MatMul", ["q", "kt"], ["y"]),
                ],
                (2, 4, 3),
                {"wq": example_weights(6, 3, 3), "wk": example_weights(7, 3, 3)},
                name="matmul_qk",
            ),
            # broadcast: an image operand [N, 1, 3, 3] against per-head constants [2, 3, 3]: summed over heads
            example_model(
                [mk("MatMul", ["x", "x"], ["s"]), mk("MatMul", ["s", "w"], ["y"])],
                (1, 3, 3),
                {"w": example_weights(8, 2, 3, 3)},
                name="matmul_broadcast",
            ),
            # a vector operand
            example_model([mk("MatMul", ["x", "v"], ["y"])], (2, 3), {"v": example_weights(9, 3)}, name="matvec"),
        ]


@register
class Gemm(GraphRule):
    op_type = "Gemm"
    description = "Gemm: alpha g B'^T, alpha A'^T g (as Gemms) and beta g summed to C's shape"

    @shaped
    def vjp(self, ctx, node, grads):
        g = grads[0]
        if g is None:
            return [None] * len(node.input)
        a, b = node.input[0], node.input[1]
        c = node.input[2] if len(node.input) > 2 and node.input[2] else None
        alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
        ta, tb = int(attr(node, "transA", 0)), int(attr(node, "transB", 0))
        out = [None] * len(node.input)
        if ctx.on_path(a):
            if not ta:  # g_A = alpha g op(B)^T
                out[0] = ctx.emit("Gemm", [g, ctx.fwd(b)], alpha=alpha, transB=1 - tb)
            else:  # g_A = alpha op(B) g^T
                out[0] = ctx.emit("Gemm", [ctx.fwd(b), g], alpha=alpha, transA=tb, transB=1)
        if ctx.on_path(b):
            if not tb:  # g_B = alpha op(A)^T g
                out[1] = ctx.emit("Gemm", [ctx.fwd(a), g], alpha=alpha, transA=1 - ta)
            else:  # g_B = alpha g^T op(A)
                out[1] = ctx.emit("Gemm", [g, ctx.fwd(a)], alpha=alpha, transA=1, transB=ta)
        if c is not None and ctx.on_path(c):
            gc = g if beta == 1.0 else ctx.emit("Mul", [g, ctx.const(np.array(beta), "beta")])
            out[2] = _unbroadcast_if(ctx, gc, ctx.shape(node.output[0]), c)
        return out

    @classmethod
    def examples(cls):
        mk = helper.make_node
        w, bias = example_weights(10, 4, 5, scale=0), example_weights(11, 4)
        return [
            example_model(
                [mk("Gemm", ["x", "w", "b"], ["y"], transB=1)], (5,), {"w": w, "b": bias}, name="gemm_linear"
            ),
            example_model([mk("Gemm", ["x", "w"], ["y"], alpha=0.5, beta=2.0)], (4,), {"w": w}, name="gemm_alpha_no_c"),
            # the image as B, both transposed ([2, 3]^T [N, 2]^T = [3, N], batch moved back)
            example_model(
                [
                    mk("Gemm", ["w", "x", "b"], ["t"], transA=1, transB=1, alpha=1.5, beta=0.5),
                    mk("Transpose", ["t"], ["y"], perm=[1, 0]),
                ],
                (2,),
                {"w": example_weights(12, 2, 3), "b": example_weights(13, 3, 1)},
                name="gemm_image_as_b_trans",
            ),
            # the image as B untransposed: [3, 2] [2, N]
            example_model(
                [
                    mk("Transpose", ["x"], ["xt"], perm=[1, 0]),
                    mk("Gemm", ["w", "xt"], ["t"]),
                    mk("Transpose", ["t"], ["y"], perm=[1, 0]),
                ],
                (2,),
                {"w": example_weights(14, 3, 2)},
                name="gemm_image_as_b",
            ),
            # the image as A transposed, and A and C both on the image path
            example_model(
                [
                    mk("Transpose", ["x"], ["xt"], perm=[1, 0]),
                    mk("Gemm", ["xt", "w", "x"], ["y"], transA=1, alpha=0.7, beta=1.3),
                ],
                (2,),
                {"w": example_weights(15, 2, 2)},
                name="gemm_transa_with_c",
            ),
        ]


def einsum_parse(eq: str, ranks: list[int]) -> tuple[list[str], str]:
    """An einsum equation as explicit index strings per operand and the output (ellipses spelled out)."""
    eq = eq.replace(" ", "")
    lhs, rhs = eq.split("->") if "->" in eq else (eq, None)
    terms = lhs.split(",")
    used = set(c for c in eq if c.isalpha())
    spare = [c for c in string.ascii_letters if c not in used]
    ell_rank = max([r - len(t.replace("...", "")) for t, r in zip(terms, ranks) if "..." in t] or [0])
    ell = "".join(spare[:ell_rank])
    ops = []
    for t, r in zip(terms, ranks):
        if "..." in t:
            k = r - len(t.replace("...", ""))
            t = t.replace("...", ell[ell_rank - k :])
        ops.append(t)
    if rhs is None:  # implicit output: the ellipsis, then the indices appearing once, sorted
        once = sorted(c for c in set("".join(terms).replace("...", "")) if "".join(ops).count(c) == 1)
        rhs = ell + "".join(once)
    else:
        rhs = rhs.replace("...", ell)
    return ops, rhs


def _contract(ctx, terms: list[tuple[str, str]], out: str, sizes: dict) -> str:
    """einsum(terms -> out) (one or two operands, no repeated index) as ReduceSum, Transpose, Reshape and
    one batched MatMul: onnxruntime's Einsum kernel dies (SIGFPE) on the empty K-cotangents batch."""

    def permute(t: str, idx: str, order: str) -> str:
        return t if idx == order else ctx.emit("Transpose", [t], perm=[idx.index(c) for c in order])

    def sum_out(t: str, idx: str, keep: set) -> tuple[str, str]:
        gone = [k for k, c in enumerate(idx) if c not in keep]
        if not gone:
            return t, idx
        t = ctx.emit("ReduceSum", [t, ctx.const(np.array(gone, np.int64), "axes")], keepdims=0)
        return t, "".join(c for c in idx if c in keep)

    def dims(idx: str) -> list:
        return [sizes[c] for c in idx]

    def prod(idx: str):
        ds = dims(idx)
        return int(np.prod(ds)) if all(is_static(d) for d in ds) else "N"

    if len(terms) == 1:
        ((x, xi),) = terms
        x, xi = sum_out(x, xi, set(out))
        return permute(x, xi, out)
    (x, xi), (y, yi) = terms
    x, xi = sum_out(x, xi, set(out) | set(yi))
    y, yi = sum_out(y, yi, set(out) | set(xi))
    batch = "".join(c for c in out if c in xi and c in yi)
    xfree = "".join(c for c in xi if c in out and c not in yi)
    yfree = "".join(c for c in yi if c in out and c not in xi)
    inner = "".join(c for c in xi if c in yi and c not in out)
    x = permute(x, xi, batch + xfree + inner)
    y = permute(y, yi, batch + inner + yfree)
    xs, ys = dims(batch) + [prod(xfree), prod(inner)], dims(batch) + [prod(inner), prod(yfree)]
    if dims(batch + xfree + inner) != xs:
        x = reshape_to(ctx, x, xs)
    if dims(batch + inner + yfree) != ys:
        y = reshape_to(ctx, y, ys)
    z = ctx.emit("MatMul", [x, y])
    zs = dims(batch + xfree + yfree)
    if zs != dims(batch) + [prod(xfree), prod(yfree)]:
        z = reshape_to(ctx, z, zs)
    return permute(z, batch + xfree + yfree, out)


@register
class Einsum(GraphRule):
    op_type = "Einsum"
    description = "Einsum (1-2 operands, no repeated index in one): the cotangent contracted back by MatMul"

    @shaped
    def vjp(self, ctx, node, grads):
        g = grads[0]
        if g is None or not any(ctx.on_path(i) for i in node.input):
            return [None] * len(node.input)
        if len(node.input) > 2:
            raise unsupported(node, "more than two operands")
        shapes = [list(ctx.shape(i)) for i in node.input]
        ops, out = einsum_parse(attr(node, "equation").decode() if isinstance(attr(node, "equation"), bytes)
                                 else attr(node, "equation"), [len(s) for s in shapes])  # fmt: skip
        if any(len(set(t)) != len(t) for t in ops + [out]):
            raise unsupported(node, "a repeated index within one operand (a diagonal)")
        sizes = {}
        for t, s in zip(ops, shapes):
            for c, d in zip(t, s):
                if c in sizes and sizes[c] != d and 1 in (sizes[c], d):
                    raise unsupported(node, "broadcasting a size-1 axis")
                sizes[c] = d
        res = []
        for i, x in enumerate(node.input):
            if not ctx.on_path(x):
                res.append(None)
                continue
            others = [ops[j] for j in range(len(ops)) if j != i]
            have = set(out).union(*others) if others else set(out)
            kept = "".join(c for c in ops[i] if c in have)  # an index only in this operand was summed: broadcast
            terms = [(g, out)] + [(ctx.fwd(node.input[j]), ops[j]) for j in range(len(ops)) if j != i]
            gi = _contract(ctx, terms, kept, sizes)
            if kept != ops[i]:
                missing = [k for k, c in enumerate(ops[i]) if c not in have]
                gi = ctx.emit("Unsqueeze", [gi, ctx.const(np.array(missing, np.int64), "axes")])
                gi = ctx.emit("Expand", [gi, ctx.dynamic_shape(x)])
            res.append(gi)
        return res

    @classmethod
    def examples(cls):
        mk = helper.make_node
        wq, wk = example_weights(14, 3, 3), example_weights(15, 3, 3)
        return [
            # attention: scores "bhid,bhjd->bhij", then the weighted sum "bhij,bhjd->bhid"
            example_model(
                [
                    mk("MatMul", ["x", "wq"], ["q"]),
                    mk("MatMul", ["x", "wk"], ["k"]),
                    mk("Einsum", ["q", "k"], ["s"], equation="bhid,bhjd->bhij"),
                    mk("Einsum", ["s", "x"], ["y"], equation="bhij,bhjd->bhid"),
                ],
                (2, 4, 3),
                {"wq": wq, "wk": wk},
                name="einsum_attention",
            ),
            # a constant operand, an index summed in the image operand only, ellipsis
            example_model(
                [mk("Einsum", ["x", "w"], ["y"], equation="...ij,jk->...k")],
                (2, 4, 3),
                {"w": example_weights(16, 3, 5)},
                name="einsum_ellipsis_sum",
            ),
            # one operand: a permutation with a reduction, implicit output
            example_model([mk("Einsum", ["x"], ["y"], equation="aji")], (3, 2), name="einsum_unary_implicit"),
            example_model([mk("Einsum", ["x"], ["y"], equation="nij->nj")], (3, 2), name="einsum_unary_sum"),
        ]


# --- Gelu (opset 20) ----------------------------------------------------------------------------------


@register
class Gelu(GraphRule):
    op_type = "Gelu"
    description = "Gelu (opset 20, exact or tanh): g times its derivative"

    @shaped
    def vjp(self, ctx, node, grads):
        x, g = node.input[0], grads[0]
        if g is None or not ctx.on_path(x):
            return [None]
        c = lambda v: ctx.const(np.array(v), "c")  # noqa: E731

        def f(op: str, *ins: str) -> str:  # the derivative is a function of the forward input: made once
            return ctx.forward(op, list(ins))

        if attr(node, "approximate", b"none") in (b"tanh", "tanh"):
            # y = x/2 (1 + tanh u), u = k (x + a x^3): y' = (1 + t)/2 + x/2 (1 - t^2) k (1 + 3a x^2)
            k, a = math.sqrt(2 / math.pi), 0.044715
            x2 = f("Mul", x, x)
            t = f("Tanh", f("Mul", f("Mul", x, f("Add", f("Mul", x2, c(a)), c(1.0))), c(k)))
            du = f("Add", f("Mul", x2, c(3 * a * k)), c(k))
            right = f("Mul", f("Mul", f("Sub", c(1.0), f("Mul", t, t)), du), x)
            d = f("Mul", f("Add", f("Add", t, c(1.0)), right), c(0.5))
        else:
            # y = x Phi(x): y' = Phi(x) + x phi(x), as the Erf-written GELU's pattern makes it
            u = f("Mul", x, c(1 / math.sqrt(2)))
            d = gelu_derivative(ctx, u, f("Add", f("Erf", u), c(1.0)), ctx.shape(x))
        return [ctx.mul(g, d, ctx.shape(x))]

    @classmethod
    def examples(cls):
        mk = helper.make_node
        return [
            example_model([mk("Gelu", ["x"], ["y"])], (3, 4), name="gelu_exact", opset=20),
            example_model([mk("Gelu", ["x"], ["y"], approximate="tanh")], (3, 4), name="gelu_tanh", opset=20),
        ]


# --- reductions ---------------------------------------------------------------------------------------


@register
class ReduceSum(GraphRule):
    op_type = "ReduceSum"
    description = "ReduceSum: the cotangent broadcast back over the reduced axes"

    @shaped
    def vjp(self, ctx, node, grads):
        x, g = node.input[0], grads[0]
        if g is None or not ctx.on_path(x):
            return [None] * len(node.input)
        axes = _reduce_axes(ctx, node, len(ctx.shape(x)))
        if axes is None:
            return [g] + [None] * (len(node.input) - 1)
        return [_expand_back(ctx, g, node, x, axes)] + [None] * (len(node.input) - 1)

    @classmethod
    def examples(cls):
        mk = helper.make_node
        return [
            example_model([mk("ReduceSum", ["x", "a"], ["y"], keepdims=0)], (3, 4), {"a": _i64(-1)}, name="rsum"),
            example_model([mk("ReduceSum", ["x", "a"], ["y"])], (3, 4, 2), {"a": _i64(1, 3)}, name="rsum_keep"),
            example_model(
                [mk("ReduceSum", ["x", "a"], ["y"], noop_with_empty_axes=1)], (3, 2), {"a": _i64()}, name="rsum_noop"
            ),
        ]


@register
class ReduceMean(GraphRule):
    op_type = "ReduceMean"
    description = "ReduceMean: the cotangent / n broadcast back over the reduced axes"

    @shaped
    def vjp(self, ctx, node, grads):
        x, g = node.input[0], grads[0]
        if g is None or not ctx.on_path(x):
            return [None] * len(node.input)
        shape = ctx.shape(x)
        axes = _reduce_axes(ctx, node, len(shape))
        if axes is None:
            return [g] + [None] * (len(node.input) - 1)
        if not all(is_static(shape[a]) for a in axes):
            raise unsupported(node, "a mean over the batch axis")
        n = int(np.prod([shape[a] for a in axes]))
        g = ctx.emit("Mul", [g, ctx.const(np.array(1.0 / n), "inv_n")])
        return [_expand_back(ctx, g, node, x, axes)] + [None] * (len(node.input) - 1)

    @classmethod
    def examples(cls):
        mk = helper.make_node
        d = 5
        return [
            example_model([mk("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=0)], (3, 2, 4), name="rmean_spatial"),
            example_model([mk("ReduceMean", ["x"], ["y"], axes=[-1])], (3, 4), name="rmean_keep"),
            # LayerNorm decomposed as torch exports some models: ReduceMean, Sub, Pow, Sqrt, Div (+ affine)
            example_model(
                [
                    mk("ReduceMean", ["x"], ["mu"], axes=[-1]),
                    mk("Sub", ["x", "mu"], ["xc"]),
                    mk("Pow", ["xc", "two"], ["sq"]),
                    mk("ReduceMean", ["sq"], ["var"], axes=[-1]),
                    mk("Add", ["var", "eps"], ["ve"]),
                    mk("Sqrt", ["ve"], ["sd"]),
                    mk("Div", ["xc", "sd"], ["xh"]),
                    mk("Mul", ["xh", "s"], ["xs"]),
                    mk("Add", ["xs", "b"], ["y"]),
                ],
                (3, d),
                {"two": np.array(2.0), "eps": np.array(1e-5), "s": example_weights(17, d), "b": example_weights(18, d)},
                name="layernorm_decomposed",
            ),
            # opset 18: axes as an input
            example_model(
                [mk("ReduceMean", ["x", "a"], ["y"], keepdims=0)], (3, 4), {"a": _i64(1)}, name="rmean18", opset=18
            ),
        ]


@register
class InstanceNormalizationRule(GraphRule):
    op_type = "InstanceNormalization"
    description = (
        "InstanceNormalization: as LayerNormalization over the spatial axes, scale per channel (torch.onnx "
        "writes GroupNorm as one between Reshapes)"
    )

    @shaped
    def vjp(self, ctx, node, grads):
        x, scale = node.input[0], node.input[1]
        g, out = grads[0], [None] * len(node.input)
        if g is None or not ctx.on_path(x):
            return out
        if any(ctx.on_path(n) for n in node.input[1:]):
            raise unsupported(node, "a scale or bias that depends on the image")
        sv = ctx.value(scale)
        if sv is None:
            raise unsupported(node, "a scale that is not a constant")
        shape = list(ctx.shape(x))
        axes = list(range(2, len(shape)))
        if not all(is_static(shape[a]) for a in axes):
            raise unsupported(node, "normalising over the batch axis")
        xhat, rstd = _normalised(ctx, x, 2, float(attr(node, "epsilon", 1e-5)))
        per_channel = np.asarray(sv, np.float32).reshape(-1, *([1] * len(axes)))
        gs = g if np.all(per_channel == 1) else ctx.emit("Mul", [g, ctx.const(per_channel, "scale")])
        out[0] = _normalised_adjoint(ctx, gs, xhat, rstd, axes, int(np.prod([shape[a] for a in axes])))
        return out

    @classmethod
    def examples(cls):
        mk = helper.make_node
        c = 4
        inits = {"s": example_weights(1, c) + 1.0, "b": example_weights(2, c), "w": example_weights(3, c, 3, 1, 1)}
        # torch's GroupNorm(2, 4): [N, 4, h, w] as [N, 2, 2*h*w], normalised, back, then the affine
        gn = {"one": np.ones(2, np.float32), "zero": np.zeros(2, np.float32), "groups": np.array([0, 2, -1]),
              "gw": example_weights(4, c, 1, 1) + 1.0, "gb": example_weights(5, c, 1, 1)}  # fmt: skip
        return [
            example_model(
                [mk("Conv", ["x", "w"], ["h"], kernel_shape=[1, 1]),
                 mk("InstanceNormalization", ["h", "s", "b"], ["y"], epsilon=1e-5)],
                (3, 5, 4), inits, name="instancenorm",
            ),
            example_model(
                [mk("Conv", ["x", "w"], ["h"], kernel_shape=[1, 1]), mk("Shape", ["h"], ["hs"]),
                 mk("Reshape", ["h", "groups"], ["r"]),
                 mk("InstanceNormalization", ["r", "one", "zero"], ["n"], epsilon=1e-5),
                 mk("Reshape", ["n", "hs"], ["back"]), mk("Mul", ["back", "gw"], ["m"]), mk("Add", ["m", "gb"], ["y"])],
                (3, 5, 4), {**inits, **gn}, name="groupnorm_torch",
            ),
        ]  # fmt: skip


@register
class ReduceL2(GraphRule):
    op_type = "ReduceL2"
    description = "ReduceL2: g x / y broadcast back (0 where the norm is 0); F.normalize, GRN, cosine attention"

    @shaped
    def vjp(self, ctx, node, grads):
        x, g = node.input[0], grads[0]
        if g is None or not ctx.on_path(x):
            return [None] * len(node.input)
        rank = len(ctx.shape(x))
        axes = _reduce_axes(ctx, node, rank)
        if axes is None:  # the identity: |x| elementwise
            return [ctx.mul(g, ctx.forward("Sign", [x]))] + [None] * (len(node.input) - 1)
        kept, y = _kept_output(ctx, node, axes)
        # x / max(y, least normal float32): where y is 0 so is x, and the cotangent is 0 (torch's too)
        floor = ctx.const(np.float32(np.finfo(np.float32).tiny), "tiny")
        d = ctx.forward("Div", [x, ctx.forward("Max", [y, floor], _shape=kept)], _shape=ctx.shape(x))
        return [ctx.mul(_expand_back(ctx, g, node, x, axes), d)] + [None] * (len(node.input) - 1)

    @classmethod
    def examples(cls):
        mk = helper.make_node
        return [
            example_model([mk("ReduceL2", ["x"], ["y"], axes=[-1], keepdims=0)], (3, 4), name="l2"),
            example_model([mk("ReduceL2", ["x"], ["y"], axes=[1, 2])], (3, 4), name="l2_keep"),
            # torch's F.normalize: x / clamp_min(||x||, eps)
            example_model(
                [mk("ReduceL2", ["x"], ["n"], axes=[-1], keepdims=1), mk("Clip", ["n", "eps"], ["c"]),
                 mk("Div", ["x", "c"], ["y"])],
                (3, 4), {"eps": np.float32(1e-12)}, name="l2_normalize",
            ),
        ]  # fmt: skip


@register
class ReduceMax(GraphRule):
    op_type = "ReduceMax"
    description = "ReduceMax: the cotangent shared by the maxima (ties split evenly, as torch.amax)"

    @shaped
    def vjp(self, ctx, node, grads):
        x, g = node.input[0], grads[0]
        if g is None or not ctx.on_path(x):
            return [None] * len(node.input)
        rank = len(ctx.shape(x))
        axes = _reduce_axes(ctx, node, rank)
        if axes is None:
            return [g] + [None] * (len(node.input) - 1)
        kept, y = _kept_output(ctx, node, axes)
        ax = ctx.const(np.array(axes, np.int64), "axes")
        if not attr(node, "keepdims", 1):
            g = ctx.emit("Unsqueeze", [g, ax])
        one, zero = ctx.const(np.array(1.0), "one"), ctx.const(np.array(0.0), "zero")
        # the maxima mask divided by their count: a function of the forward pass, made once for both passes
        mask = ctx.forward("Where", [ctx.forward("Equal", [x, y]), one, zero])
        weight = ctx.forward("Div", [mask, ctx.forward("ReduceSum", [mask, ax], _shape=kept, keepdims=1)])
        return [ctx.emit("Mul", [ctx.fwd(weight), g])] + [None] * (len(node.input) - 1)

    @classmethod
    def examples(cls):
        mk = helper.make_node
        return [
            example_model([mk("ReduceMax", ["x"], ["y"], axes=[-1], keepdims=0)], (3, 4), name="rmax"),
            example_model([mk("ReduceMax", ["x"], ["y"], axes=[1, 2])], (3, 4), name="rmax_keep"),
        ]
