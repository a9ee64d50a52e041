"""Single adjoint rules against torch autograd in float64, and the ONNX they export to."""

from __future__ import annotations

import copy
import io

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pbv_onnx.export import adjoint
from pbv_onnx.export.adjoint import VJPModule


def autograd_input_grad(f, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(f(x), x, g)
    return gx


@pytest.mark.parametrize(
    "cin, cout, kernel, stride, padding, size",
    [
        (3, 8, (11, 11), (4, 4), (2, 2), (67, 67)),  # AlexNet's first layer, smaller
        (4, 5, (4, 4), (2, 2), (1, 1), (17, 17)),  # no zero taps; odd input: rows no output reached
        (2, 3, (5, 3), (2, 1), (2, 1), (15, 12)),  # unequal strides and kernels
        (2, 3, (8, 8), (4, 4), (0, 0), (30, 31)),  # no padding, uneven right edge
    ],
)
def test_subpixel_conv_adjoint_equals_autograd(cin, cout, kernel, stride, padding, size):
    torch.manual_seed(0)
    w = torch.randn(cout, cin, *kernel, dtype=torch.float64)
    x = torch.randn(2, cin, *size, dtype=torch.float64)
    conv = lambda v: F.conv2d(v, w, None, stride, padding)  # noqa: E731
    y = conv(x)
    g = torch.randn_like(y)
    assert adjoint._subpixel_pays(kernel, stride)
    got = adjoint._subpixel_adjoint(g, w, size, stride, padding)
    torch.testing.assert_close(got, autograd_input_grad(conv, x, g), rtol=1e-10, atol=1e-10)


def test_subpixel_form_is_chosen_only_where_it_measured_faster():
    assert adjoint._subpixel_pays((11, 11), (4, 4))
    assert not adjoint._subpixel_pays((7, 7), (2, 2))
    assert not adjoint._subpixel_pays((3, 3), (2, 2))
    assert not adjoint._subpixel_pays((1, 1), (2, 2))
    assert not adjoint._subpixel_pays((3, 3), (1, 1))


class Pool(nn.Module):
    def __init__(self, relu_module: bool = False, **kw):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.relu = nn.ReLU(inplace=True) if relu_module else torch.relu
        self.pool = nn.MaxPool2d(**kw)

    def forward(self, x):
        return self.pool(self.relu(self.conv(x)))


def export_vjp(net: nn.Module, x: torch.Tensor, cot: torch.Tensor) -> bytes:
    vjp = VJPModule(torch.fx.symbolic_trace(net), tuple(x.shape[1:]))
    buf = io.BytesIO()
    torch.onnx.export(
        vjp,
        (x, cot),
        buf,
        dynamo=False,
        opset_version=17,
        input_names=["image", "cotangent"],
        output_names=["features", "input_grad"],
        dynamic_axes={"image": {0: "n"}, "cotangent": {0: "nk"}},
    )
    return buf.getvalue()


@pytest.mark.parametrize(
    "kw", [dict(kernel_size=2, stride=2), dict(kernel_size=3, stride=2), dict(kernel_size=3, stride=2, padding=1)]
)
@pytest.mark.parametrize("relu_module", [False, True])
def test_relu_then_maxpool_with_exact_ties_matches_autograd(kw, relu_module):
    """Flat image regions give exactly tied window maxima (positive and zero): the gradient must
    go to torch's choice, the first maximum in scan order, with the ReLU mask moved onto the
    pooled output."""
    import onnxruntime as ort

    torch.manual_seed(2)
    net = Pool(relu_module, **kw).eval()
    x = torch.randn(2, 3, 20, 22)
    x[:, :, 4:14, 3:15] = 0.7  # a flat patch: equal conv outputs, positive or not per channel
    x[1, :, :, 15:] = -0.2
    with torch.no_grad():
        y = net(x)
    assert (y > 0).any() and (y == 0).any()
    cot = torch.randn_like(y)
    sess = ort.InferenceSession(export_vjp(net, x, cot), providers=["CPUExecutionProvider"])
    _, gx = sess.run(None, {"image": x.numpy(), "cotangent": cot.numpy()})
    np.testing.assert_allclose(gx, autograd_input_grad(net, x, cot).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kw",
    [
        dict(kernel_size=3, stride=2),
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=3, stride=2, ceil_mode=True),
    ],
)
def test_overlapping_maxpool_exports_one_indices_node_kept_out_of_the_forward_graph(kw):
    """The backward reads indices from a single MaxPool node (no per-plane offset MaxPool), and the
    features-only subgraph runs only the plain, fast MaxPool; both graphs match autograd."""
    import onnxruntime as ort
    from onnx.utils import Extractor

    torch.manual_seed(1)
    net = Pool(**kw).eval()
    gm = torch.fx.symbolic_trace(net)
    vjp = VJPModule(gm, (3, 20, 21))
    x = torch.randn(2, 3, 20, 21)
    with torch.no_grad():
        y = net(x)
    cot = torch.randn_like(y)
    buf = io.BytesIO()
    torch.onnx.export(
        vjp,
        (x, cot),
        buf,
        dynamo=False,
        opset_version=17,
        input_names=["image", "cotangent"],
        output_names=["features", "input_grad"],
    )
    proto = onnx.load_model_from_string(buf.getvalue())
    pools = [n for n in proto.graph.node if n.op_type == "MaxPool"]
    assert sorted(len([o for o in n.output if o]) for n in pools) == [1, 2]
    fwd = Extractor(proto).extract_model(["image"], ["features"])
    assert [len([o for o in n.output if o]) for n in fwd.graph.node if n.op_type == "MaxPool"] == [1]

    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    f, gx = sess.run(None, {"image": x.numpy(), "cotangent": cot.numpy()})
    np.testing.assert_allclose(f, y.numpy(), rtol=1e-5, atol=1e-6)
    want = autograd_input_grad(net, x, cot).numpy()
    np.testing.assert_allclose(gx, want, rtol=1e-4, atol=1e-5)


