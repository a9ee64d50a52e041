"""Adjoint rules of elementwise ops: activations, arithmetic with broadcasting, identities.

A derivative that depends on the forward values (a mask, y(1-y), ...) is a forward-side tensor
(`ctx.forward`): made once per image in the forward pass and read by both backward passes (K-tiled
in the K pass), so the K cotangents of an image share it."""

from __future__ import annotations

import math

import numpy as np
from onnx import helper

from pbv_onnx.export.graph.rules import FLOAT_TYPES, GraphRule, example_model, register, unsupported

_X = (3, 5, 4)  # the examples' input [N, 3, 5, 4]


def _slope(t: float) -> float:
    """A power of two s with s * |y - t| >= 1 for every float32 y != t: near t, |y - t| is at least the
    float spacing just below |t|, 2^(e - 25) for |t| in [2^(e-1), 2^e), and s * y - s * t is exact
    (Sterbenz); far from t it is large. For t = 0: every normal float32 y > 0."""
    return 2.0**126 if t == 0 else 2.0 ** (25 - math.frexp(abs(t))[1])


def step_above(ctx, y: str, t: float) -> str:
    """(y > t) as 0/1 in y's dtype, ONE HardSigmoid (onnxruntime fuses it after a Conv and runs it in
    its blocked layout, where comparisons and Cast would force layout conversions)."""
    s = _slope(t)
    return ctx.forward("HardSigmoid", [y], alpha=s, beta=-s * t)


def step_below(ctx, y: str, t: float) -> str:
    """(y < t) as 0/1, as step_above."""
    s = _slope(t)
    return ctx.forward("HardSigmoid", [y], alpha=-s, beta=s * t)


def _scale(ctx, g: str, d: str) -> str:
    """g * d, d a forward-side derivative (ctx.mul: no K-tiled copy in the K pass)."""
    return ctx.mul(g, d)


def _f32(v) -> float:
    return float(np.float32(v))


class _Unary(GraphRule):
    """An elementwise op of one float input; `derivative` gives d y / d x as a forward-side tensor."""

    def derivative(self, ctx, node) -> str:
        raise NotImplementedError

    def vjp(self, ctx, node, grads):
        g = grads[0]
        out = [None] * len(node.input)
        if g is not None and ctx.on_path(node.input[0]):
            out[0] = _scale(ctx, g, self.derivative(ctx, node))
        return out

    @classmethod
    def examples(cls):
        attrs = getattr(cls, "example_attrs", [{}])
        return [
            example_model([helper.make_node(cls.op_type, ["x"], ["y"], **a)], _X, name=f"{cls.op_type}{i}")
            for i, a in enumerate(attrs)
        ]


@register
class ReluRule(_Unary):
    op_type = "Relu"
    description = "Relu: g * (y > 0), the mask one HardSigmoid step of the output (fused after a Conv)"
    fp32_only = {"HardSigmoid": (0,)}  # slopes up to 2^126: inf * 0 in float16

    def derivative(self, ctx, node):
        return step_above(ctx, node.output[0], 0.0)

    def vjp(self, ctx, node, grads):
        if grads[0] is not None and ctx.on_path(node.input[0]) and relu_into_maxpool(ctx, node):
            return [grads[0]]  # the MaxPool's adjoint applies the mask, at the pooled size
        return super().vjp(ctx, node, grads)


def relu_into_maxpool(ctx, relu) -> bool:
    """A Relu read only by a MaxPool. The pool routes each window's gradient to one pixel whose value
    is the window's output, so the Relu mask there equals (pooled output > 0): masking the pooled
    gradient is exact and touches a quarter of the pixels or fewer."""
    if relu.op_type != "Relu" or relu.output[0] == ctx.prep.cut:
        return False
    users = ctx.consumers(relu.output[0])
    return len(users) == 1 and users[0].op_type == "MaxPool" and users[0].input[0] == relu.output[0]


