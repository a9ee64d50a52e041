"""The torch route through the ONNX-graph transform (`export --arch ...`): transformers and ConvNeXt
against torch autograd in float64, random weights redrawn at order 1."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torchvision

from pbv_onnx.export import backbone
from pbv_onnx.export.pipeline import export_model
from pbv_onnx.runtime.engine import Engine
from pbv_onnx.runtime.modelfile import read_info

PBV = Path(sys.executable).parent / "pbv-onnx"


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def torch64(net, x: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Features and J^T c by torch autograd in float64: the independent reference."""
    net64 = copy.deepcopy(net).double()
    xt = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
    y = net64(xt)
    (g,) = torch.autograd.grad(y, xt, torch.from_numpy(c.astype(np.float64)))
    return y.detach().numpy(), g.numpy()


def check_against_torch(path: Path, module, layer: str, pool: str, size: int, bound: float) -> dict:
    """The exported model's features and input_grad (Engine, fp32) vs torch float64 autograd; errors."""
    _, net = backbone.truncate_for_graph(module, layer, pool)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, size, size)).astype(np.float32)
    engine = Engine(path, device="cpu")
    feats = engine.feature_maps(x)
    c = rng.standard_normal(feats.shape).astype(np.float32)
    _, grad = engine.vjp(x, c)
    f64, g64 = torch64(net, x, c)
    errors = {"features": rel(feats, f64), "input_grad": max(rel(grad[i], g64[i]) for i in range(len(x)))}
    assert errors["features"] < 1e-4 and errors["input_grad"] < bound, errors
    return errors


@pytest.mark.parametrize("pool", ["cls", "avg"])
def test_vit_b_16_through_the_graph_transform_matches_torch_autograd(tmp_path, pool):
    torch.manual_seed(0)
    vit = torchvision.models.vit_b_16(weights=None, image_size=64)  # 4x4 patches + class token
    n = backbone.redraw_small_params(vit, seed=0)
    assert n > 20
    layer = "encoder.layers.encoder_layer_1"
    out = tmp_path / f"vit_{pool}.onnx"
    res = export_model(out, arch="vit_b_16", layer=layer, module=vit, pool=pool, resize="64x64", progress=None)
    info = read_info(out)
    assert info.feature_shape == (768,) and info.pool == pool
    assert "ONNX-graph" in info.metadata["adjoint"]["method"]
    assert {"MatMul", "Softmax"} <= set(info.metadata["adjoint"]["rules"])
    ver = res.verification
    assert ver["errors"]["ort_vs_torch32"]["features"] <= ver["tolerance"]
    check_against_torch(out, vit, layer, pool, 64, 1e-3)


def test_vit_token_features_unpooled(tmp_path):
    torch.manual_seed(1)
    vit = torchvision.models.vit_b_16(weights=None, image_size=32)
    backbone.redraw_small_params(vit, seed=1)
    layer = "encoder.layers.encoder_layer_0"
    out = tmp_path / "vit_tokens.onnx"
    export_model(out, arch="vit_b_16", layer=layer, module=vit, resize="32x32", progress=None)
    assert read_info(out).feature_shape == (5, 768)  # [tokens, dim]
    check_against_torch(out, vit, layer, "none", 32, 1e-3)


def test_convnext_tiny_with_layer_scales_redrawn_matches_torch_autograd(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.convnext_tiny(weights=None)
    scales = [p for name, p in net.named_parameters() if name.endswith("layer_scale")]
    assert scales and float(scales[0].detach().abs().max()) < 1e-5  # torchvision's init: 1e-6, which would hide blocks
    backbone.redraw_small_params(net, seed=0)
    assert float(scales[0].detach().abs().min()) >= 1.0
    out = tmp_path / "convnext.onnx"
    export_model(out, arch="convnext_tiny", layer="features.3", module=net, resize="64x64", progress=None)
    assert "ONNX-graph" in read_info(out).metadata["adjoint"]["method"]
    check_against_torch(out, net, "features.3", "none", 64, 1e-3)


def test_a_channels_last_swin_stage_is_pooled_over_space(tmp_path):
    """Swin's stages are [N, h, w, C] in torch: cut at one with pool avg, the export turns the layer to
    [N, C, h, w] (its features are the 192 channels averaged over space, not 14 rows averaged over
    their columns and channels), against the stage written out in torch float64 and pooled over h, w."""
    torch.manual_seed(0)
    net = torchvision.models.swin_t(weights=None)
    backbone.redraw_small_params(net, seed=0)
    out = tmp_path / "swin_stage.onnx"
    export_model(out, arch="swin_t", layer="features.3", module=net, pool="avg", resize="112x112", progress=None)
    info = read_info(out)
    assert info.feature_shape == (192,)
    assert "channels-last" in info.metadata["weights"]["layer_layout"]
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 112, 112)).astype(np.float32)
    c = rng.standard_normal((2, 192)).astype(np.float32)
    stage = copy.deepcopy(net.features[:4]).double().eval()
    xt = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
    y = stage(xt)
    assert tuple(y.shape) == (2, 14, 14, 192)
    f64 = y.mean(dim=(1, 2))
    (g64,) = torch.autograd.grad(f64, xt, torch.from_numpy(c.astype(np.float64)))
    feats, grad = Engine(out, device="cpu").vjp(x, c)
    assert rel(feats, f64.detach().numpy()) < 1e-4
    assert max(rel(grad[i], g64.numpy()[i]) for i in range(2)) < 1e-3


