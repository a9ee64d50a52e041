"""Adjoints of the shape ops: Reshape, Transpose, Flatten, Concat, Split, Slice, Gather (constant
indices), Squeeze, Unsqueeze, Expand, Tile.

All of them move or copy entries without arithmetic, so each adjoint moves the cotangent back: a
Reshape to the input's shape, the inverse permutation, a Split, a Concat with zeros (as a Pad), a
zero-stuffing Pad, a one-hot MatMul, a ReduceSum over the copies. Shapes come from the prepared
graph, where everything but the batch axis is static; the batch axis (the string "N" in
`ctx.shape`, N*K in the K-cotangents pass) is never hard-coded: a reshape target writes it as -1."""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import onnx
from onnx import helper

from pbv_onnx.export.graph.builder import is_batch
from pbv_onnx.export.graph.rules import GraphRule, UnsupportedOp, example_model, example_weights, register, unsupported


def shaped(vjp):
    """Decorator for `vjp`: record each returned cotangent's static shape (its input's), which later
    rules' unbroadcast and elementwise shape tracking read."""

    @functools.wraps(vjp)
    def wrapper(self, ctx, node, grads):
        res = vjp(self, ctx, node, grads)
        for name, g in zip(node.input, res):
            if g is not None and ctx.shape(name) is not None:
                ctx.set_shape(g, ctx.shape(name))
        return res

    return wrapper


def attr(node: onnx.NodeProto, name: str, default=None):
    """A node attribute's value, or `default`."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def norm_axis(axis: int, rank: int) -> int:
    """A possibly negative axis as an index in 0..rank-1."""
    return axis + rank if axis < 0 else axis


def is_static(dim) -> bool:
    """Whether a dimension of ctx.shape is a number (not the batch axis "N" or a merged "N*h")."""
    return isinstance(dim, (int, np.integer))


def reshape_target(shape: Sequence) -> np.ndarray | None:
    """A Reshape target for a static shape with at most one symbolic axis (written -1), else None."""
    free = [i for i, d in enumerate(shape) if not is_static(d)]
    if len(free) > 1:
        return None
    return np.array([-1 if not is_static(d) else int(d) for d in shape], dtype=np.int64)


def reshape_to(ctx, g: str, shape: Sequence, like: str | None = None) -> str:
    """Reshape `g` to `shape`; through the forward tensor `like`'s runtime shape where `shape` has
    more than one symbolic axis."""
    target = reshape_target(shape)
    if target is not None:
        return ctx.emit("Reshape", [g, ctx.const(target, "shape")])
    if like is None:
        raise UnsupportedOp(None, f"cannot reshape a cotangent to {tuple(shape)}: two symbolic axes")
    return ctx.emit("Reshape", [g, ctx.dynamic_shape(like)])


def const_ints(ctx, node: onnx.NodeProto, index: int) -> np.ndarray | None:
    """The constant value of the node's `index`-th input as int64 (None when absent or empty name)."""
    if index >= len(node.input) or not node.input[index]:
        return None
    v = ctx.value(node.input[index])
    if v is None:
        raise unsupported(node, f"input {node.input[index]!r} must be constant for the adjoint")
    return np.asarray(v).astype(np.int64).reshape(-1)


def _i64(*v) -> np.ndarray:
    return np.array(v, dtype=np.int64)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# --- rules --------------------------------------------------------------------------------------------


class _ReshapeLike(GraphRule):
    """Ops whose adjoint is a Reshape of the cotangent back to the input's shape."""

    @shaped
    def vjp(self, ctx, node, grads):
        x = node.input[0]
        if grads[0] is None or not ctx.on_path(x):
            return [None] * len(node.input)
        return [reshape_to(ctx, grads[0], ctx.shape(x), like=x)] + [None] * (len(node.input) - 1)


@register
class Reshape(_ReshapeLike):
    op_type = "Reshape"
    description = "Reshape: the cotangent reshaped to the input's shape"

    @classmethod
    def examples(cls):
        return [
            example_model(
                [helper.make_node("Reshape", ["x", "s"], ["y"])], [2, 3, 4], {"s": _i64(0, 4, -1)}, name="reshape"
            ),
            # batch merged with another axis ([N,2,3,4] -> [N*2, 12]) as attention heads are
            example_model(
                [
                    helper.make_node("Reshape", ["x", "s"], ["m"]),
                    helper.make_node("Mul", ["m", "w"], ["mw"]),
                    helper.make_node("Reshape", ["mw", "t"], ["y"]),
                ],
                [2, 3, 4],
                {"s": _i64(-1, 12), "w": example_weights(1, 12), "t": _i64(-1, 24)},
                name="reshape_merge",
            ),
        ]


