"""Patterns for strided depthwise convolutions: the K-per-image adjoint kept as four stride-2 phases.

A depthwise 3x3 conv of stride 2 and padding 1 on an even-sized input, y[i] = w[0] x[2i-1] + w[1] x[2i]
+ w[2] x[2i+1] per axis, has the input gradient w[1] g[m] at 2m and w[2] g[m] + w[0] g[m+1] at 2m+1:
four small depthwise Convs of g, one per output phase (a, b) = (row, column parity), with no zeros
inserted. Back from the conv's input to a widening 1x1 conv every op is per pixel (BatchNorm scales,
ReLU / ReLU6 masks), so the phases pass through them (each mask cut into its phases by a strided
one-hot depthwise Conv of the forward tensor) and through the 1x1 adjoint, which narrows the channels;
the phases are interleaved once, on the 1x1's input channels (a grouped 2x2 ConvTranspose of one-hot
kernels). On mobilenet_v2 that is a 16-channel interleave instead of a 96-channel zero insertion at
112x112 (the retired torch.fx adjoints' choice, measured there: docs/performance.md). Only the K-per-image pass:
in the one-per-image pass the masks cut into phases are as large as the gradients (17% slower there,
docs/performance.md), so that pass keeps ConvRule's zero-upsampled adjoint."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import helper

from pbv_onnx.export.graph.ops_conv import _attr, _bn_scale, _folded_bn, _pads, _spatial
from pbv_onnx.export.graph.ops_pointwise import ClipRule, ReluRule
from pbv_onnx.export.graph.rules import GraphPattern, example_model, example_weights, register_pattern

# Per axis, the taps of the (zero-padded) kernel [0, w0, w1, w2] each output phase reads: even pixels
# w[1]; odd pixels [0, w[2], w[0]] with padding 1 on both sides (w[2] g[m] + w[0] g[m+1]): a zero tap
# instead of a one-sided Pad, which onnxruntime runs outside its blocked layout.
_TAPS = {0: [2], 1: [0, 3, 1]}
_PHASES = ((0, 0), (0, 1), (1, 0), (1, 1))


def _onehot(c: int, a: int, b: int) -> np.ndarray:
    """[c, 1, 2, 2] depthwise kernels picking pixel (a, b) of each 2x2 block."""
    kernel = np.zeros((c, 1, 2, 2), np.float32)
    kernel[:, 0, a, b] = 1.0
    return kernel


@dataclass
class _Chain:
    """A matched chain: the 1x1 conv, the per-pixel nodes between it and the strided conv (forward
    order), the strided conv's phase kernels (its folded BatchNorm applied) and the sizes."""

    pointwise: object  # the 1x1 Conv node
    between: list
    kernels: dict
    c: int  # channels of the chain (the 1x1's output, the depthwise conv's)
    cin: int  # the 1x1's input channels
    half: tuple[int, int]  # the strided conv's output size


