"""Pooled models output the map before pooling (`feature_map`): it equals torch's activation at the cut,
and the shared maps built on it decompose the similarity of torch's float64 features."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from pbv_onnx.export import backbone
from pbv_onnx.method.shared import upsample_map
from pbv_onnx.runtime.engine import Engine
from pbv_onnx.runtime.modelfile import FEATURE_MAP
from pbv_onnx.workflows.pair import explain_pair


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def _torch_prepool(x: np.ndarray, dtype=torch.float32) -> np.ndarray:
    """resnet18 (weights none, seed 4, as the fixture exports it) up to layer4, not pooled."""
    model = backbone.load_backbone("resnet18", "none", seed=4).model
    net = backbone.truncate(model, "layer4", "none").to(dtype)
    with torch.no_grad():
        return net(torch.from_numpy(x).to(dtype)).double().numpy()


def _images(n: int = 3) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 3, 64, 64)).astype(np.float32)


def test_pooled_model_outputs_the_pre_pool_map(resnet18_avg_model):
    proto = onnx.load(str(resnet18_avg_model), load_external_data=False)
    assert FEATURE_MAP in [o.name for o in proto.graph.output]
    eng = Engine(resnet18_avg_model, device="cpu", batch_size=2)  # two calls: batching too
    x = _images()
    fmap = eng.spatial_maps(x)
    ref = _torch_prepool(x)
    assert fmap.shape == ref.shape == (3, *eng.map_shape)
    assert rel_l2(fmap, ref) < 1e-5
    assert rel_l2(eng.features(x), ref.mean((2, 3))) < 1e-5
    assert eng.info.metadata["verification"]["feature_map_vs_torch32"] < 1e-5


def test_unpooled_model_has_no_extra_output(resnet18_model):
    proto = onnx.load(str(resnet18_model), load_external_data=False)
    assert FEATURE_MAP not in [o.name for o in proto.graph.output]
    eng = Engine(resnet18_model, device="cpu")
    x = _images(2)
    np.testing.assert_array_equal(eng.spatial_maps(x), eng.feature_maps(x))


def test_shared_maps_of_a_pooled_export_against_torch_float64(resnet18_avg_model):
    eng = Engine(resnet18_avg_model, device="cpu")
    x = _images(2)
    a = _torch_prepool(x, torch.float64)
    w = np.random.default_rng(1).standard_normal(eng.info.n_features)
    ds = explain_pair(eng, w, x[0], x[1], map="shared")
    bo, bb = a[0].mean((1, 2)), a[1].mean((1, 2))
    den = a.shape[2] * a.shape[3] * np.linalg.norm(w * bo) * np.linalg.norm(w * bb)
    want_o = np.einsum("c,chw->hw", w**2 * bb, a[0]) / den
    want_b = np.einsum("c,chw->hw", w**2 * bo, a[1]) / den
    got = ds["shared_map_latent"].values
    assert rel_l2(got[0], want_o) < 1e-4 and rel_l2(got[1], want_b) < 1e-4
    s = float((w * bo) @ (w * bb) / (np.linalg.norm(w * bo) * np.linalg.norm(w * bb)))
    assert got[0].sum() == pytest.approx(s, rel=1e-4) and got[1].sum() == pytest.approx(s, rel=1e-4)


@pytest.mark.parametrize(("h", "w", "H", "W"), [(7, 7, 224, 224), (2, 2, 64, 64), (4, 5, 30, 47)])
def test_upsampling_is_torchs_bilinear_times_the_area_ratio(h, w, H, W):
    m = np.random.default_rng(h * w).random((2, h, w))
    theirs = F.interpolate(torch.from_numpy(m)[:, None], size=(H, W), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(upsample_map(m, (H, W)), theirs[:, 0].numpy() * (h * w / (H * W)), rtol=1e-10)