@register
class Flatten(_ReshapeLike):
    op_type = "Flatten"
    description = "Flatten: the cotangent reshaped to the input's shape"

    @classmethod
    def examples(cls):
        return [
            example_model([helper.make_node("Flatten", ["x"], ["y"], axis=1)], [2, 3, 4], name="flatten1"),
            example_model(
                [
                    helper.make_node("Flatten", ["x"], ["m"], axis=2),
                    helper.make_node("Mul", ["m", "w"], ["mw"]),
                    helper.make_node("Reshape", ["mw", "t"], ["y"]),
                ],
                [2, 3, 4],
                {"w": example_weights(2, 12), "t": _i64(-1, 24)},
                name="flatten_batch_merged",
            ),
        ]


@register
class Squeeze(_ReshapeLike):
    op_type = "Squeeze"
    description = "Squeeze: the cotangent reshaped to the input's shape"

    @classmethod
    def examples(cls):
        return [
            example_model([helper.make_node("Squeeze", ["x", "a"], ["y"])], [1, 3, 1], {"a": _i64(1)}, name="sq1"),
            example_model([helper.make_node("Squeeze", ["x", "a"], ["y"])], [1, 3, 1], {"a": _i64(-1, 1)}, name="sq2"),
        ]


@register
class Unsqueeze(_ReshapeLike):
    op_type = "Unsqueeze"
    description = "Unsqueeze: the cotangent reshaped to the input's shape"

    @classmethod
    def examples(cls):
        return [
            example_model([helper.make_node("Unsqueeze", ["x", "a"], ["y"])], [3, 4], {"a": _i64(1)}, name="unsq"),
            example_model([helper.make_node("Unsqueeze", ["x", "a"], ["y"])], [3, 4], {"a": _i64(-1, 2)}, name="unsq2"),
        ]


@register
class Transpose(GraphRule):
    op_type = "Transpose"
    description = "Transpose: the cotangent transposed by the inverse permutation"

    @shaped
    def vjp(self, ctx, node, grads):
        x = node.input[0]
        if grads[0] is None or not ctx.on_path(x):
            return [None]
        rank = len(ctx.shape(x))
        perm = attr(node, "perm") or list(range(rank))[::-1]
        inv = [int(i) for i in np.argsort(perm)]
        if inv == list(range(rank)):
            return [grads[0]]
        return [ctx.emit("Transpose", [grads[0]], perm=inv)]

    @classmethod
    def examples(cls):
        return [
            example_model([helper.make_node("Transpose", ["x"], ["y"], perm=[0, 2, 3, 1])], [2, 3, 4], name="tr"),
            # the batch axis moved (as attention does with [T, N, D]) and back
            example_model(
                [
                    helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]),
                    helper.make_node("Mul", ["t", "w"], ["tw"]),
                    helper.make_node("Transpose", ["tw"], ["y"], perm=[1, 0, 2]),
                ],
                [3, 4],
                {"w": example_weights(3, 3, 1, 1)},
                name="tr_batch",
            ),
        ]