@register_pattern
class StridedDepthwisePhases(GraphPattern):
    name = "strided_depthwise_phases"
    root_op = "Conv"
    description = (
        "strided depthwise 3x3/2 Conv back to a widening 1x1 Conv through BatchNorm and ReLU/ReLU6 (K-per-image "
        "pass): the adjoint as four output phases, masks cut into phases, the 1x1 adjoint per phase, interleaved "
        "once on its input channels by a grouped one-hot 2x2 ConvTranspose"
    )
    fp32_only = {"HardSigmoid": (0,)}  # the masks' steps (slopes up to 2^126)

    def match(self, ctx, node):
        if not ctx.multi or len(node.input) < 2:
            return None
        wv = ctx.value(node.input[1])
        if wv is None or wv.ndim != 4 or any(ctx.on_path(n) for n in node.input[1:]):
            return None
        c = int(wv.shape[0])
        if tuple(wv.shape) != (c, 1, 3, 3) or int(_attr(node, "group", 1)) != c:
            return None
        if list(_attr(node, "strides", [1, 1])) != [2, 2] or list(_attr(node, "dilations", [1, 1])) != [1, 1]:
            return None
        xs, ys = ctx.shape(node.input[0]), ctx.shape(node.output[0])
        if xs is None or ys is None or len(xs) != 4 or xs[0] != "N" or any(isinstance(d, str) for d in xs[1:]):
            return None
        x_hw, y_hw = _spatial(ctx, node)
        if x_hw != [2 * y_hw[0], 2 * y_hw[1]] or _pads(node, x_hw, y_hw, [3, 3], [2, 2], [1, 1]) != [1, 1, 1, 1]:
            return None
        # back through per-pixel nodes, each output read by the next node only (so no other cotangent
        # reaches the chain's inner tensors), to the widening 1x1 conv
        between, t = [], node.input[0]
        while True:
            if t == ctx.prep.cut or len(ctx.consumers(t)) != 1 or not ctx.on_path(t):
                return None
            prod = ctx.producer(t)
            if prod is None:
                return None
            if prod.op_type == "Conv":
                break
            if prod.op_type == "BatchNormalization":
                if any(ctx.on_path(n) for n in prod.input[1:]) or _bn_scale(ctx, prod) is None:
                    return None
            elif prod.op_type == "Clip":
                if any(ctx.value(n) is None for n in prod.input[1:] if n):
                    return None
            elif prod.op_type != "Relu":
                return None
            if len(prod.output) != 1:
                return None
            between.insert(0, prod)
            t = prod.input[0]
        pw = ctx.value(prod.input[1]) if len(prod.input) > 1 else None
        if (
            pw is None
            or any(ctx.on_path(n) for n in prod.input[1:])
            or not ctx.on_path(prod.input[0])
            or pw.shape[0] != c
            or tuple(pw.shape[2:]) != (1, 1)
            or int(pw.shape[1]) > c
            or int(_attr(prod, "group", 1)) != 1
            or list(_attr(prod, "strides", [1, 1])) != [1, 1]
            or list(_attr(prod, "dilations", [1, 1])) != [1, 1]
            or _pads(prod, x_hw, x_hw, [1, 1], [1, 1], [1, 1]) != [0, 0, 0, 0]
        ):
            return None
        w = np.asarray(wv, np.float64)
        bn = _folded_bn(ctx, node)  # its BatchNorm's rule passes g on: the scale goes into the kernels
        if bn is not None:
            w = w * _bn_scale(ctx, bn).reshape(-1, 1, 1, 1)
        padded = np.zeros((c, 1, 4, 4))  # w at [1:, 1:], a zero tap at index 0
        padded[:, :, 1:, 1:] = w
        kernels = {(a, b): np.ascontiguousarray(padded[:, :, _TAPS[a]][:, :, :, _TAPS[b]]) for a, b in _PHASES}
        return _Chain(prod, between, kernels, c, int(pw.shape[1]), (int(y_hw[0]), int(y_hw[1])))

    def vjp(self, ctx, node, match, grads):
        g = grads[0]
        if g is None:
            return {}
        c, cin, (h, w) = match.c, match.cin, match.half
        # the per-pixel Jacobians of the chain: BatchNorm scales fold into the 1x1 adjoint's weights
        # (per channel), masks (per pixel) multiply each phase
        scale = np.ones(c)
        masks = []
        for n in match.between:
            if n.op_type == "BatchNormalization":
                scale = scale * _bn_scale(ctx, n)
            elif n.op_type == "Relu":
                masks.append(ReluRule().derivative(ctx, n))
            else:
                masks.append(ClipRule().derivative(ctx, n))
        mask = masks[0] if len(masks) == 1 else (ctx.forward("Mul", masks) if masks else None)
        pw = match.pointwise
        wt = pw.input[1]
        if not np.allclose(scale, 1.0):
            wt = ctx.forward("Mul", [wt, ctx.const(scale.reshape(-1, 1, 1, 1).astype(np.float32))])
        # [C, cin, 1, 1] -> [cin, C, 1, 1]: the 1x1 adjoint's weights (an op on the initializer, folded by
        # onnxruntime at session start)
        wt = ctx.forward("Transpose", [wt], perm=[1, 0, 2, 3], _shape=(cin, c, 1, 1))
        phase_shape = ("N", c, h, w)
        parts = []
        for a, b in _PHASES:
            p = ctx.emit(
                "Conv", [g, ctx.const(match.kernels[(a, b)], "phase_w")], pads=[a, b, a, b], group=c, _shape=phase_shape
            )
            if mask is not None:
                # the mask's phase (a, b): a strided one-hot depthwise Conv of the forward tensor, which
                # onnxruntime runs in its blocked layout and shape inference follows (a strided Slice
                # does neither); ctx.mul multiplies through [N, K, ...] x [N, 1, ...] views
                pm = ctx.forward(
                    "Conv", [mask, ctx.const(_onehot(c, a, b), "phase_onehot")], strides=[2, 2], group=c,
                    _shape=phase_shape,
                )  # fmt: skip
                p = ctx.mul(p, pm, phase_shape)
            q = ctx.emit("Conv", [p, wt], _shape=("N", cin, h, w))
            parts.append(ctx.emit("Unsqueeze", [q, ctx.const(np.array([2], np.int64))], _shape=("N", cin, 1, h, w)))
        stacked = ctx.emit("Concat", parts, axis=2, _shape=("N", cin, 4, h, w))
        stacked = ctx.emit("Reshape", [stacked, ctx.const(np.array([-1, 4 * cin, h, w], np.int64))])
        # channel 4i + 2a + b (phase (a, b) of channel i) to pixel (a, b) of output channel i
        inter = np.stack([_onehot(cin, a, b) for a, b in _PHASES], 1).reshape(4 * cin, 1, 2, 2)
        gx = ctx.emit(
            "ConvTranspose", [stacked, ctx.const(inter, "interleave_w")], strides=[2, 2], group=cin,
            _shape=("N", cin, 2 * h, 2 * w),
        )  # fmt: skip
        return {pw.input[0]: gx}

    @classmethod
    def examples(cls):
        rng = np.random.default_rng(5)

        def bn(name: str, ch: int) -> tuple[object, dict]:
            p = {f"{name}_g": rng.uniform(0.5, 2, ch), f"{name}_b": rng.standard_normal(ch),
                 f"{name}_m": rng.standard_normal(ch) * 0.3, f"{name}_v": rng.uniform(0.5, 2, ch)}  # fmt: skip
            return helper.make_node("BatchNormalization", [f"{name}_in", *p], [f"{name}_out"]), p

        dw = dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
        out = []
        # 1x1 conv 3->8, BN, ReLU6, dw 3x3/2 on 8x8, BN (folded into the phase kernels)
        bn1, p1 = bn("bn1", 8)
        bn2, p2 = bn("bn2", 8)
        nodes = [
            helper.make_node("Conv", ["x", "w1"], ["bn1_in"], kernel_shape=[1, 1]),
            bn1,
            helper.make_node("Clip", ["bn1_out", "lo", "hi"], ["r"]),
            helper.make_node("Conv", ["r", "dw"], ["bn2_in"], group=8, **dw),
            bn2,
        ]
        inits = {"w1": example_weights(1, 8, 3, 1, 1, scale=3.0), "dw": example_weights(2, 8, 1, 3, 3, scale=0),
                 "lo": np.float32(0), "hi": np.float32(6), **p1, **p2}  # fmt: skip
        out.append(example_model(nodes, (3, 8, 8), inits, out="bn2_out", name="dw_phases_bn"))
        # 16 channels (ReLU6 as the fused two-pass mask), biases, a ReLU6 after the strided conv and a
        # 1x1 projection; the 1x1's input is also read by a residual branch (its cotangents summed)
        nodes = [
            helper.make_node("Conv", ["x", "w0", "b0"], ["t"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
            helper.make_node("Conv", ["t", "w1", "b1"], ["e"], kernel_shape=[1, 1]),
            helper.make_node("Clip", ["e", "lo", "hi"], ["r"]),
            helper.make_node("Conv", ["r", "dw", "db"], ["d"], group=16, **dw),
            helper.make_node("Clip", ["d", "lo", "hi"], ["dr"]),
            helper.make_node("Conv", ["dr", "w2"], ["pj"], kernel_shape=[1, 1]),
            helper.make_node("AveragePool", ["t"], ["tp"], kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node("Add", ["pj", "tp"], ["y"]),
        ]
        inits = {"w0": example_weights(3, 4, 3, 3, 3, scale=0), "b0": example_weights(4, 4),
                 "w1": example_weights(5, 16, 4, 1, 1, scale=3.0), "b1": example_weights(6, 16),
                 "dw": example_weights(7, 16, 1, 3, 3, scale=0), "db": example_weights(8, 16),
                 "w2": example_weights(9, 4, 16, 1, 1, scale=0), "lo": np.float32(0), "hi": np.float32(6)}  # fmt: skip
        out.append(example_model(nodes, (3, 10, 6), inits, name="dw_phases_relu6"))
        # Relu then a BatchNorm between (a mask and a scale), on the image's own 3 channels widened to 3
        bn3, p3 = bn("bn3", 3)
        nodes = [
            helper.make_node("Conv", ["x", "w1"], ["e"], kernel_shape=[1, 1]),
            helper.make_node("Relu", ["e"], ["bn3_in"]),
            bn3,
            helper.make_node("Conv", ["bn3_out", "dw"], ["y"], group=3, **dw),
        ]
        inits = {"w1": example_weights(10, 3, 3, 1, 1, scale=0), "dw": example_weights(11, 3, 1, 3, 3, scale=0), **p3}
        out.append(example_model(nodes, (3, 6, 4), inits, name="dw_phases_relu_bn"))
        return out
