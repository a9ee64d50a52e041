"""Finite-difference verification of a gradient graph against a float64 copy of the forward graph.

No torch: onnx, numpy (and scipy's erf when installed). The forward model (a user's ONNX file, cut at
a tensor and pooled as exported) runs in float64 on onnx's reference evaluator; central differences of
c . features(x + t u) along random directions u are compared with u . input_grad from the exported
graph. For Gaussian u the vector of directional derivatives over the directions is an unbiased probe
of the gradient: its relative L2 error estimates the relative L2 error of input_grad itself.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

# Central-difference step, relative to ||x|| (per image) with unit-norm directions: ~1e-8 per pixel at
# 224x224. float64 rounding of c . f (~1e-16 |c . f|, 1e-14 after a deep network) divided by 2t stays
# below 1e-4 of the derivative; the truncation error is O(t^2). The step must be this small for ReLU
# networks: at 1e-6 ||x|| kinks within reach put resnet18 (layer2, 64x64) 1.8e-2 off, at 1e-8 9e-7
# (mobilenet_v2's float32 graph: 5.4e-3 at every step from 1e-7 to 1e-10, its own float32 rounding).
DEFAULT_STEP = 1e-8
DEFAULT_DIRECTIONS = 6
# the least scale a cotangent's derivatives are judged at, against a Gaussian cotangent's of the same norm
FLOOR = 0.1
_CHUNK = 2  # images per reference-evaluator call: it keeps every float64 activation (vit_b_16: 0.57 GB an image)


def to_float64(model):
    """A copy of `model` computing in float64: float initializers, constants, casts and declared
    types become double (subgraphs too)."""
    return retyped(model, "float32", "float64")


def retyped(model, src: str, dst: str):
    """A copy of `model` computing in `dst` where it computed in `src` (numpy float type names):
    initializers, constants, casts and declared types of that type change (subgraphs too)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    old, new_type = helper.np_dtype_to_tensor_dtype(np.dtype(src)), helper.np_dtype_to_tensor_dtype(np.dtype(dst))
    out = onnx.ModelProto()
    out.CopyFrom(model)

    def tensor(t):
        if t.data_type != old:
            return t
        return numpy_helper.from_array(numpy_helper.to_array(t).astype(dst), t.name)

    def types(values) -> None:
        for v in values:
            tt = v.type.tensor_type
            if tt.elem_type == old:
                tt.elem_type = new_type

    def graph(g) -> None:
        for i, t in enumerate(g.initializer):
            g.initializer[i].CopyFrom(tensor(t))
        types(g.input)
        types(g.output)
        types(g.value_info)
        for node in g.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    a.t.CopyFrom(tensor(a.t))
                elif a.type == onnx.AttributeProto.GRAPH:
                    graph(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for sub in a.graphs:
                        graph(sub)
            if node.op_type == "Cast":
                for a in node.attribute:
                    if a.name == "to" and a.i == old:
                        a.i = new_type
            if old != TensorProto.FLOAT:
                continue  # below: what makes float32 without saying so
            if node.op_type == "ConstantOfShape" and not any(a.name == "value" for a in node.attribute):
                # no value: float32 zeros by default (torch.export writes Swin's attention mask so)
                node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.zeros(1, dst))))
            if node.op_type == "Constant":
                # value_float(s) make float32: rewrite them as a tensor of the new type
                for a in list(node.attribute):
                    if a.name in ("value_float", "value_floats"):
                        vals = np.asarray(a.f if a.name == "value_float" else list(a.floats), dst)
                        node.attribute.remove(a)
                        node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(vals)))

    graph(out.graph)
    return out


def _erf_values(x: np.ndarray) -> np.ndarray:
    """erf in float64 (scipy's where installed)."""
    try:
        from scipy.special import erf
    except ImportError:  # pragma: no cover - scipy comes with the demo and test extras
        erf = np.vectorize(math.erf, otypes=[np.float64])
    return np.asarray(erf(x), np.float64)


