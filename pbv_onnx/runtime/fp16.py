"""A float16 copy of an exported graph, keeping the ops that need float32 in float32."""

from __future__ import annotations

import json

from pbv_onnx.base.errors import ModelError

PRECISIONS = ("fp32", "fp16")
# Metadata key: the ops that must stay float32 in a float16 copy (op type -> its float inputs),
# assembled by the export stage from the adjoint rules that built the graph.
FP32_ONLY_KEY = "fp32_only"
# The table for models exported before it was recorded: onnxruntime's CPU provider has no float16
# ScatterElements with reduction=add (the max-pool adjoint), and summing gradients in float16
# would lose them; the masks' HardSigmoid steps use slopes up to 2^126, which float16 arithmetic
# would turn into inf * 0.
FP32_ONLY = {"ScatterElements": (0, 2), "HardSigmoid": (0,)}
# Inputs that ONNX defines as float32 whatever the data's type (Resize's roi and scales: the
# un-pooling's constant scales, which the float16 conversion would otherwise halve too).
FP32_INPUTS = {"Resize": (1, 2)}


def fp32_only(proto) -> dict[str, tuple[int, ...]]:
    """The model's own fp32-only table from its metadata, else FP32_ONLY (older exports)."""
    props = {p.key: p.value for p in proto.metadata_props}
    if FP32_ONLY_KEY not in props:
        return dict(FP32_ONLY)
    try:
        table = json.loads(props[FP32_ONLY_KEY])
        return {str(op): tuple(int(i) for i in inputs) for op, inputs in table.items()}
    except (ValueError, TypeError, AttributeError):
        raise ModelError(
            None,
            f"model metadata {FP32_ONLY_KEY!r} is not a table of op types to input "
            f"indices: {props[FP32_ONLY_KEY][:80]!r}",
        ) from None


def to_fp16(proto):
    """A float16 copy of the model (weights and compute), float32 inputs and outputs; the ops of
    its fp32-only table (`fp32_only`) run in float32 between casts, FP32_INPUTS read their inputs
    cast back to float32. The original is left as it is."""
    import copy

    from onnx import TensorProto, helper
    from onnxruntime.transformers.float16 import convert_float_to_float16

    keep = fp32_only(proto)
    half = convert_float_to_float16(copy.deepcopy(proto), keep_io_types=True, disable_shape_infer=True)
    nodes = []
    for node in half.graph.node:
        for i in (*FP32_INPUTS.get(node.op_type, ()), *keep.get(node.op_type, ())):
            if i < len(node.input) and node.input[i]:
                name = f"{node.name}_in{i}_fp32"
                nodes.append(helper.make_node("Cast", [node.input[i]], [name], name=name, to=TensorProto.FLOAT))
                node.input[i] = name
        if node.op_type not in keep:
            nodes.append(node)
            continue
        out = node.output[0]
        node.output[0] = f"{node.name}_out_fp32"
        nodes.append(node)
        nodes.append(
            helper.make_node("Cast", [node.output[0]], [out], name=f"{node.name}_out_fp16", to=TensorProto.FLOAT16)
        )
    del half.graph.node[:]
    half.graph.node.extend(nodes)
    return half
