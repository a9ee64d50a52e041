"""Torchvision backbones: build by name, load weights, cut at a module path, preprocessing spec."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torchvision
from torch import nn

from pbv_onnx.base.errors import ModelError, UsageError
from pbv_onnx.runtime.images import Preprocessing
from pbv_onnx.runtime.modelfile import file_sha256

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Backbone:
    """A full classification model in eval mode, frozen, with where its weights came from."""

    arch: str
    model: nn.Module
    weights: dict[str, Any]
    preprocessing: Preprocessing | None = None  # from torchvision weights' transforms, if any


def available_archs() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _builder(arch: str):
    if arch not in available_archs():
        close = [a for a in available_archs() if a.startswith(arch[:3])][:8]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UsageError(None, f"arch={arch!r} is not a torchvision classification model{hint}", param="arch")
    return torchvision.models.get_model_builder(arch)


def _weights_enum(arch: str, name: str):
    enum = torchvision.models.get_model_weights(arch)
    key = name.split(".")[-1]
    if key not in enum.__members__:
        raise UsageError(
            None,
            f"weights={name!r}: not a file, not 'none', and not one of the "
            f"torchvision weights of {arch} ({', '.join(enum.__members__)})",
            param="weights",
        )
    return enum[key]


def _preprocessing_from_weights(w) -> Preprocessing:
    t = w.transforms()
    resize = t.resize_size[0] if len(t.resize_size) == 1 else tuple(t.resize_size)
    crop = tuple(t.crop_size) * (2 if len(t.crop_size) == 1 else 1)
    return Preprocessing(
        resize=resize, crop=crop, mean=tuple(t.mean), std=tuple(t.std), interpolation=t.interpolation.value
    )


def _is_file_spec(weights: str) -> bool:
    return os.sep in weights or "/" in weights or weights.endswith((".pth", ".pt")) or Path(weights).exists()


def load_backbone(arch: str, weights: str, seed: int = 0) -> Backbone:
    """`weights`: a torchvision weights name, a state_dict file, or 'none' (seeded random init)."""
    build = _builder(arch)
    if weights.lower() == "none":
        torch.manual_seed(seed)  # the random init is reproducible: same seed, same weights
        model = build(weights=None)
        record = {"source": "none", "seed": seed}
        spec = None
    elif _is_file_spec(weights):
        path = Path(weights)
        if not path.is_file():
            raise ModelError(path, "weights file not found")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelError(path, f"not a loadable state_dict ({exc.__class__.__name__})") from None
        if not isinstance(state, dict):
            raise ModelError(path, "not a state_dict (a dict of tensors)")
        model = build(weights=None)
        keys, want = set(state), set(model.state_dict())
        if keys != want:
            missing, extra = sorted(want - keys), sorted(keys - want)
            raise ModelError(
                path,
                f"state_dict does not match {arch}: "
                f"{len(missing)} missing keys {missing[:3]}, {len(extra)} unexpected {extra[:3]}",
            )
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelError(path, f"state_dict does not fit {arch}: {str(exc).splitlines()[-1].strip()}") from None
        record = {"source": "file", "path": str(path), "sha256": file_sha256(path)}
        spec = None
    else:
        w = _weights_enum(arch, weights)
        try:
            model = build(weights=w)
        except Exception as exc:
            raise ModelError(
                None,
                f"cannot get torchvision weights {arch} {w.name} from {w.url} "
                f"({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                "without network access pass a state_dict file with weights=PATH",
                param="weights",
            ) from None
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)
        record = {
            "source": "torchvision",
            "name": f"{type(w).__name__}.{w.name}",
            "url": w.url,
            "sha256": file_sha256(cached) if cached.is_file() else None,
        }
        spec = _preprocessing_from_weights(w)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Backbone(arch=arch, model=model, weights=record, preprocessing=spec)


class _CutTracer(fx.Tracer):
    """Traces the full model with the cut module kept whole, so its output is one node."""

    def __init__(self, layer: str):
        super().__init__()
        self.layer = layer

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname == self.layer or super().is_leaf_module(m, qualname)


class GlobalAvgPool(nn.Module):
    """[N, C, h, w] -> [N, C]: the `--pool avg` head."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)

    def forward(self, x):
        return self.flatten(self.pool(x))