@register
class ClipRule(_Unary):
    op_type = "Clip"
    description = "Clip: g * (lo < y < hi), steps of the output (ReLU6 on whole NCHWc blocks: two fused passes)"
    fp32_only = {"HardSigmoid": (0,)}

    def derivative(self, ctx, node):
        y = node.output[0]
        bounds = []
        for i in (1, 2):
            name = node.input[i] if len(node.input) > i else ""
            if not name:
                bounds.append(None)
                continue
            v = ctx.value(name)
            if v is None:
                raise unsupported(node, "bounds that are not constants")
            bounds.append(_f32(v.reshape(())))
        lo, hi = bounds
        shape = ctx.shape(y)
        if (
            lo == 0.0
            and hi is not None
            and 0.0 < hi < 2.0**100
            and shape is not None
            and len(shape) == 4
            and not isinstance(shape[1], str)
            and int(shape[1]) % 16 == 0
        ):
            return clamp_mask(ctx, y, hi, int(shape[1]))
        masks = [step_above(ctx, y, lo)] if lo is not None and np.isfinite(lo) else []
        if hi is not None and np.isfinite(hi):
            masks.append(step_below(ctx, y, hi))
        if not masks:
            return ctx.forward("Add", [ctx.forward("Mul", [y, ctx.const(np.float32(0))]), ctx.const(np.float32(1))])
        return masks[0] if len(masks) == 1 else ctx.forward("Mul", masks)

    @classmethod
    def examples(cls):
        out = []
        for i, (lo, hi) in enumerate(((0.0, 6.0), (-0.5, 0.7), (None, 0.3))):
            inits = {"hi": np.float32(hi)}
            ins = ["x", "", "hi"]
            if lo is not None:
                inits["lo"] = np.float32(lo)
                ins[1] = "lo"
            out.append(example_model([helper.make_node("Clip", ins, ["y"])], _X, inits, name=f"clip{i}"))
        # ReLU6 on 16 channels: the fused two-pass mask (clamp_mask)
        nodes = [
            helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]),
            helper.make_node("Clip", ["c", "lo", "hi"], ["y"]),
        ]
        inits = {"w": np.random.default_rng(8).standard_normal((16, 3, 1, 1)) * 3, "lo": np.float32(0),
                 "hi": np.float32(6)}  # fmt: skip
        out.append(example_model(nodes, _X, inits, name="relu6_blocked"))
        return out


def clamp_mask(ctx, y: str, hi: float, c: int) -> str:
    """(0 < y < hi) as 0/1 for y = Clip(x, 0, hi) [N, C, H, W], in two passes instead of three (ReLU6):
    z = (y == 0), then u = y * 2^-e + z, with 2^-e scaling hi into [0.5, 1), and the mask is
    (u < hi * 2^-e), since y = 0 lifts u to 1. The scaling is a 1x1 depthwise Conv, so onnxruntime
    fuses the Add of z and the final step into it (measured: docs/performance.md). Exact: the scale is
    a power of two, z is 0 wherever y is not 0 (for y >= the least normal float32)."""
    scale = 2.0 ** -math.frexp(hi)[1]
    z = ctx.forward("HardSigmoid", [y], alpha=-_slope(0.0), beta=1.0)  # (y <= 0), i.e. y == 0
    w = ctx.const(np.full((c, 1, 1, 1), scale, np.float32))
    u = ctx.forward("Add", [ctx.forward("Conv", [y, w], group=c, _shape=ctx.shape(y)), z])
    return step_below(ctx, u, hi * scale)


@register
class LeakyReluRule(_Unary):
    op_type = "LeakyRelu"
    description = "LeakyRelu: g * where(x > 0, 1, alpha)"
    example_attrs = [{}, {"alpha": 0.2}]

    def derivative(self, ctx, node):
        alpha = helper.get_node_attr_value(node, "alpha") if _has(node, "alpha") else 0.01
        x = node.input[0]
        pos = ctx.forward("Greater", [x, ctx.const(np.float32(0))])
        return ctx.forward("Where", [pos, ctx.const(np.float32(1)), ctx.const(np.float32(alpha))])


