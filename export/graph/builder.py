"""`Ctx`: what an adjoint rule emits its nodes through (one per backward pass being built)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx

    from pbv_onnx.export.graph.prepare import Prepared

Shape = tuple  # of int | str: the batch axis is "N" (or "N*h" where the batch is merged with h rows)

# Ops whose output shape is the numpy broadcast of their inputs' (first `arity` inputs; None: all).
_ELEMENTWISE = {
    "Add": None, "Sub": None, "Mul": None, "Div": None, "Pow": None, "Max": None, "Min": None, "Sum": None,
    "Where": None, "Less": None, "Greater": None, "Equal": None, "LessOrEqual": None, "GreaterOrEqual": None,
    "And": None, "Or": None, "Not": 1, "Neg": 1, "Abs": 1, "Sqrt": 1, "Reciprocal": 1, "Exp": 1, "Log": 1,
    "Tanh": 1, "Sigmoid": 1, "Relu": 1, "HardSigmoid": 1, "Erf": 1, "Cast": 1, "Identity": 1, "Sign": 1,
    "Clip": 1, "LeakyRelu": 1, "PRelu": None, "Softplus": 1, "Cos": 1, "Sin": 1,
}  # fmt: skip


def is_batch(d) -> bool:
    """Whether a dimension of a static shape is (or contains) the batch axis."""
    return isinstance(d, str)


def broadcast_shapes(*shapes: Shape) -> Shape:
    """numpy broadcasting over static shapes with symbolic batch entries."""
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        dims = [s[i - rank + len(s)] for s in shapes if i - rank + len(s) >= 0]
        named = [d for d in dims if is_batch(d)]
        if named:
            out.append(named[0])
        else:
            out.append(max(int(d) for d in dims))
    return tuple(out)


@dataclass
class Emitter:
    """The nodes and initializers both passes add, and the names they took (shared by both Ctx)."""

    taken: set[str]
    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    shapes: dict[str, Shape] = field(default_factory=dict)  # of emitted tensors, where known
    memo: dict[Any, Any] = field(default_factory=dict)  # forward-side nodes and small constants, made once
    count: int = 0

    def fresh(self, hint: str) -> str:
        while True:
            self.count += 1
            name = f"adj/{hint}_{self.count}"
            if name not in self.taken:
                self.taken.add(name)
                return name


class Ctx:
    """Emits the nodes of one backward pass: `multi` False for `cotangent` [N, ...] (one per image),
    True for `cotangents` [N*K, ...] (K per image, image-major), whose forward activations are
    K-tiled copies (`fwd`). The interface is export/graph's contract (see docs/adjoint-transform.md)."""

    def __init__(self, prep: Prepared, out: Emitter, multi: bool = False, cotangent: str = ""):
        self.prep = prep
        self.out = out
        self.multi = multi
        self.cotangent = cotangent  # the pass's cotangent input (for K in the multi pass)
        self._tiled: dict[str, str] = {}
        self._dyn: dict[str, str] = {}
        self._k: str | None = None

    # -- the contract -------------------------------------------------------------------------
    def emit(self, op_type: str, inputs: list[str], n_out: int = 1, _shape: Shape | None = None, **attrs):
        """Add a node (fresh output names); returns its output name, or a list when n_out > 1.
        `_shape`: the output's static shape where the rule knows it (elementwise ops get theirs); with
        n_out > 1 a list of shapes (or None), one per output."""
        from onnx import helper

        outs = [self.out.fresh(op_type) for _ in range(n_out)]
        node = helper.make_node(op_type, list(inputs), outs, name=outs[0], **attrs)
        self.out.nodes.append(node)
        if _shape is not None and n_out > 1 and _shape and isinstance(_shape[0], (tuple, list)):
            for o, sh in zip(outs, _shape):  # one shape per output
                if sh is not None:
                    self.out.shapes[o] = tuple(sh)
        elif _shape is not None:
            self.out.shapes[outs[0]] = tuple(_shape)
        elif op_type in _ELEMENTWISE:
            arity = _ELEMENTWISE[op_type]
            ins = [i for i in inputs[: arity or len(inputs)] if i]
            if op_type == "Where":
                ins = [i for i in inputs if i]
            shapes = [self.shape(i) for i in ins]
            if all(s is not None for s in shapes) and shapes:
                self.out.shapes[outs[0]] = broadcast_shapes(*shapes)
        return outs[0] if n_out == 1 else outs

    def const(self, array, hint: str = "c") -> str:
        """An initializer (float arrays take the model's float dtype, float32); small ones shared."""
        from onnx import numpy_helper

        a = np.asarray(array)
        if a.dtype.kind == "f":
            a = a.astype(np.float32)
        elif a.dtype.kind in "iu" and a.dtype != np.int64 and a.dtype != np.uint8:
            a = a.astype(np.int64)
        key = ("const", a.dtype.str, a.shape, a.tobytes()) if a.size <= 64 else None
        if key is not None and key in self.out.memo:
            return self.out.memo[key]
        name = self.out.fresh(hint)
        self.out.initializers.append(numpy_helper.from_array(a, name))
        self.out.shapes[name] = tuple(int(d) for d in a.shape)
        if key is not None:
            self.out.memo[key] = name
        return name

    def shape(self, name: str) -> Shape | None:
        """Static shape; the batch axis is the string "N" ("N*h" where merged with h rows)."""
        s = self.prep.shapes.get(name)
        return s if s is not None else self.out.shapes.get(name)

    def value(self, name: str) -> np.ndarray | None:
        """The constant value of a tensor (initializer, Constant node or folded), else None."""
        if not name:
            return None
        return self.prep.values.get(name)

    def on_path(self, name: str) -> bool:
        """Whether the tensor depends on the image (only those get cotangents)."""
        return bool(name) and name in self.prep.path

    def fwd(self, name: str) -> str:
        """The forward tensor as seen by this pass: itself, or in the K pass a K-tiled copy."""
        if not self.multi or not name:
            return name
        s = self.shape(name)
        if s is None or not any(is_batch(d) for d in s):
            return name
        if name not in self._tiled:
            self._tiled[name] = self._tile(name, s)
        return self._tiled[name]

    def unbroadcast(self, g: str, shape: Shape, g_shape: Shape | None = None) -> str:
        """Sum g over the axes broadcast to reach its shape, then reshape to `shape` (numpy rules)."""
        gs = tuple(g_shape if g_shape is not None else self.shape(g) or ())
        shape = tuple(shape)
        if not gs:
            raise ValueError(f"unbroadcast: shape of {g!r} unknown")
        lead = len(gs) - len(shape)
        axes = list(range(lead)) + [
            lead + i for i, d in enumerate(shape) if not is_batch(d) and int(d) == 1 and gs[lead + i] != 1
        ]
        if not axes:
            return g
        r = self.emit("ReduceSum", [g, self.const(np.array(axes, np.int64))], keepdims=1)
        kept = tuple(1 if i in axes else d for i, d in enumerate(gs))
        self.out.shapes[r] = kept
        if lead == 0:
            return r
        return self.reshape(r, shape)

    def dynamic_shape(self, name: str) -> str:
        """Shape(fwd(name)) as a tensor (its batch entry N*K in the K pass)."""
        key = self.fwd(name)
        if key not in self._dyn:
            self._dyn[key] = self.emit("Shape", [key], _shape=(len(self.shape(name) or ()),))
        return self._dyn[key]

    # -- additions (appended to G_interface.md) -------------------------------------------------
    def forward(self, op_type: str, inputs: list[str], n_out: int = 1, _shape: Shape | None = None, **attrs):
        """A forward-side node on forward tensors (one per image, e.g. a ReLU mask), made once for
        both passes; returns its output name(s), forward tensors: read them through `fwd` as any."""
        key = ("fwd", op_type, tuple(inputs), n_out, repr(sorted(attrs.items())))
        if key not in self.out.memo:
            one = Ctx(self.prep, self.out, multi=False)
            self.out.memo[key] = one.emit(op_type, inputs, n_out, _shape=_shape, **attrs)
        return self.out.memo[key]

    def set_shape(self, name: str, shape: Shape) -> str:
        """Record an emitted tensor's static shape (for fwd tiling and unbroadcast); returns name."""
        self.out.shapes[name] = tuple(shape)
        return name

    def reshape(self, g: str, shape: Shape) -> str:
        """Reshape to a static shape whose batch entry (at most one) is "N": it becomes -1."""
        target = [-1 if is_batch(d) else int(d) for d in shape]
        if sum(is_batch(d) for d in shape) > 1:
            raise ValueError(f"reshape to {shape}: more than one batch entry")
        if any(is_batch(d) and d != "N" for d in shape):
            raise ValueError(f"reshape to {shape}: a merged batch entry needs dynamic_shape")
        return self.emit("Reshape", [g, self.const(np.array(target, np.int64))], _shape=shape)

    def mul(self, g: str, t: str, g_shape: Shape | None = None) -> str:
        """g * t for a forward tensor t (one per image, e.g. a mask; read it through this, not fwd). In
        the K pass, where t is [N, ...] of g's rank, as views [N, K, ...] * [N, 1, ...] (no K-tiled copy
        of t; the Engine's layout rewrite keeps these products in onnxruntime's blocked layout)."""
        ts = self.shape(t)
        gs = tuple(g_shape if g_shape is not None else self.shape(g) or ())
        if not self.multi or ts is None or not ts or ts[0] != "N" or len(gs) != len(ts):
            return self.emit("Mul", [g, self.fwd(t)])
        if any(is_batch(d) for d in (*gs[1:], *ts[1:])):
            return self.emit("Mul", [g, self.fwd(t)])
        key = ("kview", t)
        if key not in self.out.memo:
            n = self.forward("Shape", [t], start=0, end=1)
            shape = self.forward("Concat", [n, self.const(np.array([1, *ts[1:]], np.int64))], axis=0)
            self.out.memo[key] = self.emit("Reshape", [t, shape])
        n = self.forward("Shape", [t], start=0, end=1)
        gshape = self.forward("Concat", [n, self.const(np.array([-1, *gs[1:]], np.int64))], axis=0)
        gv = self.emit("Reshape", [g, gshape])
        p = self.emit("Mul", [gv, self.out.memo[key]])
        out = self.emit("Reshape", [p, self.const(np.array([-1, *gs[1:]], np.int64))])
        out_shape = broadcast_shapes(gs, ts)
        self.out.shapes[out] = out_shape
        return out

    def batch_reshape(self, g: str, rest) -> str:
        """g as [batch, *rest] (rest static): in the one-per-image pass Reshape(g, [0, ..., -1]), whose 0
        copies the batch axis so it stays the symbolic N downstream (with a -1 onnxruntime cannot prove
        later mask products' shapes equal and leaves them out of its blocked layout); in the K pass
        [-1, *rest] (its batch may be empty: the whole graph's default `cotangents`)."""
        rest = [int(d) for d in rest]
        target = [-1, *rest] if self.multi or not rest else [0, *rest[:-1], -1]
        return self.emit("Reshape", [g, self.const(np.array(target, np.int64))], _shape=("N", *rest))

    def producer(self, name: str) -> onnx.NodeProto | None:
        """The forward node that outputs `name` (None for inputs and constants)."""
        return self.prep.producer.get(name)

    def consumers(self, name: str) -> list:
        """The forward nodes (up to the cut) that read `name`; the cut tensor also counts as read."""
        return self.prep.consumers.get(name, [])

    # -- the K-tiling -----------------------------------------------------------------------------
    def k(self) -> str:
        """K = rows of the pass's cotangent / images, an int64 [1] tensor."""
        if self._k is None:
            from pbv_onnx.runtime.modelfile import IMAGE

            nk = self.emit("Shape", [self.cotangent], start=0, end=1)
            n = self.emit("Shape", [IMAGE], start=0, end=1)
            self._k = self.emit("Div", [nk, n])
        return self._k

    def _tile(self, name: str, s: Shape) -> str:
        """[.., N*h, ..] -> [.., N*K*h, ..] image-major: each image's rows repeated K times."""
        axes = [i for i, d in enumerate(s) if is_batch(d)]
        if len(axes) != 1:
            raise ValueError(f"cannot K-tile {name!r} of shape {s}: not one batch axis")
        a = axes[0]
        d = s[a]
        h = 1 if d == "N" else int(d.split("*", 1)[1])
        head = [int(v) for v in s[:a]]
        tail = [int(v) for v in s[a + 1 :]]
        inner = h * int(np.prod(tail, dtype=np.int64))
        v = self.emit("Reshape", [name, self.const(np.array([*head, -1, 1, inner], np.int64))])
        ones = self.const(np.ones(len(head) + 1, np.int64))
        expand = self.emit("Concat", [ones, self.k(), self.const(np.ones(1, np.int64))], axis=0)
        v = self.emit("Expand", [v, expand])
        out = self.emit("Reshape", [v, self.const(np.array([*head, -1, *tail], np.int64))])
        self.out.shapes[out] = s
        return out
