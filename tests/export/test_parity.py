"""onnxruntime vs torch autograd: features and J^T cotangent of exported models, per sample, any batch."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torchvision
from conftest import MNV2_WEIGHTS, SHARED, tiny_cnn
from torch import nn

from pbv_onnx.export.verify import rel_l2, smooth_images
from pbv_onnx.runtime.engine import Engine
from pbv_onnx.runtime.images import load_batch

FEATURE_TOL = 1e-4


def photos(spec, n: int) -> np.ndarray:
    """Real photographs when ../shared/images is present, else smooth synthetic images."""
    files = sorted(p for p in (SHARED / "images").glob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    if not files:
        return smooth_images(n, spec.input_size, spec, seed=7)
    return load_batch(files[:n], spec)


def autograd_vjp(net: nn.Module, x: np.ndarray, cot: np.ndarray, dtype=torch.float32):
    net = copy.deepcopy(net).to(dtype).eval()
    xt = torch.from_numpy(x).to(dtype).requires_grad_(True)
    y = net(xt)
    (g,) = torch.autograd.grad(y, xt, torch.from_numpy(cot).to(dtype))
    return y.detach().double().numpy(), g.double().numpy()


def assert_parity(engine: Engine, reference: nn.Module, x: np.ndarray, seed: int = 0) -> None:
    """Features to 1e-4; input_grad to 1e-3 or, where fp32 itself is less determined (ReLU and
    max-pool near-ties), to 10x the torch fp32-vs-fp64 difference on the same inputs."""
    rng = np.random.default_rng(seed)
    feats, _ = autograd_vjp(reference, x, np.zeros((len(x), *engine.info.feature_shape), np.float32))
    for cot in (rng.standard_normal(feats.shape).astype(np.float32), feats.astype(np.float32)):
        f32, g32 = autograd_vjp(reference, x, cot)
        _, g64 = autograd_vjp(reference, x, cot, torch.float64)
        f, g = engine.vjp(x, cot)
        assert f.shape == f32.shape and g.shape == x.shape
        for i in range(len(x)):
            assert rel_l2(f[i], f32[i]) < FEATURE_TOL
            floor = rel_l2(g32[i], g64[i])
            assert rel_l2(g[i], g32[i]) < max(1e-3, 10 * floor), (i, rel_l2(g[i], g32[i]), floor)


def seeded(builder, seed):
    """The network `export --weights none --seed seed` exports: the builder's init under that seed,
    then the small parameters redrawn at order 1 as the export does (backbone.redraw_small_params)."""
    from pbv_onnx.export.backbone import redraw_small_params

    torch.manual_seed(seed)
    net = builder(weights=None).eval()
    with torch.no_grad():
        redraw_small_params(net, seed)
    return net


def test_mobilenet_v2_real_weights_on_real_photos(mnv2_model):
    m = torchvision.models.mobilenet_v2()
    m.load_state_dict(torch.load(MNV2_WEIGHTS, map_location="cpu", weights_only=True))
    reference = m.features[:19].eval()  # features.0 .. features.18
    eng = Engine(mnv2_model, device="cpu")
    if not (SHARED / "images").is_dir():
        pytest.skip("../shared/images is not present (real photos needed)")
    assert_parity(eng, reference, photos(eng.info.preprocessing, 3))


def test_alexnet_features_random_weights(alexnet_model):
    reference = seeded(torchvision.models.alexnet, 3).features
    eng = Engine(alexnet_model, device="cpu")
    assert eng.info.feature_shape == (256, 2, 2)
    assert_parity(eng, reference, photos(eng.info.preprocessing, 3))


def _resnet_trunk(m: nn.Module) -> nn.Sequential:
    return nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4)


def test_resnet18_layer4_random_weights(resnet18_model):
    reference = _resnet_trunk(seeded(torchvision.models.resnet18, 4))
    eng = Engine(resnet18_model, device="cpu")
    assert eng.info.feature_shape == (512, 2, 2)
    assert_parity(eng, reference, photos(eng.info.preprocessing, 3))


def test_resnet18_layer4_with_global_average_pooling(resnet18_avg_model):
    trunk = _resnet_trunk(seeded(torchvision.models.resnet18, 4))
    reference = nn.Sequential(trunk, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    eng = Engine(resnet18_avg_model, device="cpu")
    assert eng.info.feature_shape == (512,) and eng.info.pool == "avg"
    assert_parity(eng, reference, photos(eng.info.preprocessing, 3))


def test_grouped_depthwise_dilated_strided_convs_and_overlapping_maxpool(tiny_cnn_model):
    eng = Engine(tiny_cnn_model, device="cpu")
    x = smooth_images(4, (33, 33), eng.info.preprocessing, seed=1)
    assert_parity(eng, tiny_cnn(), x, seed=2)


def test_vjp_matches_float64_finite_differences(tiny_cnn_model):
    """The exported graph's J^T c against central differences of the fp64 network."""
    eng = Engine(tiny_cnn_model, device="cpu")
    net = tiny_cnn().double()
    rng = np.random.default_rng(5)
    x = smooth_images(2, (33, 33), eng.info.preprocessing, seed=3)
    cot = rng.standard_normal((2, *eng.info.feature_shape)).astype(np.float32)
    _, grad = eng.vjp(x, cot)
    f = lambda z: net(torch.from_numpy(z)).detach().numpy()  # noqa: E731
    h = 1e-5
    for _ in range(4):
        d = rng.standard_normal(x.shape)
        fd = (f(x + h * d) - f(x - h * d)) * cot / (2 * h)
        for i in range(2):  # per sample: sample i's directional derivative
            assert np.sum(grad[i] * d[i]) == pytest.approx(fd[i].sum(), rel=1e-4, abs=1e-6)


def test_batch_size_is_dynamic_and_samples_are_independent(tiny_cnn_model):
    eng = Engine(tiny_cnn_model, device="cpu", batch_size=5)
    rng = np.random.default_rng(6)
    x = smooth_images(5, (33, 33), eng.info.preprocessing, seed=4)
    cot = rng.standard_normal((5, *eng.info.feature_shape)).astype(np.float32)
    f5, g5 = eng.vjp(x, cot)
    f1, g1 = eng.vjp(x[2:3], cot[2:3])  # N=1 on the same model
    np.testing.assert_allclose(f1[0], f5[2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g1[0], g5[2], rtol=1e-5, atol=1e-6)
    # Sample i's gradient depends only on cotangent i.
    cot2 = cot.copy()
    cot2[3] = rng.standard_normal(cot2[3].shape)
    _, g5b = eng.vjp(x, cot2)
    others = [0, 1, 2, 4]
    np.testing.assert_allclose(g5b[others], g5[others], rtol=1e-5, atol=1e-6)
    assert rel_l2(g5b[3], g5[3]) > 0.1


def test_features_only_subgraph_equals_vjp_features(resnet18_avg_model, tiny_cnn_model):
    for path in (resnet18_avg_model, tiny_cnn_model):
        eng = Engine(path, device="cpu", batch_size=3)
        x = smooth_images(3, eng.info.input_shape[1:], eng.info.preprocessing, seed=8)
        f_vjp, _ = eng.vjp(x, np.ones((3, *eng.info.feature_shape), np.float32))
        np.testing.assert_allclose(eng.feature_maps(x), f_vjp, rtol=1e-6, atol=1e-6)
