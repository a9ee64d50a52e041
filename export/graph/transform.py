"""The ONNX-graph adjoint transform: a forward model -> the project's model format (features and
input gradients, one cotangent per image and K per image), from plain ONNX ops."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from pbv_onnx.base.errors import ModelError, UsageError
from pbv_onnx.export.graph.axes import TO_CHANNELS_FIRST
from pbv_onnx.export.graph.builder import Ctx, Emitter, is_batch
from pbv_onnx.export.graph.ops_conv import to_blocked
from pbv_onnx.export.graph.prepare import Prepared, prepare
from pbv_onnx.export.graph.rules import (
    FLOAT_TYPES,
    GraphPattern,
    GraphRule,
    load_rules,
    patterns_by_root,
    rule_for,
    unsupported,
)
from pbv_onnx.runtime.fp16 import FP32_ONLY_KEY
from pbv_onnx.runtime.modelfile import (
    COTANGENT,
    COTANGENTS,
    FEATURE_MAP,
    FEATURES,
    IMAGE,
    INPUT_GRAD,
    INPUT_GRADS,
    MULTI_COTANGENT,
)

POOLS = ("none", "avg", "cls")

# How the graph is built (the `method` line of the model's `adjoint` metadata).
METHOD = (
    "ONNX-graph adjoint transform (export/graph/): the forward graph up to the cut, shape computations "
    "folded for the fixed input size, then one registered rule per op type emits each node's adjoint as "
    "plain ONNX ops, in reverse topological order, gradients of a tensor read by several nodes summed "
    "(of a tensor split whole by scalar Gathers, as attention's q, k, v, concatenated); "
    "two backward passes read one forward pass: cotangent [N, ...] one per image and cotangents "
    "[N*K, ...] K per image, image-major (forward activations K-tiled)"
)


@dataclass
class Built:
    """A transform's result: the model, the prepared forward graph and the rules used."""

    model: Any  # onnx.ModelProto
    prep: Prepared
    rules: list[GraphRule]
    patterns: list[GraphPattern]  # those that matched somewhere
    feature_shape: tuple[int, ...]
    map_shape: tuple[int, ...]  # the cut tensor's shape without the batch (= feature_shape when pool none)


def describe(rules, patterns=()) -> dict[str, Any]:
    """The model's `adjoint` metadata: the method, each rule's description by op type, and each
    pattern's that matched by name."""
    out = {"method": METHOD, "rules": {r.op_type: r.description for r in rules}}
    if patterns:
        out["patterns"] = {p.name: p.description for p in patterns}
    return out


def fp32_table(rules) -> dict[str, list[int]]:
    """ONNX op type -> float inputs kept in float32 in a float16 copy, over the given rules (and
    patterns)."""
    table: dict[str, set[int]] = {}
    for rule in rules:
        for op, inputs in rule.fp32_only.items():
            table.setdefault(op, set()).update(inputs)
    return {op: sorted(inputs) for op, inputs in sorted(table.items())}


def transform(model, cut: str | None = None, pool: str = "none", input_size: tuple[int, int] | None = None):
    """The project's model format (no front-end metadata yet) from an ONNX forward model: see `build`."""
    return build(model, cut, pool, input_size).model


