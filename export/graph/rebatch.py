"""A forward model whose batch size is fixed (exported at batch 1: Reshape shapes and constants with the
1 baked in) made batch-free: the batch axis is followed from the image through the graph, what
hard-codes it is rewritten, and the result is checked against the original run image by image."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np

from pbv_onnx.base.errors import ModelError
from pbv_onnx.export.graph.prepare import REBATCHED, exact_session, first_line

log = logging.getLogger(__name__)

# relative L2 error allowed between the rewritten graph at batch 2, 3 and the original one image at a time
CHECK_TOL = 1e-5
_CHECK_BATCHES = (2, 3)
_MAX_TRIES = 500  # propagations tried while undoing ambiguous Reshape choices
_BIG = 2**31 - 1  # a Slice end at least this large keeps the whole axis

# ops that act on each element (or each row along axis 0) alone: the batch axis passes through
_SAME = {
    "Relu", "Sigmoid", "Tanh", "Erf", "Gelu", "Exp", "Log", "Sqrt", "Reciprocal", "Neg", "Abs", "HardSigmoid",
    "HardSwish", "LeakyRelu", "Identity", "Cast", "CastLike", "Dropout", "Softplus", "Softsign", "Elu", "Selu",
    "Celu", "Mish", "Floor", "Ceil", "Round", "Sign", "Not", "IsNaN", "IsInf", "Sin", "Cos", "ThresholdedRelu",
}  # fmt: skip
_BROADCAST = {
    "Add", "Sub", "Mul", "Div", "Pow", "Where", "Max", "Min", "Sum", "Mean", "Equal", "Greater", "Less",
    "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "PRelu", "Mod", "Clip", "BitShift",
}  # fmt: skip
# ops that treat axis 0 as independent rows (the batch must be on it; merged with other rows is fine)
_ROWS = {
    "Conv", "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool",
    "GlobalLpPool", "InstanceNormalization", "GroupNormalization", "DepthToSpace", "SpaceToDepth",
}  # fmt: skip
_CHANNEL = {"BatchNormalization", "LRN"}  # per channel (axis 1): the batch anywhere but there
_REDUCE = {
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceSumSquare",
}  # fmt: skip


@dataclass(frozen=True)
class Batch:
    """Where a tensor carries the batch: axis `axis` is p * N * m long, the batch between p outer and m
    inner rows (row-major), as in [N*heads, T, d] (p 1, m heads) or [T*N, D] (p T, m 1)."""

    axis: int
    p: int = 1
    m: int = 1

    def __str__(self) -> str:
        inner = "N" if self.p == self.m == 1 else "*".join(s for s in (str(self.p), "N", str(self.m)) if s != "1")
        return f"axis {self.axis} ({inner})"


class _Stop(Exception):
    """The batch cannot be followed through `node` under the current Reshape choices `deps`."""

    def __init__(self, node, reason: str, deps: frozenset, at: int):
        super().__init__(reason)
        self.node, self.reason, self.deps, self.at = node, reason, deps, at

    def line(self) -> str:
        return f"{self.node.op_type} node {self.node.name!r}: {self.reason}"


def rebatch(model, input_size: tuple[int, int], label) -> tuple[object, list[str]]:
    """The forward `model` (opset 17+, one image input) with its fixed batch size made free: (model,
    notes, one line per rewrite). Raises ModelError when the batch cannot be followed or the rewritten
    graph does not match the original one image at a time."""
    import onnx

    from pbv_onnx.export.graph.prepare import _constant_value, _image_input

    x = _image_input(model, label)
    d0 = x.type.tensor_type.shape.dim[0]
    b0 = int(d0.dim_value) if d0.HasField("dim_value") and d0.dim_value > 0 else 1
    graph = model.graph
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            consts[node.output[0]] = _constant_value(node)
    shape = (b0, 3, *input_size)

    def fail(why: str) -> ModelError:
        return ModelError(label, f"fixes its batch size at {b0} and cannot be made batch-free ({why})")

    sess = _session(model, every=True, label=label, fail=fail)
    rng = np.random.default_rng(0)
    image = rng.standard_normal(shape).astype(np.float32)
    names = [o.name for o in sess.get_outputs()]
    try:
        run = dict(zip(names, sess.run(None, {x.name: image})))
    except Exception as exc:
        raise fail(f"onnxruntime cannot run it at batch {b0}: {first_line(exc)}") from None
    values = {**consts, **run}
    values[x.name] = image

    nodes = list(graph.node)
    choices: dict[int, int] = {}  # Reshape node index -> the candidate taken (default 0)
    counts: dict[int, int] = {}  # Reshape node index -> its number of candidates
    best: _Stop | None = None
    for _ in range(_MAX_TRIES):
        try:
            outputs = [o.name for o in graph.output]
            infos, actions = _propagate(nodes, outputs, values, x.name, b0, choices, counts)
            break
        except _Stop as stop:
            if best is None or stop.at > best.at:
                best = stop
            for dep in sorted(stop.deps, key=lambda i: -i):  # undo the latest Reshape choice it depends on
                if choices.get(dep, 0) + 1 < counts.get(dep, 1):
                    choices[dep] = choices.get(dep, 0) + 1
                    for later in [c for c in choices if c > dep]:
                        del choices[later]
                    break
            else:
                raise fail(best.line()) from None
    else:
        raise fail(best.line() if best else "too many ambiguous reshapes")

    for out in graph.output:
        if out.name in run and out.name not in infos and _depends(nodes, x.name, out.name):
            raise fail(f"output {out.name!r} loses the batch axis")
    fixed, notes = _rewrite(model, x.name, values, infos, actions, b0)
    for note in notes:
        log.debug("rebatch: %s", note)
    _check(model, fixed, x.name, input_size, b0, infos, label, fail)
    n_reshape = sum(n.startswith("Reshape") for n in notes)
    log.info(
        "the model fixes its batch size at %d: made batch-free (Reshape shapes: %d, other rewrites: %d), "
        "checked at batch %s against one image at a time",
        b0,
        n_reshape,
        len(notes) - n_reshape,
        " and ".join(map(str, _CHECK_BATCHES)),
    )
    return fixed, notes


def rebatch_graph(nodes, values, roots, x, input_size, opset: int, label) -> tuple[object, list[str]]:
    """`prepare`'s forward pieces (nodes, constants, the root tensors, the original image input `x`; the
    image renamed `image`) as a model, made batch-free by `rebatch` and marked so (see `REBATCHED`);
    and the rewrites' notes."""
    import onnx
    from onnx import helper

    from pbv_onnx.export.graph.prepare import forward_model

    d0 = x.type.tensor_type.shape.dim[0]
    n = int(d0.dim_value) if d0.HasField("dim_value") and d0.dim_value > 0 else 1
    m, dtypes = forward_model([copy.deepcopy(nd) for nd in nodes], values, input_size, opset, batch=n)
    for r in roots:
        m.graph.output.append(helper.make_tensor_value_info(r, dtypes.get(r, onnx.TensorProto.FLOAT), None))
    fixed, notes = rebatch(m, input_size, label)
    fixed.metadata_props.add(key=REBATCHED, value="1")
    return fixed, notes