def test_a_dropped_layer_scale_would_be_seen():
    """Why the redraw: with torchvision's 1e-6 layer scales, ConvNeXt's blocks barely change the output."""
    torch.manual_seed(0)
    net = torchvision.models.convnext_tiny(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    cut, _ = backbone.truncate_for_graph(net, "features.1", "none")
    stem, _ = backbone.truncate_for_graph(net, "features.0", "none")
    with torch.no_grad():
        small = rel(cut(x).numpy(), stem(x).numpy().astype(np.float64))
        backbone.redraw_small_params(net, seed=0)
        large = rel(cut(x).numpy(), stem(x).numpy().astype(np.float64))
    assert small < 1e-4 and large > 0.1, (small, large)


def test_cli_graph_route_records_the_redraw(tmp_path):
    out = tmp_path / "effnet.onnx"
    res = subprocess.run(
        [str(PBV), "export", "--arch", "efficientnet_b0", "--layer", "features.2", "--weights", "none",
         "--resize", "64x64", "--pool", "avg", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    meta = read_info(out).metadata
    assert meta["weights"]["source"] == "none" and meta["weights"]["redrawn_tensors"] > 0
    assert "order-1" in meta["weights"]["redrawn"]
    assert meta["feature_shape"] == [24]


def test_onnx_file_route_of_a_torch_exported_resnet_matches_torch_autograd(tmp_path):
    """The torch-free route (finite-difference verification) on a real network's ONNX file, checked here
    against torch autograd in float64."""
    from pbv_onnx.export.onnx_route import export_onnx, torch_forward_proto

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None).eval()  # torch.onnx exports eval mode
    backbone.redraw_small_params(net, seed=0)
    cut, _ = backbone.truncate_for_graph(net, "layer2", "none")
    src = tmp_path / "resnet18_layer2.onnx"
    onnx.save(torch_forward_proto(cut, (3, 64, 64), 17), str(src))
    out = tmp_path / "r18.onnx"
    res = export_onnx(src, out, pool="avg", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), progress=None)
    errors = res.verification["errors"]["ort_vs_float64"]
    assert errors["input_grad[gaussian]"] < 1e-2 and errors["features"] < 1e-5, errors
    assert read_info(out).metadata["weights"]["source"] == "onnx"
    check_against_torch(out, net, "layer2", "avg", 64, 1e-2)


@pytest.mark.parametrize(
    "arch,layer,pool",
    [("vit_b_16", "encoder.layers.encoder_layer_1", "cls"), ("efficientnet_b0", "features.3", "avg")],
    ids=["vit_b_16", "efficientnet_b0"],
)
def test_the_dynamo_exporter_route_matches_torch_autograd(tmp_path, arch, layer, pool):
    """`--exporter dynamo`: torch's torch.export-based exporter (the TorchScript one is deprecated) writes
    the forward; the whole model runs in the trace and the graph keeps what the layer needs."""
    torch.manual_seed(0)
    kw = {"image_size": 64} if arch == "vit_b_16" else {}
    net = getattr(torchvision.models, arch)(weights=None, **kw)
    backbone.redraw_small_params(net, seed=0)
    out = tmp_path / f"{arch}.onnx"
    export_model(out, arch=arch, layer=layer, module=net, pool=pool, resize="64x64", exporter="dynamo", progress=None)
    versions = read_info(out).metadata["versions"]
    assert versions["torch_onnx_exporter"] == "dynamo" and versions["onnx_opset"] >= 18
    check_against_torch(out, net, layer, pool, 64, 1e-3)


def test_the_dynamo_cut_keeps_the_layer_output_an_inplace_op_later_changes(tmp_path):
    """Under `--exporter dynamo` the model runs past the layer (DenseNet applies relu_ in place to its
    `features` output): the cut must still be the layer's output, as torch autograd's cut is."""

    class InplaceAfter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8))
            self.head = torch.nn.Linear(8, 2)

        def forward(self, x):
            y = torch.nn.functional.relu(self.body(x), inplace=True)
            return self.head(y.mean(dim=(2, 3)))

    torch.manual_seed(0)
    net = InplaceAfter()
    backbone.redraw_small_params(net, seed=0)
    out = tmp_path / "inplace.onnx"
    export_model(out, layer="body", module=net, resize="32x32", exporter="dynamo", progress=None)
    errors = check_against_torch(out, net, "body", "none", 32, 1e-4)
    assert errors["features"] < 1e-5
