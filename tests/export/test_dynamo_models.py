"""ONNX files written by torch's default exporter (`torch.onnx.export(dynamo=True)`), as a lab receives
them, through `export --onnx`: gradients against torch autograd in float64. torch.export writes ops and
forms of its own (opset 18+ Gelu and LayerNormalization, ReduceMean for pools, flatten as an as_strided
Gather whose indices depend on the batch size, value-less ConstantOfShape masks); exported without
dynamic shapes, the batch size 1 is baked into its Reshapes and class token (made batch-free first)."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
import torchvision
from torch import nn

from pbv_onnx.export.backbone import redraw_small_params
from pbv_onnx.export.onnx_route import export_onnx
from pbv_onnx.runtime.engine import Engine
from pbv_onnx.runtime.modelfile import read_info

SIZE = 32


def tiny_vit() -> nn.Module:
    m = torchvision.models.VisionTransformer(
        image_size=SIZE, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32
    )
    m.heads = nn.Identity()  # the class token's features [N, 16]
    return m


def tiny_swin() -> nn.Module:
    m = torchvision.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=8, depths=[2, 2], num_heads=[1, 2], window_size=[2, 2]
    )
    m.head = nn.Identity()  # pooled features [N, 16], flattened by torch.flatten after a permute
    return m


def tiny_se_net() -> nn.Module:
    """EfficientNet's pattern: Conv -> SiLU -> squeeze-excitation (SiLU inside) -> Conv."""
    from torchvision.ops import SqueezeExcitation

    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.SiLU(),
        SqueezeExcitation(16, 4, activation=nn.SiLU),
        nn.Conv2d(16, 8, 1),
    )


def dynamo_export(module: nn.Module, path, batch: str) -> None:
    """Dynamic batch axis, or (fixed) exported at batch 1 without dynamic shapes, torch's default."""
    x = torch.randn(2 if batch == "dynamic" else 1, 3, SIZE, SIZE)
    kw = {"dynamic_shapes": ({0: torch.export.Dim("batch", min=1, max=64)},)} if batch == "dynamic" else {}
    torch.onnx.export(module, (x,), str(path), dynamo=True, input_names=["x"], **kw)


@pytest.mark.parametrize(
    "build,batch,pattern",
    [
        (tiny_vit, "dynamic", "layernorm_linear"),
        (tiny_swin, "dynamic", "roll"),
        (tiny_se_net, "dynamic", "squeeze_excitation"),
        (tiny_vit, "fixed", "layernorm_linear"),
        (tiny_swin, "fixed", "roll"),
    ],
    ids=["vit", "swin", "squeeze_excitation", "vit-batch-1", "swin-batch-1"],
)
def test_a_dynamo_export_converts_with_gradients_equal_to_torch_autograd(tmp_path, build, batch, pattern):
    torch.manual_seed(0)
    net = build().eval()
    redraw_small_params(net, 0)  # norm affines and tokens at order 1: a wrong adjoint cannot hide
    src, out = tmp_path / "forward.onnx", tmp_path / "model.onnx"
    dynamo_export(net, src, batch)
    dims = onnx.load(str(src), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].HasField("dim_value") == (batch == "fixed")
    export_onnx(src, out, resize=f"{SIZE}x{SIZE}", mean=(0.5,) * 3, std=(0.25,) * 3, n_images=2, progress=None)
    meta = read_info(out).metadata
    assert pattern in meta["adjoint"]["patterns"]
    assert ("batch_free" in meta) == (batch == "fixed")

    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 3, SIZE, SIZE))
    net64 = copy.deepcopy(net).double()
    xt = torch.from_numpy(x).requires_grad_(True)
    y = net64(xt)
    c = rng.standard_normal(tuple(y.shape))
    (g,) = torch.autograd.grad(y, xt, torch.from_numpy(c))
    engine = Engine(out, device="cpu")
    feats, grad = engine.vjp(x.astype(np.float32), c.astype(np.float32))
    rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))  # noqa: E731
    assert rel(feats, y.detach().numpy()) < 1e-5
    for i in range(3):  # each image's gradient its own: the batch is not mixed
        assert rel(grad[i], g.numpy()[i]) < 1e-4, (i, rel(grad[i], g.numpy()[i]))
