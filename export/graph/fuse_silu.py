"""Patterns for SiLU / swish and squeeze-excitation blocks: their adjoints in fewer full-size passes."""

from __future__ import annotations

import numpy as np
from onnx import helper

from pbv_onnx.export.graph.rules import GraphPattern, example_model, example_weights, register_pattern

_X = (16, 5, 4)  # the examples' input [N, 16, 5, 4]: 16 channels, one whole block of onnxruntime's NCHWc layout


def one_minus(ctx, s: str) -> str:
    """1 - s for s in [0, 1] (a sigmoid), forward-side, as HardSigmoid(s; -1, 1): the same one rounding
    as Sub, but an activation onnxruntime can run on its blocked layout, where Sub(1, s) with its
    scalar operand sends s out of that layout (a ReorderOutput per use)."""
    return ctx.forward("HardSigmoid", [s], alpha=-1.0, beta=1.0, _shape=ctx.shape(s))


@register_pattern
class SiluPattern(GraphPattern):
    name = "silu"
    root_op = "Mul"
    description = "SiLU y = x * Sigmoid(x): g * (s + y (1 - s)), the derivative made once per image"

    def match(self, ctx, node):
        """(x, s): the root reads x and s = Sigmoid(x), in either order, of the same shape."""
        if len(node.input) != 2:
            return None
        for x, s in (node.input, reversed(node.input)):
            p = ctx.producer(s)
            if p is None or p.op_type != "Sigmoid" or p.input[0] != x or not ctx.on_path(x):
                continue
            xs, ys = ctx.shape(x), ctx.shape(node.output[0])
            if xs is None or ys is None or tuple(xs) != tuple(ys):
                continue
            return x, s
        return None

    def vjp(self, ctx, node, match, grads):
        # dy/dx through both readers of x: s + x s (1 - s) = s + y (1 - s). Inner readers of s other
        # than this Mul (none in a SiLU) still get the Sigmoid rule, from their own cotangents.
        x, s = match
        g = grads[0]
        if g is None:
            return {}
        y = node.output[0]
        d = ctx.forward("Add", [s, ctx.forward("Mul", [y, one_minus(ctx, s)])])
        return {x: ctx.mul(g, d, ctx.shape(y))}

    @classmethod
    def examples(cls):
        def conv(name, out, seed, c_in=16, c_out=16):
            return helper.make_node("Conv", [name, f"w{seed}"], [out], kernel_shape=[1, 1]), {
                f"w{seed}": example_weights(seed, c_out, c_in, 1, 1, scale=0) * 2
            }

        out = []
        # Conv -> SiLU (x first), then a second SiLU with the sigmoid first: the forward as torch exports it
        c0, w0 = conv("x", "c", 1)
        c1, w1 = conv("y0", "c1", 2)
        nodes = [
            c0,
            helper.make_node("Sigmoid", ["c"], ["s"]),
            helper.make_node("Mul", ["c", "s"], ["y0"]),
            c1,
            helper.make_node("Sigmoid", ["c1"], ["s1"]),
            helper.make_node("Mul", ["s1", "c1"], ["y"]),
        ]
        out.append(example_model(nodes, _X, {**w0, **w1}, name="silu_conv"))
        # the sigmoid also read elsewhere, and x read beside the SiLU: the Sigmoid rule and the fan-out sum
        nodes = [
            helper.make_node("Sigmoid", ["x"], ["s"]),
            helper.make_node("Mul", ["x", "s"], ["a"]),
            helper.make_node("Mul", ["s", "s"], ["b"]),
            helper.make_node("Add", ["a", "b"], ["ab"]),
            helper.make_node("Add", ["ab", "x"], ["y"]),
        ]
        out.append(example_model(nodes, (3, 5, 4), name="silu_shared_sigmoid"))
        return out


def _static4(shape) -> tuple[int, int, int] | None:
    """(C, H, W) of a [N, C, H, W] shape with only the batch symbolic, else None."""
    if shape is None or len(shape) != 4 or shape[0] != "N" or any(isinstance(d, str) for d in shape[1:]):
        return None
    return int(shape[1]), int(shape[2]), int(shape[3])


