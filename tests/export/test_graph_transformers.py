"""The ONNX-graph adjoint transform on torchvision's transformers and ConvNeXt: vit_b_16, swin_t and
convnext_tiny with random weights (small-initialised parameters redrawn at order 1, backbone.redraw_small_params),
cut at a late block, exported by torch.onnx (opset 17, dynamic batch), transformed, and compared with
torch autograd in float64: features, input_grad (one cotangent per image) and input_grads (K per image)."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from torch import nn  # noqa: E402

from pbv_onnx.export.backbone import redraw_small_params  # noqa: E402
from pbv_onnx.export.graph.transform import build  # noqa: E402

# float32 onnxruntime against float64 torch through 10+ blocks: measured errors are ~1e-6 to 1e-5
# (see the report); 1e-3 relative L2 is the bound, far below what a wrong adjoint gives (O(1))
TOL = 1e-3


class ViTCut(nn.Module):
    """torchvision's VisionTransformer up to (and including) encoder block `blocks - 1`: tokens [N, T, D]."""

    def __init__(self, vit: nn.Module, blocks: int):
        super().__init__()
        self.vit, self.blocks = vit, blocks

    def forward(self, x):
        x = self.vit._process_input(x)
        cls = self.vit.class_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.vit.encoder.pos_embedding
        for layer in self.vit.encoder.layers[: self.blocks]:
            x = layer(x)
        return x


class ChannelsFirst(nn.Module):
    """Swin's channels-last stages [N, h, w, C], then permuted to [N, C, h, w] as torchvision's head does."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(x).permute(0, 3, 1, 2)


def _vit():
    return ViTCut(torchvision.models.vit_b_16(weights=None, image_size=64), blocks=10), 64, "cls"


def _swin():
    return ChannelsFirst(torchvision.models.swin_t(weights=None).features[:6]), 112, "avg"


def _convnext():
    return torchvision.models.convnext_tiny(weights=None).features[:6], 64, "none"


MODELS = {"vit_b_16": _vit, "swin_t": _swin, "convnext_tiny": _convnext}


def _pool(y: torch.Tensor, pool: str) -> torch.Tensor:
    if pool == "cls":
        return y[:, 0]
    if pool == "avg":
        return y.mean(dim=(2, 3)) if y.ndim == 4 else y.mean(dim=1)
    return y


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_transformer_gradients_match_torch_float64(arch, capsys):
    torch.manual_seed(0)
    net, size, pool = MODELS[arch]()
    net = net.eval()
    assert redraw_small_params(net, seed=1) > 0
    t0 = time.perf_counter()
    buf = io.BytesIO()
    x32 = torch.randn(2, 3, size, size)
    torch.onnx.export(
        net, (x32,), buf, dynamo=False, opset_version=17, input_names=["image"], output_names=["out"],
        dynamic_axes={"image": {0: "N"}, "out": {0: "N"}},
    )  # fmt: skip
    fwd = onnx.load_from_string(buf.getvalue())
    built = build(fwd, pool=pool)
    ops = sorted(r.op_type for r in built.rules)
    t1 = time.perf_counter()

    rng = np.random.default_rng(0)
    n, k = 2, 2
    images = rng.standard_normal((n, 3, size, size)).astype(np.float32)
    sess = ort.InferenceSession(built.model.SerializeToString(), providers=["CPUExecutionProvider"])
    fshape = (n, *built.feature_shape)
    cot = rng.standard_normal(fshape).astype(np.float32)
    cots = rng.standard_normal((n * k, *fshape[1:])).astype(np.float32)
    feats, grad, grads = sess.run(
        ["features", "input_grad", "input_grads"], {"image": images, "cotangent": cot, "cotangents": cots}
    )
    t2 = time.perf_counter()

    net64 = net.double()
    x = torch.from_numpy(images.astype(np.float64)).requires_grad_(True)
    f64 = _pool(net64(x), pool)
    ref_grad = torch.autograd.grad(f64, x, torch.from_numpy(cot.astype(np.float64)), retain_graph=True)[0]
    ref_grads = [
        torch.autograd.grad(f64, x, torch.from_numpy(cots[j::k].astype(np.float64)), retain_graph=True)[0]
        for j in range(k)
    ]
    ref_grads = torch.stack(ref_grads, dim=1).reshape(n * k, *images.shape[1:])
    t3 = time.perf_counter()

    err_f = _rel(feats, f64.detach().numpy())
    err_g = _rel(grad, ref_grad.numpy())
    err_gs = _rel(grads, ref_grads.numpy())
    with capsys.disabled():
        print(
            f"\n{arch} {size}x{size} pool={pool}: features {err_f:.2e}, input_grad {err_g:.2e}, "
            f"input_grads {err_gs:.2e}; export+transform {t1 - t0:.1f}s, ort {t2 - t1:.1f}s, "
            f"torch64 {t3 - t2:.1f}s; ops: {' '.join(ops)}"
        )
    assert err_f < TOL
    assert err_g < TOL
    assert err_gs < TOL


def test_redraw_makes_the_small_parameters_order_one():
    """What the comparison above relies on: no LayerNorm left at 1/0 and no layer scale at 1e-6."""
    net = torchvision.models.convnext_tiny(weights=None).features[:2]
    redraw_small_params(net, seed=0)
    scales = [p for name, p in net.named_parameters() if name.endswith("layer_scale")]
    norms = [m for m in net.modules() if isinstance(m, nn.LayerNorm)]
    assert scales and norms
    assert all(float(p.abs().min()) >= 0.5 for p in scales)
    assert all(float((m.weight - 1).abs().max()) > 0.1 and float(m.bias.abs().max()) > 0.1 for m in norms)