def build(model, cut: str | None = None, pool: str = "none", input_size: tuple[int, int] | None = None) -> Built:
    """Transform a forward model (ModelProto or path; one image input [N,3,H,W]) cut at tensor `cut`
    (default: its output), pooled `pool` (none | avg | cls). The result's metadata holds `adjoint`,
    `fp32_only`, `multi_cotangent`, `feature_shape`, `pool` and `layer`; the front ends add the rest."""
    import onnx
    from onnx import helper, numpy_helper

    if pool not in POOLS:
        raise UsageError(None, f"pool must be one of {', '.join(POOLS)}, not {pool!r}", "pool")
    load_rules()
    prep = prepare(model, cut, input_size)
    cut = prep.cut
    cut_shape = prep.shapes[cut]
    if not cut_shape or cut_shape[0] != "N" or any(is_batch(d) for d in cut_shape[1:]):
        raise ModelError(None, f"tensor {cut!r} has shape {list(cut_shape)}: features need the batch axis first")
    if prep.dtypes.get(cut, onnx.TensorProto.FLOAT) != onnx.TensorProto.FLOAT:
        raise ModelError(None, f"tensor {cut!r} is not float32")

    # the rules, checked before anything is built: an op without one is refused naming the node
    # a node whose outputs on the path are all bool or int (IsNaN, Greater, ArgMax) carries no gradient
    diff_nodes = [n for n in prep.model.graph.node if any(_carries_gradient(prep, o) for o in n.output)]
    rules: dict[str, GraphRule] = {}
    for node in diff_nodes:
        if node.op_type not in rules:
            rules[node.op_type] = rule_for(node)

    taken = {i for n in prep.model.graph.node for i in (*n.input, *n.output)} | set(prep.values)
    out = Emitter(taken=taken | {COTANGENT, COTANGENTS, FEATURES, INPUT_GRAD, INPUT_GRADS, FEATURE_MAP, IMAGE})
    ctx0 = Ctx(prep, out, multi=False)
    feats, map_shape, feature_shape = _pool_forward(ctx0, prep, cut, pool)
    grads_out = []
    patterns, matched = patterns_by_root(), {}
    for multi, cot in ((False, COTANGENT), (True, COTANGENTS)):
        ctx = Ctx(prep, out, multi=multi, cotangent=cot)
        g = _pool_adjoint(ctx, cot, pool, map_shape)
        g = to_blocked(ctx, g, ("N", *map_shape))
        grads_out.append(_backward(ctx, prep, rules, g, patterns, matched))

    nodes = list(prep.model.graph.node) + out.nodes
    nodes.append(helper.make_node("Identity", [feats], [FEATURES], name="features"))
    if pool != "none":
        nodes.append(helper.make_node("Identity", [cut], [FEATURE_MAP], name="feature_map"))
    nodes.append(helper.make_node("Identity", [grads_out[0]], [INPUT_GRAD], name="input_grad"))
    nodes.append(helper.make_node("Identity", [grads_out[1]], [INPUT_GRADS], name="input_grads"))
    h, w = prep.input_size
    f32 = onnx.TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info(IMAGE, f32, ["N", 3, h, w]),
        helper.make_tensor_value_info(COTANGENT, f32, ["N", *feature_shape]),
        helper.make_tensor_value_info(COTANGENTS, f32, ["NK", *feature_shape]),
    ]
    outputs = [
        helper.make_tensor_value_info(FEATURES, f32, ["N", *feature_shape]),
        helper.make_tensor_value_info(INPUT_GRAD, f32, ["N", 3, h, w]),
        helper.make_tensor_value_info(INPUT_GRADS, f32, ["NK", 3, h, w]),
    ]
    if pool != "none":
        outputs.append(helper.make_tensor_value_info(FEATURE_MAP, f32, ["N", *map_shape]))
    inits = list(prep.model.graph.initializer) + out.initializers
    # the empty default of `cotangents`, as export/pipeline.default_empty_cotangents gives it
    inits.append(numpy_helper.from_array(np.zeros((0, *feature_shape), np.float32), COTANGENTS))
    graph = helper.make_graph(_toposort(nodes, inits, inputs), "pbv_onnx_graph_adjoint", inputs, outputs, inits)
    result = helper.make_model(graph, opset_imports=[helper.make_opsetid("", prep.opset)])
    result.ir_version = prep.model.ir_version or 8
    used = [rules[k] for k in sorted(rules)]
    used_patterns = [matched[k] for k in sorted(matched)]
    meta = {
        "adjoint": describe(used, used_patterns),
        FP32_ONLY_KEY: fp32_table([*used, *used_patterns]),
        MULTI_COTANGENT: True,
        "feature_shape": list(feature_shape),
        "pool": pool,
        "layer": _original_name(prep, cut),
    }
    if prep.rebatched:  # the file fixed its batch size: what was rewritten to free it
        meta["batch_free"] = {"rewrites": len(prep.rebatched), "notes": prep.rebatched}
    for key, value in meta.items():
        result.metadata_props.add(key=key, value=json.dumps(value))
    result.producer_name = "pbv-onnx graph adjoint"
    keep_batch_axis(result)
    return Built(
        model=result, prep=prep, rules=used, patterns=used_patterns, feature_shape=feature_shape, map_shape=map_shape
    )


