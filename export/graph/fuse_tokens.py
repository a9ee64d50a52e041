"""Patterns of the token backbones: torch.roll written as Slices and a Concat (Swin's shifted windows),
and a LayerNormalization read only by a linear layer: their adjoints in fewer full-size passes.

A roll's adjoint, node by node, is a Split of the cotangent, each part padded back to full size (Slice's
rule) and the parts summed: four passes. As one: a single Gather by the inverse permutation.

A MatMul of A by Transpose(K) with the last two axes swapped (attention's q k^T): node by node, K's
cotangent is (A^T g) transposed back, a full pass over it; as one, g^T A, whose transpose onnxruntime
folds into the MatMul.

A LayerNormalization over the last axis read only by MatMul(., W), W constant [C, D]: the norm's scale and
the centring of its adjoint (g' - mean g') are linear maps on the channels, folded into the weight of the
MatMul's adjoint Gemm (ops on W that onnxruntime folds at session start), which leaves
(1/sigma)(g'' - xhat mean(g'' xhat)): two full-size passes and one reduction fewer per norm."""

from __future__ import annotations

import numpy as np
from onnx import helper

from pbv_onnx.export.graph.fuse_gelu import made_by
from pbv_onnx.export.graph.ops_shape import _slice_indices, attr, is_static, norm_axis, reshape_to
from pbv_onnx.export.graph.ops_tokens import _unbroadcast_if, swap_last_perm
from pbv_onnx.export.graph.rules import GraphPattern, example_model, register_pattern

# --- torch.roll: Concat of Slices that permute one axis -----------------------------------------------


def _ints(ctx, node, index: int) -> np.ndarray | None:
    """A constant int input of `node` as int64 [k]; None where absent; False where not constant."""
    if index >= len(node.input) or not node.input[index]:
        return None
    v = ctx.value(node.input[index])
    return False if v is None else np.asarray(v).astype(np.int64).reshape(-1)


@register_pattern
class RollPattern(GraphPattern):
    name = "roll"
    root_op = "Concat"
    description = (
        "Concat of unit-step Slices of one tensor along the Concat's axis that permute it (torch.roll): "
        "the cotangent gathered by the inverse permutation, one pass"
    )

    def match(self, ctx, node):
        """(x, axis, inverse permutation) where the Concat's inputs are Slices of x reordering its axis."""
        shape = ctx.shape(node.output[0])
        if len(node.input) < 2 or shape is None:
            return None
        rank = len(shape)
        axis = norm_axis(int(attr(node, "axis", 0)), rank)
        src, index = None, []
        for name in node.input:
            sl = made_by(ctx, name, "Slice")
            if sl is None or (src is not None and sl.input[0] != src):
                return None
            src = sl.input[0]
            x_shape = ctx.shape(src)
            if x_shape is None or tuple(x_shape) != tuple(shape) or not is_static(x_shape[axis]):
                return None
            starts, ends, axes, steps = (_ints(ctx, sl, i) for i in (1, 2, 3, 4))
            if any(v is False for v in (starts, ends, axes, steps)) or starts is None or ends is None:
                return None
            axes = np.arange(len(starts)) if axes is None else axes
            if len(starts) != 1 or norm_axis(int(axes[0]), rank) != axis or (steps is not None and steps[0] != 1):
                return None
            index += _slice_indices(int(starts[0]), int(ends[0]), 1, int(x_shape[axis]))
        dim = int(shape[axis])
        if sorted(index) != list(range(dim)) or index == list(range(dim)):
            return None
        return src, axis, np.argsort(np.array(index, np.int64))

    def vjp(self, ctx, node, match, grads):
        x, axis, inverse = match
        if grads[0] is None or not ctx.on_path(x):
            return {}
        # y = Gather(x, index, axis) for a permutation index: x's cotangent is g gathered by its inverse
        idx = ctx.const(inverse.astype(np.int64), "roll")
        return {x: ctx.emit("Gather", [grads[0], idx], axis=axis, _shape=ctx.shape(x))}

    @classmethod
    def examples(cls):
        mk = helper.make_node
        big = np.int64(2**63 - 1)
        c = {"m3": np.array([-3], np.int64), "zero": np.array([0], np.int64),
             "end": np.array([big]), "one": np.array([1], np.int64), "two": np.array([2], np.int64),
             "s1": np.array([1], np.int64), "s4": np.array([4], np.int64), "w": np.float32(1.5)}  # fmt: skip

        def roll(x, y, start, ax, tag):
            # torch.onnx's roll by -start (start > 0) or by |start| (start < 0) along `ax`
            return [
                mk("Slice", [x, start, "end", ax], [f"{tag}_a"]),
                mk("Slice", [x, "zero", start, ax], [f"{tag}_b"]),
                mk("Concat", [f"{tag}_a", f"{tag}_b"], [y], axis=int(c[ax][0])),
            ]

        return [
            # Swin: roll over H then W, (N, 3, 5, 4) standing in for (N, H, W, C)
            example_model(
                roll("x", "r", "s1", "one", "h") + roll("r", "y", "m3", "two", "w"), (3, 5, 4), c, name="roll_hw"
            ),  # fmt: skip
            # three pieces, the rolled tensor also read outside the roll, a negative Concat axis
            example_model(
                [
                    mk("Mul", ["x", "w"], ["z"]),
                    mk("Slice", ["z", "s4", "end", "two"], ["p"]),
                    mk("Slice", ["z", "s1", "s4", "two"], ["q"]),
                    mk("Slice", ["z", "zero", "s1", "two"], ["r"]),
                    mk("Concat", ["q", "p", "r"], ["t"], axis=-2),
                    mk("Mul", ["t", "z"], ["y"]),
                ],
                (3, 5, 4),
                c,
                name="roll_three_pieces",
            ),
        ]


