"""An ONNX forward model made ready for the adjoint transform: the image's H, W fixed (batch "N"),
static shapes, everything that does not depend on the image folded, and the image path found."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pbv_onnx.base.errors import ModelError, UsageError
from pbv_onnx.export.graph.rules import OPSET
from pbv_onnx.runtime.modelfile import (
    COTANGENT,
    COTANGENTS,
    FEATURE_MAP,
    FEATURES,
    IMAGE,
    INPUT_GRAD,
    INPUT_GRADS,
)

RESERVED = (IMAGE, COTANGENT, COTANGENTS, FEATURES, INPUT_GRAD, INPUT_GRADS, FEATURE_MAP)
# Ops whose output depends on their input's shape only, never its values: a tensor reached from the
# image through them alone is a shape computation (folded where the batch size does not enter it).
SHAPE_ONLY = ("Shape", "Size")
# The batch sizes the forward graph is evaluated at to tell batch axes and batch-free shape values.
_PROBE = (2, 3)
_SMALL = 1 << 20  # elements: larger integer tensors are not kept at both batch sizes
REBATCHED = "pbv_rebatched"  # metadata key of a model export/graph/rebatch.py made batch-free (never redone)


class BatchFixedError(ModelError):
    """The forward graph does not run at the probe's batch sizes (its batch size is baked in)."""


@dataclass
class Prepared:
    """The forward graph up to the cut, ready for the transform (tensor names as in the model,
    except the image input, renamed `image`, and names the format reserves, suffixed `__fwd`)."""

    model: object  # onnx.ModelProto: input `image` [N,3,H,W], output the cut tensor
    cut: str
    input_size: tuple[int, int]
    opset: int
    shapes: dict[str, tuple] = field(default_factory=dict)  # static, batch axis "N" / "N*h"
    dtypes: dict[str, int] = field(default_factory=dict)  # onnx elem types
    values: dict[str, np.ndarray] = field(default_factory=dict)  # constants (initializers, folded)
    path: set[str] = field(default_factory=set)  # tensors that depend on the image's values
    producer: dict[str, object] = field(default_factory=dict)
    consumers: dict[str, list] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)  # model name -> name here
    folded: int = 0  # nodes folded into constants
    # integer shape computations that involve the batch size (not folded): their values at the probe's
    # two batch sizes, from which a rule may read a batch-strided form (indices b * S + C)
    batch_values: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    # the rewrites that made a model with a fixed batch size batch-free (export/graph/rebatch.py), if any
    rebatched: list[str] = field(default_factory=list)
    # the cut's layout as followed from the image (axes.layouts), before any turn; None: not followed
    cut_layout: tuple[str, ...] | None = None

    @property
    def nodes(self) -> list:
        return list(self.model.graph.node)

    def shed(self) -> None:
        """Drop the forward graph's constants (the built model holds its own copy of the weights), for
        checks that run the built model only: a vit_b_16's weights are 0.35 GB a copy."""
        del self.model.graph.initializer[:]
        self.values.clear()
        self.batch_values.clear()

    def path_nodes(self) -> list:
        """The nodes the image's values flow through (in topological order): only these need adjoints."""
        return [n for n in self.model.graph.node if any(i in self.path for i in n.input if i)]


def load(model_or_path) -> tuple[object, str]:
    """(ModelProto, a label for messages) from a path or a ModelProto."""
    import onnx

    if isinstance(model_or_path, (str, Path)):
        path = Path(model_or_path)
        if not path.is_file():
            raise ModelError(path, "ONNX file not found")
        try:
            return onnx.load(str(path)), str(path)
        except Exception as exc:  # protobuf raises several unrelated types on garbage
            raise ModelError(path, f"not a readable ONNX model ({exc.__class__.__name__})") from None
    return model_or_path, None


def first_line(exc: BaseException) -> str:
    """An exception's first line (at most 200 characters) for a one-line error, else its class name."""
    return str(exc).splitlines()[0][:200] if str(exc) else exc.__class__.__name__


def _opset(model) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _image_input(model, label) -> object:
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs) or "none"
        raise ModelError(label, f"the model must have one image input [N,3,H,W], it has {len(inputs)} ({names})")
    x = inputs[0]
    t = x.type.tensor_type
    from onnx import TensorProto

    if t.elem_type != TensorProto.FLOAT or len(t.shape.dim) != 4:
        raise ModelError(label, f"the model's input {x.name!r} is not a float32 image [N,3,H,W]")
    c = t.shape.dim[1]
    if c.HasField("dim_value") and c.dim_value != 3:
        raise ModelError(label, f"the model's input {x.name!r} has {c.dim_value} channels, not 3")
    return x


TO_CHANNELS_LAST = "__to_channels_last"  # suffix of the Transpose channels_first puts first