def keep_batch_axis(proto) -> int:
    """Tell shape inference, in place, that a Resize scaling its batch axis by 1 keeps it: ONNX
    infers that axis unknown, and onnxruntime keeps a product in its blocked layout only where it
    can prove both operands' shapes equal (a mask carries the symbolic N), so every mask product
    after an un-pooling (the tiled MaxPool adjoint's nearest Resize) ran in the plain layout with
    layout conversions around it (vgg16's one-per-image graph: 15 conversions more without this).
    Each such output gets a value_info with its input's batch axis; repeated until nothing
    changes, since a restored axis can reach further Resizes. Returns how many were annotated."""
    from onnx import numpy_helper

    from pbv_onnx.runtime.layout import inferred_types

    consts = {t.name: t for t in proto.graph.initializer}
    consts.update(
        {
            n.output[0]: n.attribute[0].t
            for n in proto.graph.node
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"
        }
    )
    resizes = []
    for node in proto.graph.node:
        if node.op_type == "Resize" and len(node.input) >= 3 and node.input[2] in consts:
            scales = numpy_helper.to_array(consts[node.input[2]])
            if scales.size and scales[0] == 1.0:
                resizes.append(node)
    if not resizes:
        return 0
    # the graph inputs' named axes (N, NK): shape inference names unknown axes unk__*, not these
    named = {d.dim_param for i in proto.graph.input for d in i.type.tensor_type.shape.dim if d.dim_param}
    done: set[str] = set()
    outputs = {o.name for o in proto.graph.output}  # their types are the exporter's to declare
    while True:
        shapes = inferred_types(proto)
        added = 0
        for node in resizes:
            src, out = shapes.get(node.input[0]), shapes.get(node.output[0])
            if node.output[0] in done | outputs or src is None or out is None or not src.shape.dim:
                continue
            batch = src.shape.dim[0]
            if batch.dim_param not in named:
                continue
            info = proto.graph.value_info.add()
            info.name = node.output[0]
            info.type.tensor_type.CopyFrom(out)
            info.type.tensor_type.shape.dim[0].CopyFrom(batch)
            done.add(node.output[0])
            added += 1
        if not added:
            return len(done)


def _carries_gradient(prep: Prepared, name: str) -> bool:
    """A float tensor on the image path (a bool or int one is piecewise constant in the image)."""
    return bool(name) and name in prep.path and prep.dtypes.get(name, 1) in FLOAT_TYPES


def _original_name(prep: Prepared, name: str) -> str:
    """The model's own name of a tensor: before renaming, and before the Transpose that turns a
    channels-last cut (prepare._turn)."""
    back = {v: k for k, v in prep.renamed.items()}
    for node in prep.model.graph.node:
        if node.name.endswith(TO_CHANNELS_FIRST) and node.output[0] == name:
            name = node.input[0]
    return back.get(name, name)