@register
class PReluRule(GraphRule):
    op_type = "PRelu"
    description = "PRelu: g * where(x > 0, 1, slope) (the slope a constant)"

    def vjp(self, ctx, node, grads):
        x, slope = node.input[0], node.input[1]
        if ctx.on_path(slope):
            raise unsupported(node, "a slope that depends on the image")
        if grads[0] is None or not ctx.on_path(x):
            return [None, None]
        pos = ctx.forward("Greater", [x, ctx.const(np.float32(0))])
        d = ctx.forward("Where", [pos, ctx.const(np.float32(1)), slope], _shape=ctx.shape(x))
        return [_scale(ctx, grads[0], d), None]

    @classmethod
    def examples(cls):
        return [
            example_model(
                [helper.make_node("PRelu", ["x", "s"], ["y"])], _X, {"s": np.array([0.1, -0.3, 0.5]).reshape(3, 1, 1)}
            ),
            example_model([helper.make_node("PRelu", ["x", "s"], ["y"])], _X, {"s": np.array([0.25])}, name="prelu1"),
        ]


@register
class SigmoidRule(_Unary):
    op_type = "Sigmoid"
    description = "Sigmoid: g * y (1 - y), 1 - y as HardSigmoid(y; -1, 1) (kept in onnxruntime's blocked layout)"

    def derivative(self, ctx, node):
        # 1 - y as an activation, exact for y in [0, 1]: Sub(1, y), with its scalar operand, converts y
        # out of onnxruntime's blocked layout (fuse_silu.one_minus)
        y = node.output[0]
        one_minus = ctx.forward("HardSigmoid", [y], alpha=-1.0, beta=1.0, _shape=ctx.shape(y))
        return ctx.forward("Mul", [y, one_minus])


@register
class TanhRule(_Unary):
    op_type = "Tanh"
    description = "Tanh: g * (1 - y^2)"

    def derivative(self, ctx, node):
        y = node.output[0]
        return ctx.forward("Sub", [ctx.const(np.float32(1)), ctx.forward("Mul", [y, y])])


@register
class ErfRule(_Unary):
    op_type = "Erf"
    description = "Erf: g * 2/sqrt(pi) exp(-x^2)"

    def derivative(self, ctx, node):
        # (2/sqrt pi) / exp(x^2): the negation folded into the Div, three passes (exp(x^2) = inf gives 0, the limit)
        x = node.input[0]
        e = ctx.forward("Exp", [ctx.forward("Mul", [x, x])])
        return ctx.forward("Div", [ctx.const(np.float32(2.0 / math.sqrt(math.pi))), e])


@register
class HardSigmoidRule(_Unary):
    op_type = "HardSigmoid"
    description = "HardSigmoid: g * alpha * (0 < y < 1), steps of the output"
    fp32_only = {"HardSigmoid": (0,)}
    example_attrs = [{}, {"alpha": 1.0 / 6, "beta": 0.5}]

    def derivative(self, ctx, node):
        alpha = helper.get_node_attr_value(node, "alpha") if _has(node, "alpha") else 0.2
        y = node.output[0]
        mask = ctx.forward("Mul", [step_above(ctx, y, 0.0), step_below(ctx, y, 1.0)])
        return ctx.forward("Mul", [mask, ctx.const(np.float32(alpha))])


@register
class HardSwishRule(_Unary):
    op_type = "HardSwish"
    description = "HardSwish: g * (0 if x < -3, 1 if x > 3, x/3 + 1/2 between)"

    def derivative(self, ctx, node):
        x = node.input[0]
        mid = ctx.forward("Add", [ctx.forward("Mul", [x, ctx.const(np.float32(1.0 / 3))]), ctx.const(np.float32(0.5))])
        hi = ctx.forward("Greater", [x, ctx.const(np.float32(3))])
        lo = ctx.forward("Less", [x, ctx.const(np.float32(-3))])
        upper = ctx.forward("Where", [hi, ctx.const(np.float32(1)), mid])
        return ctx.forward("Where", [lo, ctx.const(np.float32(0)), upper])

    @classmethod
    def examples(cls):
        # inputs scaled by 4 so the examples reach both flat parts
        nodes = [helper.make_node("Mul", ["x", "four"], ["x4"]), helper.make_node("HardSwish", ["x4"], ["y"])]
        return [example_model(nodes, _X, {"four": np.float32(4.0)})]