class Steps(nn.Module):
    """The mask steps of the ReLU, ReLU6 and Hardtanh(-1, 1) adjoints, side by side."""

    THRESHOLDS = (0.0, 6.0, -1.0, 1.0)

    def forward(self, y):
        return torch.stack([f(y, t) for t in self.THRESHOLDS for f in (adjoint.step_above, adjoint.step_below)])


class ClampMasks(nn.Module):
    """ReLU6 and Hardtanh(0, hi) masks of a [N, 16, H, W] tensor, stacked. Each clamp reads an
    exact identity Conv, as in a network, where onnxruntime's blocked layout starts."""

    HIGHS = (6.0, 1.0, 0.75)
    ORDERS = (list(range(16)), list(range(15, -1, -1)), list(range(1, 16)) + [0])  # distinct convs

    def forward(self, v):
        return torch.stack(
            [
                adjoint.clamp_mask(F.hardtanh(F.conv2d(v, torch.eye(16)[order, :, None, None]), 0.0, hi), 0.0, hi)
                for hi, order in zip(self.HIGHS, self.ORDERS)
            ]
        )


def test_the_two_pass_relu6_mask_is_exact_and_fused_in_onnxruntime(tmp_path):
    """clamp_mask(y) = (0 < y < hi) bit for bit at 0, -0, hi and their float32 neighbours, far
    out on both sides and on random values (positive subnormals excepted: they may read as 0); and
    onnxruntime runs it as one step plus one Conv with the Add and the last step fused into it."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    special = np.concatenate(
        [
            _float32_near([0.0, *ClampMasks.HIGHS, 3.0]),
            np.float32([-0.0, np.finfo(np.float32).tiny, 1e-30, -1e30, 1e30]),
        ]
    )
    v = rng.uniform(-2, 8, (2, 16, 16, 16)).astype(np.float32)
    v.reshape(-1)[: len(special)] = special
    buf = io.BytesIO()
    torch.onnx.export(
        ClampMasks(),
        (torch.from_numpy(v),),
        buf,
        dynamo=False,
        opset_version=17,
        input_names=["v"],
        output_names=["masks"],
        dynamic_axes={"v": {0: "n"}},
    )
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    got = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"]).run(None, {"v": v})[0]
    for mask, hi, order in zip(got, ClampMasks.HIGHS, ClampMasks.ORDERS):
        y = np.clip(v[:, order], 0, np.float32(hi))
        subnormal = (y != 0) & (np.abs(y) < np.finfo(np.float32).tiny)
        want = ((y > 0) & (y < np.float32(hi))).astype(np.float32)
        bad = np.argwhere((mask != want) & ~subnormal)
        assert not len(bad), [(hi, float(y[tuple(i)]), mask[tuple(i)]) for i in bad[:5]]
        assert subnormal.sum() == 4  # the positive neighbours of 0; the negative ones clip to 0
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    ops = [n.op_type for n in optimized.graph.node]
    assert "Mul" not in ops and ops.count("HardSigmoid") == len(ClampMasks.HIGHS), ops
    fused = [
        n
        for n in optimized.graph.node
        if n.op_type == "Conv" and any(a.name == "activation" and a.s == b"HardSigmoid" for a in n.attribute)
    ]
    assert len(fused) == len(ClampMasks.HIGHS), ops


def _float32_near(values, ulps: int = 4) -> np.ndarray:
    """Each value and its `ulps` float32 neighbours on either side."""
    out = []
    for v in np.asarray(values, np.float32):
        lo = hi = v
        out.append(v)
        for _ in range(ulps):
            lo, hi = np.nextafter(lo, np.float32(-np.inf)), np.nextafter(hi, np.float32(np.inf))
            out += [lo, hi]
    return np.array(out, np.float32)


def test_mask_steps_are_exact_comparisons_in_onnxruntime():
    """The HardSigmoid steps equal (y > t) and (y < t) bit for bit: at the thresholds and the
    float32 values next to them, at normal values near 0 and far out (overflow to +-inf inside
    the step), for random values; subnormals just above 0 are the documented exception."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    y = np.concatenate(
        [
            _float32_near([0.0, 6.0, -1.0, 1.0, 3.0, 0.5, -0.5, 12.0]),
            np.float32(
                [
                    np.finfo(np.float32).tiny,
                    -np.finfo(np.float32).tiny,
                    1e-30,
                    -1e-30,
                    1e30,
                    -1e30,
                    np.finfo(np.float32).max,
                    -np.finfo(np.float32).max,
                ]
            ),
            rng.uniform(-8, 8, 5000).astype(np.float32),
        ]
    ).astype(np.float32)
    subnormal = (y != 0) & (np.abs(y) < np.finfo(np.float32).tiny)
    assert subnormal.sum() == 8  # the neighbours of 0: checked apart, below
    buf = io.BytesIO()
    torch.onnx.export(
        Steps(),
        (torch.from_numpy(y),),
        buf,
        dynamo=False,
        opset_version=17,
        input_names=["y"],
        output_names=["steps"],
        dynamic_axes={"y": {0: "n"}},
    )
    proto = onnx.load_model_from_string(buf.getvalue())
    assert {n.op_type for n in proto.graph.node} >= {"HardSigmoid"}
    assert not {"Greater", "Less", "Cast"} & {n.op_type for n in proto.graph.node}
    got = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"]).run(None, {"y": y})[0]
    want = np.stack([cmp(y, np.float32(t)) for t in Steps.THRESHOLDS for cmp in (np.greater, np.less)]).astype(
        np.float32
    )
    bad = np.argwhere((got != want) & ~subnormal)
    assert not len(bad), [(Steps.THRESHOLDS[i // 2], float(y[j]), got[i, j]) for i, j in bad[:5]]
    # subnormals next to 0 get a fraction of a step there, on the right side of it
    assert np.all((got[:2, subnormal] > 0) == want[:2, subnormal].astype(bool))
    torch_steps = Steps()(torch.from_numpy(y)).numpy()  # the traced forward agrees
    np.testing.assert_array_equal(torch_steps[:, ~subnormal], want[:, ~subnormal])


# -- every registered rule, on the example network it gives -----------------------------------------
RULE_IDS = [rule.name for rule in adjoint.RULES]
K = 3  # cotangents per image in the K-per-image pass


def _example(rule) -> tuple[nn.Module, tuple[int, int, int]]:
    torch.manual_seed(0)
    net, shape = rule.example()  # a rule without an example raises NotImplementedError here
    return net.eval().requires_grad_(False), shape


def _autograd(net: nn.Module, x: torch.Tensor, cots: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    y = net(x)
    return y.detach(), [torch.autograd.grad(y, x, c, retain_graph=True)[0] for c in cots]


def _k_per_image(cots: torch.Tensor) -> list[torch.Tensor]:
    """[N*K, ...] image-major -> K cotangent batches [N, ...]."""
    n = cots.shape[0] // K
    return list(cots.reshape(n, K, *cots.shape[1:]).unbind(1))


def test_the_registry_claims_each_module_class_and_function_once_and_rules_say_what_they_do():
    assert len(RULE_IDS) == len(set(RULE_IDS)) >= 19
    for rule in adjoint.RULES:
        assert rule.description and "\n" not in rule.description, rule.name
        assert rule.modules or rule.types or rule.functions, rule.name
    with pytest.raises(ValueError, match="already"):  # a second claim on nn.ReLU is refused
        adjoint.register(type("AnotherReLURule", (adjoint.AdjointRule,), {"types": (nn.ReLU,), "description": "x"}))
    assert [r.name for r in adjoint.RULES] == RULE_IDS


@pytest.mark.parametrize("rule", adjoint.RULES, ids=RULE_IDS)
def test_every_registered_rule_equals_autograd_in_float64(rule):
    """Each rule's example (a rule registered without one fails here) uses the rule, and both
    backward passes, one cotangent per image and K per image, equal torch autograd in float64."""
    net, shape = _example(rule)
    vjp = VJPModule(torch.fx.symbolic_trace(net), shape)
    assert rule in vjp.rules, f"the example of {rule.name} does not use it"
    vjp, net = vjp.double(), net.double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, *shape, generator=gen, dtype=torch.float64)
    y = net(x)
    cot = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    cots = torch.randn((2 * K, *y.shape[1:]), generator=gen, dtype=torch.float64)
    f, g, gs = vjp(x, cot, cots)
    want_f, want = _autograd(net, x, [cot, *_k_per_image(cots)])
    # exact but for float32 constants (e.g. an average pool's 1/9 kernel)
    for got, w in ((f, want_f), (g, want[0]), *zip(gs.reshape(2, K, *shape).unbind(1), want[1:])):
        torch.testing.assert_close(got, w, rtol=1e-6, atol=1e-7 * float(w.abs().max()))


@pytest.mark.parametrize("rule", adjoint.RULES, ids=RULE_IDS)
def test_every_registered_rule_in_onnxruntime_and_its_fp16_copy(rule):
    """The exported graph of each example in onnxruntime (float32) against torch autograd in
    float64, both passes; and its float16 copy, keeping in float32 exactly the ops that the rules
    used declare, runs and tracks float32 (on the CPU provider this catches an undeclared
    ScatterElements, which has no float16 kernel; HardSigmoid's inf * 0 shows on CUDA only)."""
    import json

    import onnxruntime as ort

    from pbv_onnx.export.pipeline import vjp_proto
    from pbv_onnx.runtime.fp16 import FP32_ONLY_KEY, to_fp16

    net, shape = _example(rule)
    vjp = VJPModule(torch.fx.symbolic_trace(net), shape)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, *shape, generator=gen)
    with torch.no_grad():
        feature_shape = tuple(net(x).shape[1:])
    cot = torch.randn((2, *feature_shape), generator=gen)
    cots = torch.randn((2 * K, *feature_shape), generator=gen)
    proto = vjp_proto(vjp, shape, feature_shape)
    proto.metadata_props.add(key=FP32_ONLY_KEY, value=json.dumps(adjoint.fp32_table(vjp.rules)))
    feeds = {"image": x.numpy(), "cotangent": cot.numpy(), "cotangents": cots.numpy()}
    names = ["features", "input_grad", "input_grads"]
    f, g, gs = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(names, feeds)
    want_f, want = _autograd(copy.deepcopy(net).double(), x.double(), [cot.double(), *_k_per_image(cots.double())])
    np.testing.assert_allclose(f, want_f.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g, want[0].numpy(), rtol=1e-4, atol=1e-5)
    for k, w in enumerate(want[1:]):
        np.testing.assert_allclose(gs.reshape(2, K, *shape)[:, k], w.numpy(), rtol=1e-4, atol=1e-5)

    half = ort.InferenceSession(to_fp16(proto).SerializeToString(), providers=["CPUExecutionProvider"])
    f16, g16, gs16 = half.run(names, feeds)
    for a, b in ((f16, f), (g16, g), (gs16, gs)):
        # float16 moves max-pool choices at near-ties (the examples' pools are small and close):
        # loose, but a mask lost to inf * 0 or a gradient summed away fails it
        assert np.isfinite(a).all() and np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.98, rule.name
