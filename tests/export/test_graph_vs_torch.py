"""The ONNX-graph adjoint transform on torchvision CNNs: torch.onnx exports the truncated forward, the
transform builds the gradient graph; features and input_grad against torch autograd in float64.

Random weights with BatchNorm affines and statistics redrawn at order 1 (backbone.redraw_small_params),
so an adjoint that ignored a BatchNorm scale could not pass. Bounds: float32 onnxruntime against float64
torch, relative L2 per image: features 1e-4, input_grad 1e-3 (float32 rounding through ~20 layers is
~1e-6..1e-5)."""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision

from pbv_onnx.export.backbone import redraw_small_params, truncate_for_graph
from pbv_onnx.export.graph import build
from pbv_onnx.runtime.modelfile import (
    COTANGENT,
    COTANGENTS,
    FEATURES,
    IMAGE,
    INPUT_GRAD,
    INPUT_GRADS,
    multi_subgraph,
    vjp_subgraph,
)

FEATURE_TOL, GRAD_TOL = 1e-4, 1e-3
CASES = [
    ("mobilenet_v2", "features.18", "none", 64),
    ("resnet18", "layer4", "avg", 64),
    ("alexnet", "features", "none", 96),
    ("vgg11", "features.10", "none", 64),
]


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64).reshape(len(a), -1), np.asarray(b, np.float64).reshape(len(b), -1)
    return float(max(np.linalg.norm(a[i] - b[i]) / np.linalg.norm(b[i]) for i in range(len(a))))


def _onnx_forward(unpooled: torch.nn.Module, size: int) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            unpooled,
            (torch.zeros(2, 3, size, size),),
            buf,
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "N"}, "y": {0: "N"}},
        )
    return onnx.load_from_string(buf.getvalue())


def _session(proto):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("arch,layer,pool,size", CASES, ids=[c[0] for c in CASES])
def test_graph_transform_matches_torch_autograd(arch, layer, pool, size):
    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)(weights=None).eval().requires_grad_(False)
    redraw_small_params(net, seed=1)  # alexnet and vgg11 have no BatchNorm: nothing to redraw
    unpooled, pooled = truncate_for_graph(net, layer, pool)
    # torch.onnx.export restores the exported module's training flag on the whole tree: a wrapper
    # left in training mode would put every BatchNorm in training mode after the export
    unpooled.eval(), pooled.eval()
    built = build(_onnx_forward(unpooled, size), pool=pool)
    assert not any(m.training for m in net.modules())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, size, size)).astype(np.float32)
    cot = rng.standard_normal((2, *built.feature_shape)).astype(np.float32)
    feats, grad = _session(vjp_subgraph(built.model)).run([FEATURES, INPUT_GRAD], {IMAGE: x, COTANGENT: cot})

    net64 = copy.deepcopy(pooled).double()
    x64 = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
    y64 = net64(x64)
    (y64 * torch.from_numpy(cot.astype(np.float64))).sum().backward()
    assert _rel(feats, y64.detach().numpy()) < FEATURE_TOL
    assert _rel(grad, x64.grad.numpy()) < GRAD_TOL


# Networks whose adjoints run through patterns (export/graph/fuse_*.py): the patterns expected to match,
# and how many phase interleaves the K-per-image pass holds (mobilenet_v2's four stride-2 depthwise
# convs at 64 x 64: 32 -> 16 -> 8 -> 4 -> 2; efficientnet_b0's strided depthwise convs follow SiLU).
PATTERN_CASES = [
    ("mobilenet_v2", "features.18", {"strided_depthwise_phases"}, 4),
    ("efficientnet_b0", "features", {"silu", "squeeze_excitation"}, 0),
]


@pytest.mark.parametrize("arch,layer,patterns,interleaves", PATTERN_CASES, ids=[c[0] for c in PATTERN_CASES])
def test_pattern_networks_match_torch_autograd_in_both_passes(arch, layer, patterns, interleaves):
    """Features, one cotangent per image and K per image against torch autograd in float64, and the K
    pass against the one-per-image pass (the patterns may apply to one pass only)."""
    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)(weights=None).eval().requires_grad_(False)
    redraw_small_params(net, seed=1)
    unpooled, _ = truncate_for_graph(net, layer, "none")
    unpooled.eval()
    size, n, k = 64, 2, 3
    built = build(_onnx_forward(unpooled, size))
    assert patterns <= {p.name for p in built.patterns}
    multi = multi_subgraph(built.model)
    assert sum(node.op_type == "ConvTranspose" and "interleave" in node.input[1] for node in multi.graph.node) == (
        interleaves
    )
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 3, size, size)).astype(np.float32)
    cots = rng.standard_normal((n, k, *built.feature_shape)).astype(np.float32)
    grads = _session(multi).run([INPUT_GRADS], {IMAGE: x, COTANGENTS: cots.reshape(n * k, *built.feature_shape)})[0]
    grads = grads.reshape(n, k, 3, size, size)
    one = _session(vjp_subgraph(built.model))
    net64 = copy.deepcopy(unpooled).double()
    for j in range(k):
        x64 = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
        y64 = net64(x64)
        (y64 * torch.from_numpy(cots[:, j].astype(np.float64))).sum().backward()
        feats, single = one.run([FEATURES, INPUT_GRAD], {IMAGE: x, COTANGENT: cots[:, j]})
        assert _rel(feats, y64.detach().numpy()) < FEATURE_TOL
        assert _rel(single, x64.grad.numpy()) < GRAD_TOL
        assert _rel(grads[:, j], x64.grad.numpy()) < GRAD_TOL
        assert _rel(grads[:, j], single) < 1e-5
