"""Which axes of a 4-D tensor hold channels and space, followed from the image through the ops whose
layout ONNX defines: graphs from tf2onnx and jax2onnx compute channels last between their Convs, so a
cut there is [N, h, w, C], and pooling it "over space" as [N, C, h, w] would average rows and channels."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

NCHW = ("N", "C", "H", "W")
TO_CHANNELS_FIRST = "__to_channels_first"  # suffix of the Transpose cut_channels_first puts after a cut

# ops that read and write [N, C, H, W] by definition
_IMAGE_OPS = {
    "Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
    "GlobalLpPool", "BatchNormalization", "InstanceNormalization", "LRN", "DepthToSpace", "SpaceToDepth",
}  # fmt: skip
# ops whose 4-D output keeps the layout of their 4-D input(s): elementwise, broadcasting, and ops that
# act along an axis without moving it
_KEEP = {
    "Relu", "Sigmoid", "Tanh", "Erf", "Gelu", "Exp", "Log", "Sqrt", "Reciprocal", "Neg", "Abs", "HardSigmoid",
    "HardSwish", "LeakyRelu", "PRelu", "Identity", "Cast", "Dropout", "Softplus", "Softsign", "Elu", "Selu",
    "Celu", "Mish", "Clip", "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where",
    "Concat", "Split", "Slice", "Pad", "Resize", "Softmax", "LayerNormalization", "ReduceMean", "ReduceSum",
    "ReduceMax", "ReduceMin",
}  # fmt: skip


def layouts(model, image: str) -> dict[str, tuple[str, ...]]:
    """{tensor: which of N, C, H, W each axis holds} for the 4-D tensors whose layout follows from the
    image (NCHW) through `model`'s nodes (in graph order); tensors it cannot tell are absent."""
    import onnx

    ranks: dict[str, int] = {}
    inferred = onnx.shape_inference.infer_shapes(model)
    for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        if v.type.tensor_type.HasField("shape"):
            ranks[v.name] = len(v.type.tensor_type.shape.dim)
    for t in model.graph.initializer:
        ranks[t.name] = len(t.dims)
    out: dict[str, tuple[str, ...]] = {image: NCHW}
    producer = {o: n for n in model.graph.node for o in n.output if o}
    moves = {image}  # tensors computed from the image; the others (weights, shapes) broadcast
    for node in model.graph.node:
        ins = [i for i in node.input if i]
        if not any(i in moves for i in ins):
            continue
        moves.update(o for o in node.output if o)
        four = [i for i in ins if ranks.get(i) == 4 and i in moves]
        if node.op_type in _IMAGE_OPS:  # whatever their input held, their output's axis 1 is channels
            found = NCHW
        elif node.op_type == "Transpose" and ins and ins[0] in out:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [3, 2, 1, 0])
            found = tuple(out[ins[0]][p] for p in perm)
        elif node.op_type == "Reshape" and len(ins) == 2 and _back_to(node, producer, out):
            # a Reshape back to the shape of a tensor it was computed from (a GroupNorm's grouped view
            # undone, as jax2onnx writes it): that tensor's layout
            found = out[producer[ins[1]].input[0]]
        elif node.op_type == "MatMul" and ins[0] in out and out[ins[0]][-1] == "C" and ins[1] not in moves:
            found = out[ins[0]]  # a linear layer on the channels (channels-last blocks: Swin, ConvNeXt)
        elif node.op_type in _KEEP and four:
            # elementwise ops align their inputs axis by axis: a residual sum of a known tensor and one
            # whose layout was lost (Swin's windows undone by Reshapes) has the known one's
            seen = {out[i] for i in four if i in out}
            if len(seen) != 1:
                continue
            (found,) = seen
        else:
            continue
        for o in node.output:
            if o and ranks.get(o) == 4:
                out[o] = found
    return out


def cut_channels_first(model, cut: str | None = None) -> str | None:
    """Where the 4-D tensor `cut` holds channels and space in another order than [N, C, H, W] (a
    channels-last cut, [N, h, w, C]), a Transpose to that order goes after it (in place): returns the
    name to cut at instead, else None. `cut` None: the graph's first output. A cut already turned so
    is left as it is."""
    from onnx import helper

    cut = cut or model.graph.output[0].name
    inits = {t.name for t in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        return None
    image = inputs[0]

    for node in model.graph.node:
        if node.name.endswith(TO_CHANNELS_FIRST) and node.output[0] == cut:
            return None
    order = layouts(model, image).get(cut)
    if order is None or order == NCHW or sorted(order) != sorted(NCHW) or order[0] != "N":
        return None
    taken = {i for n in model.graph.node for i in (*n.input, *n.output)} | {t.name for t in model.graph.initializer}
    new = f"{cut}__nchw"
    while new in taken:
        new += "_"
    perm = [order.index(axis) for axis in NCHW]
    model.graph.node.append(helper.make_node("Transpose", [cut], [new], perm=perm, name=f"{new}{TO_CHANNELS_FIRST}"))
    log.info("tensor %s is %s: a Transpose to [N, C, H, W] follows it", cut, "".join(order))
    return new


def turned_perm(model) -> list[int] | None:
    """The permutation cut_channels_first put after the cut of `model`, else None."""
    for node in model.graph.node:
        if node.name.endswith(TO_CHANNELS_FIRST):
            return next(list(a.ints) for a in node.attribute if a.name == "perm")
    return None


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
