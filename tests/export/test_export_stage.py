"""The export command: preprocessing parity with torchvision, refusals, errors, metadata, info."""

from __future__ import annotations

import json
import urllib.error

import numpy as np
import pytest
import torch
from conftest import SHARED, run_cli, tiny_cnn
from PIL import Image
from torch import nn
from torchvision import transforms as T

from pbv_onnx.base.errors import ModelError, OutputError, UsageError
from pbv_onnx.export import export_model
from pbv_onnx.export.backbone import build_preprocessing
from pbv_onnx.runtime.images import preprocess


def _pil_images() -> list[Image.Image]:
    files = sorted(p for p in (SHARED / "images").glob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    rng = np.random.default_rng(0)
    out = [Image.fromarray(rng.integers(0, 256, (301, 217, 3), dtype=np.uint8))]  # odd, portrait
    return out + [Image.open(p).convert("RGB") for p in files[:4]]


@pytest.mark.parametrize("resize,crop", [("224x224", None), ("256", "224"), ("160", "128x112")])
def test_runtime_preprocessing_equals_torchvision_transforms(resize, crop):
    spec = build_preprocessing(None, resize, crop, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    size = spec.resize if isinstance(spec.resize, int) else list(spec.resize)
    steps = [T.Resize(size, interpolation=T.InterpolationMode.BILINEAR)]
    steps += [T.CenterCrop(list(spec.crop))] if spec.crop else []
    tf = T.Compose(steps + [T.ToTensor(), T.Normalize(spec.mean, spec.std)])
    for img in _pil_images():
        np.testing.assert_allclose(preprocess(img, spec), tf(img).numpy(), atol=1e-5)


def test_a_wrong_adjoint_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    from pbv_onnx.export.graph.rules import RULES, load_rules

    load_rules()  # a deliberately wrong ReLU adjoint: the gradient passes unmasked
    monkeypatch.setattr(RULES["Relu"], "vjp", lambda self, ctx, node, grads: [grads[0]])
    out = tmp_path / "bad.onnx"
    with pytest.raises(ModelError, match="export refused"):
        export_model(out, module=tiny_cnn(), resize="33x33", progress=None, n_images=2)
    assert list(tmp_path.iterdir()) == []


def test_export_refused_by_the_cli_exits_non_zero(tmp_path):
    # A graph whose adjoint is fine, but a tolerance no fp32 computation can meet.
    out = tmp_path / "r.onnx"
    proc = run_cli(
        "export",
        "--arch",
        "resnet18",
        "--layer",
        "layer1",
        "--resize",
        "32x32",
        "--weights",
        "none",
        "--tolerance",
        "1e-12",
        "--out",
        str(out),
    )
    assert proc.returncode == 4, proc.stderr
    assert "export refused" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"keep")
    with pytest.raises(OutputError, match="force=True"):
        export_model(out, arch="resnet18", layer="layer1", weights="none", resize="32x32", progress=None)
    assert out.read_bytes() == b"keep"
    export_model(
        out, arch="resnet18", layer="layer1", weights="none", resize="32x32", progress=None, force=True, n_images=1
    )
    assert out.read_bytes()[:4] != b"keep"


def test_bad_arch_layer_and_options_are_usage_errors(tmp_path):
    out = tmp_path / "m.onnx"
    with pytest.raises(UsageError, match="not a torchvision"):
        export_model(out, arch="resnet19", layer="layer4", weights="none", progress=None)
    with pytest.raises(UsageError, match="layer5"):
        export_model(out, arch="resnet18", layer="layer5", weights="none", progress=None)
    with pytest.raises(UsageError, match="add crop to fix"):
        export_model(out, arch="resnet18", layer="layer1", weights="none", resize="256", progress=None)
    with pytest.raises(UsageError, match="weights='IMAGENET9K'"):
        export_model(out, arch="resnet18", layer="layer1", weights="IMAGENET9K", progress=None)
    with pytest.raises(UsageError, match="weights=none"):  # random weights only when asked for
        export_model(out, arch="resnet18", layer="layer1", progress=None)
    assert not out.exists()


def test_export_without_weights_is_a_one_line_usage_error(tmp_path):
    out = tmp_path / "m.onnx"
    proc = run_cli("export", "--arch", "resnet18", "--layer", "layer1", "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--weights none" in lines[0] and "state_dict" in lines[0], proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_info_says_random_weights_plainly_and_shows_no_none(resnet18_model):
    proc = run_cli("info", str(resnet18_model))
    assert proc.returncode == 0, proc.stderr
    assert "random weights (seed 4)" in proc.stdout
    assert "None" not in proc.stdout and "no crop" in proc.stdout, proc.stdout


def test_unsupported_operation_is_named(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SELU())  # torch.onnx writes Selu: no adjoint rule
    with pytest.raises(ModelError, match="Selu") as err:
        export_model(tmp_path / "s.onnx", module=net, resize="16x16", progress=None, n_images=2)
    assert err.value.exit_code == 4 and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []
    # GELU (Erf, Mul and Add in the ONNX graph) has rules
    export_model(tmp_path / "g.onnx", module=nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU()), resize="16x16",
                 progress=None, n_images=2)  # fmt: skip


def test_weights_file_must_match_the_architecture(tmp_path):
    bad = tmp_path / "w.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(ModelError, match="missing keys"):
        export_model(tmp_path / "m.onnx", arch="resnet18", layer="layer1", weights=str(bad), progress=None)


def test_unreachable_torchvision_weights_give_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty cache

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ModelError, match="cannot get torchvision weights") as err:
        export_model(tmp_path / "m.onnx", arch="alexnet", layer="features", weights="IMAGENET1K_V1", progress=None)
    assert "\n" not in str(err.value) and "weights=PATH" in str(err.value)  # the CLI shows --weights PATH
    assert err.value.param == "weights"


