"""Hand-written, ONNX-friendly adjoints: an fx graph -> a module returning (features, J^T cotangent).

Each op type has one rule class, registered with `@register` (section "registry" below): which fx
nodes it takes, their forward and adjoint, a one-line description and the ONNX ops it emits that a
float16 copy must keep in float32 (both recorded in the model's metadata), and a small example
network the tests check it on. export/README.md says how to add one."""

from __future__ import annotations

import math
import operator
import struct
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from pbv_onnx.base.errors import ModelError


class UnsupportedOp(ModelError):
    """A node of the traced network with no adjoint rule."""


@dataclass(frozen=True)
class Layout:
    """The cotangent layout of the backward pass being traced: one cotangent per image ([N, ...],
    the batch axis shared with the image's) or K per image ([N*K, ...], image-major). Passed to
    every adjoint explicitly, never held in module state, so two exports in one process cannot
    interfere. The forward pass has the one-per-image layout."""

    multi: bool = False


ONE_PER_IMAGE = Layout(multi=False)
K_PER_IMAGE = Layout(multi=True)


@dataclass
class Adjoint:
    """One node: its forward (returning the output and what the adjoint needs) and its adjoint.

    `inputs`: the fx nodes passed positionally to `fwd`; `bwd(g, xs, y, saved, layout)` returns
    one gradient (or None) per input, for the pass of that `Layout`.
    """

    inputs: list[fx.Node]
    fwd: Callable[..., tuple[torch.Tensor, Any]]
    bwd: Callable[[Any, list, torch.Tensor, Any, Layout], list] | None
    live: frozenset = frozenset()  # the inputs that depend on the image (set by VJPModule)
    phases: bool = False  # bwd takes a Phases gradient, returning Phases (else it gets the whole)
    rule: AdjointRule | None = None  # the registered rule that built it (set by adjoint_for)


class Phases:
    """A gradient [B, C, H, W] of even H, W held as its four stride-2 phases, parts[a][b] =
    g[..., a::2, b::2], in the K-per-image pass. A strided depthwise adjoint makes it without the
    zeros of an upsampled gradient; masks and channel-reducing 1x1 adjoints work phase by phase
    (all pointwise in space), and the phases are interleaved only where another rule reads them,
    on the fewest channels: on mobilenet_v2 a 16-channel interleave instead of a 96-channel zero
    insertion at 112x112."""

    def __init__(self, parts):
        self.parts = tuple(tuple(row) for row in parts)

    def map(self, f: Callable[[torch.Tensor, int, int], torch.Tensor]) -> Phases:
        return Phases([[f(p, a, b) for b, p in enumerate(row)] for a, row in enumerate(self.parts)])

    def __add__(self, other: Phases) -> Phases:
        return self.map(lambda p, a, b: p + other.parts[a][b])

    def interleave(self) -> torch.Tensor:
        """The whole gradient: a grouped 2x2 ConvTranspose of stride 2 with one-hot kernels over
        the phases stacked per channel (onnxruntime's DepthToSpace took 3x as long)."""
        (p00, p01), (p10, p11) = self.parts
        c, h, w = (int(v) for v in p00.shape[1:])
        stacked = torch.stack([p00, p01, p10, p11], dim=2).reshape(-1, 4 * c, h, w)
        return F.conv_transpose2d(stacked, _interleave_weight(c).to(p00.dtype), None, 2, 0, 0, c)


def _onehot(c: int, a: int, b: int) -> np.ndarray:
    """[c, 1, 2, 2] depthwise kernels picking pixel (a, b) of each 2x2 block (a constant of the
    graph, not ops that build it)."""
    kernel = np.zeros((c, 1, 2, 2), np.float32)
    kernel[:, 0, a, b] = 1.0
    return kernel


def _interleave_weight(c: int) -> torch.Tensor:
    """[4c, 1, 2, 2]: input channel 4i + 2a + b (phase (a, b) of channel i) to pixel (a, b) of
    output channel i."""
    return torch.from_numpy(np.stack([_onehot(c, a, b) for a in (0, 1) for b in (0, 1)], 1).reshape(4 * c, 1, 2, 2))


def _phase_of(t: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """t[:, :, a::2, b::2] of a forward tensor [N, C, H, W] (a mask): a depthwise one-hot 2x2 Conv
    of stride 2, which onnxruntime runs in its blocked layout and shape inference follows (a
    strided Slice does neither)."""
    c = int(t.shape[1])
    return F.conv2d(t, torch.from_numpy(_onehot(c, a, b)).to(t.dtype), None, 2, 0, 1, c)


def whole(g):
    """g as one tensor (Phases interleaved)."""
    return g.interleave() if isinstance(g, Phases) else g


def pmap(g, f: Callable[[torch.Tensor], torch.Tensor]):
    """f of g, phase by phase where g is Phases (f pointwise in space)."""
    return g.map(lambda p, a, b: f(p)) if isinstance(g, Phases) else f(g)


def _phase_adjoint(g: torch.Tensor, w: torch.Tensor) -> Phases:
    """J^T g for a depthwise 3x3 conv of stride 2, padding 1, on an even-sized input, phase by
    phase: y[i] = w[0] x[2i-1] + w[1] x[2i] + w[2] x[2i+1], so x's gradient is w[1] g[m] at 2m and
    w[2] g[m] + w[0] g[m+1] at 2m+1 (per axis; the 2-D kernels are the products of the two)."""
    c = int(w.shape[0])
    # odd phases as [0, w[2], w[0]] with padding 1 on both sides (w[2] g[m] + w[0] g[m+1]): a zero
    # tap instead of a one-sided Pad, which onnxruntime runs outside its blocked layout. The four
    # kernels are constants of the graph (the depthwise weights are small), so that shape
    # inference knows every phase's shape (pbv_onnx/layout.py relies on it).
    w_np = w.detach().cpu().numpy()
    padded = np.zeros((c, 1, 4, 4), w_np.dtype)  # w at [1:, 1:], a zero tap at index 0
    padded[:, :, 1:, 1:] = w_np
    taps = {0: [2], 1: [0, 3, 1]}  # even: w[1]; odd: 0, w[2], w[0]

    def kernel(a: int, b: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(padded[:, :, taps[a]][:, :, :, taps[b]])).to(g.dtype)

    return Phases([[F.conv2d(g, kernel(a, b), None, 1, (a, b), 1, c) for b in (0, 1)] for a in (0, 1)])


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(node.meta["tensor_meta"].shape)


def _unbroadcast(g: torch.Tensor, shape: tuple[int, ...], g_shape: tuple[int, ...]) -> torch.Tensor:
    """Sum a broadcast gradient back to `shape` (static shapes from shape propagation)."""
    lead = len(g_shape) - len(shape)
    if lead:
        g = g.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, (s, gs) in enumerate(zip(shape, g_shape[lead:])) if s == 1 and gs != 1)
    return g.sum(dim=dims, keepdim=True) if dims else g


def kmul(g: torch.Tensor, t: torch.Tensor, layout: Layout) -> torch.Tensor:
    """g * t where t is one forward tensor per image ([N, ...], broadcastable to g's per-sample
    shape) and g holds one cotangent per image ([N, ...]: a plain Mul whose operands onnxruntime
    can prove equal in shape) or, in the multi-cotangent pass, K per image ([N*K, ...],
    image-major): the backward pass of all K cotangents reads one forward pass."""
    if isinstance(g, Phases):
        full = tuple(2 * int(v) for v in g.parts[0][0].shape[-2:])
        if tuple(int(v) for v in t.shape[-2:]) == full and t.dim() == 4:
            return g.map(lambda p, a, b: kmul(p, _phase_of(t, a, b), layout))
        g = g.interleave()
    if not layout.multi:
        return g * t
    shape = tuple(int(v) for v in g.shape[1:])  # static: a traced size would become ops
    tail = tuple(int(v) for v in t.shape[1:])
    n = t.shape[0]  # dynamic N
    return (g.reshape(n, -1, *shape) * t.reshape(n, 1, *tail)).reshape(-1, *shape)


