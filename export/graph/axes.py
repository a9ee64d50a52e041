"""Which axes of a 4-D tensor hold channels and space, and of a 3-D one tokens and channels, followed
from the image through the ops whose layout ONNX defines: graphs from tf2onnx and jax2onnx compute
channels last between their Convs, and token models reshape [N, T, C] tokens into [N, h, w, C] grids,
so a cut there pooled "over space" as [N, C, h, w] would average rows and channels."""

from __future__ import annotations

NCHW = ("N", "C", "H", "W")
NTC = ("N", "T", "C")  # tokens: batch, token, channel
CANONICAL = {4: NCHW, 3: NTC}  # the layouts pooling and maps read (export/graph/transform.py)
TO_CHANNELS_FIRST = "__to_channels_first"  # suffix of the Transpose prepare puts after a turned cut
_SPACE = ("H", "W", "T")  # axes that index positions in the image: a Reshape may merge or split them

# ops that read and write [N, C, H, W] (at rank 3 [N, C, L]) by definition
_IMAGE_OPS = {
    "Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
    "GlobalLpPool", "BatchNormalization", "InstanceNormalization", "LRN", "DepthToSpace", "SpaceToDepth",
}  # fmt: skip
# ops whose output keeps the layout of their input(s) of its rank: elementwise, broadcasting, and ops
# that act along an axis without moving it
_KEEP = {
    "Relu", "Sigmoid", "Tanh", "Erf", "Gelu", "Exp", "Log", "Sqrt", "Reciprocal", "Neg", "Abs", "HardSigmoid",
    "HardSwish", "LeakyRelu", "PRelu", "Identity", "Cast", "Dropout", "Softplus", "Softsign", "Elu", "Selu",
    "Celu", "Mish", "Clip", "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where",
    "Concat", "Split", "Slice", "Pad", "Resize", "Softmax", "LayerNormalization", "ReduceMean", "ReduceSum",
    "ReduceMax", "ReduceMin",
}  # fmt: skip


def layouts(model, image: str, shapes: dict[str, tuple] | None = None) -> dict[str, tuple[str, ...]]:
    """{tensor: which of N, C, H, W (rank 4) or N, T, C (rank 3) each axis holds} for the tensors whose
    layout follows from the image (NCHW) through `model`'s nodes (in graph order); tensors it cannot
    tell are absent. `shapes` (name -> dims, the batch axis a symbol): static shapes, as prepare
    finds them; without them onnx's shape inference gives what it can."""
    dims = dict(shapes) if shapes is not None else _inferred_dims(model)
    for t in model.graph.initializer:
        dims.setdefault(t.name, tuple(int(d) for d in t.dims))
    out: dict[str, tuple[str, ...]] = {image: NCHW}
    producer = {o: n for n in model.graph.node for o in n.output if o}
    moves = {image}  # tensors computed from the image; the others (weights, shapes) broadcast
    for node in model.graph.node:
        ins = [i for i in node.input if i]
        if not any(i in moves for i in ins):
            continue
        moves.update(o for o in node.output if o)
        rank = len(dims.get(node.output[0], ())) if node.output and node.output[0] else 0
        if rank not in CANONICAL:
            continue
        if node.op_type in _IMAGE_OPS and rank == 4:  # whatever their input held, their output's axis 1 is channels
            found = NCHW
        elif node.op_type in _IMAGE_OPS and out.get(ins[0]) == ("N", "C", "T"):
            found = out[ins[0]]  # at rank 3 only on channels-first tokens (not a GroupNorm's [N, groups, -1] view)
        elif node.op_type == "Transpose" and ins and ins[0] in out:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            found = tuple(out[ins[0]][p] for p in perm or reversed(range(len(out[ins[0]]))))
        elif node.op_type == "Reshape" and len(ins) == 2 and _back_to(node, producer, out):
            # a Reshape back to the shape of a tensor it was computed from (a GroupNorm's grouped view
            # undone, as jax2onnx writes it): that tensor's layout
            found = out[producer[ins[1]].input[0]]
        elif node.op_type == "Reshape" and ins[0] in out:
            found = reshaped(out[ins[0]], dims.get(ins[0]), dims.get(node.output[0]))
        elif node.op_type == "MatMul" and ins[0] in out and out[ins[0]][-1] == "C" and ins[1] not in moves:
            found = out[ins[0]]  # a linear layer on the channels (channels-last blocks: Swin, ConvNeXt, tokens)
        elif node.op_type in _KEEP:
            # elementwise ops align their inputs axis by axis: a residual sum of a known tensor and one
            # whose layout was lost (Swin's windows undone by Reshapes) has the known one's
            seen = {out[i] for i in ins if i in out and i in moves and len(out[i]) == rank}
            if len(seen) != 1:
                continue
            (found,) = seen
        else:
            continue
        if found is None or len(found) != rank:
            continue
        for o in node.output:
            if o and len(dims.get(o, ())) == rank:
                out[o] = found
    return out