def _pool_forward(ctx: Ctx, prep: Prepared, cut: str, pool: str):
    """(features tensor, map shape, feature shape) for the pooling chosen."""
    map_shape = tuple(int(d) for d in prep.shapes[cut][1:])
    if pool == "none":
        return cut, map_shape, map_shape
    if pool == "avg":
        if len(map_shape) == 3:  # [N, C, h, w]: mean over space
            axes, feature_shape = [2, 3], (map_shape[0],)
        elif len(map_shape) == 2:  # [N, T, D]: mean over tokens
            axes, feature_shape = [1], (map_shape[1],)
        else:
            raise UsageError(None, f"pool avg needs a [N,C,h,w] map or [N,T,D] tokens, not {['N', *map_shape]}", "pool")
        s = ctx.emit("ReduceSum", [cut, ctx.const(np.array(axes, np.int64))], keepdims=0)
        n = int(np.prod([map_shape[a - 1] for a in axes]))
        return ctx.emit("Mul", [s, ctx.const(np.array(1.0 / n, np.float32))]), map_shape, feature_shape
    if len(map_shape) != 2:
        raise UsageError(None, f"pool cls needs [N,T,D] tokens, not {['N', *map_shape]}", "pool")
    feats = ctx.emit("Gather", [cut, ctx.const(np.array(0, np.int64))], axis=1)
    return feats, map_shape, (map_shape[1],)


def _pool_adjoint(ctx: Ctx, cot: str, pool: str, map_shape: tuple[int, ...]) -> str:
    """The cotangent of the cut tensor, [N, *map_shape], from the features' cotangent."""
    if pool == "none":
        return cot
    if pool == "avg" and len(map_shape) == 3:
        c, h, w = map_shape
        g = ctx.emit("Unsqueeze", [cot, ctx.const(np.array([2, 3], np.int64))])
        return ctx.emit("Mul", [g, ctx.const(np.full((h, w), 1.0 / (h * w), np.float32))])
    t, d = map_shape
    g = ctx.emit("Unsqueeze", [cot, ctx.const(np.array([1], np.int64))])
    if pool == "avg":
        return ctx.emit("Mul", [g, ctx.const(np.full((t, 1), 1.0 / t, np.float32))])
    return ctx.emit("Pad", [g, ctx.const(np.array([0, 0, 0, 0, t - 1, 0], np.int64))])


def _backward(ctx: Ctx, prep: Prepared, rules: dict[str, GraphRule], g_cut: str, patterns=None, matched=None) -> str:
    """Emit one backward pass from the cut's cotangent; returns the image's gradient. `patterns`: root
    op type -> GraphPattern instances tried before the node's rule; those that match go into `matched`."""
    patterns = patterns or {}
    matched = matched if matched is not None else {}
    grads: dict[str, list[str]] = {prep.cut: [g_cut]}
    ctx.set_shape(g_cut, prep.shapes[prep.cut])
    splits = _splits(ctx, prep)
    parts: dict[str, dict[int, str | None]] = {}
    for node in reversed(list(prep.model.graph.node)):
        if not any(o in prep.path for o in node.output):
            continue
        gs = [_total(ctx, grads.pop(o, None), prep.shapes.get(o)) if o else None for o in node.output]
        if node.op_type == "Gather" and node.input[0] in splits:
            split = node.input[0]
            axis, index = splits[split]
            parts.setdefault(split, {})[index[id(node)]] = gs[0]
            if len(parts[split]) == len(index):  # the last reader in reverse order: one Concat for all
                g = _join_split(ctx, parts.pop(split), axis, prep.shapes[split])
                if g is not None:
                    grads.setdefault(split, []).append(g)
            continue
        if all(g is None for g in gs):
            continue
        contributions = None
        for pattern in patterns.get(node.op_type, ()):
            m = pattern.match(ctx, node)
            if m is not None:
                contributions = list(pattern.vjp(ctx, node, m, gs).items())
                matched[pattern.name] = pattern
                break
        if contributions is None:
            ins = rules[node.op_type].vjp(ctx, node, gs)
            if len(ins) != len(node.input):
                raise ModelError(
                    None, f"adjoint rule {node.op_type} returned {len(ins)} gradients for {len(node.input)} inputs"
                )
            contributions = list(zip(node.input, ins))
        for name, g in contributions:
            if g is None or not ctx.on_path(name):
                continue
            if ctx.shape(g) is None:
                ctx.set_shape(g, prep.shapes[name])
            grads.setdefault(name, []).append(g)
    total = _total(ctx, grads.pop(IMAGE, None), prep.shapes[IMAGE])
    if total is None:
        raise unsupported(prep.producer[prep.cut], "no gradient reaches the image")
    return total