def channels_first(model) -> bool:
    """A model whose one image input is channels last, [N, H, W, 3] (Keras; tf2onnx without
    --inputs-as-nchw), takes [N, 3, H, W] instead: a Transpose to its own layout goes first (in place).
    Returns whether it did; an input [N, 3, H, W] is left as it is."""
    from onnx import helper

    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1 or len(inputs[0].type.tensor_type.shape.dim) != 4:
        return False
    x = inputs[0]
    dims = x.type.tensor_type.shape.dim

    def three(d) -> bool:
        return d.HasField("dim_value") and d.dim_value == 3

    if three(dims[1]) or not three(dims[3]):
        return False
    taken = {i for n in model.graph.node for i in (*n.input, *n.output)} | inits
    name, new = x.name, f"{x.name}__nchw"
    while new in taken:
        new += "_"
    order = [copy.deepcopy(dims[i]) for i in (0, 3, 1, 2)]
    del dims[:]
    dims.extend(order)
    x.name = new
    node = helper.make_node("Transpose", [new], [name], perm=[0, 2, 3, 1], name=f"{name}{TO_CHANNELS_LAST}")
    model.graph.node.insert(0, node)
    return True


def as_float32(model) -> tuple[object, bool]:
    """A half-precision model (float16 image input or weights, as `model.half()` exports or a float16
    conversion writes) as a float32 copy: the transform and its checks compute in float32. Returns
    (model, whether it was converted)."""
    from onnx import TensorProto

    from pbv_onnx.export.graph.fd import retyped

    half = TensorProto.FLOAT16
    if not any(i.type.tensor_type.elem_type == half for i in model.graph.input) and not any(
        t.data_type == half for t in model.graph.initializer
    ):
        return model, False
    return retyped(model, "float16", "float32"), True