@register
class SqrtRule(_Unary):
    op_type = "Sqrt"
    description = "Sqrt: g * 0.5 / y"

    def derivative(self, ctx, node):
        return ctx.forward("Div", [ctx.const(np.float32(0.5)), node.output[0]])

    @classmethod
    def examples(cls):
        nodes = [
            helper.make_node("Mul", ["x", "x"], ["sq"]),
            helper.make_node("Add", ["sq", "one"], ["pos"]),
            helper.make_node("Sqrt", ["pos"], ["y"]),
        ]
        return [example_model(nodes, _X, {"one": np.float32(1.0)})]


@register
class ReciprocalRule(_Unary):
    op_type = "Reciprocal"
    description = "Reciprocal: g * -(y^2)"

    def derivative(self, ctx, node):
        y = node.output[0]
        return ctx.forward("Neg", [ctx.forward("Mul", [y, y])])

    @classmethod
    def examples(cls):
        nodes = [
            helper.make_node("Mul", ["x", "x"], ["sq"]),
            helper.make_node("Add", ["sq", "one"], ["pos"]),
            helper.make_node("Reciprocal", ["pos"], ["y"]),
        ]
        return [example_model(nodes, _X, {"one": np.float32(1.0)})]


@register
class ExpRule(_Unary):
    op_type = "Exp"
    description = "Exp: g * y"

    def derivative(self, ctx, node):
        return node.output[0]


@register
class LogRule(_Unary):
    op_type = "Log"
    description = "Log: g / x"

    def vjp(self, ctx, node, grads):
        if grads[0] is None or not ctx.on_path(node.input[0]):
            return [None]
        return [ctx.emit("Div", [grads[0], ctx.fwd(node.input[0])])]

    @classmethod
    def examples(cls):
        nodes = [
            helper.make_node("Mul", ["x", "x"], ["sq"]),
            helper.make_node("Add", ["sq", "one"], ["pos"]),
            helper.make_node("Log", ["pos"], ["y"]),
        ]
        return [example_model(nodes, _X, {"one": np.float32(1.0)})]


@register
class NegRule(GraphRule):
    op_type = "Neg"
    description = "Neg: -g"

    def vjp(self, ctx, node, grads):
        return [ctx.emit("Neg", [grads[0]]) if grads[0] is not None and ctx.on_path(node.input[0]) else None]

    @classmethod
    def examples(cls):
        return [example_model([helper.make_node("Neg", ["x"], ["y"])], _X)]


class _PassThrough(GraphRule):
    """y = x (in inference): the cotangent passes unchanged; other inputs get none."""

    def vjp(self, ctx, node, grads):
        out = [None] * len(node.input)
        if grads[0] is not None and ctx.on_path(node.input[0]):
            out[0] = grads[0]
        return out


@register
class IdentityRule(_PassThrough):
    op_type = "Identity"
    description = "Identity: g"

    @classmethod
    def examples(cls):
        return [example_model([helper.make_node("Identity", ["x"], ["y"])], _X)]


@register
class DropoutRule(_PassThrough):
    op_type = "Dropout"
    description = "Dropout in inference: g"

    def vjp(self, ctx, node, grads):
        mode = node.input[2] if len(node.input) > 2 else ""
        if mode and (ctx.value(mode) is None or bool(ctx.value(mode))):
            raise unsupported(node, "training mode")
        return super().vjp(ctx, node, grads)

    @classmethod
    def examples(cls):
        return [example_model([helper.make_node("Dropout", ["x"], ["y"])], _X)]


