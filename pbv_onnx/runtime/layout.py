"""A rewrite of onnxruntime's optimised CPU graph: the K-cotangents pass kept in the NCHWc layout.

onnxruntime's CPU provider runs convolutions in a blocked layout (NCHWc: channels in blocks of 8 or
16, innermost) and keeps a Mul or Add in it only when it can prove both operands the same shape.
The K-per-image backward pass multiplies each gradient [N*K, C, H, W] by a mask [N, C, H, W]
through [N, K, C, H, W] and [N, 1, C, H, W] views, so onnxruntime converts the gradient out of the
blocked layout before every mask product, and back after it; a residual sum that reads such a
product is then computed in the plain layout too, and so is the next product. Those conversions
were a large share of the call (docs/performance.md).

They are not needed. When C is a whole number of blocks, the blocked layout of a [C, H, W] sample
is a fixed permutation of its values, the same for every tensor of that shape, and an elementwise
product or sum of two such tensors (broadcast over samples or not) pairs the same values in either
layout. The rewrite walks the graph in order and computes those products and sums on the blocked
tensors themselves; a conversion back into the blocked layout of a value already held there is
dropped, and one conversion out is placed for any other reader. Every other node stays as
onnxruntime wrote it.
"""

from __future__ import annotations

from collections import defaultdict

NCHWC_DOMAIN = "com.microsoft.nchwc"
# Largest NCHWc block onnxruntime uses (AVX-512); whole blocks of it are whole blocks of any.
BLOCK = 16


def _attr(node, name: str, default: int = 0) -> int:
    for a in node.attribute:
        if a.name == name:
            return a.i
    return default


def _is(node, op: str, domain: str = "") -> bool:
    return node is not None and node.op_type == op and node.domain == domain


def inferred_types(source) -> dict:
    """ONNX shape inference of `source` (a ModelProto, left unchanged): each value's tensor type,
    graph inputs and outputs included. The weights' values are left out of the copy inferred: only
    their shapes matter (small constants, such as shapes and scales, are kept)."""
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(source)
    for init in model.graph.initializer:
        if len(init.dims) > 1 or (init.dims and init.dims[0] > 64):  # keep small constants (shapes)
            for field in ("raw_data", "float_data", "double_data", "int32_data", "int64_data"):
                init.ClearField(field)
    graph = onnx.shape_inference.infer_shapes(model).graph
    return {info.name: info.type.tensor_type for info in [*graph.value_info, *graph.input, *graph.output]}