def _is_squeeze(ctx, node, x: str) -> bool:
    """Whether node is GlobalAveragePool(x), or ReduceMean(x) over H and W keeping them (as torch.export
    writes it): the squeeze of a squeeze-excitation block."""
    if not node.input or node.input[0] != x:
        return False
    if node.op_type == "GlobalAveragePool":
        return True
    keepdims = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
    if node.op_type != "ReduceMean" or keepdims != 1:
        return False
    axes = next((list(a.ints) for a in node.attribute if a.name == "axes"), None)
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = ctx.value(node.input[1])
        axes = None if value is None else [int(v) for v in np.asarray(value).reshape(-1)]
    return axes is not None and sorted(a % 4 for a in axes) == [2, 3]


@register_pattern
class SqueezeExcitationPattern(GraphPattern):
    name = "squeeze_excitation"
    root_op = "Mul"
    description = (
        "squeeze-excitation y = x * f(GlobalAveragePool(x)), f on [N, C, 1, 1] maps: the scale's cotangent a "
        "GlobalAveragePool of g x (times H W), the pool's gradient added to g f at [N, C, 1, 1] (broadcast Add)"
    )

    def match(self, ctx, node):
        """(x, e, chain, pool): the root multiplies x [N,C,H,W] by e [N,C,1,1], e computed from x only through
        GlobalAveragePool(x) and nodes whose outputs only this chain reads (`chain`, in graph order)."""
        if len(node.input) != 2:
            return None
        for x, e in (node.input, reversed(node.input)):
            dims = _static4(ctx.shape(x))
            if dims is None or ctx.shape(e) != ("N", dims[0], 1, 1) or not ctx.on_path(e):
                continue
            found = self._chain(ctx, node, x, e)
            if found is not None:
                return (x, e, *found)
        return None

    @staticmethod
    def _chain(ctx, root, x: str, e: str, limit: int = 16):
        members, pool, todo = {}, None, [e]
        while todo:
            t = todo.pop()
            p = ctx.producer(t)
            if p is None or t == ctx.prep.cut or t == x:  # x itself read by the excitation: not this pattern
                return None
            readers = ctx.consumers(t)
            if any(id(r) not in members and r is not root for r in readers) or (t == e and readers != [root]):
                return None  # read outside the chain: leave it to the rules
            if id(p) in members:
                continue
            if _is_squeeze(ctx, p, x):
                if pool is not None and pool is not p:
                    return None
                pool = p
                members[id(p)] = p
                continue
            if len(members) >= limit or len(p.output) != 1:
                return None
            members[id(p)] = p
            todo.extend(i for i in p.input if ctx.on_path(i))
        if pool is None:
            return None
        order = [n for n in ctx.prep.model.graph.node if id(n) in members]
        return order, pool

    def vjp(self, ctx, node, match, grads):
        from pbv_onnx.export.graph.rules import patterns_by_root, rule_for

        x, e, chain, pool = match
        g = grads[0]
        if g is None:
            return {}
        c, h, w = _static4(ctx.shape(x))
        full, small = ("N", c, h, w), ("N", c, 1, 1)
        # the scale's cotangent: sum over space of g * x, as a GlobalAveragePool (which onnxruntime runs on
        # its blocked layout, where ReduceSum reads the product converted out of it) times H W
        # (a batched MatMul [N, C, 1, HW] x [N, C, HW, 1] of the plain-layout copies measured 1.13x slower)
        gx_prod = ctx.mul(g, x, full)
        ge = ctx.emit("Mul", [ctx.emit("GlobalAveragePool", [gx_prod], _shape=small), ctx.const(np.float32(h * w))])
        ctx.set_shape(ge, small)
        # back through the excitation's small maps with the registered rules (and patterns), to the pool
        local = {e: [ge]}
        patterns = patterns_by_root()
        g_pool = None
        for n in reversed(chain):
            gs = []
            for o in n.output:
                parts = local.pop(o, None)
                if not parts:
                    gs.append(None)
                    continue
                total = parts[0] if len(parts) == 1 else ctx.emit("Sum", parts)
                gs.append(ctx.set_shape(total, ctx.shape(o)))
            if all(v is None for v in gs):
                continue
            if n is pool:
                g_pool = gs[0]
                continue
            contributions = None
            for pattern in patterns.get(n.op_type, ()):
                if pattern.name == self.name:
                    continue
                m = pattern.match(ctx, n)
                if m is not None:
                    contributions = list(pattern.vjp(ctx, n, m, gs).items())
                    break
            if contributions is None:
                contributions = list(zip(n.input, rule_for(n).vjp(ctx, n, gs)))
            for name, gi in contributions:
                if gi is None or not ctx.on_path(name):
                    continue
                if ctx.shape(gi) is None:
                    ctx.set_shape(gi, ctx.shape(name))
                local.setdefault(name, []).append(gi)
        if local:  # match() admits only chains whose image-path inputs are their own outputs or x via the pool
            raise ValueError(f"squeeze-excitation chain at {node.name!r} left cotangents of {sorted(local)}")
        # x's cotangent: g * e (broadcast) plus the pool's g / (H W), added at [N, C, 1, 1]
        # (g * e against a full-size copy of e entered into the blocked layout through an identity Conv, so
        # that the product stays there, measured slower on efficientnet_b0: the copy costs more than the
        # conversions it saves)
        out = ctx.mul(g, e, full)
        if g_pool is not None:
            spread = ctx.emit("Mul", [g_pool, ctx.const(np.float32(1.0 / (h * w)))], _shape=small)
            out = ctx.emit("Add", [out, spread], _shape=full)
        return {x: out}

    @classmethod
    def examples(cls):
        c = 16
        w1 = example_weights(11, 4, c, 1, 1, scale=0) * 2
        w2 = example_weights(12, c, 4, 1, 1, scale=0) * 2
        w0 = example_weights(13, c, c, 1, 1, scale=0) * 2
        se = [
            helper.make_node("GlobalAveragePool", ["h"], ["p"]),
            helper.make_node("Conv", ["p", "w1", "b1"], ["q"], kernel_shape=[1, 1]),
            helper.make_node("Sigmoid", ["q"], ["qs"]),
            helper.make_node("Mul", ["q", "qs"], ["r"]),
            helper.make_node("Conv", ["r", "w2", "b2"], ["t"], kernel_shape=[1, 1]),
            helper.make_node("Sigmoid", ["t"], ["e"]),
        ]
        inits = {"w0": w0, "w1": w1, "w2": w2, "b1": np.linspace(-1, 1, 4), "b2": np.linspace(-1, 1, c)}
        out = []
        # as in EfficientNet: Conv -> SiLU -> SE (scale first), then a Conv reading the product
        nodes = [
            helper.make_node("Conv", ["x", "w0"], ["c0"], kernel_shape=[1, 1]),
            helper.make_node("Sigmoid", ["c0"], ["s0"]),
            helper.make_node("Mul", ["c0", "s0"], ["h"]),
            *se,
            helper.make_node("Mul", ["e", "h"], ["m"]),
            helper.make_node("Conv", ["m", "w0"], ["y"], kernel_shape=[1, 1]),
        ]
        out.append(example_model(nodes, _X, inits, name="se_silu"))
        # the map first in the product, and also read by a residual Add
        nodes = [helper.make_node("Identity", ["x"], ["h"]), *se, helper.make_node("Mul", ["h", "e"], ["m"]),
                 helper.make_node("Add", ["m", "h"], ["y"])]  # fmt: skip
        out.append(example_model(nodes, _X, inits, name="se_residual"))
        # the squeeze as ReduceMean over H and W (opset 18: axes an input), as torch.export writes it
        mean = helper.make_node("ReduceMean", ["h", "hw"], ["p"], keepdims=1)
        nodes = [helper.make_node("Identity", ["x"], ["h"]), mean, *se[1:], helper.make_node("Mul", ["e", "h"], ["y"])]
        out.append(example_model(nodes, _X, {**inits, "hw": np.array([-1, -2], np.int64)}, name="se_mean", opset=18))
        return out
