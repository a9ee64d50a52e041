"""efficientnet_b0 through the ONNX-graph transform, where its SiLU and squeeze-excitation adjoints are emitted
as patterns (export/graph/fuse_silu.py): features and both backward passes (one cotangent per image, K per
image) against torch autograd in float64 (bounds as test_graph_vs_torch.py)."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torchvision
from test_graph_vs_torch import FEATURE_TOL, GRAD_TOL, _onnx_forward, _rel, _session

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


def test_efficientnet_b0_silu_and_squeeze_excitation_patterns_match_torch():
    torch.manual_seed(0)
    net = torchvision.models.efficientnet_b0(weights=None).eval().requires_grad_(False)
    redraw_small_params(net, seed=1)
    unpooled, _ = truncate_for_graph(net, "features", "none")
    unpooled.eval()
    size, n, k = 64, 2, 2
    built = build(_onnx_forward(unpooled, size))
    assert {"silu", "squeeze_excitation"} <= {p.name for p in built.patterns}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 3, size, size)).astype(np.float32)
    cots = rng.standard_normal((n, k, *built.feature_shape)).astype(np.float32)
    feats, grad = _session(vjp_subgraph(built.model)).run([FEATURES, INPUT_GRAD], {IMAGE: x, COTANGENT: cots[:, 0]})
    multi = (
        _session(multi_subgraph(built.model))
        .run([INPUT_GRADS], {IMAGE: x, COTANGENTS: cots.reshape(n * k, *built.feature_shape)})[0]
        .reshape(n, k, 3, size, size)
    )
    net64 = copy.deepcopy(unpooled).double()
    for j in range(k):
        x64 = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
        y64 = net64(x64)
        (y64 * torch.from_numpy(cots[:, j].astype(np.float64))).sum().backward()
        if j == 0:
            assert _rel(feats, y64.detach().numpy()) < FEATURE_TOL
            assert _rel(grad, x64.grad.numpy()) < GRAD_TOL
            assert _rel(multi[:, 0], grad) < 1e-5
        assert _rel(multi[:, j], x64.grad.numpy()) < GRAD_TOL