class _Step(torch.autograd.Function):
    """clip(alpha * y + beta, 0, 1), exported as ONE HardSigmoid node."""

    @staticmethod
    def forward(ctx, y, alpha, beta):
        return torch.clamp(y * alpha + beta, 0.0, 1.0)

    @staticmethod
    def symbolic(g, y, alpha, beta):
        return g.op("HardSigmoid", y, alpha_f=alpha, beta_f=beta)


def _slope(t: float) -> float:
    """A power of two s with s * |y - t| >= 1 for every float32 y != t: near t, |y - t| is at
    least the float spacing just below |t|, 2^(e - 25) for |t| in [2^(e-1), 2^e), and s * y - s * t
    is exact (Sterbenz); far from t it is large. For t = 0: every normal float32 y > 0."""
    return 2.0**126 if t == 0 else 2.0 ** (25 - math.frexp(abs(t))[1])


def step_above(y: torch.Tensor, t: float) -> torch.Tensor:
    """(y > t) as 0/1 in y's dtype: one elementwise op that onnxruntime runs on its blocked NCHWc
    layout (comparisons and Cast would force layout conversions around every mask). Exact for
    every float32 y except subnormals just above 0, where no network output lies in practice."""
    s = _slope(t)
    return _Step.apply(y, s, -s * t)


def step_below(y: torch.Tensor, t: float) -> torch.Tensor:
    """(y < t) as 0/1, as step_above."""
    s = _slope(t)
    return _Step.apply(y, -s, s * t)


def _unsupported(what: str) -> UnsupportedOp:
    return UnsupportedOp(
        None,
        f"the export stage has no adjoint for {what}; cut the network "
        "earlier (layer) or add a rule in export/adjoint.py",
        param="layer",
    )