@register
class CastRule(GraphRule):
    op_type = "Cast"
    description = "Cast between float types: g cast back to the input's type; from bool or int: none"

    def vjp(self, ctx, node, grads):
        x = node.input[0]
        if grads[0] is None or not ctx.on_path(x):
            return [None]
        src = ctx.prep.dtypes.get(x)
        if src not in FLOAT_TYPES:
            return [None]  # a mask or an index made a number: piecewise constant in the image
        if helper.get_node_attr_value(node, "to") not in FLOAT_TYPES:
            raise unsupported(node, "a cast from a float type to a non-float type on the image path")
        return [ctx.emit("Cast", [grads[0]], to=src)]

    @classmethod
    def examples(cls):
        mk = helper.make_node
        return [
            example_model([mk("Cast", ["x"], ["y"], to=1)], _X),
            # a mask made a float and applied: the gradient flows through the product alone
            example_model(
                [mk("Greater", ["x", "zero"], ["pos"]), mk("Cast", ["pos"], ["m"], to=1), mk("Mul", ["x", "m"], ["y"])],
                _X, {"zero": np.float32(0)}, name="cast_mask",
            ),
        ]  # fmt: skip


def _has(node, name: str) -> bool:
    return any(a.name == name for a in node.attribute)


# -- binary arithmetic with broadcasting ---------------------------------------------------------
class _Binary(GraphRule):
    """y = f(a, b) with numpy broadcasting: each input's cotangent summed over its broadcast axes."""

    def grads(self, ctx, node, g: str) -> tuple[str | None, str | None]:
        raise NotImplementedError

    def vjp(self, ctx, node, grads):
        g = grads[0]
        if g is None:
            return [None, None]
        ga, gb = self.grads(ctx, node, g)
        y_shape = ctx.shape(node.output[0])
        out = []
        for name, gi in zip(node.input, (ga, gb)):
            if gi is None or not ctx.on_path(name):
                out.append(None)
                continue
            ctx.set_shape(gi, y_shape)  # the products broadcast to y's shape
            out.append(ctx.unbroadcast(gi, ctx.shape(name), g_shape=y_shape))
        return out

    @classmethod
    def examples(cls):
        op = cls.op_type
        rng = np.random.default_rng(5)
        c = rng.uniform(0.5, 1.5, (3, 1, 4)).astype(np.float32)
        if op == "Div":
            return [
                example_model(
                    [
                        helper.make_node("Mul", ["x", "x"], ["sq"]),
                        helper.make_node("Add", ["sq", "one"], ["den"]),
                        helper.make_node("Div", ["x", "den"], ["y"]),
                    ],
                    _X,
                    {"one": np.float32(1)},
                    name="div_both",
                ),
                example_model([helper.make_node("Div", ["x", "c"], ["y"])], _X, {"c": c}, name="div_const"),
                example_model(
                    [
                        helper.make_node("Mul", ["x", "x"], ["sq"]),
                        helper.make_node("Add", ["sq", "one"], ["den"]),
                        helper.make_node("ReduceSum", ["den", "ax"], ["s"], keepdims=1),
                        helper.make_node("Div", ["x", "s"], ["y"]),
                    ],
                    _X,
                    {"one": np.float32(1), "ax": np.array([1, 3], np.int64)},
                    name="div_bcast",
                ),
            ]
        return [
            example_model([helper.make_node(op, ["x", "c"], ["y"])], _X, {"c": c}, name=f"{op}_const"),
            example_model([helper.make_node(op, ["c", "x"], ["y"])], _X, {"c": c}, name=f"{op}_const_first"),
            example_model(
                [helper.make_node("Tanh", ["x"], ["t"]), helper.make_node(op, ["x", "t"], ["y"])], _X, name=f"{op}_both"
            ),
            example_model(
                [
                    helper.make_node("ReduceSum", ["x", "ax"], ["s"], keepdims=1),
                    helper.make_node(op, ["x", "s"], ["y"]),
                ],
                _X,
                {"ax": np.array([1, 2], np.int64)},
                name=f"{op}_bcast",
            ),
        ]


@register
class AddRule(_Binary):
    op_type = "Add"
    description = "Add: g to both inputs, summed over broadcast axes"

    def grads(self, ctx, node, g):
        return g, g


@register
class SubRule(_Binary):
    op_type = "Sub"
    description = "Sub: g and -g, summed over broadcast axes"

    def grads(self, ctx, node, g):
        return g, (ctx.emit("Neg", [g]) if ctx.on_path(node.input[1]) else None)


