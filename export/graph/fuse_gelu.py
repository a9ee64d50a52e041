"""Patterns for GELU written as Erf (x * 0.5 * (1 + erf(x / sqrt 2))): its adjoint in fewer full-size passes.

Node by node, the chain's adjoint costs six full-size passes per backward pass (the constant Mul, both
sides of the product rule, the Erf derivative, the Div, the Add joining the two paths to x) and three
forward-side ones (the Erf derivative). As one: g * d, with the derivative d = Phi(x) + x phi(x) made once
per image, forward-side, from the chain's own u = x / sqrt 2 and a = 1 + erf(u) in five passes."""

from __future__ import annotations

import math

import numpy as np
from onnx import helper

from pbv_onnx.export.graph.rules import GraphPattern, example_model, register_pattern

_TOL = 1e-6  # relative: torch.onnx and tf2onnx write the constants rounded to float32


def _scalar(ctx, name: str) -> float | None:
    """The value of a one-element constant tensor, else None."""
    v = ctx.value(name)
    if v is None or np.asarray(v).size != 1 or np.asarray(v).dtype.kind != "f":
        return None
    return float(np.asarray(v).reshape(()))


def _is(ctx, name: str, target: float) -> bool:
    v = _scalar(ctx, name)
    return v is not None and abs(v - target) <= _TOL * abs(target)


def made_by(ctx, name: str, op: str):
    node = ctx.producer(name)
    return node if node is not None and node.op_type == op else None


def _erf_half(ctx, a: str) -> tuple[str, str] | None:
    """(x, u) where a = 1 + erf(u), u = x / sqrt 2 (Div, or Mul by 1/sqrt 2), in either operand order."""
    add = made_by(ctx, a, "Add")
    if add is None:
        return None
    for e, one in (add.input, add.input[::-1]):
        erf = made_by(ctx, e, "Erf")
        if erf is None or not _is(ctx, one, 1.0):
            continue
        u = erf.input[0]
        scale = ctx.producer(u)
        if scale is None:
            return None
        if scale.op_type == "Div" and _is(ctx, scale.input[1], math.sqrt(2)):
            return scale.input[0], u
        if scale.op_type == "Mul":
            for x, c in (scale.input, scale.input[::-1]):
                if _is(ctx, c, 1 / math.sqrt(2)):
                    return x, u
    return None


def _halved(ctx, name: str) -> str | None:
    """t where name = Mul(t, 0.5) (either order), else None."""
    mul = made_by(ctx, name, "Mul")
    if mul is None:
        return None
    for t, c in (mul.input, mul.input[::-1]):
        if _is(ctx, c, 0.5):
            return t
    return None


def gelu_derivative(ctx, u: str, a: str, shape) -> str:
    """GELU's derivative Phi(x) + x phi(x) as a forward-side tensor, from u = x / sqrt 2 and a = 1 + erf(u):
    Mean(a, (2/sqrt pi) u exp(-u^2)) in five passes, u exp(-u^2) as u / exp(u^2) (the negation folded into
    the Div, no Neg pass; exp(u^2) = inf past |u| ~ 9.4 gives 0, the limit)."""
    e = ctx.forward("Exp", [ctx.forward("Mul", [u, u])])
    t = ctx.forward("Mul", [ctx.forward("Div", [u, e]), ctx.const(np.float32(2 / math.sqrt(math.pi)))])
    return ctx.forward("Mean", [a, t], _shape=shape)


@register_pattern
class GeluErfPattern(GraphPattern):
    name = "gelu_erf"
    root_op = "Mul"
    description = (
        "GELU written with Erf (x/2 (1 + erf(x/sqrt2)), any placement of the 1/2): g * (Phi(x) + x phi(x)), "
        "the derivative made once per image from the chain's x/sqrt2 and 1 + erf"
    )

    def match(self, ctx, node):
        """(x, u, a): the GELU's input, x / sqrt 2 and 1 + erf(x / sqrt 2), where `node` ends one."""
        p, q = node.input
        shape = ctx.shape(node.output[0])
        if shape is None:
            return None
        for left, right in ((p, q), (q, p)):
            # x * a * 0.5, grouped as (x * a) * 0.5, (x * 0.5) * a or x * (a * 0.5)
            inner = made_by(ctx, left, "Mul") if _is(ctx, right, 0.5) else None
            candidates = [] if inner is None else [tuple(inner.input), tuple(inner.input[::-1])]
            half_x = _halved(ctx, left)
            if half_x is not None:
                candidates.append((half_x, right))
            half_a = _halved(ctx, right)
            if half_a is not None:
                candidates.append((left, half_a))
            for x, a in candidates:
                found = _erf_half(ctx, a)
                if found is not None and found[0] == x and ctx.shape(x) == shape:
                    return x, found[1], a
        return None

    def vjp(self, ctx, node, match, grads):
        x, u, a = match
        if grads[0] is None or not ctx.on_path(x):
            return {}
        # the derivative from the chain's own u and a. Measured against one from x alone, which lets
        # onnxruntime fuse the forward chain into one Gelu kernel but recomputes erf: no faster
        shape = ctx.shape(x)
        return {x: ctx.mul(grads[0], gelu_derivative(ctx, u, a, shape), shape)}

    @classmethod
    def examples(cls):
        mk = helper.make_node
        c = {"s2": np.float32(math.sqrt(2)), "r2": np.float32(1 / math.sqrt(2)), "one": np.float32(1),
             "half": np.float32(0.5), "three": np.float32(3)}  # fmt: skip

        def gelu(u_node, tail, name, extra=(), add=("e", "one")):
            # x = 3 * input, so the examples reach the tails of Phi
            nodes = [mk("Mul", ["x", "three"], ["z"]), u_node, mk("Erf", ["u"], ["e"]), mk("Add", list(add), ["a"])]
            return example_model(nodes + tail + list(extra), (3, 2, 4), c, name=name)

        div, mul = mk("Div", ["z", "s2"], ["u"]), mk("Mul", ["r2", "z"], ["u"])
        return [
            # torch.onnx: ((x * a) * 0.5)
            gelu(div, [mk("Mul", ["z", "a"], ["m"]), mk("Mul", ["m", "half"], ["y"])], "gelu_torch"),
            # (x * 0.5) * a, u by Mul, 1 + erf and 0.5 * x in the other operand order
            gelu(mul, [mk("Mul", ["half", "z"], ["h"]), mk("Mul", ["a", "h"], ["y"])], "gelu_half_x", add=("one", "e")),
            # x * (a * 0.5)
            gelu(div, [mk("Mul", ["a", "half"], ["h"]), mk("Mul", ["z", "h"], ["y"])], "gelu_half_a"),
            # the chain's 1 + erf also read outside it: its own rules carry that path
            gelu(
                div,
                [mk("Mul", ["a", "z"], ["m"]), mk("Mul", ["half", "m"], ["g"])],
                "gelu_shared_inner",
                [mk("Mul", ["a", "a"], ["a2"]), mk("Add", ["g", "a2"], ["y"])],
            ),
        ]