def sample_shapes(source) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes (all but the batch axis) of the tensors of `source`, the graph as written
    (a ModelProto, left unchanged), where ONNX shape inference finds them all static."""
    shapes = {}
    for name, tensor in inferred_types(source).items():
        dims = tensor.shape.dim[1:]
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[name] = tuple(d.dim_value for d in dims)
    return shapes


def blocked_products(model, shapes: dict[str, tuple[int, ...]]) -> int:
    """Rewrite, in place, an onnxruntime-optimised graph (a ModelProto saved through
    `optimized_model_filepath`, nodes in execution order) so that these run on NCHWc tensors:

    - a mask product  Reshape(a) -> Mul <- Reshape(b),  Mul -> Reshape (its only reader);
    - a sum  Add(a, b);

    where a and b have the same per-sample shape in `shapes` (see sample_shapes: of the graph as
    written, whose tensor names survive optimisation), a whole number of blocks of channels, and at
    least one of them is held in the blocked layout (read through a ReorderOutput, or computed so
    by this rewrite; the other, e.g. a graph input, is converted into it once).
    A ReorderInput of such a result is dropped (its readers read the result), a Shape reads it as it
    is, and any other reader gets one ReorderOutput. Returns the number of products and sums
    rewritten. The caller checks the result against the graph as written (sessions.create_session).
    """
    from onnx import helper

    graph = model.graph
    readers: dict[str, list] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    producer = {out: node for node in graph.node for out in node.output}
    outputs = {o.name for o in graph.output}

    def channels_of(name: str) -> int | None:
        shape = shapes.get(name)
        return shape[0] if shape and len(shape) == 3 and shape[0] % BLOCK == 0 else None

    blocked: dict[str, str] = {}  # plain tensor -> the same values in the blocked layout
    converted: set[str] = set()  # tensors now computed blocked under their plain name
    dropped: set[int] = set()
    after: dict[int, list] = defaultdict(list)  # id(node) -> ReorderOutputs placed after it
    before: dict[int, list] = defaultdict(list)  # id(node) -> ReorderInputs placed before it
    plain_copy: dict[str, str] = {}
    alias: dict[str, str] = {}  # output of a dropped ReorderInput -> the blocked tensor it copied

    def pairable(a: str, b: str, node) -> bool:
        """Whether a and b can be combined blocked; a plain one (a graph input, a ConvTranspose
        output) is converted, right before `node`, where the other is blocked already."""
        if shapes.get(a) != shapes.get(b) or channels_of(a) is None or (a not in blocked and b not in blocked):
            return False
        for name in (a, b):
            if name not in blocked:
                blocked[name] = name + "_nchwc"
                before[id(node)].append(
                    helper.make_node(
                        "ReorderInput", [name], [blocked[name]], name=blocked[name] + "_reorder", domain=NCHWC_DOMAIN
                    )
                )
        return True

    def plain(name: str) -> str:
        """The plain form of a converted tensor, converted once, right after its producer."""
        if name not in plain_copy:
            plain_copy[name] = name + "_nchw"
            after[id(producer[name])].append(
                helper.make_node(
                    "ReorderOutput",
                    [name],
                    [plain_copy[name]],
                    name=plain_copy[name] + "_reorder",
                    domain=NCHWC_DOMAIN,
                    channels=channels_of(name),
                )
            )
        return plain_copy[name]

    def product_of(mul) -> tuple[list, object] | None:
        """The views and the reshape back of a mask product this rewrite can run blocked."""
        if not _is(mul, "Mul") or len(mul.input) != 2 or mul.output[0] in outputs:
            return None
        vs = [producer.get(name) for name in mul.input]
        if not all(_is(v, "Reshape") and readers[v.output[0]] == [mul] for v in vs):
            return None
        back = readers[mul.output[0]]
        if len(back) != 1 or not _is(back[0], "Reshape") or back[0].output[0] in outputs:
            return None
        if shapes.get(back[0].output[0]) != shapes.get(vs[0].input[0]):
            return None
        return vs, back[0]

    def reads(node) -> None:
        """The reads of a node left as written: of a dropped conversion into the blocked layout,
        the tensor it would have copied; of a converted tensor, its plain copy (Shape excepted)."""
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
            elif _is(node, "Shape") and name in blocked and channels_of(name) is not None:
                node.input[i] = blocked[name]  # a whole-block NCHWc tensor has its plain shape
            elif name in converted:
                node.input[i] = plain(name)

    order = {id(node): k for k, node in enumerate(graph.node)}
    products = {id(node): found for node in graph.node if (found := product_of(node)) is not None}
    views = {id(v) for vs, _ in products.values() for v in vs}  # handled with their product
    skip: set[int] = set()
    rewritten = 0
    for node in list(graph.node):
        if id(node) in views or id(node) in skip:
            continue
        if _is(node, "ReorderOutput", NCHWC_DOMAIN) and not _attr(node, "channels_last"):
            if channels_of(node.output[0]) == _attr(node, "channels"):
                blocked[node.output[0]] = node.input[0]
            continue
        if id(node) in products:
            vs, back = products[id(node)]
            first = min(vs, key=lambda v: order[id(v)])
            if pairable(vs[0].input[0], vs[1].input[0], first):
                for v in vs:
                    v.input[0] = blocked[v.input[0]]
                skip.add(id(back))  # it reads the blocked product, and its output is blocked
                blocked[back.output[0]] = back.output[0]
                converted.add(back.output[0])
                rewritten += 1
                continue
            for v in vs:
                reads(v)
        if _is(node, "Add") and len(node.input) == 2 and node.output[0] not in outputs:
            a, b = node.input
            if shapes.get(node.output[0]) == shapes.get(a) and pairable(a, b, node):
                node.input[0], node.input[1] = blocked[a], blocked[b]
                blocked[node.output[0]] = node.output[0]
                converted.add(node.output[0])
                rewritten += 1
                continue
        if (
            _is(node, "ReorderInput", NCHWC_DOMAIN)
            and not _attr(node, "channels_last")
            and node.input[0] in blocked
            and node.output[0] not in outputs
        ):
            alias[node.output[0]] = blocked[node.input[0]]  # its readers read the blocked tensor
            dropped.add(id(node))
            continue
        reads(node)
    if not rewritten:
        return 0
    # (graph outputs are never converted: they keep their plain form under their own names)
    read: set[str] = set(outputs)
    for node in graph.node:
        if id(node) not in dropped:
            read.update(node.input)
    for extra in [*after.values(), *before.values()]:
        for node in extra:
            read.update(node.input)
    for node in graph.node:  # conversions out of the blocked layout that nothing reads any more
        if _is(node, "ReorderOutput", NCHWC_DOMAIN) and not set(node.output) & read:
            dropped.add(id(node))
    nodes = []
    for node in graph.node:
        if id(node) not in dropped:
            nodes.extend(before[id(node)])
            nodes.append(node)
            nodes.extend(after[id(node)])
    del graph.node[:]
    graph.node.extend(nodes)
    return rewritten