def prepare(
    model_or_path, cut: str | None = None, input_size: tuple[int, int] | None = None, whole: bool = False
) -> Prepared:
    """Fix the image's H, W, fold what does not depend on the image, find the image path to `cut`
    (a tensor name; default the graph's first output). `whole`: keep what every graph output needs
    (for listing layers), not only the cut."""
    import onnx
    from onnx import helper, numpy_helper

    model, label = load(model_or_path)
    model = copy.deepcopy(model)
    channels_first(model)
    model, _ = as_float32(model)
    opset = _opset(model)
    if opset < OPSET:
        try:
            from onnx import version_converter

            model = version_converter.convert_version(model, OPSET)
        except Exception as exc:
            raise ModelError(
                label, f"opset {opset} is older than {OPSET} and could not be converted ({exc.__class__.__name__})"
            ) from None
        opset = OPSET
    graph = model.graph
    x = _image_input(model, label)
    dims = x.type.tensor_type.shape.dim
    if input_size is None:
        if not (dims[2].HasField("dim_value") and dims[3].HasField("dim_value")):
            raise UsageError(
                label, "the model's input has no fixed height and width: give the input size", "input_size"
            )
        input_size = (int(dims[2].dim_value), int(dims[3].dim_value))
    input_size = (int(input_size[0]), int(input_size[1]))

    # names: the image input becomes `image`; a tensor already named as a format I/O is suffixed
    names = {i for n in graph.node for i in (*n.input, *n.output)} | {t.name for t in graph.initializer}
    renamed = {x.name: IMAGE} if x.name != IMAGE else {}
    for r in RESERVED:
        if r in names and r != x.name:
            renamed[r] = f"{r}__fwd"
    outputs = [o.name for o in graph.output]
    if cut is None:
        cut = outputs[0]
    if cut in {t.name for t in graph.initializer}:
        raise UsageError(label, f"tensor {cut!r} is a constant (a weight), not a layer", "layer")
    if cut not in names:
        some = ", ".join(sorted(n.output[0] for n in graph.node if n.output)[:5])
        raise UsageError(
            label,
            f"no tensor {cut!r} in the model (e.g. {some}; the layers option of `pbv-onnx info` lists them all)",
            "layer",
        )
    cut = renamed.get(cut, cut)

    def rn(name: str) -> str:
        return renamed.get(name, name)

    # constants: initializers and Constant nodes
    values: dict[str, np.ndarray] = {rn(t.name): numpy_helper.to_array(t) for t in graph.initializer}
    nodes = []
    for node in graph.node:
        for i, v in enumerate(node.input):
            node.input[i] = rn(v)
        for i, v in enumerate(node.output):
            node.output[i] = rn(v)
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            values[node.output[0]] = _constant_value(node)
        else:
            nodes.append(node)

    # dependence on the image: through values (path), or through shapes only (shape computations)
    data, shape_dep = {IMAGE}, set()
    for node in nodes:
        ins = [i for i in node.input if i]
        if any(i in data for i in ins) and node.op_type not in SHAPE_ONLY:
            data.update(o for o in node.output if o)
        elif any(i in data or i in shape_dep for i in ins):
            shape_dep.update(o for o in node.output if o)

    # only what the cut needs
    roots = [rn(o) for o in outputs] if whole else [cut]
    needed = ancestors(nodes, roots)
    nodes = [n for n in nodes if any(o in needed for o in n.output)]
    if cut not in data:
        raise UsageError(label, f"tensor {cut!r} does not depend on the image", "layer")

    # evaluate every tensor at two batch sizes: static shapes, batch axes, batch-free shape values
    rebatched = any(p.key == REBATCHED for p in model.metadata_props)
    try:
        outs = [o for n in nodes for o in n.output if o]
        runs, dtypes = _probe(nodes, values, input_size, opset, outs, label, shape_only=data)
        # a batch-1 export may run at batch 2 yet merge the batch into a root's axis (Reshape [1, -1])
        fixed = dims[0].HasField("dim_value") and any(
            "N" not in _symbolic_shape(runs[0][r].shape, runs[1][r].shape) for r in roots if r in runs[0] and r in data
        )
    except BatchFixedError:
        if rebatched:
            raise
        fixed = True
    if fixed and not rebatched:  # the batch size baked in: made batch-free (checked), prepared again
        from pbv_onnx.export.graph.rebatch import rebatch_graph

        batch_free, notes = rebatch_graph(nodes, values, roots, x, input_size, opset, label)
        prep = prepare(batch_free, cut, input_size, whole)
        prep.renamed = renamed
        prep.rebatched = notes
        return prep
    dtypes[IMAGE] = onnx.TensorProto.FLOAT
    for name, v in values.items():
        dtypes.setdefault(name, helper.np_dtype_to_tensor_dtype(np.asarray(v).dtype))
    shapes: dict[str, tuple] = {IMAGE: ("N", 3, *input_size)}
    for name in runs[0]:
        shapes[name] = _symbolic_shape(runs[0][name].shape, runs[1][name].shape)
    for name, v in values.items():
        shapes[name] = tuple(int(d) for d in v.shape)

    # fold: nodes not depending on the image at all, and shape computations free of the batch size
    folded_names = set()
    for node in nodes:
        outs = [o for o in node.output if o]
        if any(o in data for o in outs):
            continue
        if all(o in runs[0] and _same(runs[0][o], runs[1][o]) for o in outs):
            for o in outs:
                values[o] = runs[0][o]
                shapes[o] = tuple(int(d) for d in runs[0][o].shape)
            folded_names.update(outs)
    kept = [n for n in nodes if not all(o in folded_names for o in n.output if o)]
    batch_values = {
        o: (runs[0][o], runs[1][o])
        for n in kept
        for o in n.output
        if o and o not in data and o in runs[0] and runs[0][o].dtype.kind in "iu" and runs[0][o].size <= _SMALL
    }
    # the graph: kept nodes; initializers for every constant they read
    read = {i for n in kept for i in n.input if i} | {cut}
    inits = [numpy_helper.from_array(np.asarray(values[t]), t) for t in sorted(read) if t in values]
    image = helper.make_tensor_value_info(IMAGE, onnx.TensorProto.FLOAT, ["N", 3, *input_size])
    out_type = dtypes.get(cut, onnx.TensorProto.FLOAT)
    out = helper.make_tensor_value_info(cut, out_type, list(shapes[cut]))
    g = helper.make_graph(kept, graph.name or "forward", [image], [out], initializer=inits)
    fwd = helper.make_model(g, opset_imports=[o for o in model.opset_import])
    fwd.ir_version = model.ir_version
    cut_layout = None
    if not whole:  # a channels-last cut is turned to [N, C, h, w], tokens to [N, T, C] (pooling and maps read them so)
        from pbv_onnx.export.graph.axes import layouts

        cut_layout = layouts(fwd, IMAGE, shapes).get(cut)
        turned = _turn(fwd, cut, cut_layout, shapes, dtypes)
        if turned:
            cut, roots = turned, [turned]
            data.add(turned)

    kept = list(fwd.graph.node)  # the graph's own node objects (make_graph copied them)
    needed_kept = ancestors(kept, roots)
    prod = {o: n for n in kept for o in n.output if o}
    path = {t for t in data if t in needed_kept}
    consumers: dict[str, list] = {}
    for n in kept:
        for i in n.input:
            if i:
                consumers.setdefault(i, []).append(n)
    return Prepared(
        model=fwd,
        cut=cut,
        input_size=input_size,
        opset=opset,
        shapes=shapes,
        dtypes=dtypes,
        values={k: v for k, v in values.items() if k in read or k in folded_names},
        path=path,
        producer=prod,
        consumers=consumers,
        renamed=renamed,
        folded=len(nodes) - len(kept),
        batch_values=batch_values,
        cut_layout=cut_layout,
    )


