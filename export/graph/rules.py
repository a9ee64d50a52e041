"""The rule registry of the ONNX-graph adjoint transform: one `GraphRule` class per op type.

A rule emits the adjoint of one node through a `Ctx` (builder.py) as plain ONNX ops that stock
onnxruntime runs, and gives small example models the registry test (tests/runtime/test_graph_rules.py)
checks it on against float64 finite differences. docs/adjoint-transform.md says how to add one."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from pbv_onnx.base.errors import ModelError

if TYPE_CHECKING:
    import onnx

    from pbv_onnx.export.graph.builder import Ctx

FLOAT_TYPES = (1, 10, 11, 16)  # onnx FLOAT, FLOAT16, DOUBLE, BFLOAT16: the types gradients flow through
# The opset of the examples (and the minimum the transform accepts).
OPSET = 17


class UnsupportedOp(ModelError):
    """A node on the image path with no adjoint rule (or a variant its rule cannot handle); exit code 4."""


def unsupported(node, why: str = "") -> UnsupportedOp:
    """The one-line refusal naming the node's op type and name (and, for a variant, what about it)."""
    what = f"{node.op_type} node {node.name or node.output[0]!r}"
    detail = f" ({why})" if why else ""
    return UnsupportedOp(
        None,
        f"no adjoint for the {what}{detail} on the image path; cut the network earlier "
        "(layer) or add a rule in export/graph/ (docs/adjoint-transform.md)",
        param="layer",
    )


class GraphRule:
    """One ONNX op type (default domain): its adjoint, emitted through a Ctx.

    `fp32_only`: ONNX op type -> its float inputs, for the ops the adjoint emits that a float16 copy
    must keep in float32 (recorded in the model's metadata, see pbv_onnx/runtime/fp16.py)."""

    op_type: ClassVar[str] = ""
    description: ClassVar[str] = ""
    fp32_only: ClassVar[dict[str, tuple[int, ...]]] = {}

    def vjp(self, ctx: Ctx, node: onnx.NodeProto, grads: list[str | None]) -> list[str | None]:
        """Emit the adjoint of `node`: grads[i] is the cotangent of node.output[i] (None: none flows);
        return one entry per node.input, its cotangent's name or None (off the image path)."""
        raise NotImplementedError

    @classmethod
    def examples(cls) -> list[onnx.ModelProto]:
        """Small float32 forward models (opset 17, input "x" [N, ...], one output) using the op."""
        return []

    @property
    def name(self) -> str:
        return self.op_type

    def __repr__(self) -> str:
        return f"<graph rule {self.op_type}>"


RULES: dict[str, type[GraphRule]] = {}


def register(cls: type[GraphRule]) -> type[GraphRule]:
    """Class decorator: add a rule to the registry (one per op type)."""
    if not cls.op_type:
        raise ValueError(f"graph rule {cls.__name__} sets no op_type")
    if not cls.description or "\n" in cls.description:
        raise ValueError(f"graph rule {cls.__name__} needs a one-line description")
    other = RULES.get(cls.op_type)
    if other is not None and other.__qualname__ != cls.__qualname__:  # re-import of the same module is fine
        raise ValueError(f"graph rule {cls.__name__} claims {cls.op_type}, already {other.__name__}'s")
    RULES[cls.op_type] = cls
    return cls