def _float64_ops() -> list:
    """Erf and Gelu (opset 20) in float64: the reference evaluator computes Erf in float32
    (np.vectorize, otypes 'f'), and runs Gelu as a function whose Erf is that float32 one."""
    from onnx.reference.op_run import OpRun
    from onnx.reference.ops._op import OpRunUnaryNum

    class Erf(OpRunUnaryNum):
        def _run(self, x):
            return (_erf_values(x).astype(x.dtype),)

    class Gelu(OpRun):
        op_domain = ""

        def _run(self, x, approximate="none"):
            if approximate == "tanh":
                y = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
            else:
                y = 0.5 * x * (1 + _erf_values(x / np.sqrt(2)))
            return (np.asarray(y).astype(x.dtype),)

    return [Erf, Gelu]


def pool_features(y: np.ndarray, pool: str) -> np.ndarray:
    """The export's pooling in numpy: avg = mean over space ([N, C, h, w]) or tokens ([N, T, D]),
    cls = token 0."""
    if pool == "none":
        return y
    if pool == "avg":
        return y.mean(axis=(2, 3)) if y.ndim == 4 else y.mean(axis=1)
    if pool == "cls":
        return y[:, 0]
    raise ValueError(f"pool must be none, avg or cls, not {pool!r}")


class Forward64:
    """The forward graph (image -> cut tensor), pooled, in float64 on onnx's reference evaluator."""

    def __init__(self, model, cut: str | None = None, pool: str = "none", perm: list[int] | None = None):
        """`perm`: the cut read through this permutation, as prepare turns a channels-last one (axes.py)."""
        from onnx.reference import ReferenceEvaluator

        graph_inputs = {t.name for t in model.graph.initializer}
        inputs = [i.name for i in model.graph.input if i.name not in graph_inputs]
        if len(inputs) != 1:
            raise ValueError(f"the forward graph must have one image input, not {len(inputs)}")
        self.image = inputs[0]
        self.cut = cut or model.graph.output[0].name
        if cut is not None and cut != model.graph.output[0].name:
            model = _cut_model(model, cut)
        self.pool, self.perm = pool, perm
        self._eval = ReferenceEvaluator(to_float64(model), new_ops=_float64_ops())
        d0 = next(i for i in model.graph.input if i.name == self.image).type.tensor_type.shape.dim[0]
        # a graph exported at a fixed batch size may hard-code it (a Reshape [1, -1] runs at batch 3 and
        # merges the images): it runs at that size, chunks filled up to it
        fixed = int(d0.dim_value) if d0.HasField("dim_value") and d0.dim_value > 0 else None
        self._chunk, self._pad = (fixed, True) if fixed else (_CHUNK, False)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Pooled features of images `x` [N, 3, H, W] in float64."""
        x = np.asarray(x, np.float64)
        parts, i = [], 0
        while i < len(x):
            part = x[i : i + self._chunk]
            if self._pad and len(part) < self._chunk:  # filled with copies of its last image, dropped after
                part = np.concatenate([part, np.repeat(part[-1:], self._chunk - len(part), axis=0)])
            try:
                y = self._eval.run([self.cut], {self.image: part})[0]
            except Exception:
                if not self._fall_back():
                    raise
                continue
            y = np.asarray(y, np.float64)[: len(x) - i]
            parts.append(pool_features(y.transpose(self.perm) if self.perm else y, self.pool))
            i += self._chunk
        return np.concatenate(parts)

    def _fall_back(self) -> bool:
        """After a failed run of a graph without a fixed batch size: one image at a time."""
        if self._pad or self._chunk == 1:
            return False
        self._chunk = 1
        return True


def _cut_model(model, cut: str):
    """A copy of `model` holding only the nodes `cut` depends on, with `cut` its one output."""
    import onnx
    from onnx import helper

    from pbv_onnx.export.graph.prepare import ancestors

    if not any(cut in n.output for n in model.graph.node):
        raise ValueError(f"no node computes tensor {cut!r}")
    needed = ancestors(model.graph.node, [cut])
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = [n for n in model.graph.node if any(o in needed for o in n.output if o)]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    del out.graph.output[:]
    out.graph.output.append(helper.make_tensor_value_info(cut, onnx.TensorProto.FLOAT, None))
    return out


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| in float64 (0 when both are 0)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den = float(np.linalg.norm(b))
    num = float(np.linalg.norm(a - b))
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def directional_errors(
    forward: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    cotangents: dict[str, np.ndarray],
    grads: dict[str, np.ndarray],
    n_directions: int = DEFAULT_DIRECTIONS,
    step: float = DEFAULT_STEP,
    seed: int = 0,
    scale_kind: str | None = None,
) -> dict:
    """Compare u . grads[kind][i] with the central difference of cotangents[kind][i] . forward(x_i + t u)
    for `n_directions` Gaussian unit directions u per image (one set of perturbed forward passes serves
    every cotangent). Returns per kind the worst image's relative L2 over its directions, the steps, and
    "unmoved": how many images' features are bitwise the same at every x_i + t u and x_i - t u.

    With `scale_kind` (a Gaussian cotangent), another kind's error is relative to at least FLOOR times
    the derivatives that kind gives per unit of cotangent norm: a cotangent the image cannot move along
    (the features of a normalised output, whose norm is fixed) has derivatives of float32 rounding's
    size, which a relative error alone would call wrong. Kinds the floor applied to are in "floored"."""
    rng = np.random.default_rng(seed + 3)
    n = len(x)
    x64 = np.asarray(x, np.float64)
    u = rng.standard_normal((n, n_directions, *x.shape[1:]))
    u /= np.linalg.norm(u.reshape(n, n_directions, -1), axis=2).reshape(n, n_directions, *([1] * (x.ndim - 1)))
    t = step * np.maximum(np.linalg.norm(x64.reshape(n, -1), axis=1), 1.0)  # [n]
    tt = t.reshape(n, 1, *([1] * (x.ndim - 1)))
    plus = (x64[:, None] + tt * u).reshape(-1, *x.shape[1:])
    minus = (x64[:, None] - tt * u).reshape(-1, *x.shape[1:])
    f_plus = forward(plus).reshape(n, n_directions, -1)
    f_minus = forward(minus).reshape(n, n_directions, -1)
    fds, ads, norms = {}, {}, {}
    for kind, c in cotangents.items():
        c64 = np.asarray(c, np.float64).reshape(n, 1, -1)
        fds[kind] = ((f_plus - f_minus) * c64).sum(axis=2) / (2 * t[:, None])  # [n, d]
        g = np.asarray(grads[kind], np.float64).reshape(n, 1, -1)
        ads[kind] = (u.reshape(n, n_directions, -1) * g).sum(axis=2)
        norms[kind] = np.linalg.norm(c64.reshape(n, -1), axis=1)
    result: dict = {}
    floored = []
    for kind in cotangents:
        worst = 0.0
        for i in range(n):
            num = float(np.linalg.norm(ads[kind][i] - fds[kind][i]))
            den = float(np.linalg.norm(fds[kind][i]))
            if scale_kind is not None and kind != scale_kind and norms[scale_kind][i] > 0:
                per_norm = float(np.linalg.norm(fds[scale_kind][i])) / float(norms[scale_kind][i])
                floor = FLOOR * per_norm * float(norms[kind][i])
                if floor > den:
                    den = floor
                    if kind not in floored:
                        floored.append(kind)
            worst = max(worst, num / den if den > 0 else (0.0 if num == 0 else float("inf")))
        result[f"input_grad[{kind}]"] = worst
    result["steps"] = [float(v) for v in t]
    # images whose features do not change at all along any direction (a saturated or dead network):
    # their differences are exactly 0, so no relative error can judge a gradient there
    result["unmoved"] = int(sum(bool(np.array_equal(f_plus[i], f_minus[i])) for i in range(n)))
    if scale_kind is not None:
        result["floored"] = floored
    return result