class _Pooled(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body
        self.head = GlobalAvgPool()

    def forward(self, x):
        return self.head(self.body(x))


def truncate(model: nn.Module, layer: str | None, pool: str = "none") -> fx.GraphModule:
    """The network up to and including `layer`'s output, flattened into primitive fx nodes.

    `layer=None` keeps the whole model. `pool='avg'` appends global average pooling.
    """
    if pool not in ("none", "avg"):
        raise UsageError(None, f"pool must be none or avg, not {pool!r}", param="pool")
    try:
        if layer:
            names = dict(model.named_modules())
            if layer not in names:
                tops = ", ".join(n for n, _ in model.named_children())
                raise UsageError(
                    None, f"layer={layer!r} is not a module of the model (top-level modules: {tops})", param="layer"
                )
            graph = _CutTracer(layer).trace(model)
            hits = [n for n in graph.nodes if n.op == "call_module" and n.target == layer]
            if len(hits) != 1:
                raise UsageError(
                    None,
                    f"layer={layer!r} is called {len(hits)} times in the model's forward; "
                    "pick a module that runs exactly once",
                    param="layer",
                )
            out = next(n for n in graph.nodes if n.op == "output")
            graph.erase_node(out)
            graph.output(hits[0])
            cut = fx.GraphModule(model, graph)
            cut.graph.eliminate_dead_code()
            cut.recompile()
        else:
            cut = model
        if pool == "avg":
            cut = _Pooled(cut)
        return fx.symbolic_trace(cut)  # inline the cut module into primitive nodes
    except (UsageError, ModelError):
        raise
    except Exception as exc:
        raise ModelError(
            None,
            f"cannot trace the model with torch.fx ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})",
        ) from None


def parse_size(text: str | None, option: str) -> int | tuple[int, int] | None:
    """'224' -> 224, '224x200' -> (224, 200) (height x width)."""
    if text is None:
        return None
    try:
        parts = [int(p) for p in str(text).lower().split("x")]
    except ValueError:
        raise UsageError(None, f"{option} must be N or HxW (e.g. 224 or 224x224), not {text!r}", param=option) from None
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise UsageError(None, f"{option} must be N or HxW with positive sizes, not {text!r}", param=option)
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def build_preprocessing(
    from_weights: Preprocessing | None, resize: str | None = None, crop: str | None = None, mean=None, std=None
) -> Preprocessing:
    """The spec from torchvision weights, or the defaults (224x224, ImageNet stats); options override."""
    base = from_weights or Preprocessing(resize=(224, 224), crop=None, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    r = parse_size(resize, "resize")
    c = parse_size(crop, "crop")
    new_resize = base.resize if r is None else r
    new_crop = base.crop if c is None else (c, c) if isinstance(c, int) else c
    if r is not None and c is None and from_weights is not None:
        new_crop = None if not isinstance(r, int) else base.crop  # an exact size needs no crop
    if mean is not None and (len(mean) != 3):
        raise UsageError(None, "mean takes three values (R G B)", param="mean")
    if std is not None and (len(std) != 3 or min(std) <= 0):
        raise UsageError(None, "std takes three positive values (R G B)", param="std")
    spec = Preprocessing(
        resize=new_resize,
        crop=new_crop,
        mean=tuple(float(v) for v in (mean or base.mean)),
        std=tuple(float(v) for v in (std or base.std)),
        interpolation=base.interpolation,
    )
    if isinstance(spec.resize, int) and spec.crop is None:
        raise UsageError(
            None,
            f"resize={spec.resize} resizes the shorter side only; add crop to fix the input size",
            param=("resize", "crop"),
        )
    if (
        spec.crop is not None
        and not isinstance(spec.resize, int)
        and (spec.crop[0] > spec.resize[0] or spec.crop[1] > spec.resize[1])
    ):
        raise UsageError(None, f"crop={spec.crop} is larger than resize={spec.resize}", param=("crop", "resize"))
    return spec