def test_cli_spelling_writes_metadata_and_info_reads_it(mnv2_model):
    proc = run_cli("info", str(mnv2_model), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    meta = info["metadata"]
    assert meta["arch"] == "mobilenet_v2" and meta["layer"] == "features.18"
    assert meta["feature_shape"] == [1280, 7, 7]
    assert meta["preprocessing"]["mean"] == [0.5, 0.5, 0.5] and meta["preprocessing"]["resize"] == [224, 224]
    assert meta["weights"]["source"] == "file"
    assert meta["weights"]["sha256"] == "a3b7ac27921c6bb677b2a1ca6a4958b96aafd3e870b6a37e374ba51f052d2fa2"
    ver = meta["verification"]
    assert ver["errors"]["ort_vs_torch32"]["features"] < ver["tolerance"]
    assert "photos" in ver["inputs"]
    assert meta["versions"]["torch"] == torch.__version__
    text = run_cli("info", str(mnv2_model)).stdout
    assert "mobilenet_v2" in text and info["sha256"] in text
    # the adjoint rules that built the graph, and the float16 needs assembled from them
    # torch.onnx folds each BatchNorm into its Conv; ReLU6 is Clip
    assert {"Conv", "Clip", "Add"} <= set(meta["adjoint"]["rules"])
    assert "strided_depthwise_phases" in meta["adjoint"]["patterns"]
    assert "MaxPool" not in meta["adjoint"]["rules"] and meta["fp32_only"] == {"HardSigmoid": [0]}


def test_fp16_reads_the_models_own_fp32_table_and_falls_back_for_older_models(tiny_cnn_model):
    import onnx

    from pbv_onnx.runtime.fp16 import FP32_ONLY, FP32_ONLY_KEY, fp32_only

    proto = onnx.load(str(tiny_cnn_model))
    assert fp32_only(proto) == {"HardSigmoid": (0,), "ScatterElements": (0, 2)}  # ReLU masks, overlapping pool
    props = [p for p in proto.metadata_props if p.key != FP32_ONLY_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(props)
    assert fp32_only(proto) == FP32_ONLY  # exported before the table was recorded
    proto.metadata_props.add(key=FP32_ONLY_KEY, value=json.dumps({"HardSigmoid": [0]}))
    assert fp32_only(proto) == {"HardSigmoid": (0,)}
    proto.metadata_props[-1].value = json.dumps(["HardSigmoid"])
    with pytest.raises(ModelError, match="fp32_only"):
        fp32_only(proto)