def _session(model, every: bool, label, fail):
    """An onnxruntime session of `model` (every tensor an output when `every`)."""
    import onnx
    from onnx import helper

    m = model
    n_out = len(m.graph.output)
    if every:  # outputs added for the session, taken off again (no copy of the weights)
        try:
            inferred = onnx.shape_inference.infer_shapes(m)
        except Exception:
            inferred = m
        dtypes = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
        have = {o.name for o in m.graph.output}
        for n in m.graph.node:
            for o in n.output:
                if o and o not in have and dtypes.get(o):
                    m.graph.output.append(helper.make_tensor_value_info(o, dtypes[o], None))
                    have.add(o)
    try:
        return exact_session(m)
    except Exception as exc:
        raise fail(f"onnxruntime cannot run it: {first_line(exc)}") from None
    finally:
        del m.graph.output[n_out:]


def _depends(nodes, image: str, name: str) -> bool:
    data = {image}
    for n in nodes:
        if n.op_type not in ("Shape", "Size") and any(i in data for i in n.input if i):
            data.update(o for o in n.output if o)
    return name in data


def _attr(node, name, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _reshape_candidates(s_in: tuple, info: Batch, s_out: tuple, b0: int) -> list[Batch]:
    """Where the batch can sit in a Reshape's output: the axis whose rows hold the flat position the
    batch starts at (row-major), pure axes first, then the batch outermost in its axis."""
    outer = int(np.prod(s_in[: info.axis], dtype=np.int64)) * info.p  # elements before the batch, per image
    cands = []
    for k in range(len(s_out)):
        q = int(np.prod(s_out[:k], dtype=np.int64))
        if q == 0 or outer % q:
            continue
        p = outer // q
        if s_out[k] % (p * b0) == 0 and s_out[k] > 0:
            cands.append(Batch(k, p, s_out[k] // (p * b0)))
    cands.sort(key=lambda c: (not (c.p == 1 and c.m == 1), c.p != 1, c.axis))
    return cands


def _propagate(nodes, outputs, values, image: str, b0: int, choices: dict[int, int], counts: dict[int, int]):
    """Follow the batch from the image through `nodes`: ({tensor: Batch}, rewrites), or _Stop."""
    infos: dict[str, Batch] = {image: Batch(0)}
    deps: dict[str, frozenset] = {image: frozenset()}
    actions: list[tuple] = []

    def shp(name: str) -> tuple:
        return tuple(int(d) for d in np.shape(values[name])) if name in values else None

    def const(name: str):
        return None if not name or name not in values else np.asarray(values[name])

    for idx, node in enumerate(nodes):
        ins = list(node.input)
        bat = [(j, n) for j, n in enumerate(ins) if n and n in infos]
        if not bat or node.op_type in ("Shape", "Size"):
            continue
        dep = frozenset().union(*(deps[n] for _, n in bat))
        outs = [o for o in node.output if o]
        op = node.op_type

        def stop(reason: str):
            raise _Stop(node, reason, dep, idx)

        def tile(j: int, axis: int, info: Batch):
            """Input j (batch-free) must carry the batch at its own `axis` (broadcast not enough)."""
            s = shp(ins[j])
            if s is None:
                stop(f"the shape of {ins[j]!r} is unknown")
            if s[axis] == 1 and info.p * b0 * info.m == 1:
                actions.append(("tile", idx, j, axis, Batch(axis, 1, 1)))
            elif s[axis] == info.p * b0 * info.m:
                actions.append(("tile", idx, j, axis, Batch(axis, info.p, info.m)))
            else:
                stop(f"input {ins[j]!r} is {s[axis]} long on the batch axis, not {info.p * b0 * info.m}")

        def only_first():
            if any(j != 0 for j, _ in bat):
                stop("the batch reaches a parameter input")
            return infos[ins[0]]

        def as_reshape(b: Batch) -> tuple[Batch, list[int]]:
            """The batch through a row-major re-layout to the output's shape: (where, the new shape)."""
            nonlocal dep
            cands = _reshape_candidates(shp(ins[0]), b, shp(outs[0]), b0)
            if not cands:
                stop(f"no axis of the output {list(shp(outs[0]))} holds the batch of {b}")
            if len(cands) > 1:  # ambiguous where unit dims meet the batch of 1: a choice, undone on a stop
                counts[idx] = len(cands)
                dep = dep | {idx}
            out = cands[choices.get(idx, 0)] if len(cands) > 1 else cands[0]
            if 0 in shp(outs[0]):
                stop("an empty output")
            new = [int(d) for d in shp(outs[0])]
            new[out.axis] = -1
            return out, new

        out: Batch | None = None
        try:
            if op in _SAME:
                out = only_first()
            elif op in _ROWS:
                out = only_first()
                if out.axis != 0:
                    stop(f"the batch is on {out}, the op needs it on axis 0")
            elif op in _CHANNEL:
                out = only_first()
                if out.axis == 1:
                    stop("the batch is on the channel axis")
            elif op in _BROADCAST:
                ranks = [len(shp(n)) if n and shp(n) is not None else 0 for n in ins]
                r = max(ranks)
                for j, n in bat:
                    b = infos[n]
                    a = Batch(r - ranks[j] + b.axis, b.p, b.m)
                    if out is None:
                        out = a
                    elif a != out:
                        stop(f"its inputs carry the batch on {out} and {a}")
                for j, n in enumerate(ins):
                    if n and n not in infos and ranks[j] > out.axis - (r - ranks[j]) >= 0:
                        ax = out.axis - (r - ranks[j])
                        if shp(n)[ax] != 1:  # a 1 broadcasts: the same for every image
                            tile(j, ax, out)
            elif op == "Transpose":
                b = only_first()
                r = len(shp(ins[0]))
                perm = list(_attr(node, "perm", list(range(r))[::-1]))
                out = Batch(perm.index(b.axis), b.p, b.m)
            elif op == "Reshape":
                out, new = as_reshape(only_first())
                old = const(ins[1])
                if old is None or list(old.ravel()) != new or _attr(node, "allowzero", 0):
                    actions.append(("reshape", idx, new))
            elif op == "Flatten":
                b = only_first()
                s = shp(ins[0])
                a = _attr(node, "axis", 1)
                a = a + len(s) if a < 0 else a
                lo, hi = (0, a) if b.axis < a else (a, len(s))  # the rows that become output axis 0 or 1
                before, after = int(np.prod(s[lo : b.axis])), int(np.prod(s[b.axis + 1 : hi]))
                out = Batch(int(b.axis >= a), before * b.p, b.m * after)
            elif op == "Squeeze":
                b = only_first()
                s = shp(ins[0])
                ax = const(ins[1]) if len(ins) > 1 and ins[1] else None
                if ax is None:  # every unit axis
                    axes = [i for i, d in enumerate(s) if d == 1]
                else:
                    axes = [int(a) % len(s) for a in ax.ravel()]
                if b.axis in axes:
                    stop(f"it squeezes the batch axis ({b})")
                out = Batch(b.axis - sum(a < b.axis for a in axes), b.p, b.m)
            elif op == "Unsqueeze":
                b = only_first()
                r = len(shp(outs[0]))
                axes = sorted(int(a) % r for a in const(ins[1]).ravel())
                kept = [i for i in range(r) if i not in axes]
                out = Batch(kept[b.axis], b.p, b.m)
            elif op == "Concat":
                r = len(shp(outs[0]))
                a = _attr(node, "axis") % r
                for _, n in bat:
                    if out is None:
                        out = infos[n]
                    elif infos[n] != out:
                        stop(f"its inputs carry the batch on {out} and {infos[n]}")
                if out.axis == a:
                    stop("it concatenates along the batch axis")
                for j, n in enumerate(ins):
                    if n and n not in infos:
                        tile(j, out.axis, out)
            elif op == "Split":
                out = only_first()
                if _attr(node, "axis", 0) % len(shp(ins[0])) == out.axis:
                    stop("it splits along the batch axis")
            elif op == "Slice":
                out = only_first()
                r = len(shp(ins[0]))
                starts, ends = const(ins[1]), const(ins[2])
                axes = const(ins[3]) if len(ins) > 3 and ins[3] else np.arange(len(starts.ravel()))
                steps = const(ins[4]) if len(ins) > 4 and ins[4] else np.ones(len(starts.ravel()), np.int64)
                size = shp(ins[0])[out.axis]
                whole = ends.astype(np.int64).ravel().copy()
                for k, (s0, e0, a0, st) in enumerate(zip(starts.ravel(), ends.ravel(), axes.ravel(), steps.ravel())):
                    if int(a0) % r != out.axis or int(e0) >= _BIG:
                        continue
                    # [0, size) of the batch axis at the fixed size is the whole axis (jax2onnx writes
                    # x[:, 0] as such a Slice): its end becomes "to the end"
                    if int(st) == 1 and int(s0) in (0, -size) and int(e0) >= size:
                        whole[k] = np.iinfo(np.int64).max
                        actions.append(("slice_whole", idx, whole))
                    else:
                        stop("it slices along the batch axis")
            elif op == "Gather":
                r = len(shp(ins[0]))
                a = _attr(node, "axis", 0) % r
                ri = len(shp(ins[1]))
                if 1 in dict(bat) and 0 in dict(bat):
                    stop("both data and indices carry the batch")
                if bat[0][0] == 0:
                    b = infos[ins[0]]
                    ind = const(ins[1])
                    if b.axis == a and ind is not None and np.array_equal(ind.ravel(), np.arange(shp(ins[0])[a])):
                        # every element in order (torch's as_strided as a view): a Reshape
                        out, new = as_reshape(b)
                        actions.append(("gather_reshape", idx, new))
                    elif b.axis == a:
                        stop("it gathers along the batch axis")
                    else:
                        out = b if b.axis < a else Batch(b.axis + ri - 1, b.p, b.m)
                else:
                    b = infos[ins[1]]
                    out = Batch(a + b.axis, b.p, b.m)
            elif op in ("Softmax", "LogSoftmax", "Hardmax"):
                out = only_first()
                if _attr(node, "axis", -1) % len(shp(ins[0])) == out.axis:
                    stop("it normalises along the batch axis")
            elif op == "LayerNormalization":
                out = only_first()
                if _attr(node, "axis", -1) % len(shp(ins[0])) <= out.axis:
                    stop("it normalises over the batch axis")
            elif op in _REDUCE or op in ("ArgMax", "ArgMin"):
                out = only_first()
                r = len(shp(ins[0]))
                if op in ("ArgMax", "ArgMin"):
                    axes = [_attr(node, "axis", 0) % r]
                elif len(ins) > 1 and ins[1]:
                    axes = [int(a) % r for a in const(ins[1]).ravel()]
                else:
                    axes = [int(a) % r for a in (_attr(node, "axes") or [])]
                if not axes:
                    axes = [] if _attr(node, "noop_with_empty_axes", 0) else list(range(r))
                if out.axis in axes:
                    stop("it reduces over the batch axis")
                if not _attr(node, "keepdims", 1):
                    out = Batch(out.axis - sum(a < out.axis for a in axes), out.p, out.m)
            elif op == "Expand":
                b = only_first()
                target = [int(v) for v in const(ins[1]).ravel()]
                r = max(len(target), len(shp(ins[0])))
                out = Batch(r - len(shp(ins[0])) + b.axis, b.p, b.m)
                t = out.axis - (r - len(target))
                if t >= 0 and target[t] != 1:
                    target[t] = 1
                    actions.append(("expand", idx, target))
            elif op == "Pad":
                out = only_first()
                r = len(shp(ins[0]))
                pads = const(ins[1]).ravel()
                axes = [int(a) % r for a in const(ins[3]).ravel()] if len(ins) > 3 and ins[3] else list(range(r))
                if out.axis in axes:
                    i = axes.index(out.axis)
                    if pads[i] or pads[i + len(axes)]:
                        stop("it pads the batch axis")
            elif op == "Tile":
                out = only_first()
                if int(const(ins[1]).ravel()[out.axis]) != 1:
                    stop("it tiles the batch axis")
            elif op == "Resize":
                out = only_first()
                if _attr(node, "axes") is not None:
                    stop("Resize with axes")
                scales = const(ins[2]) if len(ins) > 2 and ins[2] else None
                sizes = const(ins[3]) if len(ins) > 3 and ins[3] else None
                if sizes is not None and sizes.size:
                    if (out.p, out.m) != (1, 1) or int(sizes.ravel()[out.axis]) != b0:
                        stop("it resizes the batch axis")
                    actions.append(("resize_sizes", idx, [int(v) for v in sizes.ravel()], out.axis))
                elif scales is None or not scales.size or float(scales.ravel()[out.axis]) != 1.0:
                    stop("it resizes the batch axis")
            elif op == "MatMul":
                out = _matmul(node, ins, bat, infos, shp, stop, tile)
            elif op == "Gemm":
                out = _gemm(node, ins, bat, infos, shp, stop, tile)
            elif op == "Einsum":
                out = _einsum(node, ins, bat, infos, shp, stop, tile, b0)
            else:
                stop("an op the batch cannot be followed through")
        except _Stop:
            raise
        except Exception as exc:  # an input this analysis does not know (no shape, a computed axis list)
            raise _Stop(node, f"its inputs could not be analysed ({exc.__class__.__name__})", dep, idx) from None
        for o in outs:
            infos[o] = out
            deps[o] = dep
    producer = {o: (i, n) for i, n in enumerate(nodes) for o in n.output if o}
    for o in outputs:  # a graph output holds the batch on an axis of its own
        b = infos.get(o)
        if b is not None and (b.p, b.m) != (1, 1) and o in producer:
            i, n = producer[o]
            raise _Stop(n, f"its output {o!r} holds the batch merged with other rows ({b})", deps[o], i)
    return infos, actions


def _matmul(node, ins, bat, infos, shp, stop, tile) -> Batch:
    sa, sb = shp(ins[0]), shp(ins[1])
    ra, rb = len(sa), len(sb)
    if ra < 2 or rb < 2:
        stop("MatMul with a vector operand")
    r = max(ra, rb)
    out = None
    lead = None  # (operand, its axis) when the batch is in the broadcast dims
    for j, n in bat:
        b = infos[n]
        rank = ra if j == 0 else rb
        if (j == 0 and b.axis == ra - 1) or (j == 1 and b.axis == rb - 2):
            stop("the batch is on the contracted axis")
        if j == 0 and b.axis == ra - 2:
            a = Batch(r - 2, b.p, b.m)
        elif j == 1 and b.axis == rb - 1:
            a = Batch(r - 1, b.p, b.m)
        else:
            a = Batch(r - rank + b.axis, b.p, b.m)
            lead = a
        if out is not None and a != out:
            stop("both operands carry the batch, on different output axes")
        out = a
    if lead is not None and len(bat) == 1:
        j = 1 - bat[0][0]
        rank = rb if j == 1 else ra
        ax = out.axis - (r - rank)
        if 0 <= ax < rank - 2 and (shp(ins[j])[ax] != 1):
            tile(j, ax, out)
    return out


def _gemm(node, ins, bat, infos, shp, stop, tile) -> Batch:
    out = None
    for j, n in bat:
        b = infos[n]
        if j == 0:
            m_axis = 1 if _attr(node, "transA", 0) else 0
            if b.axis != m_axis:
                stop("the batch is on the contracted axis")
            a = Batch(0, b.p, b.m)
        elif j == 1:
            n_axis = 0 if _attr(node, "transB", 0) else 1
            if b.axis != n_axis:
                stop("the batch is on the contracted axis")
            a = Batch(1, b.p, b.m)
        else:
            a = Batch(2 - len(shp(ins[2])) + b.axis, b.p, b.m)
        if out is not None and a != out:
            stop("two operands carry the batch")
        out = a
    if len(ins) > 2 and ins[2] and ins[2] not in infos:
        rc = len(shp(ins[2]))
        ax = out.axis - (2 - rc)
        if ax >= 0 and shp(ins[2])[ax] != 1:
            tile(2, ax, out)
    return out


def _einsum(node, ins, bat, infos, shp, stop, tile, b0: int) -> Batch:
    """The batch through an Einsum: the index its axis holds in each operand, which the output keeps."""
    from pbv_onnx.export.graph.ops_tokens import einsum_parse

    eq = _attr(node, "equation")
    ops, res = einsum_parse(eq.decode() if isinstance(eq, bytes) else eq, [len(shp(n)) for n in ins])
    index, out = None, None
    for j, n in bat:
        b = infos[n]
        c = ops[j][b.axis]
        if index is not None and (c, b.p, b.m) != (index, out.p, out.m):
            stop("its operands carry the batch on different indices")
        if c not in res:
            stop("it sums over the batch axis")
        index, out = c, Batch(res.index(c), b.p, b.m)
    for j, n in enumerate(ins):
        if n and n not in infos and index in ops[j]:
            ax = ops[j].index(index)
            if shp(n)[ax] != 1 or out.p * b0 * out.m == 1:  # a 1 in an ellipsis broadcasts where the batch is larger
                tile(j, ax, out)
    return out


def _rewrite(model, image: str, values, infos, actions, b0: int):
    """Apply the rewrites to a copy of `model`: (model, notes)."""
    from onnx import helper, numpy_helper

    m = copy.deepcopy(model)
    g = m.graph
    nodes = list(g.node)
    notes: list[str] = []
    before: dict[int, list] = {}  # node index -> nodes to insert before it
    inits: list = []
    used = {t.name for t in g.initializer} | {o for n in nodes for o in (*n.input, *n.output)}

    def fresh(base: str) -> str:
        i, name = 0, f"{base}__rebatch"
        while name in used:
            i += 1
            name = f"{base}__rebatch{i}"
        used.add(name)
        return name

    def const(base: str, value) -> str:
        name = fresh(base)
        inits.append(numpy_helper.from_array(np.asarray(value, np.int64), name))
        return name

    n_name = fresh("batch_size")  # [N], read from the image at run time
    head = [helper.make_node("Shape", [image], [n_name], name=fresh("batch_size_shape"), start=0, end=1)]
    tiled: dict[tuple, str] = {}
    for act in actions:
        kind, idx = act[0], act[1]
        node = nodes[idx]
        if kind == "reshape":
            shape = const(f"{node.name}_shape", act[2])
            node.input[1] = shape
            for a in list(node.attribute):
                if a.name == "allowzero":
                    node.attribute.remove(a)
            notes.append(f"Reshape {node.name!r}: shape {act[2]} (batch entry -1)")
        elif kind == "gather_reshape":
            node.op_type = "Reshape"
            node.input[1] = const(f"{node.name}_shape", act[2])
            del node.attribute[:]
            notes.append(f"Gather {node.name!r}: every element in order along the batch axis, now Reshape {act[2]}")
        elif kind == "slice_whole":
            node.input[2] = const(f"{node.name}_ends", act[2])
            notes.append(f"Slice {node.name!r}: the whole batch axis (end past it)")
        elif kind == "expand":
            node.input[1] = const(f"{node.name}_shape", act[2])
            notes.append(f"Expand {node.name!r}: shape {act[2]} (batch entry 1)")
        elif kind == "resize_sizes":
            sizes, axis = act[2], act[3]
            target = fresh(f"{node.name}_sizes")
            parts = ([const("sizes", sizes[:axis])] if axis else []) + [n_name]
            parts += [const("sizes", sizes[axis + 1 :])] if axis + 1 < len(sizes) else []
            before.setdefault(idx, []).append(helper.make_node("Concat", parts, [target], axis=0, name=target))
            node.input[3] = target
            notes.append(f"Resize {node.name!r}: sizes {sizes} with the batch read from the image")
        elif kind == "tile":
            j, axis, info = act[2], act[3], act[4]
            src = node.input[j]
            key = (src, axis, info)
            if key not in tiled:
                s = [int(d) for d in np.shape(values[src])]
                r = len(s)
                new = []
                if info.p == info.m == 1 and b0 == 1:
                    ones_l, ones_r = const("ones", [1] * axis), const("ones", [1] * (r - axis - 1))
                    target = fresh(f"{src}_target")
                    new.append(helper.make_node("Concat", [ones_l, n_name, ones_r], [target], axis=0, name=target))
                    out = fresh(src)
                    new.append(helper.make_node("Expand", [src, target], [out], name=out))
                else:  # split the axis into (p, B0, m), keep the first image's rows, expand, merge back
                    split = fresh(f"{src}_split")
                    shape = const("shape", [*s[:axis], info.p, b0, info.m, *s[axis + 1 :]])
                    new.append(helper.make_node("Reshape", [src, shape], [split], name=split))
                    one = fresh(f"{src}_one")
                    starts, ends, axes = const("zero", [0]), const("one", [1]), const("axis", [axis + 1])
                    new.append(helper.make_node("Slice", [split, starts, ends, axes], [one], name=one))
                    ones_l, ones_r = const("ones", [1] * (axis + 1)), const("ones", [1] * (r - axis))
                    target = fresh(f"{src}_target")
                    new.append(helper.make_node("Concat", [ones_l, n_name, ones_r], [target], axis=0, name=target))
                    wide = fresh(f"{src}_wide")
                    new.append(helper.make_node("Expand", [one, target], [wide], name=wide))
                    out = fresh(src)
                    merged = const("shape", [*s[:axis], -1, *s[axis + 1 :]])
                    new.append(helper.make_node("Reshape", [wide, merged], [out], name=out))
                before.setdefault(idx, []).extend(new)
                tiled[key] = out
                notes.append(f"{node.op_type} {node.name!r}: input {src!r} expanded to the batch ({info})")
            node.input[j] = tiled[key]
    order = list(head)
    for i, node in enumerate(nodes):
        order.extend(before.get(i, []))
        order.append(node)
    del g.node[:]
    g.node.extend(order)
    g.initializer.extend(inits)
    del g.value_info[:]  # the exporter's static shapes hold the old batch size
    for v in g.input:
        if v.name == image:
            v.type.tensor_type.shape.dim[0].Clear()
            v.type.tensor_type.shape.dim[0].dim_param = "N"
    for v in g.output:
        b = infos.get(v.name)
        if b is not None and v.type.tensor_type.HasField("shape") and b.axis < len(v.type.tensor_type.shape.dim):
            d = v.type.tensor_type.shape.dim[b.axis]
            d.Clear()
            d.dim_param = "N" if b.p == b.m == 1 else f"N_{b.axis}"
    return m, notes


def _per_image(y: np.ndarray, b: Batch | None, n: int, i: int) -> np.ndarray:
    """Image i's part of output y (batch n) on its batch axis."""
    if b is None:
        return y
    s = y.shape
    y = y.reshape(*s[: b.axis], b.p, n, b.m, *s[b.axis + 1 :])
    return np.take(y, i, axis=b.axis + 1)


def _check(original, fixed, image: str, input_size, b0: int, infos, label, fail) -> None:
    """The rewritten graph at batch 2 and 3 against the original one image at a time (each image
    repeated to the original batch size)."""
    ref = _session(original, every=False, label=label, fail=fail)
    new = _session(fixed, every=False, label=label, fail=fail)
    names = [o.name for o in fixed.graph.output]
    rng = np.random.default_rng(1)
    for n in _CHECK_BATCHES:
        x = rng.standard_normal((n, 3, *input_size)).astype(np.float32)
        try:
            got = new.run(names, {image: x})
        except Exception as exc:
            raise fail(f"the rewritten graph does not run at batch {n}: {first_line(exc)}") from None
        for i in range(n):
            want = ref.run(names, {image: np.repeat(x[i : i + 1], b0, axis=0)})
            for name, g, w in zip(names, got, want):
                b = infos.get(name)
                if b is not None and (g.ndim <= b.axis or g.shape[b.axis] != b.p * n * b.m):
                    raise fail(f"output {name!r} is {list(g.shape)} at batch {n}: the batch is not on {b}")
                a, e = _per_image(g, b, n, i), _per_image(w, b, b0, 0)
                if a.shape != e.shape:
                    raise fail(f"output {name!r} at batch {n} is {list(g.shape)}, not per image {list(e.shape)}")
                a64, e64 = a.astype(np.float64), e.astype(np.float64)
                err = np.linalg.norm(a64 - e64) / max(np.linalg.norm(e64), 1e-30)
                if not err <= CHECK_TOL:
                    raise fail(f"output {name!r} at batch {n} differs from the image alone by {err:.1e}")
