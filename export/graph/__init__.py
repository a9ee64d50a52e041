"""The ONNX-graph adjoint transform (onnx and numpy only, never torch): any ONNX forward model ->
the project's model format with its gradient graph. docs/adjoint-transform.md describes it.

Note: `transform` here is the function; the module is `pbv_onnx.export.graph.transform` (import it
with importlib or `from pbv_onnx.export.graph.transform import ...`)."""

from pbv_onnx.export.graph.layers import list_layers
from pbv_onnx.export.graph.rules import (
    PATTERNS,
    RULES,
    GraphPattern,
    GraphRule,
    UnsupportedOp,
    load_rules,
    register,
    register_pattern,
)
from pbv_onnx.export.graph.transform import build, describe, fp32_table, transform

__all__ = [
    "PATTERNS",
    "RULES",
    "GraphPattern",
    "GraphRule",
    "UnsupportedOp",
    "build",
    "describe",
    "fp32_table",
    "list_layers",
    "load_rules",
    "register",
    "register_pattern",
    "transform",
]