@register
class Concat(GraphRule):
    op_type = "Concat"
    description = "Concat: the cotangent sliced back into the inputs' parts (Split, or Slice for one part)"

    @shaped
    def vjp(self, ctx, node, grads):
        g = grads[0]
        live = [ctx.on_path(i) for i in node.input]
        if g is None or not any(live):
            return [None] * len(node.input)
        shapes = [ctx.shape(i) for i in node.input]
        axis = norm_axis(attr(node, "axis"), len(shapes[0]))
        sizes = [s[axis] for s in shapes]
        if not all(is_static(n) for n in sizes):
            raise unsupported(node, "concatenation along the batch axis has no adjoint here")
        sizes = [int(n) for n in sizes]
        offsets = np.cumsum([0, *sizes])
        if sum(live) == 1:  # one image part (a class token prepended to patch tokens): one Slice
            k = live.index(True)
            part = ctx.emit(
                "Slice",
                [g, ctx.const(_i64(offsets[k]), "starts"), ctx.const(_i64(offsets[k + 1]), "ends"),
                 ctx.const(_i64(axis), "axes")],
            )  # fmt: skip
            return [part if i == k else None for i in range(len(node.input))]
        parts = ctx.emit("Split", [g, ctx.const(np.array(sizes, np.int64), "split")], n_out=len(sizes), axis=axis)
        parts = [parts] if isinstance(parts, str) else parts
        return [p if on else None for p, on in zip(parts, live)]

    @classmethod
    def examples(cls):
        r = _rng(1)
        tok = r.standard_normal((1, 1, 4)).astype(np.float32)
        return [
            # two image parts along a non-batch axis (x and its transpose-free copy through Neg)
            example_model(
                [helper.make_node("Neg", ["x"], ["n"]), helper.make_node("Concat", ["x", "n", "x"], ["y"], axis=1)],
                [2, 3],
                name="concat_all",
            ),
            # a constant class token expanded to the batch and prepended (axis 1), as ViT does
            example_model(
                [
                    helper.make_node("Shape", ["x"], ["xs"]),
                    helper.make_node("Gather", ["xs", "i0"], ["n"], axis=0),
                    helper.make_node("Concat", ["n", "one", "one"], ["es"], axis=0),
                    helper.make_node("Expand", ["tok", "es"], ["t"]),
                    helper.make_node("Concat", ["t", "x"], ["y"], axis=-2),
                ],
                [3, 4],
                {"tok": tok, "i0": _i64(0), "one": _i64(1)},
                name="concat_cls",
            ),
        ]


@register
class Split(GraphRule):
    op_type = "Split"
    description = "Split: the parts' cotangents concatenated, zeros (a Pad) for parts without one"

    @shaped
    def vjp(self, ctx, node, grads):
        x = node.input[0]
        if not ctx.on_path(x) or all(g is None for g in grads):
            return [None] * len(node.input)
        rank = len(ctx.shape(x))
        axis = norm_axis(attr(node, "axis", 0), rank)
        if all(g is not None for g in grads):
            return [ctx.emit("Concat", list(grads), axis=axis)] + [None] * (len(node.input) - 1)
        sizes = [ctx.shape(o)[axis] for o in node.output]
        if not all(is_static(n) for n in sizes):
            raise unsupported(node, "a split along the batch axis with unused parts has no adjoint here")
        offsets = np.cumsum([0, *sizes])
        total = int(offsets[-1])
        # runs of consecutive parts with a cotangent: concatenated, padded with zeros to the whole axis
        runs, run = [], []
        for k, g in enumerate(grads):
            if g is None:
                runs, run = (runs + [run]) if run else runs, []
            else:
                run.append(k)
        runs = runs + [run] if run else runs
        total_g = None
        for run in runs:
            part = grads[run[0]] if len(run) == 1 else ctx.emit("Concat", [grads[k] for k in run], axis=axis)
            pads = np.zeros(2 * rank, np.int64)
            pads[axis], pads[rank + axis] = offsets[run[0]], total - offsets[run[-1] + 1]
            part = ctx.emit("Pad", [part, ctx.const(pads, "pads")])
            total_g = part if total_g is None else ctx.emit("Add", [total_g, part])
        return [total_g] + [None] * (len(node.input) - 1)

    @classmethod
    def examples(cls):
        return [
            # all parts used (q, k, v of a fused projection)
            example_model(
                [
                    helper.make_node("Split", ["x", "s"], ["a", "b", "c"], axis=-1),
                    helper.make_node("Mul", ["a", "b"], ["ab"]),
                    helper.make_node("Add", ["ab", "c"], ["y"]),
                ],
                [3, 6],
                {"s": _i64(2, 2, 2)},
                name="split_all",
            ),
            # the middle part unused, unequal sizes
            example_model(
                [
                    helper.make_node("Split", ["x", "s"], ["a", "b", "c"], axis=1),
                    helper.make_node("Concat", ["c", "a"], ["y"], axis=1),
                ],
                [6, 2],
                {"s": _i64(1, 3, 2)},
                name="split_gap",
            ),
            # only the first part used, equal split without sizes
            example_model(
                [helper.make_node("Split", ["x"], ["a", "b"], axis=2), helper.make_node("Identity", ["a"], ["y"])],
                [2, 4],
                name="split_first",
            ),
        ]


def _slice_indices(start: int, end: int, step: int, dim: int) -> list[int]:
    """The indices ONNX Slice takes along one axis (its clamping rules)."""
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    if step > 0:
        start, end = min(max(start, 0), dim), min(max(end, 0), dim)
    else:
        start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    return list(range(start, end, step))


