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

# torch-free, shared with the ONNX-file route; re-exported here where the torch route has always found them
from pbv_onnx.export.onnx_route import IMAGENET_MEAN, IMAGENET_STD, build_preprocessing, parse_size
from pbv_onnx.runtime.images import Preprocessing
from pbv_onnx.runtime.modelfile import file_sha256

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Backbone",
    "build_preprocessing",
    "load_backbone",
    "parse_size",
    "redraw_small_params",
    "run_to_end",
    "truncate",
    "truncate_for_graph",
]


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


def load_backbone(arch: str, weights: str, seed: int = 0, redraw: bool = True) -> Backbone:
    """`weights`: a torchvision weights name, a state_dict file, or 'none' (seeded random init, its small
    parameters redrawn at order 1 unless `redraw` is False: the builder's own init, as a sanity check's
    randomised blocks take it)."""
    build = _builder(arch)
    if weights.lower() == "none":
        torch.manual_seed(seed)  # the random init is reproducible: same seed, same weights
        model = build(weights=None)
        record = {"source": "none", "seed": seed}
        if redraw:  # tiny or constant parameters would hide a wrong adjoint from verification
            with torch.no_grad():
                n = redraw_small_params(model, seed)
            record.update(redrawn=REDRAWN, redrawn_tensors=n)
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


# -- the ONNX-graph route: the truncated forward for torch.onnx, random weights that hide nothing ----------
class _Reached(Exception):
    """Raised by the cut module's hook once its output is kept: the rest of the model never runs."""


class GraphCut(nn.Module):
    """`model` up to and including module `layer`'s output (the whole model for None), then `pool`:
    none, avg (mean over space for [N, C, h, w], over tokens for [N, T, D]) or cls (token 0).

    The cut is a forward hook, not an fx trace, so any model torch.onnx can export (transformers with
    shape asserts included) can be cut at any module that runs once."""

    def __init__(self, model: nn.Module, layer: str | None, pool: str = "none", early_exit: bool = True):
        super().__init__()
        if pool not in ("none", "avg", "cls"):
            raise UsageError(None, f"pool must be none, avg or cls, not {pool!r}", param="pool")
        if layer:
            names = dict(model.named_modules())
            if layer not in names or not layer:
                tops = ", ".join(n for n, _ in model.named_children())
                raise UsageError(
                    None, f"layer={layer!r} is not a module of the model (top-level modules: {tops})", param="layer"
                )
        self.model, self.layer, self.pool, self.early_exit = model, layer, pool, early_exit
        # set after the export where the transform turned a channels-last cut (swin_t's stages are
        # [N, h, w, C]): the verification then reads the layer as the exported model does
        self.perm: list[int] | None = None

    def cut(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output, unpooled."""
        if not self.layer:
            return self.model(x)
        kept: list[torch.Tensor] = []

        def keep(module, inputs, output):
            if self.early_exit:
                kept.append(output)
                raise _Reached
            # the model runs on: an in-place op after the layer (DenseNet's relu) would change the output
            kept.append(output.clone() if isinstance(output, torch.Tensor) else output)

        handle = self.model.get_submodule(self.layer).register_forward_hook(keep)
        try:
            self.model(x)
        except _Reached:
            pass
        finally:
            handle.remove()
        if len(kept) != 1 or not isinstance(kept[0], torch.Tensor):
            raise UsageError(
                None, f"layer={self.layer!r} does not return one tensor when the model runs", param="layer"
            )
        return kept[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cut(x)
        return pool_tokens(y if self.perm is None else y.permute(*self.perm), self.pool)


def pool_tokens(y: torch.Tensor, pool: str) -> torch.Tensor:
    """The `--pool` head in torch, as the graph transform pools: avg over space ([N, C, h, w]) or tokens
    ([N, T, D]), cls = token 0 ([N, T, D])."""
    if pool == "none":
        return y
    if pool == "avg":
        return y.mean(dim=(2, 3)) if y.dim() == 4 else y.mean(dim=1)
    if y.dim() != 3:
        raise UsageError(None, f"pool=cls needs token features [N, T, D], not {list(y.shape)}", param="pool")
    return y[:, 0]


class _Unpooled(nn.Module):
    def __init__(self, cut: GraphCut):
        super().__init__()
        self.inner = cut

    def forward(self, x):
        y = self.inner.cut(x)
        return y if self.inner.perm is None else y.permute(*self.inner.perm)


def run_to_end(cut: nn.Module) -> nn.Module:
    """The unpooled cut of `truncate_for_graph` for torch.export, which cannot trace the early exit's
    exception: the whole model runs and the layer's output is returned (the exported graph keeps only
    what that output needs)."""
    inner = cut.inner
    return _Unpooled(GraphCut(inner.model, inner.layer, "none", early_exit=False)).eval()


def truncate_for_graph(model: nn.Module, layer: str | None, pool: str = "none") -> tuple[nn.Module, nn.Module]:
    """(unpooled cut for torch.onnx export, pooled cut for torch autograd verification)."""
    # eval mode on the wrappers too: torch.onnx.export restores the exported module's mode afterwards,
    # recursively, so a wrapper left in training mode would put the backbone's BatchNorms in it
    pooled = GraphCut(model, layer, pool).eval()
    return _Unpooled(pooled).eval(), pooled


# What redraw_small_params redraws, for the model's weights metadata.
REDRAWN = (
    "order-1 redraw of small or constant initial parameters (seeded): BatchNorm/LayerNorm/GroupNorm affines "
    "U(0.5, 1.5) and N(0, 0.2^2), BatchNorm statistics N(0, 0.1^2) and U(0.5, 2), layer scales U(1, 3), "
    "class tokens, position embeddings and relative position biases N(0, 0.5^2)"
)
_TOKENS = ("class_token", "cls_token", "pos_embedding", "pos_embed", "relative_position_bias_table")


def redraw_small_params(model: nn.Module, seed: int = 0) -> int:
    """Redraw, in place, the parameters a fresh init leaves tiny or constant (norm affines at 1 and 0,
    ConvNeXt layer scales at 1e-6, 0.02-std tokens and embeddings) at order 1, so a wrong adjoint cannot
    hide behind them (an adjoint that ignores LayerNorm's scale is exactly right at scale 1). Returns how
    many tensors were redrawn."""
    gen = torch.Generator().manual_seed(10_000 + seed)

    def uniform(t: torch.Tensor, lo: float, hi: float) -> None:
        t.copy_(lo + (hi - lo) * torch.rand(t.shape, generator=gen, dtype=torch.float64).to(t.dtype))

    def normal(t: torch.Tensor, std: float) -> None:
        t.copy_(std * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype))

    count = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
                if getattr(module, "weight", None) is not None:
                    uniform(module.weight, 0.5, 1.5)
                    count += 1
                if getattr(module, "bias", None) is not None:
                    normal(module.bias, 0.2)
                    count += 1
                if getattr(module, "running_mean", None) is not None:
                    normal(module.running_mean, 0.1)
                    uniform(module.running_var, 0.5, 2.0)
                    count += 2
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "layer_scale" or (leaf == "gamma" and float(param.abs().max()) < 1e-3):
                # ConvNeXt's branches are small again behind 0.02-std weights: at U(0.5, 1.5) a stage's
                # blocks are 7% of its output at 64x64, close to the gradient limit; at U(1, 3), 14%
                uniform(param, 1.0, 3.0)
                count += 1
            elif leaf in _TOKENS:
                normal(param, 0.5)
                count += 1
    return count
