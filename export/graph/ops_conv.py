"""Adjoint rules of the CNN ops: Conv, BatchNormalization, pooling, Pad, Resize.

Weights stay shared: an adjoint that needs transformed weights (flipped, transposed, scaled by a
folded BatchNorm) computes them with ops on the forward's initializer, which onnxruntime folds at
session start, so the file holds each weight once."""

from __future__ import annotations

import numpy as np
from onnx import helper

from pbv_onnx.export.graph.ops_pointwise import relu_into_maxpool, step_above
from pbv_onnx.export.graph.rules import GraphRule, example_model, example_weights, register, unsupported

_INT_MIN = np.iinfo(np.int64).min


def _attr(node, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _spatial(ctx, node) -> tuple[list[int], list[int]]:
    """The static spatial sizes of a node's input and output."""
    xs, ys = ctx.shape(node.input[0]), ctx.shape(node.output[0])
    if xs is None or ys is None or any(isinstance(d, str) for d in (*xs[1:], *ys[1:])):
        raise unsupported(node, "shapes not static")
    return [int(d) for d in xs[2:]], [int(d) for d in ys[2:]]


def _pads(node, x_hw, y_hw, kernel, strides, dilations) -> list[int]:
    """Explicit [begin..., end...] pads, auto_pad resolved from the static sizes."""
    r = len(x_hw)
    auto = _attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", ""):
        return list(_attr(node, "pads", [0] * (2 * r)))
    if auto == "VALID":
        return [0] * (2 * r)
    begin, end = [], []
    for x, y, k, s, d in zip(x_hw, y_hw, kernel, strides, dilations):
        total = max(0, (y - 1) * s + d * (k - 1) + 1 - x)
        small, big = total // 2, total - total // 2
        begin.append(big if auto == "SAME_LOWER" else small)
        end.append(small if auto == "SAME_LOWER" else big)
    return begin + end


def to_blocked(ctx, t: str, shape) -> str:
    """t through an exact identity, a 1x1 depthwise Conv of ones, in the one-per-image pass, where t is
    [N, C, H, W] with C in whole blocks of onnxruntime's NCHWc layout (16): that layout is entered only
    through a Conv, and a graph input (the cotangent) or a ConvTranspose output read raw by a residual
    Add or a mask product keeps those, and every later gradient, in plain NCHW with layout conversions
    around each (measured: docs/performance.md)."""
    if ctx.multi or shape is None or len(shape) != 4 or isinstance(shape[1], str) or int(shape[1]) % 16:
        return t
    c = int(shape[1])
    return ctx.emit("Conv", [t, ctx.const(np.ones((c, 1, 1, 1), np.float32))], group=c, _shape=shape)


def transpose_to(ctx, g: str, w: str, x_hw, y_hw, kernel, strides, dilations, pads, group: int) -> str:
    """ConvTranspose(g, w) cropped or zero-extended to exactly x_hw: the adjoint of a strided window
    op (Conv with weights w, or a pool with a constant kernel), ceil_mode overhangs included."""
    r = len(x_hw)
    crop_end, extra = [], []
    for i in range(r):
        full = strides[i] * (y_hw[i] - 1) + dilations[i] * (kernel[i] - 1) + 1 - pads[i]
        crop_end.append(max(0, full - x_hw[i]))
        extra.append(max(0, x_hw[i] - full))
    op = [e if e < strides[i] else 0 for i, e in enumerate(extra)]
    out = ctx.emit(
        "ConvTranspose",
        [g, w],
        strides=list(strides),
        dilations=list(dilations),
        pads=list(pads[:r]) + crop_end,
        output_padding=op,
        group=group,
    )
    rest = [e - o for e, o in zip(extra, op)]
    if any(rest):  # rows no window reaches beyond a stride: zero gradient
        out = ctx.emit("Pad", [out, ctx.const(np.array([0, 0] + [0] * r + [0, 0] + rest, np.int64))])
    shape = ctx.shape(g)
    if shape is not None and r == 2:
        out = to_blocked(ctx, out, (shape[0], int(ctx.shape(w)[1]) * group, *x_hw))
    return out


def subpixel_pays(kernel, strides, dilations, c_in: int) -> bool:
    """Whether a dense strided Conv's adjoint is faster as the sub-pixel Conv than as ConvTranspose in
    onnxruntime: a stem reading the image (at most 4 input channels, where ConvTranspose's product has
    few rows), equal undilated strides, overlapping windows (kernel > stride), and the kernel padded to
    a multiple of the stride at most 1.2x its taps (measured: bench/conv_adjoint_forms.py)."""
    s = int(strides[0])
    if c_in > 4 or len(set(strides)) != 1 or s < 2 or any(int(d) != 1 for d in dilations):
        return False
    if any(int(k) <= s for k in kernel):
        return False
    padded = np.prod([s * -(-int(k) // s) for k in kernel])
    return bool(padded <= 1.2 * np.prod([int(k) for k in kernel]))


def _bn_scale(ctx, bn) -> np.ndarray | None:
    """gamma / sqrt(var + eps) of an inference BatchNormalization with constant parameters."""
    vals = [ctx.value(n) for n in bn.input[1:5]]
    if any(v is None for v in vals) or _attr(bn, "training_mode", 0):
        return None
    gamma, _, _, var = (np.asarray(v, np.float64) for v in vals)
    return gamma / np.sqrt(var + float(_attr(bn, "epsilon", 1e-5)))


def _folded_bn(ctx, conv):
    """The inference BatchNormalization that alone reads this Conv's output: its scale moves into the
    Conv's adjoint weights (one elementwise pass fewer per conv in the backward graph)."""
    users = ctx.consumers(conv.output[0])
    if conv.output[0] == ctx.prep.cut or len(users) != 1:
        return None
    bn = users[0]
    if bn.op_type != "BatchNormalization" or bn.input[0] != conv.output[0] or _bn_scale(ctx, bn) is None:
        return None
    return bn


@register
class ConvRule(GraphRule):
    op_type = "Conv"
    description = (
        "Conv: stride 1 as a Conv with per-group transposed, flipped weights; strided depthwise as that Conv "
        "on the zero-upsampled gradient; an image stem with overlapping windows (AlexNet's 11x11/4) as a "
        "stride-1 Conv to one channel per output phase and a DepthToSpace; other strided as ConvTranspose "
        "with the same weights (a following inference BatchNorm's scale folded into them)"
    )

    def vjp(self, ctx, node, grads):
        x, w = node.input[0], node.input[1]
        out = [None] * len(node.input)
        if any(ctx.on_path(n) for n in node.input[1:]):
            raise unsupported(node, "weights or bias that depend on the image")
        if grads[0] is None or not ctx.on_path(x):
            return out
        wv = ctx.value(w)
        if wv is None:
            raise unsupported(node, "weights that are not constants")
        x_hw, y_hw = _spatial(ctx, node)
        r = len(x_hw)
        kernel = list(wv.shape[2:])
        strides = list(_attr(node, "strides", [1] * r))
        dilations = list(_attr(node, "dilations", [1] * r))
        group = int(_attr(node, "group", 1))
        pads = _pads(node, x_hw, y_hw, kernel, strides, dilations)
        bn = _folded_bn(ctx, node)
        if bn is not None:
            scale = _bn_scale(ctx, bn).reshape(-1, *([1] * (r + 1)))
            w = ctx.forward("Mul", [w, ctx.const(scale.astype(np.float32))], _shape=wv.shape)
        g = grads[0]
        adj = [d * (k - 1) - p for d, k, p in zip(dilations, kernel, pads[:r])]
        adj_end = [d * (k - 1) - p for d, k, p in zip(dilations, kernel, pads[r:])]
        c = int(wv.shape[0])
        if all(s == 1 for s in strides) and min(adj + adj_end) >= 0:
            wt = self.adjoint_weight(ctx, w, wv.shape, group)
            out[0] = ctx.emit("Conv", [g, wt], pads=adj + adj_end, dilations=dilations, group=group)
        elif group == c and int(wv.shape[1]) == 1 and r == 2:
            # strided depthwise: the stride-1 adjoint on the zero-upsampled gradient (onnxruntime's
            # grouped ConvTranspose runs group by group, far slower than its depthwise Conv)
            out[0] = self.upsampled_adjoint(ctx, g, w, wv.shape, x_hw, y_hw, strides, dilations, pads, adj)
        elif group == 1 and r == 2 and subpixel_pays(kernel, strides, dilations, int(wv.shape[1])):
            out[0] = self.subpixel_adjoint(ctx, g, w, wv.shape, x_hw, y_hw, int(strides[0]), pads)
        else:
            out[0] = transpose_to(ctx, g, w, x_hw, y_hw, kernel, strides, dilations, pads, group)
        return out

    @classmethod
    def upsampled_adjoint(cls, ctx, g, w, shape, x_hw, y_hw, strides, dilations, pads, adj) -> str:
        """J^T g of a strided depthwise conv: u[s*i] = g[i] (zeros between; a 1x1 depthwise ConvTranspose
        of ones, which keeps the batch axis symbolic), then the stride-1 adjoint Conv, cropped or padded
        to the input: gx[i] = sum_j u[i + p - d*j] w[j]."""
        c, r = int(shape[0]), len(x_hw)
        up = [h * s for h, s in zip(y_hw, strides)]
        u = ctx.emit(
            "ConvTranspose",
            [g, ctx.const(np.ones((c, 1, *([1] * r)), np.float32))],
            strides=list(strides),
            output_padding=[s - 1 for s in strides],
            group=c,
        )
        right = [x + p - n for x, p, n in zip(x_hw, pads[:r], up)]
        begin = list(adj)
        if min(begin + right) < 0:  # crop where the adjoint's pads would be negative
            lo = [max(0, -b) for b in begin]
            hi = [n - max(0, -e) for n, e in zip(up, right)]
            u = ctx.emit(
                "Slice",
                [u, ctx.const(np.array(lo, np.int64)), ctx.const(np.array(hi, np.int64)),
                 ctx.const(np.arange(2, 2 + r, dtype=np.int64))],
            )  # fmt: skip
            begin, right = [max(0, b) for b in begin], [max(0, e) for e in right]
        wt = cls.adjoint_weight(ctx, w, shape, c)
        return ctx.emit("Conv", [u, wt], pads=begin + right, dilations=list(dilations), group=c)

    @staticmethod
    def subpixel_adjoint(ctx, g, w, shape, x_hw, y_hw, s: int, pads) -> str:
        """J^T g of a dense conv with stride s on both axes as a stride-1 Conv of g to Cin*s*s channels,
        one per output phase (rh, rw), and a DepthToSpace: for a padded-input row v = s*q + r,
        gx[v] = sum_d g[q - d] w[s*d + r], the kernel zero-padded to a multiple of s and flipped (ops on
        w). Then rows [p, p + x) of the padded input, zeros past the last row the windows reach."""
        cout, cin, kh, kw = (int(v) for v in shape)
        d = [-(-k // s) for k in (kh, kw)]
        v = ctx.forward("Pad", [w, ctx.const(np.array([0, 0, 0, 0, 0, 0, s * d[0] - kh, s * d[1] - kw], np.int64))])
        v = ctx.forward("Reshape", [v, ctx.const(np.array([cout, cin, d[0], s, d[1], s], np.int64))])
        v = ctx.forward(
            "Slice",
            [v, ctx.const(np.array([-1, -1], np.int64)), ctx.const(np.array([_INT_MIN, _INT_MIN], np.int64)),
             ctx.const(np.array([2, 4], np.int64)), ctx.const(np.array([-1, -1], np.int64))],
        )  # fmt: skip
        v = ctx.forward("Transpose", [v], perm=[1, 3, 5, 0, 2, 4])
        wt = ctx.forward(
            "Reshape", [v, ctx.const(np.array([cin * s * s, cout, *d], np.int64))], _shape=(cin * s * s, cout, *d)
        )
        u = ctx.emit("Conv", [g, wt], pads=[d[0] - 1, d[1] - 1, d[0] - 1, d[1] - 1])
        u = ctx.emit("DepthToSpace", [u], blocksize=s, mode="CRD")
        reach = [(y + k - 1) * s for y, k in zip(y_hw, d)]  # padded-input rows the phases cover
        begin = [int(p) for p in pads[:2]]
        end = [min(p + x, n) for p, x, n in zip(begin, x_hw, reach)]
        batch = ctx.shape(g)[0] if ctx.shape(g) is not None else "N"
        u = ctx.emit(
            "Slice",
            [u, ctx.const(np.array(begin, np.int64)), ctx.const(np.array(end, np.int64)),
             ctx.const(np.array([2, 3], np.int64))],
            _shape=(batch, cin, *[e - b for b, e in zip(begin, end)]),
        )  # fmt: skip
        rest = [p + x - e for p, x, e in zip(begin, x_hw, end)]
        if any(rest):  # rows no window reaches: zero gradient
            pad = ctx.const(np.array([0, 0, 0, 0, 0, 0, *rest], np.int64))
            u = ctx.emit("Pad", [u, pad], _shape=(batch, cin, *x_hw))
        return to_blocked(ctx, u, (batch, cin, *x_hw))

    @staticmethod
    def adjoint_weight(ctx, w: str, shape, group: int) -> str:
        """[Cin, Cout/group, k...]: per group in/out transposed, spatially flipped (ops on w)."""
        cout, cin_g, *k = (int(v) for v in shape)
        r = len(k)
        v = ctx.forward("Reshape", [w, ctx.const(np.array([group, cout // group, cin_g, *k], np.int64))])
        v = ctx.forward("Transpose", [v], perm=[0, 2, 1, *range(3, 3 + r)])
        v = ctx.forward("Reshape", [v, ctx.const(np.array([group * cin_g, cout // group, *k], np.int64))])
        axes = list(range(2, 2 + r))
        return ctx.forward(
            "Slice",
            [
                v,
                ctx.const(np.full(r, -1, np.int64)),
                ctx.const(np.full(r, _INT_MIN, np.int64)),
                ctx.const(np.array(axes, np.int64)),
                ctx.const(np.full(r, -1, np.int64)),
            ],
            _shape=(group * cin_g, cout // group, *k),
        )

    @classmethod
    def examples(cls):
        out = []
        variants = [
            dict(cin=3, cout=4, k=(3, 3), pads=[1, 1, 1, 1]),
            dict(cin=3, cout=6, k=(3, 3), strides=[2, 2], pads=[1, 1, 1, 1]),
            dict(cin=3, cout=4, k=(3, 2), strides=[2, 1], pads=[0, 1, 1, 0], dilations=[1, 2]),
            dict(cin=3, cout=6, k=(3, 3), group=3, pads=[1, 1, 1, 1]),
            dict(cin=3, cout=3, k=(3, 3), group=3, strides=[2, 2], pads=[1, 1, 1, 1]),
            dict(cin=3, cout=4, k=(3, 3), auto_pad="SAME_UPPER", strides=[2, 2]),
            dict(cin=3, cout=4, k=(2, 2), auto_pad="SAME_LOWER"),
            dict(cin=3, cout=4, k=(3, 3), auto_pad="VALID", dilations=[2, 2]),
            dict(cin=3, cout=5, k=(5, 5), strides=[3, 3], pads=[2, 2, 2, 2]),
            dict(cin=3, cout=4, k=(1, 1), strides=[2, 2]),
            dict(cin=3, cout=4, k=(3, 3), pads=[3, 0, 0, 2]),
            dict(cin=3, cout=3, k=(5, 5), group=3, strides=[2, 2], pads=[2, 2, 2, 2]),
            dict(cin=3, cout=3, k=(3, 3), group=3, strides=[2, 3], pads=[0, 1, 0, 0]),
            dict(cin=3, cout=3, k=(3, 3), group=3, strides=[2, 2], pads=[1, 1, 1, 1], dilations=[2, 1]),
            dict(cin=3, cout=3, k=(2, 2), group=3, strides=[3, 3], pads=[3, 0, 0, 3]),
            # the sub-pixel form: rows past the last window padded with zeros, then end pads cropped
            dict(cin=3, cout=4, k=(6, 6), strides=[3, 3], pads=[2, 1, 0, 0]),
            dict(cin=3, cout=4, k=(8, 8), strides=[4, 4], pads=[2, 2, 2, 2]),
        ]
        for i, v in enumerate(variants):
            cin, cout, k, group = v.pop("cin"), v.pop("cout"), v.pop("k"), v.get("group", 1)
            w = example_weights(10 + i, cout, cin // group, *k, scale=0)
            b = example_weights(30 + i, cout)
            node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=list(k), **v)
            out.append(example_model([node], (3, 9, 8), {"w": w, "b": b}, name=f"conv{i}"))
        return out


@register
class BatchNormalizationRule(GraphRule):
    op_type = "BatchNormalization"
    description = "BatchNormalization (inference): g * gamma / sqrt(var + eps), folded into a preceding Conv's adjoint"

    def vjp(self, ctx, node, grads):
        out = [None] * len(node.input)
        if any(ctx.on_path(n) for n in node.input[1:]):
            raise unsupported(node, "parameters that depend on the image")
        scale = _bn_scale(ctx, node)
        if scale is None:
            raise unsupported(node, "training mode or parameters that are not constants")
        if grads[0] is None or not ctx.on_path(node.input[0]):
            return out
        prod = ctx.producer(node.input[0])
        folded = _folded_bn(ctx, prod) if prod is not None and prod.op_type == "Conv" else None
        if folded is not None and folded.output[0] == node.output[0]:
            out[0] = grads[0]  # the Conv's adjoint applies the scale
            return out
        rank = len(ctx.shape(node.input[0]))
        c = ctx.const(scale.reshape(-1, *([1] * (rank - 2))).astype(np.float32))
        out[0] = ctx.emit("Mul", [grads[0], c])
        return out

    @classmethod
    def examples(cls):
        rng = np.random.default_rng(3)
        p = {
            "gamma": rng.uniform(0.5, 2, 3),
            "beta": rng.standard_normal(3),
            "mean": rng.standard_normal(3),
            "var": rng.uniform(0.5, 2, 3),
        }
        bn = helper.make_node("BatchNormalization", ["x", "gamma", "beta", "mean", "var"], ["y"], epsilon=1e-3)
        plain = example_model([bn], (3, 5, 4), p, name="bn")
        conv = helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        bn2 = helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"])
        folded = example_model([conv, bn2], (3, 6, 5), {**p, "w": example_weights(4, 3, 3, 3, 3, scale=0)}, name="cbn")
        return [plain, folded]


@register
class MaxPoolRule(GraphRule):
    op_type = "MaxPool"
    description = (
        "MaxPool: the gradient scattered (ScatterElements, add) to each window's argmax, from a second "
        "MaxPool's Indices made beside the forward one (its per-plane offset subtracted); a preceding "
        "Relu read only by the pool masked at the pooled size"
    )
    fp32_only = {"ScatterElements": (0, 2), "HardSigmoid": (0,)}

    def vjp(self, ctx, node, grads):
        x = node.input[0]
        if grads[0] is None or not ctx.on_path(x):
            return [None]
        if len(node.output) > 1 and node.output[1]:
            raise unsupported(node, "its Indices output read by the network")
        x_hw, y_hw = _spatial(ctx, node)
        if len(x_hw) != 2:
            raise unsupported(node, "not 2-D")
        c = int(ctx.shape(x)[1])
        hw_in, hw_out = int(np.prod(x_hw)), int(np.prod(y_hw))
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "storage_order"}
        g = grads[0]
        prod = ctx.producer(x)
        if prod is not None and relu_into_maxpool(ctx, prod):  # the Relu's mask, at the pooled size
            g = ctx.mul(g, step_above(ctx, node.output[0], 0.0), ctx.shape(node.output[0]))
        tiled = self.tiled(ctx, node, g, c, x_hw, y_hw, attrs)
        if tiled is not None:
            return [tiled]
        _, idx = ctx.forward("MaxPool", [x], n_out=2, storage_order=0, **attrs)
        # ONNX counts indices over the whole [N, C, H, W] tensor: subtract each plane's (n*C + c)*H*W
        n = ctx.forward("Shape", [x], start=0, end=1)
        nc = ctx.forward("Mul", [n, ctx.const(np.array([c], np.int64))])
        planes = ctx.forward("Range", [ctx.const(np.array(0, np.int64)), ctx.forward("Squeeze", [nc]),
                                       ctx.const(np.array(1, np.int64))])  # fmt: skip
        offs = ctx.forward("Mul", [planes, ctx.const(np.array(hw_in, np.int64))])
        offs = ctx.forward("Reshape", [offs, ctx.const(np.array([-1, c, 1, 1], np.int64))])
        local = ctx.forward("Sub", [idx, offs], _shape=("N", c, *y_hw))
        flat = ctx.forward("Reshape", [local, ctx.const(np.array([-1, c, hw_out], np.int64))], _shape=("N", c, hw_out))
        g = ctx.batch_reshape(g, (c, hw_out))
        if ctx.multi:
            rows = ctx.emit("Shape", [g], start=0, end=1)
            size = ctx.emit("Concat", [rows, ctx.const(np.array([c, hw_in], np.int64))], axis=0)
            zeros = ctx.emit("ConstantOfShape", [size], value=helper.make_tensor("z", 1, [1], [0.0]))
        else:
            # zeros made from x, (x < x) (false even for inf and NaN), not from a shape: they carry x's
            # symbolic batch axis, so onnxruntime keeps the later mask products in its blocked layout
            less = ctx.forward("Less", [x, x])
            zeros = ctx.batch_reshape(ctx.forward("Cast", [less], to=1, _shape=ctx.shape(x)), (c, hw_in))
        gx = ctx.emit("ScatterElements", [zeros, ctx.fwd(flat), g], axis=2, reduction="add")
        return [ctx.batch_reshape(gx, (c, *x_hw))]

    @staticmethod
    def tiled(ctx, node, g, c, x_hw, y_hw, attrs) -> str | None:
        """Max pooling over non-overlapping windows (kernel = stride, no padding or dilation, no window
        over the edge): the forward pass stays the plain MaxPool (onnxruntime's fast kernel; its MaxPool
        with indices is a slow generic one). Beside it a mask in the input's layout marks each window's
        first maximum in scan order: ArgMax over the window's pixels, upsampled, compared with each
        pixel's position in its window. The adjoint is g upsampled (nearest) times that mask."""
        kernel = list(attrs.get("kernel_shape", []))
        strides = list(attrs.get("strides", [1, 1]))
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        auto = attrs.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if (
            kernel != strides
            or any(pads)
            or auto not in ("NOTSET", "VALID")
            or any(d != 1 for d in attrs.get("dilations", [1, 1]))
            or [h for h in y_hw] != [x // k for x, k in zip(x_hw, kernel)]
        ):
            return None
        x = node.input[0]
        (kh, kw), (h, w) = kernel, y_hw
        size = (h * kh, w * kw)
        extra = [x_hw[0] - size[0], x_hw[1] - size[1]]  # rows/columns no window covers: no gradient
        xs = x
        if any(extra):
            xs = ctx.forward(
                "Slice",
                [x, ctx.const(np.array([0, 0], np.int64)), ctx.const(np.array(size, np.int64)),
                 ctx.const(np.array([2, 3], np.int64))],
            )  # fmt: skip
        t = ctx.forward("Reshape", [xs, ctx.const(np.array([0, c, h, kh, w, kw], np.int64))])
        t = ctx.forward("Transpose", [t], perm=[0, 1, 2, 4, 3, 5])  # kw stays contiguous: a fast transpose
        t = ctx.forward("Reshape", [t, ctx.const(np.array([0, c, h, w, kh * kw], np.int64))])
        first = ctx.forward("Cast", [ctx.forward("ArgMax", [t], axis=-1, keepdims=0)], to=1)
        up_scales = ctx.const(np.array([1, 1, kh, kw], np.float32))
        nearest = dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
        first = ctx.forward("Resize", [first, "", up_scales], **nearest)
        yy, xx = np.meshgrid(np.arange(size[0]), np.arange(size[1]), indexing="ij")
        position = ((yy % kh) * kw + xx % kw).astype(np.float32)
        pad = np.array([0, 0, 0, 0, 0, 0, extra[0], extra[1]], np.int64)
        if any(extra):
            first = ctx.forward("Pad", [first, ctx.const(pad), ctx.const(np.float32(-1))])
            position = np.pad(position, ((0, extra[0]), (0, extra[1])), constant_values=-2.0)
        eq = ctx.forward("Equal", [first, ctx.const(position[None, None])])
        mask = ctx.forward("Cast", [eq], to=1, _shape=("N", c, *x_hw))
        gx = ctx.emit("Resize", [g, "", up_scales], **nearest)
        if any(extra):
            gx = ctx.emit("Pad", [gx, ctx.const(pad)])
        return ctx.mul(gx, mask, ("N", c, *x_hw))

    @classmethod
    def examples(cls):
        variants = [
            dict(kernel_shape=[2, 2], strides=[2, 2]),
            dict(kernel_shape=[3, 3], strides=[2, 2]),
            dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
            dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
            dict(kernel_shape=[2, 3], strides=[1, 2], dilations=[2, 1]),
            dict(kernel_shape=[3, 3], strides=[1, 1], auto_pad="SAME_UPPER"),
            dict(kernel_shape=[2, 3], strides=[2, 3]),  # tiled, rows and columns left over
            dict(kernel_shape=[3, 3], strides=[3, 3], auto_pad="VALID"),
        ]
        out = [
            example_model([helper.make_node("MaxPool", ["x"], ["y"], **v)], (3, 9, 8), name=f"maxpool{i}")
            for i, v in enumerate(variants)
        ]
        # a Relu read only by the pool: its mask moves to the pooled gradient
        relu = helper.make_node("Relu", ["x"], ["r"])
        for i, v in enumerate((variants[2], variants[0])):
            pool = helper.make_node("MaxPool", ["r"], ["y"], **v)
            out.append(example_model([relu, pool], (3, 9, 8), name=f"relu_maxpool{i}"))
        return out


def _window_counts(n_in, n_out, k, s, d, pb, pe, include_pad: bool) -> np.ndarray:
    """Per output position along one axis: how many window taps AveragePool divides by."""
    counts = np.zeros(n_out)
    for o in range(n_out):
        taps = o * s - pb + d * np.arange(k)
        lo, hi = (-pb, n_in + pe) if include_pad else (0, n_in)
        counts[o] = np.count_nonzero((taps >= lo) & (taps < hi))
    return counts


@register
class AveragePoolRule(GraphRule):
    op_type = "AveragePool"
    description = (
        "AveragePool: g divided by each window's count, then a depthwise ConvTranspose of ones "
        "(count_include_pad, ceil_mode overhangs as onnxruntime counts them)"
    )

    def vjp(self, ctx, node, grads):
        x = node.input[0]
        if grads[0] is None or not ctx.on_path(x):
            return [None]
        x_hw, y_hw = _spatial(ctx, node)
        r = len(x_hw)
        c = int(ctx.shape(x)[1])
        kernel = list(_attr(node, "kernel_shape"))
        strides = list(_attr(node, "strides", [1] * r))
        dilations = list(_attr(node, "dilations", [1] * r))
        pads = _pads(node, x_hw, y_hw, kernel, strides, dilations)
        include = bool(_attr(node, "count_include_pad", 0))
        div = np.ones(())
        for i in range(r):
            cnt = _window_counts(x_hw[i], y_hw[i], kernel[i], strides[i], dilations[i], pads[i], pads[r + i], include)
            div = np.multiply.outer(div, cnt)
        g = grads[0]
        inv = 1.0 / div
        if np.allclose(inv, inv.flat[0]):
            ones = np.full((c, 1, *kernel), inv.flat[0], np.float32)
        else:
            ones = np.ones((c, 1, *kernel), np.float32)
            g = ctx.emit("Mul", [g, ctx.const(inv.astype(np.float32))])
        return [transpose_to(ctx, g, ctx.const(ones), x_hw, y_hw, kernel, strides, dilations, pads, c)]

    @classmethod
    def examples(cls):
        variants = [
            dict(kernel_shape=[2, 2], strides=[2, 2]),
            dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
            dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1),
            dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
            dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1, count_include_pad=1),
            dict(kernel_shape=[3, 2], strides=[1, 1], auto_pad="SAME_UPPER"),
        ]
        return [
            example_model([helper.make_node("AveragePool", ["x"], ["y"], **v)], (3, 9, 8), name=f"avgpool{i}")
            for i, v in enumerate(variants)
        ]


@register
class GlobalAveragePoolRule(GraphRule):
    op_type = "GlobalAveragePool"
    description = "GlobalAveragePool: g / (H W) broadcast over the map"

    def vjp(self, ctx, node, grads):
        x = node.input[0]
        if grads[0] is None or not ctx.on_path(x):
            return [None]
        x_hw, _ = _spatial(ctx, node)
        return [ctx.emit("Mul", [grads[0], ctx.const(np.full(x_hw, 1.0 / np.prod(x_hw), np.float32))])]

    @classmethod
    def examples(cls):
        return [example_model([helper.make_node("GlobalAveragePool", ["x"], ["y"])], (3, 5, 4))]


@register
class PadRule(GraphRule):
    op_type = "Pad"
    description = "Pad (constant): the cotangent cropped to the input (and zero-padded where Pad cropped)"

    def vjp(self, ctx, node, grads):
        x = node.input[0]
        out = [None] * len(node.input)
        mode = _attr(node, "mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode != "constant":
            raise unsupported(node, f"mode {mode}")
        if grads[0] is None or not ctx.on_path(x):
            return out
        pads = ctx.value(node.input[1])
        if pads is None:
            raise unsupported(node, "pads that are not constants")
        xs = ctx.shape(x)
        rank = len(xs)
        axes = ctx.value(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        axes = list(range(rank)) if axes is None else [int(a) % rank for a in axes]
        begin, end = [0] * rank, [0] * rank
        for j, a in enumerate(axes):
            begin[a], end[a] = int(pads[j]), int(pads[len(axes) + j])
        g = grads[0]
        if any(p < 0 for p in begin + end):  # Pad cropped: zeros back where it cut
            g = ctx.emit("Pad", [g, ctx.const(np.array([max(-p, 0) for p in begin + end], np.int64))])
        sl_axes = [a for a in range(rank) if begin[a] > 0 or end[a] > 0]
        if sl_axes:
            if any(isinstance(xs[a], str) for a in sl_axes):
                raise unsupported(node, "padding the batch axis")
            starts = [max(begin[a], 0) for a in sl_axes]
            ends = [s + int(xs[a]) for s, a in zip(starts, sl_axes)]
            g = ctx.emit(
                "Slice", [g, ctx.const(np.array(starts, np.int64)), ctx.const(np.array(ends, np.int64)),
                          ctx.const(np.array(sl_axes, np.int64))],
            )  # fmt: skip
        out[0] = g
        return out

    @classmethod
    def examples(cls):
        # (negative pads, a crop, are handled too, but onnx's reference evaluator, the float64
        # forward of the registry test, refuses them)
        return [
            example_model(
                [helper.make_node("Pad", ["x", "p", "v"], ["y"])],
                (3, 5, 4),
                {"p": np.array([0, 0, 1, 2, 0, 0, 2, 0], np.int64), "v": np.float32(0.5)},
                name="pad0",
            ),
        ]


@register
class ResizeRule(GraphRule):
    op_type = "Resize"
    description = (
        "Resize (any mode, scaling H and W only): the transposed per-axis interpolation matrices, "
        "found by resizing an identity, applied as two MatMuls"
    )

    def vjp(self, ctx, node, grads):
        x = node.input[0]
        out = [None] * len(node.input)
        if grads[0] is None or not ctx.on_path(x):
            return out
        xs, ys = ctx.shape(x), ctx.shape(node.output[0])
        if len(xs) != 4 or xs[1] != ys[1] or any(isinstance(d, str) for d in (*xs[1:], *ys[1:])):
            raise unsupported(node, "not a [N,C,H,W] resize of H and W")
        if _attr(node, "axes") is not None or _attr(node, "antialias", 0):
            raise unsupported(node, "axes or antialias")
        mats = [self.matrix(ctx, node, a, int(xs[a]), int(ys[a])) for a in (2, 3)]
        g = grads[0]
        # gx = R_h^T g R_w: [H, h] @ g [N, C, h, w] @ [w, W]
        g = ctx.emit("MatMul", [ctx.const(mats[0].T), g])
        out[0] = ctx.emit("MatMul", [g, ctx.const(mats[1])])
        return out

    @staticmethod
    def matrix(ctx, node, axis: int, n_in: int, n_out: int) -> np.ndarray:
        """[n_out, n_in]: the node's interpolation along one axis (ONNX Resize is separable)."""
        import onnxruntime as ort

        scales = ctx.value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        roi = ctx.value(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        # sizes need not be constant (a batch-free file computes them from the image's batch size): the
        # output's static shape gives each axis's size
        by_sizes = len(node.input) > 3 and bool(node.input[3])
        if (scales is None or scales.size == 0) and not by_sizes:
            raise unsupported(node, "scales that are not constants")
        eye = np.eye(n_in, dtype=np.float32).reshape(n_in, 1, n_in, 1)
        if roi is not None and roi.size:
            if roi.size != 8:
                raise unsupported(node, "roi of another rank")
            roi = np.array([0, 0, roi[axis], 0, 1, 1, roi[4 + axis], 1], np.float32)
        inputs = {"roi": roi if roi is not None and roi.size else np.zeros(0, np.float32)}
        if scales is not None and scales.size:
            inputs["scales"] = np.array([1, 1, float(scales[axis]), 1], np.float32)
            inputs["sizes"] = None
        else:
            inputs["scales"] = None
            inputs["sizes"] = np.array([n_in, 1, n_out, 1], np.int64)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        names = ["e", "roi", "scales" if inputs["scales"] is not None else ""]
        names.append("sizes" if inputs["sizes"] is not None else "")
        m = example_model([helper.make_node("Resize", names, ["y"], **attrs)], (1, n_in, 1), {
            k: v for k, v in inputs.items() if v is not None}, name="resize_matrix")  # fmt: skip
        m.graph.input[0].name = "e"
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        y = sess.run(None, {"e": eye})[0]
        if y.shape != (n_in, 1, n_out, 1):
            raise unsupported(node, f"resizing an axis of {n_in} gave {y.shape[2]}, not {n_out}")
        return np.ascontiguousarray(y[:, 0, :, 0].T)

    @classmethod
    def examples(cls):
        variants = [
            ("nearest", [1, 1, 2, 2], {}),
            ("linear", [1, 1, 2, 2], {}),
            ("linear", [1, 1, 1.5, 0.5], {}),
            ("linear", [1, 1, 2, 1.5], {"coordinate_transformation_mode": "align_corners"}),
            ("nearest", [1, 1, 1.5, 2], {"nearest_mode": "floor", "coordinate_transformation_mode": "asymmetric"}),
        ]
        out = []
        for i, (mode, scales, extra) in enumerate(variants):
            inits = {"scales": np.array(scales, np.float32)}
            node = helper.make_node("Resize", ["x", "", "scales"], ["y"], mode=mode, **extra)
            out.append(example_model([node], (3, 5, 4), inits, name=f"resize{i}"))
        return out