@register
class Slice(GraphRule):
    op_type = "Slice"
    description = "Slice (constant bounds, any steps): the cotangent zero-stuffed (steps) and padded back"

    @shaped
    def vjp(self, ctx, node, grads):
        x, g = node.input[0], grads[0]
        if g is None or not ctx.on_path(x):
            return [None] * len(node.input)
        shape = list(ctx.shape(x))
        rank = len(shape)
        starts, ends = const_ints(ctx, node, 1), const_ints(ctx, node, 2)
        axes = const_ints(ctx, node, 3)
        axes = np.arange(len(starts)) if axes is None else axes
        steps = const_ints(ctx, node, 4)
        steps = np.ones(len(starts), np.int64) if steps is None else steps
        cur = list(shape)  # the cotangent's shape as the axes are restored one by one
        sliced = []
        for a, s, e, st in zip(axes, starts, ends, steps):
            a = norm_axis(int(a), rank)
            dim = shape[a]
            if not is_static(dim):
                if int(st) == 1 and int(s) == 0 and int(e) >= 2**31 - 1:
                    continue  # the whole batch axis
                raise unsupported(node, "slicing the batch axis has no adjoint here")
            idx = _slice_indices(int(s), int(e), int(st), int(dim))
            if not idx:
                raise unsupported(node, f"an empty slice along axis {a}")
            cur[a] = len(idx)
            sliced.append((a, idx, int(st)))
        for a, idx, st in sliced:
            dim, m = int(shape[a]), len(idx)
            if st < 0:  # reverse the cotangent: the kept indices then ascend with step |st|
                g = ctx.emit(
                    "Slice",
                    [g, ctx.const(_i64(-1), "starts"), ctx.const(_i64(-(2**63)), "ends"), ctx.const(_i64(a), "axes"),
                     ctx.const(_i64(-1), "steps")],
                )  # fmt: skip
                idx, st = idx[::-1], -st
            if st > 1 and m > 1:
                # zero-stuffing: [.., m, ..] -> [.., m, st, ..] (zeros after each entry) -> [.., m*st, ..] -> crop
                g = ctx.emit("Unsqueeze", [g, ctx.const(_i64(a + 1), "axes")])
                pads = np.zeros(2 * (rank + 1), np.int64)
                pads[rank + 1 + a + 1] = st - 1
                g = ctx.emit("Pad", [g, ctx.const(pads, "pads")])
                cur[a] = m * st
                g = reshape_to(ctx, g, cur)
                span = (m - 1) * st + 1
                bounds = [ctx.const(_i64(0), "starts"), ctx.const(_i64(span), "ends"), ctx.const(_i64(a), "axes")]
                g = ctx.emit("Slice", [g, *bounds])
                cur[a] = span
            else:
                span = (m - 1) * st + 1 if m > 1 else 1
            pads = np.zeros(2 * rank, np.int64)
            pads[a], pads[rank + a] = idx[0], dim - idx[0] - span
            if pads.any():
                g = ctx.emit("Pad", [g, ctx.const(pads, "pads")])
            cur[a] = dim
        return [g] + [None] * (len(node.input) - 1)

    @classmethod
    def examples(cls):
        def sl(starts, ends, axes=None, steps=None, shape=(4, 7, 6), name="slice"):
            ins = {"s": _i64(*starts), "e": _i64(*ends)}
            names = ["x", "s", "e"]
            if axes is not None:
                ins["a"] = _i64(*axes)
                names.append("a")
            if steps is not None:
                ins["t"] = _i64(*steps)
                names.append("t")
            return example_model([helper.make_node("Slice", names, ["y"])], list(shape), ins, name=name)

        big = 2**63 - 1
        return [
            sl([1], [3], [1], name="slice_simple"),
            sl([0, 1, -5], [big, 6, -1], [0, 2, 3], name="slice_batch_full_neg"),
            sl([1, 0], [7, 6], [2, 3], [2, 3], name="slice_steps"),
            sl([-1, 5], [-big, 0], [3, 2], [-2, -1], name="slice_negative_steps"),
            sl([0, 1, 2], [big, 2, 6], None, None, shape=(2, 7, 6), name="slice_default_axes"),
        ]


