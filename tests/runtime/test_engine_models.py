"""Exported backbones on the torch-free runtime: info, shapes, batch invariance, export without torch.

The models are exported beforehand with the export environment (see export/README.md):
  pbv-onnx export --arch mobilenet_v2 --layer features.18 --weights ../shared/weights/mobilenet_v2_imagenet.pth \
      --mean 0.5 0.5 0.5 --std 0.5 0.5 0.5 --out build/models/mobilenet_v2-features.18.onnx --force
  pbv-onnx export --arch resnet18 --layer layer4 --weights none --seed 0 --pool avg --resize 112x112 \
      --out build/models/resnet18_avg.onnx --force
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pbv_onnx.runtime.engine import Engine
from pbv_onnx.runtime.images import load_batch

ROOT = Path(__file__).resolve().parents[2]
MODELS = {
    "mnv2": ROOT / "build" / "models" / "mobilenet_v2-features.18.onnx",
    "resnet18_avg": ROOT / "build" / "models" / "resnet18_avg.onnx",
}
EXPECTED = {
    "mnv2": ("mobilenet_v2", "features.18", (1280, 7, 7), (3, 224, 224)),
    "resnet18_avg": ("resnet18", "layer4", (512,), (3, 112, 112)),
}


def cli(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from pbv_onnx.cli.main import main; sys.argv = ['pbv-onnx'] + sys.argv[1:]; main()"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(params=sorted(MODELS))
def model(request) -> tuple[str, Path]:
    path = MODELS[request.param]
    if not path.is_file():
        pytest.skip(
            f"{path.relative_to(ROOT)} is absent: export it first with the export environment "
            "(make models, or the commands in export/README.md)"
        )
    return request.param, path


def _images(eng: Engine, shared_images: list[Path], n: int) -> np.ndarray:
    return load_batch(shared_images[:n], eng.info.preprocessing)


def test_info_prints_the_export_metadata(model):
    name, path = model
    arch, layer, feature_shape, _ = EXPECTED[name]
    proc = cli("info", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["metadata"]["arch"] == arch and info["metadata"]["layer"] == layer
    assert tuple(info["metadata"]["feature_shape"]) == feature_shape
    assert info["size_bytes"] == path.stat().st_size and len(info["sha256"]) == 64
    ver = info["metadata"]["verification"]
    assert ver["errors"]["ort_vs_torch32"]["features"] <= ver["tolerance"]
    text = cli("info", str(path))
    assert text.returncode == 0 and arch in text.stdout and info["sha256"] in text.stdout


def test_features_and_vjp_shapes(model, shared_images):
    name, path = model
    _, _, feature_shape, input_shape = EXPECTED[name]
    eng = Engine(path, device="cpu")
    x = _images(eng, shared_images, 3)
    assert x.shape == (3, *input_shape)
    feats = eng.feature_maps(x)
    assert feats.shape == (3, *feature_shape) and np.isfinite(feats).all()
    f, g = eng.vjp(x, feats)  # the VJP of 0.5 ||phi||^2
    assert f.shape == feats.shape and g.shape == x.shape
    np.testing.assert_allclose(f, feats, rtol=1e-5, atol=1e-5)
    assert np.abs(g).sum() > 0


def test_results_do_not_depend_on_batch_size(model, shared_images):
    _, path = model
    x = _images(Engine(path, device="cpu"), shared_images, 5)
    rng = np.random.default_rng(0)
    one = Engine(path, device="cpu", batch_size=1)
    cot = rng.standard_normal((5, *one.info.feature_shape)).astype(np.float32)
    f1, g1 = one.vjp(x, cot)
    f5, g5 = Engine(path, device="cpu", batch_size=5).vjp(x, cot)
    np.testing.assert_allclose(f1, f5, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g1, g5, rtol=1e-4, atol=1e-6 * np.abs(g5).max())


def test_export_without_torch_fails_cleanly(tmp_path):
    if importlib.util.find_spec("torch") is not None:
        pytest.skip("torch is installed here; this checks the runtime environment")
    out = tmp_path / "m.onnx"
    proc = cli("export", "--arch", "resnet18", "--layer", "layer4", "--out", str(out))
    assert proc.returncode == 7
    assert proc.stderr.strip() == "pbv-onnx: error: the export stage needs PyTorch: pip install 'pbv-onnx[export]'"
    assert not out.exists()