def reshaped(order, src, dst) -> tuple[str, ...] | None:
    """The layout of a Reshape of a tensor of layout `order` and shape `src` to shape `dst`, or None.
    A row-major Reshape leaves the axes of a common prefix and a common suffix of the two shapes in
    place; the block between them must only merge or split positions (H, W, tokens: [N, C, h, w] to
    [N, C, h*w], [N, h*w, C] to [N, h, w, C]), and is positions again. Anything else (attention's
    [N, T, heads, d], windows, a merged batch) is unknown."""
    if src is None or dst is None or len(dst) not in CANONICAL or len(order) != len(src):
        return None
    if any(not isinstance(d, (int, str)) for d in (*src, *dst)):
        return None
    p = 0
    while p < min(len(src), len(dst)) and src[p] == dst[p]:
        p += 1
    s = 0
    while s < min(len(src), len(dst)) - p and src[len(src) - 1 - s] == dst[len(dst) - 1 - s]:
        s += 1
    # the block between ("_") is positions: the result has as many of them as the target only where the
    # two other axes are the input's N and C (a block that held either would leave one more)
    labels = [*order[:p], *(["_"] * (len(dst) - p - s)), *order[len(src) - s :]]
    space = [a for a in CANONICAL[len(dst)] if a in _SPACE]
    if sum(a in _SPACE or a == "_" for a in labels) != len(space):
        return None
    it = iter(space)  # positions in order: rows before columns, as the image's
    return tuple(next(it) if a in _SPACE or a == "_" else a for a in labels)


def canonical_perm(order: tuple[str, ...] | None) -> list[int] | None:
    """The permutation taking a tensor of layout `order` to the one pooling and maps read ([N, C, h, w]
    for rank 4, [N, T, C] for rank 3); None where it is that already, or is unknown."""
    target = CANONICAL.get(len(order)) if order else None
    if target is None or order == target or sorted(order) != sorted(target) or order[0] != "N":
        return None
    return [order.index(axis) for axis in target]


def turned_perm(model) -> list[int] | None:
    """The permutation prepare put after the cut of `model` (a Transpose named *TO_CHANNELS_FIRST),
    else None."""
    for node in model.graph.node:
        if node.name.endswith(TO_CHANNELS_FIRST):
            return next(list(a.ints) for a in node.attribute if a.name == "perm")
    return None


def layout_note(order: tuple[str, ...] | None, rank: int) -> str:
    """How export reads a cut of layout `order` (None: not followed), for messages and the model's
    `weights.layer_layout`; "" where there is nothing to say."""
    if rank not in CANONICAL:
        return ""
    read = "[N, C, h, w]" if rank == 4 else "[N, T, C] tokens"
    if order is None:
        return f"not followed through the graph (lost in a Reshape): read as {read}"
    if canonical_perm(order) is None:
        return ""
    was = "channels-last" if rank == 4 else "channels-first tokens"
    return f"{was} ({''.join(order)}); a Transpose to {read} after the cut"


def _inferred_dims(model) -> dict[str, tuple]:
    """name -> dims by onnx's shape inference (a symbol's name, or None where unknown)."""
    import onnx

    out: dict[str, tuple] = {}
    inferred = onnx.shape_inference.infer_shapes(model)
    for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        if v.type.tensor_type.HasField("shape"):
            out[v.name] = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in v.type.tensor_type.shape.dim
            )
    return out


def _back_to(reshape, producer, known) -> bool:
    """Whether `reshape`'s shape is Shape(t) (whole) of a tensor t of known layout from which its data
    input is computed (within 64 nodes upstream)."""
    shape = producer.get(reshape.input[1])
    if shape is None or shape.op_type != "Shape" or any(a.name in ("start", "end") for a in shape.attribute):
        return False
    t = shape.input[0]
    if t not in known:
        return False
    todo, seen = [reshape.input[0]], set()
    while todo and len(seen) < 64:
        name = todo.pop()
        if name == t:
            return True
        if name in seen or name not in producer:
            continue
        seen.add(name)
        todo.extend(i for i in producer[name].input if i)
    return False
