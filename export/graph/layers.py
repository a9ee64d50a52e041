"""The tensors of an ONNX forward model one can cut at (for `pbv-onnx info --layers`)."""

from __future__ import annotations

from pbv_onnx.export.graph.builder import is_batch


def list_layers(model, input_size: tuple[int, int] | None = None, with_layout: bool = False) -> list[tuple]:
    """(tensor name, op type, shape with the batch "N") of every float tensor that depends on the
    image's values and has the batch axis first: shape computations and constants are skipped. With
    `with_layout`, a fourth entry: a 4-D tensor's axes as far as they follow from the image ("NCHW",
    "NHWC" for channels last), a 3-D one's ("NTC" tokens, "NCT" channels first), "?" where they do not
    follow (axes.layouts), "" for other ranks."""
    import onnx

    from pbv_onnx.export.graph.axes import layouts
    from pbv_onnx.export.graph.prepare import TO_CHANNELS_LAST, prepare
    from pbv_onnx.runtime.modelfile import IMAGE

    prep = prepare(model, None, input_size, whole=True)
    back = {v: k for k, v in prep.renamed.items()}
    axes = layouts(prep.model, IMAGE, prep.shapes) if with_layout else {}
    out = []
    for node in prep.model.graph.node:
        if node.name.endswith(TO_CHANNELS_LAST):  # the layout change put before a channels-last model
            continue
        for name in node.output:
            shape = prep.shapes.get(name)
            if not name or name not in prep.path or shape is None:
                continue
            if prep.dtypes.get(name) != onnx.TensorProto.FLOAT or not shape or shape[0] != "N":
                continue
            if any(is_batch(d) for d in shape[1:]):
                continue
            row = (back.get(name, name), node.op_type, shape)
            if with_layout:
                row += ("".join(axes.get(name, "?")) if len(shape) in (3, 4) else "",)
            out.append(row)
    return out