# --- LayerNormalization read only by a linear layer ----------------------------------------------------


@register_pattern
class LayerNormLinearPattern(GraphPattern):
    name = "layernorm_linear"
    root_op = "MatMul"
    description = (
        "LayerNormalization (last axis, constant scale) read only by MatMul with a constant weight W: the scale "
        "and the centring folded into W for the adjoint Gemm, then (1/sigma)(g - xhat mean(g xhat))"
    )

    def match(self, ctx, node):
        """(x, scale, W, epsilon) where node = MatMul(LayerNormalization(x, scale, .), W)."""
        h, w = node.input
        ln = made_by(ctx, h, "LayerNormalization")
        wv = ctx.value(w)
        if ln is None or wv is None or np.asarray(wv).ndim != 2 or len(ctx.consumers(h)) != 1 or h == ctx.prep.cut:
            return None
        x, scale = ln.input[0], ln.input[1]
        shape, sv = ctx.shape(x), ctx.value(scale)
        if shape is None or len(shape) < 2 or sv is None or ctx.on_path(w) or ctx.on_path(scale):
            return None
        if len(ln.input) > 2 and ln.input[2] and ctx.on_path(ln.input[2]):
            return None
        c = shape[-1]
        if norm_axis(int(attr(ln, "axis", -1)), len(shape)) != len(shape) - 1 or not is_static(c):
            return None
        if np.asarray(sv).size != int(c) or np.asarray(wv).shape[0] != int(c) or any(ln.output[1:]):
            return None
        if sum(not is_static(d) for d in shape) != 1:
            return None
        return x, scale, w, float(attr(ln, "epsilon", 1e-5))

    def vjp(self, ctx, node, match, grads):
        x, scale, w, eps = match
        g = grads[0]
        if g is None or not ctx.on_path(x):
            return {}
        shape = list(ctx.shape(x))
        c = int(shape[-1])
        y_shape = list(ctx.shape(node.output[0]))
        # W' = P diag(scale) W, P = I - 11^T/C (the centring): ops on the initializers, folded at session start
        d = int(y_shape[-1])
        column = ctx.forward("Unsqueeze", [scale, ctx.const(np.array([1], np.int64))])
        ws = ctx.forward("Mul", [w, column], _shape=(c, d))
        total = ctx.forward("ReduceSum", [ws, ctx.const(np.array([0], np.int64))], keepdims=1, _shape=(1, d))
        wc = ctx.forward("Sub", [ws, ctx.forward("Mul", [total, ctx.const(np.float32(1.0 / c))])])
        rows = g if len(y_shape) == 2 else reshape_to(ctx, g, ["N", y_shape[-1]])
        gc = ctx.emit("Gemm", [rows, wc], transB=1)  # g' - mean g', g' = (g W^T) * scale
        gc = ctx.set_shape(gc if len(shape) == 2 else reshape_to(ctx, gc, shape, like=x), shape)
        # xhat and 1/sigma as LayerNormalization's rule makes them (made once for both passes)
        xhat, _, rstd = ctx.forward(
            "LayerNormalization", [x, ctx.const(np.ones([c]), "ones")], n_out=3, axis=-1, epsilon=eps
        )
        ctx.set_shape(xhat, shape)
        rstd = ctx.forward("CastLike", [rstd, xhat], _shape=shape[:-1] + [1])
        # mean(g'' xhat) = mean(g' xhat) as mean(xhat) = 0
        m2 = ctx.emit("ReduceSum", [ctx.mul(gc, xhat, shape), ctx.const(np.array([-1], np.int64))], keepdims=1)
        m2 = ctx.emit("Mul", [m2, ctx.const(np.float32(1.0 / c))])
        centred = ctx.emit("Sub", [gc, ctx.emit("Mul", [ctx.fwd(xhat), m2])], _shape=shape)
        return {x: ctx.mul(centred, rstd, shape)}

    @classmethod
    def examples(cls):
        from pbv_onnx.export.graph.rules import example_weights

        mk = helper.make_node
        d = 6
        inits = {"s": example_weights(1, d) + 1, "b": example_weights(2, d), "w": example_weights(3, d, 5, scale=0)}
        return [
            # tokens [N, T, C] -> LayerNorm -> linear
            example_model(
                [
                    mk("LayerNormalization", ["x", "s", "b"], ["h"], axis=-1, epsilon=1e-5),
                    mk("MatMul", ["h", "w"], ["y"]),
                ],
                (4, d),
                inits,
                name="layernorm_linear_tokens",
            ),
            # ConvNeXt: channels moved last, LayerNorm, linear, the norm's input also read by a residual
            example_model(
                [
                    mk("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]),
                    mk("LayerNormalization", ["t", "s"], ["h"], axis=-1, epsilon=1e-6),
                    mk("MatMul", ["h", "w"], ["m"]),
                    mk("ReduceSum", ["t", "ax"], ["r"], keepdims=1),
                    mk("Mul", ["m", "r"], ["y"]),
                ],
                (d, 2, 3),
                {**inits, "ax": np.array([-1], np.int64)},
                name="layernorm_linear_channels_last",
            ),
        ]


# --- MatMul(A, Transpose(K)): attention's scores q k^T ---------------------------------------------------


@register_pattern
class TransposedOperandPattern(GraphPattern):
    name = "matmul_transposed_operand"
    root_op = "MatMul"
    description = (
        "MatMul(A, Transpose(K)), the Transpose swapping the last two axes and read only here (attention's "
        "q k^T): K's cotangent g^T A and A's g K, no transpose of either result"
    )

    def match(self, ctx, node):
        """(a, k) where node = MatMul(a, Transpose(k)), k on the image's path, shapes known."""
        if len(node.input) != 2:
            return None
        a, b = node.input
        t = made_by(ctx, b, "Transpose")
        if t is None or b == ctx.prep.cut or ctx.consumers(b) != [node] or not ctx.on_path(t.input[0]):
            return None
        k = t.input[0]
        sa, sk = ctx.shape(a), ctx.shape(k)
        if sa is None or sk is None or len(sa) < 2 or len(sk) < 2:
            return None
        if list(attr(t, "perm") or []) != swap_last_perm(len(sk)):
            return None
        return a, k

    def vjp(self, ctx, node, match, grads):
        a, k = match
        g = grads[0]
        if g is None:
            return {}
        sa, sk, sy = list(ctx.shape(a)), list(ctx.shape(k)), list(ctx.shape(node.output[0]))
        out = {}
        if ctx.on_path(a):  # g [.., m, n] @ K [.., n, c]
            ga = ctx.emit("MatMul", [g, ctx.fwd(k)])
            out[a] = ctx.set_shape(_unbroadcast_if(ctx, ga, sy[:-1] + [sk[-1]], a), ctx.shape(a))
        # g^T [.., n, m] @ A [.., m, c]: the transpose of A^T g, as K's own layout
        gk = ctx.emit("MatMul", [ctx.emit("Transpose", [g], perm=swap_last_perm(len(sy))), ctx.fwd(a)])
        out[k] = ctx.set_shape(_unbroadcast_if(ctx, gk, sy[:-2] + [sy[-1], sa[-1]], k), ctx.shape(k))
        return out

    @classmethod
    def examples(cls):
        mk = helper.make_node
        scale = {"c1": np.linspace(0.5, 1.5, 4).astype(np.float32), "c2": np.float32(0.3)}
        kt = mk("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2])
        out = [
            # q k^T, both from the image
            example_model(
                [mk("Mul", ["x", "c1"], ["q"]), mk("Add", ["x", "c2"], ["k"]), kt, mk("MatMul", ["q", "kt"], ["y"])],
                (3, 5, 4), scale, name="qk",
            ),
            # A a constant broadcast over the batch: only K's cotangent
            example_model(
                [mk("Tanh", ["x"], ["k"]), kt, mk("MatMul", ["a", "kt"], ["y"])],
                (3, 5, 4), {"a": np.linspace(-1, 1, 60).reshape(1, 3, 5, 4)}, name="const_a",
            ),
            # K broadcast over the heads axis ([N, 1, 5, 4]): its cotangent summed over it
            example_model(
                [mk("ReduceMean", ["x"], ["k"], axes=[1], keepdims=1), kt, mk("MatMul", ["x", "kt"], ["y"])],
                (3, 5, 4), name="broadcast_k",
            ),
        ]  # fmt: skip
        return out
