"""The K-cotangents-per-image pass of the ONNX-graph transform on mobilenet_v2, where its strided depthwise
adjoints run as four phases (export/graph/fuse_strided.py): each of K cotangents' input gradients against
torch autograd in float64 (bounds as test_graph_vs_torch.py), and against the one-per-image pass."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torchvision
from test_graph_vs_torch import GRAD_TOL, _onnx_forward, _rel, _session

from pbv_onnx.export.backbone import redraw_small_params, truncate_for_graph
from pbv_onnx.export.graph import build
from pbv_onnx.runtime.modelfile import (
    COTANGENT,
    COTANGENTS,
    IMAGE,
    INPUT_GRAD,
    INPUT_GRADS,
    multi_subgraph,
    vjp_subgraph,
)


def test_mobilenet_v2_k_pass_in_phases_matches_torch():
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v2(weights=None).eval().requires_grad_(False)
    redraw_small_params(net, seed=1)
    unpooled, _ = truncate_for_graph(net, "features.18", "none")
    unpooled.eval()
    size, n, k = 64, 2, 3
    built = build(_onnx_forward(unpooled, size))
    assert "strided_depthwise_phases" in [p.name for p in built.patterns]
    multi = multi_subgraph(built.model)
    # the four stride-2 depthwise convs of mobilenet_v2 (32 -> 16 -> 8 -> 4 -> 2 at 64 x 64): one interleave each
    assert sum(node.op_type == "ConvTranspose" and "interleave" in node.input[1] for node in multi.graph.node) == 4
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 3, size, size)).astype(np.float32)
    cots = rng.standard_normal((n, k, *built.feature_shape)).astype(np.float32)
    grads = _session(multi).run([INPUT_GRADS], {IMAGE: x, COTANGENTS: cots.reshape(n * k, *built.feature_shape)})[0]
    grads = grads.reshape(n, k, 3, size, size)
    one = _session(vjp_subgraph(built.model))
    net64 = copy.deepcopy(unpooled).double()
    for j in range(k):
        x64 = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
        (net64(x64) * torch.from_numpy(cots[:, j].astype(np.float64))).sum().backward()
        assert _rel(grads[:, j], x64.grad.numpy()) < GRAD_TOL
        single = one.run([INPUT_GRAD], {IMAGE: x, COTANGENT: cots[:, j]})[0]
        assert _rel(grads[:, j], single) < 1e-5