# -- convolutions and pools ---------------------------------------------------------------------
def conv_adjoint_weight(w: torch.Tensor, groups: int) -> torch.Tensor:
    """Weights of the stride-1 adjoint conv: per group in/out transposed, spatially flipped."""
    cout, cin_g, kh, kw = (int(v) for v in w.shape)  # static: a traced size would become ops
    return (
        w.reshape(groups, cout // groups, cin_g, kh, kw)
        .transpose(1, 2)
        .reshape(groups * cin_g, cout // groups, kh, kw)
        .flip(-2, -1)
    )


def _output_padding(x_hw, y_hw, stride, padding, dilation, kernel) -> tuple[int, int]:
    return tuple(
        int(x - ((y - 1) * s - 2 * p + d * (k - 1) + 1))
        for x, y, s, p, d, k in zip(x_hw, y_hw, stride, padding, dilation, kernel)
    )


def conv_input_adjoint(
    g: torch.Tensor, w: torch.Tensor, x_hw, y_hw, stride, padding, dilation, groups: int, layout: Layout
) -> torch.Tensor:
    """J^T g for y = conv2d(x, w): Conv with flipped weights at stride 1; strided depthwise convs
    the same on the zero-upsampled gradient (onnxruntime's grouped ConvTranspose runs group by
    group, far slower than its depthwise Conv); other strided convs ConvTranspose."""
    kernel = tuple(w.shape[-2:])
    adj_pad = tuple(d * (k - 1) - p for d, k, p in zip(dilation, kernel, padding))
    if stride == (1, 1) and min(adj_pad) >= 0:
        return F.conv2d(g, conv_adjoint_weight(w, groups), None, 1, adj_pad, dilation, groups)
    c = int(w.shape[0])
    if (
        layout.multi
        and groups == c
        and int(w.shape[1]) == 1
        and kernel == (3, 3)
        and stride == (2, 2)
        and tuple(padding) == (1, 1)
        and tuple(dilation) == (1, 1)
        and tuple(x_hw) == (2 * y_hw[0], 2 * y_hw[1])
    ):
        return _phase_adjoint(g, w)
    if groups == c and int(w.shape[1]) == 1 and min(adj_pad) >= 0:
        (h, wd), (sh, sw) = y_hw, stride
        # u[s*i] = g[i], zeros between: a 1x1 depthwise ConvTranspose of ones (faster than nearest
        # upsampling times a 0/1 grid, see docs/performance.md; it keeps the batch axis symbolic,
        # so onnxruntime can prove the masks' shapes equal downstream)
        ones = torch.ones((c, 1, 1, 1), dtype=g.dtype)
        u = F.conv_transpose2d(g, ones, None, stride, 0, (sh - 1, sw - 1), c)
        right = (x_hw[0] + padding[0] - h * sh, x_hw[1] + padding[1] - wd * sw)
        if right == adj_pad:
            return F.conv2d(u, conv_adjoint_weight(w, groups), None, 1, adj_pad, dilation, groups)
        u = F.pad(u, (adj_pad[1], right[1], adj_pad[0], right[0]))  # negative: crop
        return F.conv2d(u, conv_adjoint_weight(w, groups), None, 1, 0, dilation, groups)
    if groups == 1 and dilation == (1, 1) and _subpixel_pays(kernel, stride):
        return _subpixel_adjoint(g, w, x_hw, stride, padding)
    op = _output_padding(x_hw, y_hw, stride, padding, dilation, kernel)
    return to_blocked(F.conv_transpose2d(g, w, None, stride, padding, op, groups, dilation), layout)


def to_blocked(t: torch.Tensor, layout: Layout) -> torch.Tensor:
    """t through an exact identity, a 1x1 depthwise Conv of ones, in the one-per-image pass.

    onnxruntime's NCHWc layout is entered only through a Conv; a graph input (the cotangent) or a
    ConvTranspose output read raw by a residual Add or a mask product keeps those, and every
    later shortcut gradient, in plain NCHW, with layout conversions around each (resnet50: 15
    Adds and 19 mask products)."""
    if layout.multi or not _whole_blocks(t):
        return t
    c = int(t.shape[1])
    return F.conv2d(t, torch.ones((c, 1, 1, 1), dtype=t.dtype), groups=c)


def _whole_blocks(t: torch.Tensor) -> bool:
    """Whether t is [N, C, H, W] with C in whole blocks of onnxruntime's NCHWc layout (16 with
    AVX-512, 8 with AVX2), the layout the 1x1 depthwise Convs here are meant to run in."""
    return t.dim() == 4 and int(t.shape[1]) % 16 == 0


def _subpixel_pays(kernel, stride) -> bool:
    """Whether the sub-pixel form beats ConvTranspose: it pads each kernel side to a multiple of
    the stride, and those zero taps cost. Measured in onnxruntime (8 images, 2 threads): 11x11/4
    (19% zero taps) 16 ms vs 26 ms; 7x7/2 (31%) 45 vs 39 ms; 3x3/2 (78%) 74 vs 41 ms."""
    padded = 1
    for k, s in zip(kernel, stride):
        padded *= s * -(-k // s)
    return max(stride) > 1 and padded <= 1.2 * kernel[0] * kernel[1]


def subpixel_weight(w: torch.Tensor, stride) -> torch.Tensor:
    """[Cin*sh*sw, Cout, Dh, Dw]: for each output phase (rh, rw), the taps w[s*d + r], flipped."""
    cout, cin, kh, kw = (int(v) for v in w.shape)
    (sh, sw) = stride
    dh, dw = -(-kh // sh), -(-kw // sw)
    wp = F.pad(w, (0, sw * dw - kw, 0, sh * dh - kh)).reshape(cout, cin, dh, sh, dw, sw)
    return wp.flip(2, 4).permute(1, 3, 5, 0, 2, 4).reshape(cin * sh * sw, cout, dh, dw)


def _subpixel_adjoint(g: torch.Tensor, w: torch.Tensor, x_hw, stride, padding) -> torch.Tensor:
    """J^T g of a strided conv as a stride-1 Conv to Cin*s*s phase channels and a pixel shuffle:
    with v = u + p = s*q + r, gx_padded[v] = sum_d g[q - d] w[s*d + r]."""
    kernel = tuple(int(k) for k in w.shape[-2:])
    d = tuple(-(-k // s) for k, s in zip(kernel, stride))
    u = F.conv2d(g, subpixel_weight(w, stride), None, 1, (d[0] - 1, d[1] - 1))
    if stride[0] == stride[1]:
        u = F.pixel_shuffle(u, stride[0])
    else:
        n, _, qh, qw = u.shape
        cin = int(w.shape[1])
        u = (
            u.reshape(n, cin, stride[0], stride[1], qh, qw)
            .permute(0, 1, 4, 2, 5, 3)
            .reshape(n, cin, qh * stride[0], qw * stride[1])
        )
    size = [int(v) for v in u.shape[-2:]]
    # rows [p, p + x) of the padded input; pad with zeros where no output phase reached
    right = [x + p - full for x, p, full in zip(x_hw, padding, size)]
    return F.pad(u, (-padding[1], right[1], -padding[0], right[0]))


def _folded_bn(conv: fx.Node, gm: fx.GraphModule) -> nn.BatchNorm2d | None:
    """The eval BatchNorm that alone reads this conv's output: its scale moves into the conv's
    adjoint weights (one elementwise pass fewer per conv in the backward graph)."""
    if conv.op != "call_module" or not isinstance(gm.get_submodule(conv.target), nn.Conv2d):
        return None
    users = list(conv.users)
    if len(users) != 1 or users[0].op != "call_module" or users[0].args[0] is not conv:
        return None
    bn = gm.get_submodule(users[0].target)
    if isinstance(bn, nn.BatchNorm2d) and bn.running_var is not None:
        return bn
    return None


def _conv_rule(node: fx.Node, m: nn.Conv2d, bn: nn.BatchNorm2d | None = None) -> Adjoint:
    if m.padding_mode != "zeros" or isinstance(m.padding, str) and m.padding != "valid":
        raise _unsupported(f"Conv2d with padding={m.padding!r}, padding_mode={m.padding_mode!r} ({node.target})")
    padding = (0, 0) if isinstance(m.padding, str) else _pair(m.padding)
    stride, dilation = _pair(m.stride), _pair(m.dilation)
    x_hw, y_hw = _shape(node.args[0])[-2:], _shape(node)[-2:]
    pointwise = (
        m.kernel_size == (1, 1)
        and stride == (1, 1)
        and padding == (0, 0)
        and m.groups == 1
        and m.in_channels <= m.out_channels
    )  # phases pass it on, on fewer channels
    return Adjoint(
        [node.args[0]],
        lambda x: (F.conv2d(x, m.weight, m.bias, stride, padding, dilation, m.groups), None),
        lambda g, xs, y, s, layout: [
            pmap(
                g,
                lambda v: conv_input_adjoint(
                    v,
                    m.weight if bn is None else m.weight * _bn_scale(bn).reshape(-1, 1, 1, 1),
                    x_hw,
                    y_hw,
                    stride,
                    padding,
                    dilation,
                    m.groups,
                    layout,
                ),
            )
        ],  # a phase: 1x1, sizes unused
        phases=pointwise,
    )


def _bn_scale(m: nn.BatchNorm2d) -> torch.Tensor:
    scale = torch.rsqrt(m.running_var + m.eps)
    if m.weight is not None:
        scale = scale * m.weight
    return scale.reshape(1, -1, 1, 1)


def _bn_rule(node: fx.Node, m: nn.BatchNorm2d, folded: bool = False) -> Adjoint:
    if m.running_var is None:
        raise _unsupported(f"BatchNorm2d without running statistics ({node.target})")
    return Adjoint(
        [node.args[0]],
        lambda x: (F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps), None),
        (lambda g, xs, y, s, layout: [g])
        if folded
        else (lambda g, xs, y, s, layout: [pmap(g, lambda v: v * _bn_scale(m))]),
        phases=True,
    )


def _tiled_maxpool_rule(node: fx.Node, m: nn.MaxPool2d) -> Adjoint | None:
    """Max pooling over non-overlapping windows (kernel = stride, no padding or dilation).

    The forward pass stays a plain MaxPool (onnxruntime's fast kernel; its MaxPool with indices
    is a slow generic one). Beside it, a mask in the input's layout marks each window's first
    maximum in scan order (torch's choice at ties): ArgMax over the window's pixels, upsampled,
    compared with each pixel's position in its window. The adjoint is the gradient upsampled
    (nearest) times that mask.
    """
    kernel, stride = _pair(m.kernel_size), _pair(m.stride or m.kernel_size)
    if kernel != stride or _pair(m.padding) != (0, 0) or _pair(m.dilation) != (1, 1):
        return None
    c, h_in, w_in = _shape(node.args[0])[1:]
    kh, kw = kernel
    h, w = _shape(node)[-2:]
    if (h, w) != (h_in // kh, w_in // kw):  # ceil_mode windows hanging over the edge
        return None
    size = (h * kh, w * kw)
    pad = (0, w_in - size[1], 0, h_in - size[0])  # rows/columns no window covers: no gradient
    yy, xx = torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij")
    position = F.pad(((yy % kh) * kw + xx % kw).float(), pad, value=-2.0)[None, None]

    def fwd(x):
        xs = x[:, :, : size[0], : size[1]] if any(pad) else x
        # [N, C, h, w, kh*kw]: swapping two middle axes keeps kw contiguous (a fast transpose)
        tiles = _batch_reshape(
            _batch_reshape(xs, (c, h, kh, w, kw), ONE_PER_IMAGE).transpose(3, 4), (c, h, w, kh * kw), ONE_PER_IMAGE
        )
        first = _nearest_up(torch.argmax(tiles, dim=-1).to(x.dtype), kernel)
        if any(pad):
            first = F.pad(first, pad, value=-1.0)
        return F.max_pool2d(x, kernel, stride), (first == position.to(x.dtype)).to(x.dtype)

    def bwd(g, xs, y, mask, layout):
        gx = _nearest_up(g, kernel)
        return [kmul(F.pad(gx, pad) if any(pad) else gx, mask, layout)]

    return Adjoint([node.args[0]], fwd, bwd)


def _maxpool_rule(node: fx.Node, m: nn.MaxPool2d) -> Adjoint:
    tiled = _tiled_maxpool_rule(node, m)
    if tiled is not None:
        return tiled
    args = (m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
    x_shape = _shape(node.args[0])

    c, hw_in = x_shape[1], x_shape[2] * x_shape[3]
    hw_out = _shape(node)[2] * _shape(node)[3]

    def fwd(x):
        # the plain MaxPool is onnxruntime's fast kernel; the indices come from a second node
        # that only the backward pass reads, so the forward-only subgraph never runs it
        return F.max_pool2d(x, *args), MaxPoolIndices.apply(x, *args, c, hw_in)

    def bwd(g, xs, y, idx, layout):
        # Scatter-add so overlapping windows that pick the same pixel sum their gradients; the K
        # cotangents of an image share its forward indices.
        if not layout.multi:
            # into zeros made from x, (x < x) (false even for inf and NaN), not from its shape: they
            # carry x's symbolic batch axis to the gradient, so onnxruntime can prove the later
            # mask products' shapes equal and keeps them in its blocked layout
            zeros = _batch_reshape((xs[0] < xs[0]).to(g.dtype), (c, hw_in), layout)
            gx = zeros.scatter_add(2, idx.reshape(-1, c, hw_out), g.reshape(-1, c, hw_out))
            return [_batch_reshape(gx, x_shape[1:], layout)]
        n = idx.shape[0]
        gk = g.reshape(n, -1, c, hw_out)
        k = gk.shape[1]
        # zeros of the gradient's own batch (one fill; expanding an image-sized one costs a copy)
        flat = g.new_zeros((g.shape[0], c, hw_in)).reshape(n, -1, c, hw_in)
        ik = idx.reshape(n, 1, c, hw_out).expand(-1, k, -1, -1)
        return [flat.scatter_add(3, ik, gk).reshape(-1, *x_shape[1:])]

    return Adjoint([node.args[0]], fwd, bwd)


class MaxPoolIndices(torch.autograd.Function):
    """torch's per-plane max-pool indices, exported as ONE MaxPool node: ONNX counts indices over
    the whole [N, C, H, W] tensor, so each plane's offset (n*C + c)*H*W is subtracted (torch's own
    export finds those offsets with a second, full-resolution MaxPool, as slow as the first; an
    int64 Mod measured 25x slower than this Sub)."""

    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation, ceil_mode, c, hw):
        return F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)[1]

    @staticmethod
    def symbolic(g, x, kernel, stride, padding, dilation, ceil_mode, c, hw):
        k, s, p, d = _pair(kernel), _pair(stride or kernel), _pair(padding), _pair(dilation)
        _, idx = g.op(
            "MaxPool",
            x,
            outputs=2,
            kernel_shape_i=list(k),
            strides_i=list(s),
            pads_i=[p[0], p[1], p[0], p[1]],
            dilations_i=list(d),
            ceil_mode_i=int(bool(ceil_mode)),
            storage_order_i=0,
        )

        def const(v):
            return g.op("Constant", value_t=torch.tensor(v, dtype=torch.int64))

        n = g.op("Gather", g.op("Shape", x), const(0), axis_i=0)
        planes = g.op("Range", const(0), g.op("Mul", n, const(c)), const(1))
        offsets = g.op("Reshape", g.op("Mul", planes, const(hw)), const([-1, c, 1, 1]))
        return g.op("Sub", idx, offsets)


def _avgpool_rule(node: fx.Node, kernel, stride, padding, count_include_pad=True) -> Adjoint:
    """Average pooling as a depthwise conv with a constant kernel; its adjoint a ConvTranspose."""
    kernel, stride, padding = _pair(kernel), _pair(stride or kernel), _pair(padding)
    c, *x_hw = _shape(node.args[0])[1:]
    y_hw = _shape(node)[-2:]
    if any(padding) and not count_include_pad:
        raise _unsupported(f"average pooling with count_include_pad=False ({node.name})")
    expect = [(x + 2 * p - k) // s + 1 for x, p, k, s in zip(x_hw, padding, kernel, stride)]
    if list(y_hw) != expect:  # ceil_mode windows hanging over the edge average fewer pixels
        raise _unsupported(f"average pooling with ceil_mode windows ({node.name})")
    if tuple(x_hw) == tuple(y_hw) and kernel == (1, 1):
        return _identity_rule(node.args[0])
    weight = torch.full((c, 1, *kernel), 1.0 / (kernel[0] * kernel[1]))
    op = _output_padding(x_hw, y_hw, stride, padding, (1, 1), kernel)
    if tuple(y_hw) == (1, 1) and tuple(x_hw) == kernel and not any(padding):
        fwd = lambda x: (x.mean(dim=(2, 3), keepdim=True), None)  # noqa: E731  (GlobalAveragePool)
    else:
        fwd = lambda x: (F.avg_pool2d(x, kernel, stride, padding), None)  # noqa: E731
    return Adjoint(
        [node.args[0]],
        fwd,
        lambda g, xs, y, s, layout: [
            to_blocked(F.conv_transpose2d(g, weight.to(g.dtype), None, stride, padding, op, c), layout)
        ],
    )


def _adaptive_avg_rule(node: fx.Node, output_size) -> Adjoint:
    x_hw = _shape(node.args[0])[-2:]
    out = [x if o is None else o for x, o in zip(x_hw, _pair(output_size))]
    if any(x % o for x, o in zip(x_hw, out)):
        raise _unsupported(f"adaptive average pooling from {tuple(x_hw)} to {tuple(out)} (uneven windows)")
    kernel = tuple(x // o for x, o in zip(x_hw, out))
    return _avgpool_rule(node, kernel, kernel, 0)


# -- elementwise ----------------------------------------------------------------------------------
def _relu_rule(node: fx.Node, x: fx.Node, gm: fx.GraphModule) -> Adjoint:
    if _relu_into_maxpool(node, gm):  # its mask is applied by the pool, at the pooled size
        return Adjoint([x], lambda v: (F.relu(v), None), lambda g, xs, y, s, layout: [g])

    def fwd(v):
        y = F.relu(v)
        return y, step_above(y, 0.0)

    return Adjoint([x], fwd, lambda g, xs, y, mask, layout: [kmul(g, mask, layout)], phases=True)


RELU_FUNCTIONS = (F.relu, torch.relu, "relu")


def _is_relu(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)) is nn.ReLU
    return node.op in ("call_function", "call_method") and node.target in RELU_FUNCTIONS


def _relu_into_maxpool(node: fx.Node, gm: fx.GraphModule) -> bool:
    """A ReLU read only by a MaxPool. The pool routes each window's gradient to one pixel whose
    value is the window's output, so the ReLU mask at that pixel equals (pooled output > 0):
    masking the pooled gradient is exact and touches a quarter of the pixels or fewer."""
    if not _is_relu(node, gm) or len(node.users) != 1:
        return False
    user = next(iter(node.users))
    return user.op == "call_module" and isinstance(gm.get_submodule(user.target), nn.MaxPool2d) and user.args[0] is node


def _masked_by_output(rule: Adjoint) -> Adjoint:
    """The rule with its incoming gradient first multiplied by (output > 0): a mask made in the
    forward pass, as the ReLU's own, beside whatever the rule saves."""
    fwd, bwd = rule.fwd, rule.bwd

    def masked_fwd(*xs):
        y, saved = fwd(*xs)
        return y, (saved, step_above(y, 0.0))

    rule.fwd = masked_fwd
    rule.bwd = lambda g, xs, y, s, layout: bwd(kmul(g, s[1], layout), xs, y, s[0], layout)
    return rule


def _float32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


def clamp_mask(y: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """(lo < y < hi) as 0/1, y = hardtanh(., lo, hi) [N, C, H, W].

    For lo = 0 (ReLU6) in two passes instead of three: z = (y == 0), then u = y * 2^-e + z, with
    2^-e scaling hi into [0.5, 1), and the mask is (u < hi * 2^-e), since y = 0 lifts u to 1. The
    scaling is a 1x1 depthwise Conv, so onnxruntime fuses the Add of z and the final step into it
    (Conv + Sum + HardSigmoid) instead of running two steps and their product. Exact: the scale is
    a power of two, and z is 0 wherever y is not 0, for y >= the least normal float32 (a
    subnormal y > 0, never a network's output in practice, may read as 0 here).
    """
    # the fusion happens in onnxruntime's blocked layout only
    if lo != 0.0 or not 0.0 < hi < 2.0**100 or _float32(hi) != hi or not _whole_blocks(y):
        return step_above(y, lo) * step_below(y, hi)
    c = int(y.shape[1])
    scale = 2.0 ** -math.frexp(hi)[1]
    z = _Step.apply(y, -_slope(0.0), 1.0)  # (y <= 0), i.e. y == 0
    u = F.conv2d(y, torch.full((c, 1, 1, 1), scale, dtype=y.dtype), groups=c) + z
    return step_below(u, hi * scale)


def _clamp_rule(node: fx.Node, x: fx.Node, lo: float, hi: float) -> Adjoint:
    # the mask is forward state: made once per image, while y is fresh in cache, and read by
    # both backward passes (K cotangents share it)
    def fwd(v):
        y = F.hardtanh(v, lo, hi)
        return y, clamp_mask(y, lo, hi)

    return Adjoint([x], fwd, lambda g, xs, y, mask, layout: [kmul(g, mask, layout)], phases=True)


def _pointwise_rule(x: fx.Node, f, df) -> Adjoint:
    return Adjoint([x], lambda v: (f(v), None), lambda g, xs, y, s, layout: [kmul(g, df(xs[0], y), layout)])


def _hardswish_grad(x, y):
    return torch.where(x < -3, torch.zeros_like(x), torch.where(x > 3, torch.ones_like(x), x / 3 + 0.5))


def _hardsigmoid_grad(x, y):
    return ((x > -3) & (x < 3)).to(x.dtype) / 6


def _silu_grad(x, y):
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _identity_rule(x: fx.Node) -> Adjoint:
    return Adjoint([x], lambda v: (v, None), lambda g, xs, y, s, layout: [g])


class _BatchReshape(torch.autograd.Function):
    """t reshaped to [t.shape[0], *shape], exported as Reshape(t, [0, ...]): the 0 copies the
    batch axis, so it stays the symbolic N downstream (a -1 made it an unknown, and onnxruntime
    then could not prove the later mask products' shapes equal)."""

    @staticmethod
    def forward(ctx, t, shape):
        return t.reshape(t.shape[0], *shape)

    @staticmethod
    def symbolic(g, t, shape):
        # the last size as -1 (inferred): torch's exporter rejects a 0 without a -1
        target = g.op("Constant", value_t=torch.tensor([0, *shape[:-1], -1], dtype=torch.int64))
        return g.op("Reshape", t, target)


def _batch_reshape(g: torch.Tensor, rest: tuple[int, ...], layout: Layout) -> torch.Tensor:
    """g as [batch, *rest]: the batch axis copied in the one-per-image pass; a -1 in the K-per-image
    pass, whose axis is its own anyway and may be empty (the whole graph's default `cotangents`,
    which the 0-copying form cannot reshape: its -1 would divide by zero)."""
    return g.reshape(-1, *rest) if layout.multi else _BatchReshape.apply(g, rest)


class _Repeat(torch.autograd.Function):
    """t [B, C, h, w] repeated over kh x kw tiles (nearest upsampling), exported as ONE Resize
    with constant scales: onnxruntime runs it in its blocked layout (torch's own export computes
    the sizes in-graph, and that Resize runs in the plain layout). ONNX shape inference leaves the
    batch axis of such a Resize unknown; pipeline.keep_batch_axis restores it."""

    @staticmethod
    def forward(ctx, t, kh, kw):
        return t.repeat_interleave(kh, dim=2).repeat_interleave(kw, dim=3)

    @staticmethod
    def symbolic(g, t, kh, kw):
        scales = g.op("Constant", value_t=torch.tensor([1.0, 1.0, float(kh), float(kw)]))
        roi = g.op("Constant", value_t=torch.tensor([], dtype=torch.float32))
        return g.op(
            "Resize",
            t,
            roi,
            scales,
            mode_s="nearest",
            coordinate_transformation_mode_s="asymmetric",
            nearest_mode_s="floor",
        )


def _nearest_up(t: torch.Tensor, kernel: tuple[int, int]) -> torch.Tensor:
    """t upsampled (nearest) by the pool's kernel: each value over its window."""
    return _Repeat.apply(t, int(kernel[0]), int(kernel[1]))


def _reshape_rule(x: fx.Node, fwd) -> Adjoint:
    rest = tuple(int(v) for v in _shape(x)[1:])
    return Adjoint([x], lambda v: (fwd(v), None), lambda g, xs, y, s, layout: [_batch_reshape(g, rest, layout)])


def _binary_rule(node: fx.Node, op: str) -> Adjoint:
    """add/sub/mul of two operands, either of which may be a constant or a tensor."""
    a, b = node.args[0], node.args[1]
    if node.kwargs.get("alpha", 1) != 1:
        raise _unsupported(f"{op} with alpha ({node.name})")
    tensors = [v for v in (a, b) if isinstance(v, fx.Node)]
    y_shape = _shape(node)
    shapes = {v: _shape(v) for v in tensors}

    def fwd(*ts):
        it = iter(ts)
        va = next(it) if isinstance(a, fx.Node) else a
        vb = next(it) if isinstance(b, fx.Node) else b
        return {"add": operator.add, "sub": operator.sub, "mul": operator.mul}[op](va, vb), (va, vb)

    def bwd(g, xs, y, saved, layout):
        va, vb = saved
        grads = []
        for v, w, other, sign in ((a, b, vb, 1), (b, a, va, -1 if op == "sub" else 1)):
            if not isinstance(v, fx.Node):
                continue
            if v not in rule.live:  # a constant operand needs no gradient
                grads.append(None)
                continue
            if op == "mul":  # a forward tensor of the image is shared by its K cotangents
                gv = kmul(g, other, layout) if w in rule.live else g * other
            else:
                gv = g if sign == 1 else -g
            grads.append(_unbroadcast(gv, shapes[v], y_shape))
        return grads

    rule = Adjoint(tensors, fwd, None)
    rule.bwd = bwd
    return rule


def _cat_rule(node: fx.Node) -> Adjoint:
    parts = list(node.args[0])
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if dim == 0:
        raise _unsupported(f"concatenation along the batch dimension ({node.name})")
    sizes = [_shape(p)[dim] for p in parts]
    return Adjoint(
        parts, lambda *ts: (torch.cat(ts, dim), None), lambda g, xs, y, s, layout: list(torch.split(g, sizes, dim))
    )


def _linear_rule(node: fx.Node, m: nn.Linear) -> Adjoint:
    return Adjoint(
        [node.args[0]],
        lambda x: (F.linear(x, m.weight, m.bias), None),
        lambda g, xs, y, s, layout: [g.matmul(m.weight)],
    )


def _flatten_args(node: fx.Node) -> tuple[int, int]:
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return start, end


# -- registry -------------------------------------------------------------------------------------
class AdjointRule:
    """One op type: which fx nodes it takes, and for each its forward and adjoint.

    A subclass, registered with `@register`, sets what it matches (`modules`: nn.Module classes,
    subclasses included; `types`: nn.Module classes matched exactly; `functions`: fx call_function
    targets and call_method names), a one-line `description` (recorded in the model's `adjoint`
    metadata), `fp32_only` (ONNX op type -> its float inputs, for the ops its graph emits that a
    float16 copy must keep in float32; recorded in the model's metadata), implements `build`, and
    gives an `example` network that exercises it (the tests check every registered rule on its
    example against torch autograd).
    """

    modules: ClassVar[tuple[type[nn.Module], ...]] = ()
    types: ClassVar[tuple[type[nn.Module], ...]] = ()
    functions: ClassVar[tuple[Any, ...]] = ()
    description: ClassVar[str] = ""
    fp32_only: ClassVar[dict[str, tuple[int, ...]]] = {}

    @property
    def name(self) -> str:
        """The rule's name in the metadata: its class name without the `Rule` suffix."""
        return type(self).__name__.removesuffix("Rule")

    def matches(self, node: fx.Node, gm: fx.GraphModule) -> bool:
        """Whether this rule takes the node."""
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            return type(m) in self.types or isinstance(m, self.modules)
        return node.op in ("call_function", "call_method") and node.target in self.functions

    def build(self, node: fx.Node, gm: fx.GraphModule) -> Adjoint:
        """The node's forward and adjoint (or UnsupportedOp for a variant it cannot handle)."""
        raise NotImplementedError

    @staticmethod
    def example() -> tuple[nn.Module, tuple[int, int, int]]:
        """A small network in eval mode that uses this rule (in each of its forms), and its input
        shape [C, H, W]."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<adjoint rule {self.name}>"


# Dispatch tries the rules in registration order and takes the first that matches; a module
# class or function claimed by an earlier rule is refused at registration, so the order matters
# only for subclasses (`modules`) of another rule's classes.
RULES: list[AdjointRule] = []


def register(cls: type[AdjointRule]) -> type[AdjointRule]:
    """Class decorator: add a rule to the registry."""
    rule = cls()
    if not rule.description or "\n" in rule.description:
        raise ValueError(f"adjoint rule {rule.name} needs a one-line description")
    for other in RULES:
        claimed = {*rule.types, *rule.modules} & {*other.types, *other.modules} | {
            f for f in rule.functions if f in other.functions
        }
        if claimed:
            raise ValueError(f"adjoint rule {rule.name} claims {claimed}, already {other.name}'s")
    RULES.append(rule)
    return cls


def rule_for(node: fx.Node, gm: fx.GraphModule) -> AdjointRule:
    """The registered rule that takes an fx node, or UnsupportedOp naming the node."""
    for rule in RULES:
        if rule.matches(node, gm):
            return rule
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        raise _unsupported(f"module {type(m).__name__} ({node.target})")
    if node.op in ("call_function", "call_method"):
        name = getattr(node.target, "__name__", str(node.target))
        raise _unsupported(f"operation {name!r} ({node.name})")
    raise _unsupported(f"fx node {node.op} {node.target!r}")


def adjoint_for(node: fx.Node, gm: fx.GraphModule) -> Adjoint:
    """The forward + adjoint of one fx node, built by its rule."""
    rule = rule_for(node, gm)
    adjoint = rule.build(node, gm)
    adjoint.rule = rule
    return adjoint


# How the VJP module uses the rules (the `method` line of the model's `adjoint` metadata).
METHOD = (
    "hand-written adjoint rules (export/adjoint.py) applied in reverse over the torch.fx graph of "
    "the truncated network; two backward passes read one forward pass: cotangent [N, ...] one per "
    "image (its batch axis the image's; the cotangent and ConvTranspose outputs enter onnxruntime's "
    "NCHWc layout through an identity 1x1 depthwise Conv) and cotangents [N*K, ...] K per image, "
    "image-major"
)


def describe(rules: list[AdjointRule]) -> dict[str, Any]:
    """The model's `adjoint` metadata: the method, and each rule's description by name."""
    return {"method": METHOD, "rules": {rule.name: rule.description for rule in rules}}


def fp32_table(rules: list[AdjointRule]) -> dict[str, list[int]]:
    """ONNX op type -> float inputs kept in float32 in a float16 copy, over the given rules."""
    table: dict[str, set[int]] = {}
    for rule in rules:
        for op, inputs in rule.fp32_only.items():
            table.setdefault(op, set()).update(inputs)
    return {op: sorted(inputs) for op, inputs in sorted(table.items())}


def _conv_bn_stats(*bns: nn.BatchNorm2d) -> None:
    """Non-trivial batch-norm statistics for the examples (fresh ones are the identity)."""
    with torch.no_grad():
        for bn in bns:
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)


class _Example(nn.Module):
    """An example network: a forward function over the given submodules and constant tensors."""

    def __init__(self, forward: Callable[..., torch.Tensor], buffers: dict[str, torch.Tensor], **modules: nn.Module):
        super().__init__()
        self._forward = forward
        for name, m in modules.items():
            self.add_module(name, m)
        for name, t in buffers.items():
            self.register_buffer(name, t)

    def forward(self, x):
        return self._forward(self, x)


def _example(
    shape: tuple[int, int, int], forward: Callable[..., torch.Tensor], buffers: dict | None = None, **modules: nn.Module
) -> tuple[nn.Module, tuple[int, int, int]]:
    return _Example(forward, buffers or {}, **modules).eval(), shape


@register
class ReLURule(AdjointRule):
    description = (
        "ReLU: the mask of the forward output as an exact 0/1 step (HardSigmoid with a "
        "power-of-two slope, kept in onnxruntime's NCHWc layout), made in the forward pass; "
        "nothing where a MaxPool alone reads it (the pool masks its output)"
    )
    types = (nn.ReLU,)
    functions = RELU_FUNCTIONS
    fp32_only = {"HardSigmoid": (0,)}  # slopes up to 2^126: inf * 0 in float16

    def matches(self, node, gm):
        return _is_relu(node, gm)

    def build(self, node, gm):
        return _relu_rule(node, node.args[0], gm)

    @staticmethod
    def example():
        # module, function and method spellings; one read only by a max-pool
        return _example(
            (3, 12, 12),
            lambda s, x: s.pool(torch.relu(s.c2(F.relu(s.act(s.c1(x))).relu()))).relu(),
            c1=nn.Conv2d(3, 8, 3, padding=1),
            act=nn.ReLU(),
            c2=nn.Conv2d(8, 8, 3),
            pool=nn.MaxPool2d(2),
        )


@register
class Conv2dRule(AdjointRule):
    description = (
        "Conv2d: stride 1 = Conv with flipped, in/out-transposed weights (computed in-graph); "
        "strided depthwise = zero insertion (1x1 ConvTranspose) + depthwise Conv, in the "
        "K-per-image pass (3x3/2, even sizes) four phase Convs kept apart through masks, "
        "BatchNorm and widening 1x1 adjoints and interleaved by a grouped 2x2 ConvTranspose; "
        "kernel nearly a multiple of the stride (e.g. 11x11/4) = sub-pixel Conv + DepthToSpace; "
        "other strided = ConvTranspose with output_padding; a BatchNorm it alone feeds is "
        "folded into its adjoint weights"
    )
    modules = (nn.Conv2d,)

    def build(self, node, gm):
        return _conv_rule(node, gm.get_submodule(node.target), _folded_bn(node, gm))

    @staticmethod
    def example():
        bn = nn.BatchNorm2d(16)
        _conv_bn_stats(bn)

        def forward(s, x):
            y = s.grouped(s.dw5(s.dw(s.bn(s.expand(x)))))  # phases through BN and the widening 1x1
            return torch.cat([s.down(y).flatten(1), s.sub(x).flatten(1)], 1)

        return _example(
            (3, 36, 36),
            forward,
            expand=nn.Conv2d(3, 16, 1),
            bn=bn,
            dw=nn.Conv2d(16, 16, 3, 2, 1, groups=16),
            dw5=nn.Conv2d(16, 16, 5, 2, 1, groups=16),
            grouped=nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=4),
            down=nn.Conv2d(16, 16, 3, 2),
            sub=nn.Conv2d(3, 4, 11, 4, 2),
        )


@register
class BatchNorm2dRule(AdjointRule):
    description = (
        "BatchNorm2d (eval): the per-channel scale, or nothing where it is folded into the conv it alone follows"
    )
    modules = (nn.BatchNorm2d,)

    def build(self, node, gm):
        m, x = gm.get_submodule(node.target), node.args[0]
        return _bn_rule(node, m, isinstance(x, fx.Node) and _folded_bn(x, gm) is m)

    @staticmethod
    def example():
        b1, b2 = nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        _conv_bn_stats(b1, b2)
        return _example(
            (3, 10, 10), lambda s, x: s.b2(torch.relu(s.b1(s.conv(x)))), conv=nn.Conv2d(3, 8, 3), b1=b1, b2=b2
        )


@register
class HardtanhRule(AdjointRule):
    description = (
        "ReLU6/Hardtanh: the mask of the forward output as exact 0/1 steps, made in the forward "
        "pass; ReLU6 on whole 16-channel blocks in two passes (one step, then a 1x1 depthwise "
        "Conv + Add + step that onnxruntime fuses)"
    )
    modules = (nn.ReLU6,)
    types = (nn.Hardtanh,)
    functions = (F.relu6,)
    fp32_only = {"HardSigmoid": (0,)}

    def build(self, node, gm):
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            return _clamp_rule(node, node.args[0], float(m.min_val), float(m.max_val))
        return _clamp_rule(node, node.args[0], 0.0, 6.0)

    @staticmethod
    def example():
        def forward(s, x):
            y = s.ht(s.c2(s.relu6(3 * s.c1(x))))
            return F.relu6(4 * s.c3(y))

        return _example(
            (3, 8, 8),
            forward,
            c1=nn.Conv2d(3, 16, 1),
            relu6=nn.ReLU6(),
            c2=nn.Conv2d(16, 8, 1),
            ht=nn.Hardtanh(-1.0, 1.0),
            c3=nn.Conv2d(8, 8, 1),
        )


@register
class MaxPool2dRule(AdjointRule):
    description = (
        "MaxPool2d: non-overlapping windows = the mask of each window's first maximum (ArgMax) "
        "times the nearest-upsampled gradient (a Resize with constant scales); other = indices "
        "from a second MaxPool node read only by the backward pass + ScatterElements(add) into "
        "zeros made from the pool's input; after a ReLU it alone reads, the gradient first "
        "masked by (pooled output > 0)"
    )
    modules = (nn.MaxPool2d,)
    # onnxruntime's CPU provider has no float16 scatter-add, and float16 sums would lose gradients;
    # the masks of a ReLU before it are HardSigmoid steps (see ReLURule)
    fp32_only = {"ScatterElements": (0, 2), "HardSigmoid": (0,)}

    def build(self, node, gm):
        rule = _maxpool_rule(node, gm.get_submodule(node.target))
        return _masked_by_output(rule) if _relu_into_maxpool(node.args[0], gm) else rule

    @staticmethod
    def example():
        def forward(s, x):
            y = s.overlap(torch.relu(s.c1(x)))  # overlapping windows, after a ReLU it alone reads
            return torch.cat(
                [s.tiled(s.c2(y)).flatten(1), s.ceil(s.c3(y)).flatten(1), s.tiled_odd(torch.relu(s.c4(x))).flatten(1)],
                1,
            )

        return _example(
            (3, 20, 20),
            forward,
            c1=nn.Conv2d(3, 8, 3, padding=1),
            overlap=nn.MaxPool2d(3, 2, 1),
            c2=nn.Conv2d(8, 8, 1),
            tiled=nn.MaxPool2d(2),
            c3=nn.Conv2d(8, 8, 1),
            ceil=nn.MaxPool2d(3, 2, ceil_mode=True, padding=1),
            c4=nn.Conv2d(3, 4, 3),
            tiled_odd=nn.MaxPool2d(4),
        )


@register
class AvgPool2dRule(AdjointRule):
    description = "AvgPool2d: ConvTranspose with a constant 1/k kernel (identity where sizes match)"
    modules = (nn.AvgPool2d,)

    def build(self, node, gm):
        m = gm.get_submodule(node.target)
        if m.divisor_override:
            raise _unsupported(f"AvgPool2d with divisor_override ({node.target})")
        return _avgpool_rule(node, m.kernel_size, m.stride, m.padding, m.count_include_pad)

    @staticmethod
    def example():
        def forward(s, x):
            y = s.c(x)
            return torch.cat([s.a2(y).flatten(1), s.a3(y).flatten(1), s.a1(y).flatten(1), s.whole(y).flatten(1)], 1)

        return _example(
            (3, 10, 10),
            forward,
            c=nn.Conv2d(3, 16, 3),
            a2=nn.AvgPool2d(2),
            a3=nn.AvgPool2d(3, 2, 1),
            a1=nn.AvgPool2d(1),
            whole=nn.AvgPool2d(8),
        )


@register
class AdaptiveAvgPool2dRule(AdjointRule):
    description = "AdaptiveAvgPool2d (even windows): ConvTranspose with a constant 1/k kernel"
    modules = (nn.AdaptiveAvgPool2d,)
    functions = (F.adaptive_avg_pool2d,)

    def build(self, node, gm):
        if node.op == "call_module":
            return _adaptive_avg_rule(node, gm.get_submodule(node.target).output_size)
        return _adaptive_avg_rule(node, node.args[1] if len(node.args) > 1 else node.kwargs["output_size"])

    @staticmethod
    def example():
        def forward(s, x):
            y = s.c(x)
            return torch.cat([s.pool(y).flatten(1), F.adaptive_avg_pool2d(y, 1).flatten(1)], 1)

        return _example((3, 12, 12), forward, c=nn.Conv2d(3, 16, 3, padding=1), pool=nn.AdaptiveAvgPool2d((6, 3)))


class PointwiseRule(AdjointRule):
    """An elementwise activation: its derivative from the forward input and output."""

    @staticmethod
    def f(x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def df(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def build(self, node, gm):
        return _pointwise_rule(node.args[0], self.f, self.df)

    @classmethod
    def example(cls):
        module, function = cls.types[0](), cls.functions[0]
        return _example(
            (3, 8, 8),
            lambda s, x: function(s.c2(s.act(s.c1(x)))),
            c1=nn.Conv2d(3, 8, 3, padding=1),
            act=module,
            c2=nn.Conv2d(8, 8, 1),
        )


@register
class HardswishRule(PointwiseRule):
    description = "Hardswish: its closed-form derivative times the gradient"
    types = (nn.Hardswish,)
    functions = (F.hardswish,)
    f = staticmethod(F.hardswish)
    df = staticmethod(_hardswish_grad)


@register
class HardsigmoidRule(PointwiseRule):
    description = "Hardsigmoid: its closed-form derivative times the gradient"
    types = (nn.Hardsigmoid,)
    functions = (F.hardsigmoid,)
    f = staticmethod(F.hardsigmoid)
    df = staticmethod(_hardsigmoid_grad)


@register
class SiLURule(PointwiseRule):
    description = "SiLU: its closed-form derivative times the gradient"
    types = (nn.SiLU,)
    functions = (F.silu,)
    f = staticmethod(F.silu)
    df = staticmethod(_silu_grad)


@register
class SigmoidRule(PointwiseRule):
    description = "Sigmoid: y (1 - y) times the gradient"
    types = (nn.Sigmoid,)
    functions = (torch.sigmoid,)
    f = staticmethod(torch.sigmoid)
    df = staticmethod(lambda x, y: y * (1 - y))


@register
class IdentityRule(AdjointRule):
    description = "Dropout (eval), Identity, contiguous: the identity"
    modules = (nn.Dropout, nn.Identity)
    functions = (F.dropout, "contiguous", F.dropout2d)

    def build(self, node, gm):
        return _identity_rule(node.args[0])

    @staticmethod
    def example():
        def forward(s, x):
            y = s.drop(s.idn(s.c(x))).contiguous()
            return F.dropout2d(F.dropout(y, training=False), training=False)

        return _example((3, 6, 6), forward, c=nn.Conv2d(3, 4, 3), idn=nn.Identity(), drop=nn.Dropout())


@register
class FlattenRule(AdjointRule):
    description = "flatten: a Reshape that copies the batch axis (Reshape with 0), so it stays the symbolic N"
    modules = (nn.Flatten,)
    functions = (torch.flatten, "flatten")

    def build(self, node, gm):
        x = node.args[0]
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            return _reshape_rule(x, lambda v: v.flatten(m.start_dim, m.end_dim))
        start, end = _flatten_args(node)
        return _reshape_rule(x, lambda v: v.flatten(start, end))

    @staticmethod
    def example():
        def forward(s, x):
            y = s.c(x)
            return torch.cat([s.flat(y), torch.flatten(y, 1), y.flatten(2).flatten(1)], 1)

        return _example((3, 6, 6), forward, c=nn.Conv2d(3, 4, 3), flat=nn.Flatten())


@register
class LinearRule(AdjointRule):
    description = "Linear: the gradient times the weight matrix"
    modules = (nn.Linear,)

    def build(self, node, gm):
        return _linear_rule(node, gm.get_submodule(node.target))

    @staticmethod
    def example():
        return _example(
            (3, 6, 6),
            lambda s, x: s.fc2(torch.relu(s.fc1(s.c(x).flatten(1)))),
            c=nn.Conv2d(3, 4, 3),
            fc1=nn.Linear(64, 16),
            fc2=nn.Linear(16, 5),
        )


class _BinaryRule(AdjointRule):
    """add/sub/mul of two operands, either of which may be a constant or a tensor (broadcasting)."""

    op: ClassVar[str] = ""

    def build(self, node, gm):
        return _binary_rule(node, self.op)


@register
class AddRule(_BinaryRule):
    description = "add (broadcasting): the gradient to each tensor operand, summed over broadcast axes"
    functions = (operator.add, torch.add, "add", operator.iadd)
    op = "add"

    @staticmethod
    def example():
        def forward(s, x):
            y = s.c1(x)
            y = torch.add(y, s.c2(y)) + 0.5
            y += s.bias  # a constant operand
            return y.add(F.adaptive_avg_pool2d(y, 1))  # broadcast over space

        return _example(
            (3, 6, 6), forward, {"bias": torch.randn(4, 1, 1)}, c1=nn.Conv2d(3, 4, 1), c2=nn.Conv2d(4, 4, 1)
        )


@register
class SubRule(_BinaryRule):
    description = "sub (broadcasting): the gradient and its negative, summed over broadcast axes"
    functions = (operator.sub, torch.sub, "sub")
    op = "sub"

    @staticmethod
    def example():
        def forward(s, x):
            y = s.c1(x)
            return torch.sub(1.0 - y, s.c2(y)).sub(s.bias) - F.adaptive_avg_pool2d(y, 1)

        return _example(
            (3, 6, 6), forward, {"bias": torch.randn(4, 1, 1)}, c1=nn.Conv2d(3, 4, 1), c2=nn.Conv2d(4, 4, 1)
        )


@register
class MulRule(_BinaryRule):
    description = (
        "mul (broadcasting): the gradient times the other operand, a forward tensor shared by an image's K cotangents"
    )
    functions = (operator.mul, torch.mul, "mul", operator.imul)
    op = "mul"

    @staticmethod
    def example():
        def forward(s, x):
            y = s.c1(x)
            y = torch.mul(y, s.c2(y)) * 2.0
            y *= s.scale  # a constant operand
            return y.mul(torch.sigmoid(F.adaptive_avg_pool2d(y, 1)))  # squeeze-and-excitation

        return _example(
            (3, 6, 6), forward, {"scale": torch.randn(4, 1, 1)}, c1=nn.Conv2d(3, 4, 1), c2=nn.Conv2d(4, 4, 1)
        )


@register
class CatRule(AdjointRule):
    description = "cat (not along the batch axis): the gradient split into the parts"
    functions = (torch.cat, torch.concat)

    def build(self, node, gm):
        return _cat_rule(node)

    @staticmethod
    def example():
        return _example(
            (3, 6, 6),
            lambda s, x: torch.concat([s.c1(x), torch.cat((s.c2(x), x), dim=1)], 1),
            c1=nn.Conv2d(3, 4, 1),
            c2=nn.Conv2d(3, 2, 1),
        )


@register
class ReshapeRule(AdjointRule):
    description = "view/reshape: a Reshape that copies the batch axis (Reshape with 0), so it stays the symbolic N"
    functions = ("view", "reshape", torch.reshape)

    def build(self, node, gm):
        y_shape = _shape(node)
        return _reshape_rule(node.args[0], lambda v: v.reshape(-1, *y_shape[1:]))

    @staticmethod
    def example():
        def forward(s, x):
            y = s.c(x)
            return torch.reshape(y.view(-1, 4, 16).reshape(-1, 64), (-1, 8, 8))

        return _example((3, 6, 6), forward, c=nn.Conv2d(3, 4, 3))


def _fetch(gm: nn.Module, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _depends_on_input(graph: fx.Graph, inp: fx.Node) -> set[fx.Node]:
    live = {inp}
    for node in graph.nodes:
        if any(a in live for a in node.all_input_nodes):
            live.add(node)
    return live


class VJPModule(nn.Module):
    """forward(image, cotangent) -> (features, J^T cotangent) by a reverse pass over the fx graph.

    `feature_map`: the name of a node (the map before a pooling head) whose value is output last too.
    """

    def __init__(self, gm: fx.GraphModule, input_shape: tuple[int, ...], feature_map: str | None = None):
        super().__init__()
        self.net = gm
        ShapeProp(gm).propagate(torch.zeros((2, *input_shape)))
        nodes = list(gm.graph.nodes)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise ModelError(None, f"the network must take one image input, not {len(placeholders)}")
        self._input = placeholders[0]
        self._output = next(n for n in nodes if n.op == "output").args[0]
        if not isinstance(self._output, fx.Node):
            raise ModelError(None, "the network must return one tensor")
        live = _depends_on_input(gm.graph, self._input)
        if self._output not in live:
            raise ModelError(None, "the network's output does not depend on its input")
        self._plan: list[tuple[fx.Node, Adjoint]] = []
        needed = {a for n in live for a in n.all_input_nodes}
        for node in nodes:
            if node.op == "get_attr" and node in needed:  # a constant read by the network
                self._plan.append(
                    (node, Adjoint([], lambda t=node.target: (_fetch(gm, t), None), lambda g, xs, y, s, layout: []))
                )
            elif node in needed and node not in live and node.op != "placeholder":
                raise _unsupported(f"constant subexpression {node.name}")
            if node in live and node is not self._input and node.op != "output":
                step = adjoint_for(node, gm)
                bad = [a for a in node.all_input_nodes if a in live and a not in step.inputs]
                if bad:
                    raise _unsupported(f"{node.name} reading {bad[0].name} outside its tensor arguments")
                step.live = frozenset(a for a in step.inputs if a in live)
                self._plan.append((node, step))
        self._live = live
        self._feature_map = None
        if feature_map is not None:
            self._feature_map = next((n for n in nodes if n.name == feature_map), None)
            if self._feature_map not in live:
                raise ModelError(None, f"feature_map node {feature_map!r} is not on the image's path")
        used = {id(step.rule) for _, step in self._plan}
        self.rules: list[AdjointRule] = [rule for rule in RULES if id(rule) in used]  # registry order
        self.eval()  # exporters restore this mode on the shared modules afterwards

    def forward(self, image: torch.Tensor, cotangent: torch.Tensor, cotangents: torch.Tensor | None = None):
        """cotangent: [N, *feature_shape], one per image. Returns features [N, ...] and input_grad
        [N, 3, H, W]; given cotangents [N*K, *feature_shape], image-major (rows n*K .. n*K+K-1
        belong to image n), also input_grads [N*K, 3, H, W] from the same forward pass. With a
        `feature_map` node, its value [N, ...] comes last."""
        env: dict[fx.Node, Any] = {self._input: image}
        saved: dict[fx.Node, Any] = {}
        for node, rule in self._plan:
            env[node], saved[node] = rule.fwd(*[env[a] for a in rule.inputs])
        features = env[self._output]
        extra = () if self._feature_map is None else (env[self._feature_map],)
        gx = self._backward(env, saved, cotangent, ONE_PER_IMAGE)
        if cotangents is None:
            return (features, gx, *extra)
        return (features, gx, self._backward(env, saved, cotangents, K_PER_IMAGE), *extra)

    def _backward(self, env: dict, saved: dict, cotangent: torch.Tensor, layout: Layout) -> torch.Tensor:
        """The reverse pass over the plan for one cotangent layout (see kmul)."""
        cotangent = to_blocked(cotangent, layout)  # the one-per-image pass only (to_blocked checks)
        grads: dict[fx.Node, torch.Tensor] = {self._output: cotangent}
        for node, step in reversed(self._plan):
            g = grads.pop(node, None)
            if g is None:
                continue
            if not step.phases:
                g = whole(g)
            xs = [env[a] for a in step.inputs]
            for a, ga in zip(step.inputs, step.bwd(g, xs, env[node], saved[node], layout)):
                if ga is None or a not in self._live:
                    continue
                if a in grads:
                    both = isinstance(ga, Phases) and isinstance(grads[a], Phases)
                    grads[a] = grads[a] + ga if both else whole(grads[a]) + whole(ga)
                else:
                    grads[a] = ga
        gx = grads.get(self._input)
        if gx is None:  # the output does not depend on the image through any live path
            return torch.zeros((cotangent.shape[0], *env[self._input].shape[1:]), dtype=cotangent.dtype)
        return whole(gx)