class GraphPattern:
    """A chain of forward nodes ending at one node (the root, of type `root_op`) whose adjoint costs
    fewer full-size passes emitted as one than node by node (SiLU: x * Sigmoid(x)). Tried, in
    registration order, before the root's own rule; the chain's inner nodes then get cotangents only
    from readers outside the chain, so their rules still run for those (the chain rule sums paths)."""

    name: ClassVar[str] = ""
    root_op: ClassVar[str] = ""
    description: ClassVar[str] = ""
    fp32_only: ClassVar[dict[str, tuple[int, ...]]] = {}

    def match(self, ctx: Ctx, node: onnx.NodeProto) -> Any | None:
        """What vjp needs about the chain ending at `node`, or None where it is not this pattern."""
        raise NotImplementedError

    def vjp(self, ctx: Ctx, node: onnx.NodeProto, match: Any, grads: list[str | None]) -> dict[str, str]:
        """Emit the chain's adjoint from its root's output cotangents (`grads`, as GraphRule.vjp gets);
        return {forward tensor: its cotangent through the chain}, for tensors the chain reads."""
        raise NotImplementedError

    @classmethod
    def examples(cls) -> list[onnx.ModelProto]:
        """Small float32 forward models (as GraphRule.examples) in which the pattern matches."""
        return []

    def __repr__(self) -> str:
        return f"<graph pattern {self.name}>"


PATTERNS: dict[str, type[GraphPattern]] = {}


def register_pattern(cls: type[GraphPattern]) -> type[GraphPattern]:
    """Class decorator: add a pattern to the registry (by name; several may share a root op)."""
    if not cls.name or not cls.root_op:
        raise ValueError(f"graph pattern {cls.__name__} needs a name and a root_op")
    if not cls.description or "\n" in cls.description:
        raise ValueError(f"graph pattern {cls.__name__} needs a one-line description")
    other = PATTERNS.get(cls.name)
    if other is not None and other.__qualname__ != cls.__qualname__:
        raise ValueError(f"graph pattern {cls.__name__} claims {cls.name!r}, already {other.__name__}'s")
    PATTERNS[cls.name] = cls
    return cls


def patterns_by_root() -> dict[str, list[GraphPattern]]:
    """Root op type -> instances of the patterns ending at it, in registration order."""
    out: dict[str, list[GraphPattern]] = {}
    for cls in PATTERNS.values():
        out.setdefault(cls.root_op, []).append(cls())
    return out


# The modules holding rules and patterns; load_rules imports them (each registers its classes on import).
RULE_MODULES = (
    "ops_conv",
    "ops_pointwise",
    "ops_shape",
    "ops_tokens",
    "fuse_strided",
    "fuse_silu",
    "fuse_gelu",
    "fuse_tokens",
)


def load_rules() -> dict[str, type[GraphRule]]:
    """Import every rule module (each registers its rules and patterns) and return the rule registry."""
    import importlib

    for mod in RULE_MODULES:
        importlib.import_module(f"pbv_onnx.export.graph.{mod}")
    return RULES


def rule_for(node) -> GraphRule:
    """An instance of the registered rule for a node, or UnsupportedOp naming it."""
    cls = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
    if cls is None:
        raise unsupported(node)
    return cls()


# -- building examples ------------------------------------------------------------------------------
def example_model(
    nodes: list,
    x_shape: tuple[int, ...],
    inits: dict[str, np.ndarray] | None = None,
    out: str = "y",
    name: str = "example",
    opset: int = OPSET,
) -> onnx.ModelProto:
    """A float32 model with input "x" [N, *x_shape] and output `out`, from nodes made with
    onnx.helper.make_node and initializers {name: array} (float arrays stored as float32)."""
    from onnx import TensorProto, helper, numpy_helper

    tensors = []
    for key, value in (inits or {}).items():
        value = np.asarray(value)
        if value.dtype.kind == "f":
            value = value.astype(np.float32)
        tensors.append(numpy_helper.from_array(value, key))
    for i, node in enumerate(nodes):
        if not node.name:
            node.name = f"{node.op_type.lower()}{i}"
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
        initializer=tensors,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def example_weights(seed: int, *shape: int, scale: float = 1.0) -> np.ndarray:
    """Seeded normal weights for examples (fan-in scaled when `scale` is 0)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape)
    if scale == 0:
        scale = 1.0 / np.sqrt(max(1, int(np.prod(shape[1:]))))
    return (w * scale).astype(np.float32)
