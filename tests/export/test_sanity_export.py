"""export/sanity.py: cascading randomisation of a backbone's top blocks through the normal export pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pbv_onnx.export import backbone
from pbv_onnx.export.sanity import export_cascade, randomised_state


def test_randomised_state_replaces_exactly_the_named_blocks():
    trained = backbone.load_backbone("resnet18", "none", seed=1).model.state_dict()
    fresh = backbone.load_backbone("resnet18", "none", seed=2).model.state_dict()
    out = randomised_state(trained, fresh, ["layer4", "fc"])
    for k, v in out.items():
        src = fresh if k.startswith(("layer4.", "fc.")) else trained
        assert torch.equal(v, src[k]), k
    assert set(out) == set(trained)
    with pytest.raises(ValueError, match="layer9"):
        randomised_state(trained, fresh, ["layer9"])


def test_randomised_blocks_take_the_builders_own_init_not_the_exports_redraw(tmp_path, monkeypatch):
    """Adebayo et al.'s re-initialisation: BatchNorm at scale 1, shift 0 and unit statistics, as the
    builder makes them; `--weights none` exports redraw those at order 1 (a different check)."""
    plain = backbone.load_backbone("resnet18", "none", seed=2, redraw=False)
    redrawn = backbone.load_backbone("resnet18", "none", seed=2)
    assert torch.equal(plain.model.layer4[0].bn1.weight, torch.ones(512))
    assert not torch.equal(redrawn.model.layer4[0].bn1.weight, torch.ones(512))
    assert "redrawn" in redrawn.weights and "redrawn" not in plain.weights
    seen = []
    real_load = backbone.load_backbone

    def spy(arch, weights, seed=0, redraw=True):
        seen.append((weights, redraw))
        return real_load(arch, weights, seed, redraw)

    monkeypatch.setattr(backbone, "load_backbone", spy)
    trained = tmp_path / "w.pth"
    torch.save(real_load("resnet18", "none", seed=1, redraw=False).model.state_dict(), trained)
    monkeypatch.setattr("pbv_onnx.export.sanity.export_model", lambda *a, **k: None)
    export_cascade("resnet18", "layer4", str(trained), ["layer4"], tmp_path / "out", resize="32x32")
    assert ("none", False) in seen and ("none", True) not in seen


def test_export_cascade_writes_one_verified_model_per_level(tmp_path):
    from pbv_onnx.runtime.engine import Engine

    weights = tmp_path / "w.pth"
    torch.save(backbone.load_backbone("resnet18", "none", seed=3).model.state_dict(), weights)
    paths = export_cascade(
        "resnet18", "layer4", str(weights), ["layer4", "layer3"], tmp_path / "cascade", resize="32x32", progress=None
    )
    assert [p.name for p in paths] == ["cascade-1.onnx", "cascade-2.onnx"]
    manifest = json.loads((tmp_path / "cascade" / "cascade.json").read_text())
    assert [lvl["randomised"] for lvl in manifest["levels"]] == [["layer4"], ["layer4", "layer3"]]
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    # level 1 equals a torch model with layer4 taken from the seeded fresh init, the rest trained
    trained = backbone.load_backbone("resnet18", str(weights)).model
    fresh = backbone.load_backbone("resnet18", "none", seed=0, redraw=False).model.state_dict()
    trained.load_state_dict(randomised_state(trained.state_dict(), fresh, ["layer4"]))
    net = backbone.truncate(trained, "layer4")
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    got = Engine(paths[0]).features(x).reshape(ref.shape)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-4