@register
class MulRule(_Binary):
    op_type = "Mul"
    description = "Mul: g * b and g * a, summed over broadcast axes"

    def grads(self, ctx, node, g):
        a, b = node.input
        y_shape = ctx.shape(node.output[0])
        ga = ctx.mul(g, b, y_shape) if ctx.on_path(a) else None
        gb = ctx.mul(g, a, y_shape) if ctx.on_path(b) else None
        return ga, gb


@register
class DivRule(_Binary):
    op_type = "Div"
    description = "Div: g / b and -g y / b, summed over broadcast axes"

    def grads(self, ctx, node, g):
        a, b = node.input
        ga = ctx.emit("Div", [g, ctx.fwd(b)]) if ctx.on_path(a) else None
        gb = None
        if ctx.on_path(b):
            d = ctx.forward("Neg", [ctx.forward("Div", [node.output[0], b])])
            gb = ctx.emit("Mul", [g, ctx.fwd(d)])
        return ga, gb


@register
class PowRule(_Binary):
    op_type = "Pow"
    description = "Pow: g * b a^(b-1) and g * y ln(a), summed over broadcast axes"

    def grads(self, ctx, node, g):
        a, b = node.input
        ga = gb = None
        if ctx.on_path(a):
            bv = ctx.value(b)
            if bv is not None and bv.size == 1 and float(bv.reshape(())) == 2.0:
                d = ctx.forward("Mul", [a, ctx.const(np.float32(2))])
            elif bv is not None and bv.size == 1 and float(bv.reshape(())) == 1.0:
                d = None
            elif bv is not None:
                pw = ctx.forward("Pow", [a, ctx.const(np.asarray(bv - 1, np.float32))])
                d = ctx.forward("Mul", [pw, ctx.const(np.asarray(bv, np.float32))])
            else:
                pw = ctx.forward("Pow", [a, ctx.forward("Sub", [b, ctx.const(np.float32(1))])])
                d = ctx.forward("Mul", [pw, b])
            ga = g if d is None else ctx.emit("Mul", [g, ctx.fwd(d)])
        if ctx.on_path(b):
            d = ctx.forward("Mul", [node.output[0], ctx.forward("Log", [a])])
            gb = ctx.emit("Mul", [g, ctx.fwd(d)])
        return ga, gb

    @classmethod
    def examples(cls):
        out = []
        for i, p in enumerate((2.0, 3.0, 0.5)):
            nodes = [
                helper.make_node("Mul", ["x", "x"], ["sq"]),
                helper.make_node("Add", ["sq", "one"], ["pos"]),
                helper.make_node("Pow", ["pos", "p"], ["y"]),
            ]
            out.append(example_model(nodes, _X, {"one": np.float32(1), "p": np.float32(p)}, name=f"pow{i}"))
        nodes = [
            helper.make_node("Mul", ["x", "x"], ["sq"]),
            helper.make_node("Add", ["sq", "one"], ["pos"]),
            helper.make_node("Tanh", ["x"], ["t"]),
            helper.make_node("Pow", ["pos", "t"], ["y"]),
        ]
        out.append(example_model(nodes, _X, {"one": np.float32(1)}, name="pow_both"))
        return out