def _splits(ctx: Ctx, prep: Prepared) -> dict[str, tuple[int, dict[int, int]]]:
    """Tensors split whole by their readers: every reader a Gather of one constant scalar index along one
    static axis, each index read once (attention's q, k, v = qkv[0], qkv[1], qkv[2]). Their cotangent is
    one Concat of the parts' cotangents (missing ones as zeros), where the Gather rule would pad each part
    back to full size and sum the three: {tensor: (axis, {id(reader): index})}."""
    out = {}
    for name, readers in prep.consumers.items():
        shape = prep.shapes.get(name)
        if name == prep.cut or not ctx.on_path(name) or shape is None or len(readers) < 2:
            continue
        axes, index = set(), {}
        for r in readers:
            idx = ctx.value(r.input[1]) if r.op_type == "Gather" and r.input[0] == name else None
            if idx is None or np.asarray(idx).ndim != 0:
                break
            axis = int(next((a.i for a in r.attribute if a.name == "axis"), 0)) % len(shape)
            axes.add(axis)
            index[id(r)] = int(idx) % int(shape[axis]) if not is_batch(shape[axis]) else -1
        else:
            if len(axes) == 1 and -1 not in index.values():
                axis = axes.pop()
                if sorted(index.values()) == list(range(int(shape[axis]))):
                    out[name] = (axis, index)
    return out


def _join_split(ctx: Ctx, parts: dict[int, str | None], axis: int, shape) -> str | None:
    """The cotangent of a split tensor from its parts' (None: no cotangent reached that part)."""
    if all(g is None for g in parts.values()):
        return None
    some = next(g for g in parts.values() if g is not None)
    zeros = None
    pieces = []
    for i in range(len(parts)):
        g = parts[i]
        if g is None:  # zeros shaped like a part that has one (all parts share a shape)
            zeros = zeros or ctx.emit("Mul", [some, ctx.const(np.float32(0))])
            g = zeros
        pieces.append(ctx.emit("Unsqueeze", [g, ctx.const(np.array([axis], np.int64))]))
    out = ctx.emit("Concat", pieces, axis=axis)
    return ctx.set_shape(out, shape)


def _total(ctx: Ctx, gs: list[str] | None, shape) -> str | None:
    """The sum of a tensor's cotangents (fan-out: one per reading node)."""
    if not gs:
        return None
    if len(gs) == 1:
        return gs[0]
    total = ctx.emit("Sum", gs) if len(gs) > 2 else ctx.emit("Add", gs)
    return ctx.set_shape(total, shape) if shape is not None else total


def _toposort(nodes: list, inits: list, inputs: list) -> list:
    """Nodes in an order where each reads only tensors made before it (rules emit out of order)."""
    ready = {t.name for t in inits} | {i.name for i in inputs} | {""}
    producer = {}
    for n in nodes:
        for o in n.output:
            producer[o] = n
    order, done, placed = [], set(ready), set()

    def visit(n):
        if id(n) in placed:
            return
        # depth first over producers, iteratively (graphs run to thousands of nodes)
        todo = [(n, iter(n.input))]
        while todo:
            node, it = todo[-1]
            advanced = False
            for i in it:
                if i in done or i not in producer:
                    continue
                p = producer[i]
                if id(p) not in placed:
                    todo.append((p, iter(p.input)))
                    advanced = True
                    break
            if not advanced:
                todo.pop()
                if id(node) not in placed:
                    placed.add(id(node))
                    order.append(node)
                    done.update(node.output)

    for n in nodes:
        visit(n)
    return order