def _turn(fwd, cut: str, order, shapes: dict, dtypes: dict) -> str | None:
    """A Transpose after `cut` to the layout pooling and maps read, where its layout `order` is another
    (axes.canonical_perm): added to `fwd` as its output, with its shape and type; returns its name."""
    import onnx
    from onnx import helper

    from pbv_onnx.export.graph.axes import CANONICAL, TO_CHANNELS_FIRST, canonical_perm

    perm = canonical_perm(order)
    if perm is None:
        return None
    taken = {i for n in fwd.graph.node for i in (*n.input, *n.output)} | {t.name for t in fwd.graph.initializer}
    new = f"{cut}__{''.join(CANONICAL[len(perm)]).lower()}"
    while new in taken:
        new += "_"
    fwd.graph.node.append(helper.make_node("Transpose", [cut], [new], perm=perm, name=f"{new}{TO_CHANNELS_FIRST}"))
    shapes[new] = tuple(shapes[cut][p] for p in perm)
    dtypes[new] = dtypes.get(cut, onnx.TensorProto.FLOAT)
    del fwd.graph.output[:]
    fwd.graph.output.append(helper.make_tensor_value_info(new, dtypes[new], list(shapes[new])))
    return new


def ancestors(nodes, roots) -> set[str]:
    """The tensors `roots` are computed from (themselves included), through `nodes`."""
    producer = {o: n for n in nodes for o in n.output if o}
    needed, stack = set(), list(roots)
    while stack:
        t = stack.pop()
        if t in needed:
            continue
        needed.add(t)
        node = producer.get(t)
        if node is not None:
            stack.extend(i for i in node.input if i)
    return needed


def _constant_value(node) -> np.ndarray:
    from onnx import helper, numpy_helper

    attr = node.attribute[0]
    if attr.name == "value":
        return numpy_helper.to_array(attr.t)
    v = helper.get_attribute_value(attr)
    dtype = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}
    if attr.name in dtype:
        return np.array(v, dtype[attr.name])
    raise ModelError(None, f"Constant node {node.name!r} with {attr.name} is not supported")


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")


def _symbolic_shape(s2, s3) -> tuple:
    """Shapes at batch 2 and 3 -> static dims, the batch axis "N" (or "N*h")."""
    out = []
    for a, b in zip(s2, s3):
        if a == b:
            out.append(int(a))
        else:
            h = b - a
            out.append("N" if h == 1 else f"N*{h}")
    return tuple(out)


def forward_model(nodes, values, input_size, opset: int, batch: int | str = "N"):
    """The forward `nodes` as a model (input `image` [batch, 3, H, W], constants from `values`, no
    outputs yet), and the elem types shape inference gives its tensors."""
    import onnx
    from onnx import helper, numpy_helper

    used = {i for n in nodes for i in n.input if i}
    inits = [numpy_helper.from_array(np.asarray(values[t]), t) for t in sorted(used) if t in values]
    image = helper.make_tensor_value_info(IMAGE, onnx.TensorProto.FLOAT, [batch, 3, *input_size])
    g = helper.make_graph(list(nodes), "forward", [image], [], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    try:
        inferred = onnx.shape_inference.infer_shapes(m)
    except Exception:
        inferred = m
    return m, {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}


def exact_session(model):
    """An onnxruntime CPU session running `model` as written (graph optimisations off: every tensor is
    what the graph says) and silent: a failure is the caller's one-line error, not a log line."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _probe(nodes, values, input_size, opset, names, label, shape_only=frozenset()):
    """Run the forward nodes at two batch sizes with onnxruntime: every tensor's value (for names in
    `shape_only`, the image path's activations, a zero-strided view of its shape: no memory), elem types."""
    from onnx import helper

    m, dtypes = forward_model(nodes, values, input_size, opset)
    outs = [n for n in names if dtypes.get(n)]
    for n in outs:
        m.graph.output.append(helper.make_tensor_value_info(n, dtypes[n], None))
    try:
        sess = exact_session(m)
    except Exception as exc:
        raise ModelError(label, f"onnxruntime cannot run the forward graph ({first_line(exc)})") from None
    rng = np.random.default_rng(0)
    runs = []
    for n in _PROBE:
        x = rng.standard_normal((n, 3, *input_size)).astype(np.float32)
        try:
            got = sess.run(outs, {IMAGE: x})
        except Exception as exc:
            why = first_line(exc)
            raise BatchFixedError(
                label,
                f"onnxruntime cannot run the forward graph at batch {n} (does the model fix its batch size? {why})",
            ) from None
        runs.append(
            {n: np.broadcast_to(np.zeros((), v.dtype), v.shape) if n in shape_only else v for n, v in zip(outs, got)}
        )
        del got
    return runs, dtypes