@register
class Gather(GraphRule):
    op_type = "Gather"
    description = (
        "Gather (constant indices): one token padded back, a range padded, else a one-hot MatMul; indices "
        "b * S + C on a batch-major flattening (as_strided): per image, the same"
    )

    @shaped
    def vjp(self, ctx, node, grads):
        x, g = node.input[0], grads[0]
        if g is None or not ctx.on_path(x):
            return [None, None]
        if ctx.on_path(node.input[1]):
            raise unsupported(node, "indices that depend on the image have no adjoint")
        idx = ctx.value(node.input[1])
        if idx is None:
            strided = _batch_strided(ctx, node)
            if strided is None:
                raise unsupported(node, "indices must be constant for the adjoint")
            return [_strided_vjp(ctx, g, *strided), None]
        idx = np.asarray(idx).astype(np.int64)
        shape = list(ctx.shape(x))
        rank = len(shape)
        axis = norm_axis(attr(node, "axis", 0), rank)
        dim = shape[axis]
        if not is_static(dim):
            raise unsupported(node, "gathering along the batch axis has no adjoint here")
        dim = int(dim)
        flat = np.where(idx < 0, idx + dim, idx).reshape(-1)
        m = flat.size
        if idx.ndim != 1:  # scalar: the axis is gone; several index axes: merge them into one
            g = reshape_to(ctx, g, shape[:axis] + [m] + shape[axis + 1 :], like=None)
        if np.array_equal(flat, np.arange(flat[0], flat[0] + m)):  # a contiguous range: pad with zeros
            pads = np.zeros(2 * rank, np.int64)
            pads[axis], pads[rank + axis] = flat[0], dim - flat[0] - m
            return [ctx.emit("Pad", [g, ctx.const(pads, "pads")]) if pads.any() else g, None]
        onehot = np.zeros((m, dim))
        np.add.at(onehot, (np.arange(m), flat), 1.0)  # repeated indices accumulate
        if axis != rank - 1:
            perm = [i for i in range(rank) if i != axis] + [axis]
            g = ctx.emit("Transpose", [g], perm=perm)
        g = ctx.emit("MatMul", [g, ctx.const(onehot, "onehot")])
        if axis != rank - 1:
            g = ctx.emit("Transpose", [g], perm=[int(i) for i in np.argsort(perm)])
        return [g, None]

    @classmethod
    def examples(cls):
        def ga(idx, axis, shape=(5, 3), name="gather"):
            return example_model(
                [helper.make_node("Gather", ["x", "i"], ["y"], axis=axis)],
                list(shape),
                {"i": np.asarray(idx)},
                name=name,
            )

        def as_strided(c, name):  # flat[b * 12 + c]: torch.export's as_strided over a batch-major flattening
            mk = helper.make_node
            nodes = [
                mk("Reshape", ["x", "flat"], ["xf"]),
                mk("Shape", ["x"], ["n1"], start=0, end=1),
                mk("Squeeze", ["n1", "zero1"], ["n"]),
                mk("Range", ["zero", "n", "one"], ["b"]),
                mk("Mul", ["b", "stride"], ["bs"]),
                mk("Unsqueeze", ["bs", "tail_axes"], ["bs2"]),
                mk("Add", ["bs2", "c"], ["i"]),
                mk("Gather", ["xf", "i"], ["y"], axis=0),
            ]
            inits = {
                "flat": _i64(-1),
                "zero1": _i64(0),
                "zero": np.int64(0),
                "one": np.int64(1),
                "stride": np.int64(12),
                "tail_axes": np.arange(1, c.ndim, dtype=np.int64),
                "c": c,
            }
            return example_model(nodes, [4, 3], inits, name=name)

        return [
            ga(np.int64(0), 1, name="gather_cls"),  # the class token: scalar index on the token axis
            ga(np.int64(-1), -1, name="gather_last"),
            ga(_i64(1, 2, 3), 1, name="gather_range"),
            ga(_i64(4, 0, 0, 2), 1, name="gather_perm_repeat"),
            ga(np.array([[0, 2], [2, 1]], np.int64), 2, shape=(2, 3), name="gather_2d"),
            as_strided(np.arange(12, dtype=np.int64).reshape(1, 4, 3), "gather_as_strided_identity"),
            as_strided(np.array([[[0, 7], [7, 11], [3, 1]]], np.int64), "gather_as_strided_repeat"),
        ]