# -- elementwise extrema ------------------------------------------------------------------------
class _Extremum(GraphRule):
    """y = Max or Min of one or more inputs with numpy broadcasting: g goes to the inputs equal to y,
    split evenly where several are (as torch.maximum and JAX's lax.max do), each input's share summed
    over its broadcast axes. Flax's LayerNorm clamps its variance with a Max at 0."""

    def vjp(self, ctx, node, grads):
        g = grads[0]
        out = [None] * len(node.input)
        on = [i for i, name in enumerate(node.input) if ctx.on_path(name)]
        if g is None or not on:
            return out
        if len(node.input) == 1:
            return [g]
        y = node.output[0]
        y_shape = ctx.shape(y)
        one, zero = ctx.const(np.float32(1)), ctx.const(np.float32(0))
        # which inputs reach y, and how many do at each element: functions of the forward pass, made once
        hits = [ctx.forward("Where", [ctx.forward("Equal", [name, y]), one, zero]) for name in node.input]
        count = ctx.forward("Sum", hits, _shape=y_shape)
        for i in on:
            share = ctx.forward("Div", [hits[i], count], _shape=y_shape)
            gi = ctx.set_shape(ctx.mul(g, share, y_shape), y_shape)
            shape = ctx.shape(node.input[i])
            out[i] = gi if tuple(shape) == tuple(y_shape) else ctx.unbroadcast(gi, shape, g_shape=y_shape)
        return out

    @classmethod
    def examples(cls):
        op = cls.op_type
        rng = np.random.default_rng(9)
        c = rng.uniform(-0.5, 0.5, (3, 1, 4)).astype(np.float32)
        mk = helper.make_node
        return [
            example_model([mk(op, ["x", "c"], ["y"])], _X, {"c": c}, name=f"{op}_const"),
            example_model([mk(op, ["zero", "x"], ["y"])], _X, {"zero": np.float32(0)}, name=f"{op}_scalar_first"),
            example_model(
                [
                    mk("Tanh", ["x"], ["t"]),
                    mk("ReduceMean", ["x"], ["m"], axes=[2], keepdims=1),
                    mk(op, ["x", "t", "m", "c"], ["y"]),
                ],
                _X,
                {"c": c},
                name=f"{op}_four",
            ),  # fmt: skip
            # every element a tie: y = x, so the split halves must add up to g (2g without the split)
            example_model([mk("Identity", ["x"], ["x2"]), mk(op, ["x", "x2"], ["y"])], _X, name=f"{op}_tied"),
        ]


@register
class MaxRule(_Extremum):
    op_type = "Max"
    description = "Max: g to the inputs equal to y (ties split evenly), summed over broadcast axes"


@register
class MinRule(_Extremum):
    op_type = "Min"
    description = "Min: g to the inputs equal to y (ties split evenly), summed over broadcast axes"


@register
class WhereRule(GraphRule):
    op_type = "Where"
    description = (
        "Where: g to a where the condition holds and to b where not (none to the condition), summed over broadcast axes"
    )

    def vjp(self, ctx, node, grads):
        cond, a, b = node.input
        g = grads[0]
        out = [None, None, None]
        if g is None:
            return out
        y_shape = ctx.shape(node.output[0])
        zero = ctx.const(np.float32(0))
        for i, name in ((1, a), (2, b)):
            if not ctx.on_path(name):
                continue
            picked = [ctx.fwd(cond), g, zero] if i == 1 else [ctx.fwd(cond), zero, g]
            gi = ctx.set_shape(ctx.emit("Where", picked), y_shape)
            shape = ctx.shape(name)
            out[i] = gi if tuple(shape) == tuple(y_shape) else ctx.unbroadcast(gi, shape, g_shape=y_shape)
        return out

    @classmethod
    def examples(cls):
        mk = helper.make_node
        c = np.random.default_rng(11).uniform(-0.5, 0.5, (3, 1, 4)).astype(np.float32)
        return [
            # both branches from the image, the condition too (a kink where it flips)
            example_model(
                [mk("Greater", ["x", "c"], ["cond"]), mk("Tanh", ["x"], ["t"]), mk("Mul", ["x", "x"], ["sq"]),
                 mk("Where", ["cond", "t", "sq"], ["y"])],
                _X, {"c": c}, name="where_both",
            ),
            # a constant branch broadcast against the image's ([3, 1, 4] against [N, 3, 5, 4])
            example_model(
                [mk("Less", ["x", "zero"], ["cond"]), mk("Where", ["cond", "c", "x"], ["y"])],
                _X, {"c": c, "zero": np.float32(0)}, name="where_const",
            ),
            # torch.onnx's scaled_dot_product_attention: a fully masked row's NaNs set to 0
            example_model(
                [mk("Softmax", ["x"], ["p"], axis=-1), mk("IsNaN", ["p"], ["nan"]),
                 mk("Where", ["nan", "zero", "p"], ["y"])],
                _X, {"zero": np.float32(0)}, name="where_isnan",
            ),
        ]  # fmt: skip