def _batch_strided(ctx, node) -> tuple[str, int, np.ndarray] | None:
    """(x, S, C) where node gathers, along axis 0 of x [N*S, ...], indices b * S + C for image b (C
    constant, in [0, S)): torch.export's as_strided over a batch-major flattening. Read from the indices'
    values at the probe's two batch sizes; None when they have another form."""
    x = node.input[0]
    pair = ctx.prep.batch_values.get(node.input[1])
    shape = ctx.shape(x)
    if pair is None or not shape or norm_axis(attr(node, "axis", 0), len(shape)) != 0:
        return None
    d = shape[0]
    if not is_batch(d):
        return None
    rows = 1 if d == "N" else int(str(d).split("*", 1)[1])
    i2, i3 = (np.asarray(v).astype(np.int64) for v in pair)
    if i2.ndim == 0 or i2.shape[0] != 2 or i3.shape != (3, *i2.shape[1:]):
        return None
    c = i2[:1]
    for v in (i2, i3):
        b = np.arange(len(v)).reshape(-1, *([1] * (v.ndim - 1)))
        if not np.array_equal(v, b * rows + c):
            return None
    if c.min() < 0 or c.max() >= rows:
        return None
    return x, rows, c[0]


def _strided_vjp(ctx, g: str, x: str, rows: int, c: np.ndarray) -> str:
    """The cotangent of x [N*S, ...] from g [N, *C.shape, ...]: per image, g scattered back to rows C."""
    shape = list(ctx.shape(x))
    rest = [int(v) for v in shape[1:]]
    flat = c.reshape(-1)
    m = flat.size
    g = ctx.emit("Reshape", [g, ctx.const(np.array([-1, m, *rest], np.int64), "shape")], _shape=("N", m, *rest))
    if not np.array_equal(flat, np.arange(rows)):  # else the identity (torch.flatten as as_strided)
        onehot = np.zeros((m, rows))
        np.add.at(onehot, (np.arange(m), flat), 1.0)  # repeated rows accumulate
        if rest:
            perm = [0, *range(2, 2 + len(rest)), 1]
            g = ctx.emit("Transpose", [g], perm=perm)
        g = ctx.emit("MatMul", [g, ctx.const(onehot, "onehot")])
        if rest:
            g = ctx.emit("Transpose", [g], perm=[int(i) for i in np.argsort(perm)])
    return ctx.emit("Reshape", [g, ctx.const(np.array([-1, *rest], np.int64), "shape")], _shape=tuple(shape))


@register
class Expand(GraphRule):
    op_type = "Expand"
    description = "Expand: the cotangent summed over the broadcast axes"

    @shaped
    def vjp(self, ctx, node, grads):
        x, g = node.input[0], grads[0]
        if g is None or not ctx.on_path(x):
            return [None, None]
        return [ctx.unbroadcast(g, ctx.shape(x), ctx.shape(node.output[0])), None]

    @classmethod
    def examples(cls):
        return [
            example_model([helper.make_node("Expand", ["x", "s"], ["y"])], [1, 3], {"s": _i64(1, 4, 3)}, name="exp"),
            # a rank increase puts the new axis before the batch: moved back after
            example_model(
                [
                    helper.make_node("Expand", ["x", "s"], ["e"]),
                    helper.make_node("Transpose", ["e"], ["y"], perm=[1, 0, 2, 3]),
                ],
                [3, 1],
                {"s": _i64(2, 1, 3, 5)},
                name="exp_rank",
            ),
        ]


@register
class Tile(GraphRule):
    op_type = "Tile"
    description = "Tile: the cotangent summed over the copies"

    @shaped
    def vjp(self, ctx, node, grads):
        x, g = node.input[0], grads[0]
        if g is None or not ctx.on_path(x):
            return [None, None]
        reps = const_ints(ctx, node, 1)
        shape = list(ctx.shape(x))
        target, sum_axes = [], []
        for d, r in zip(shape, reps):
            if not is_static(d):
                if r != 1:
                    raise unsupported(node, "tiling the batch axis has no adjoint here")
                target.append(d)
                continue
            if r != 1:
                sum_axes.append(len(target))
                target.append(int(r))
            target.append(int(d))
        if not sum_axes:
            return [g, None]
        g = reshape_to(ctx, g, target)
        g = ctx.emit("ReduceSum", [g, ctx.const(np.array(sum_axes, np.int64), "axes")], keepdims=0)
        return [g, None]

    @classmethod
    def examples(cls):
        return [
            example_model([helper.make_node("Tile", ["x", "r"], ["y"])], [2, 3], {"r": _i64(1, 3, 2)}, name="tile"),
        ]
