"""Hugging Face vision backbones through torch.onnx and the ONNX adjoint transform, against torch autograd.

Two steps, two environments (transformers is not a dependency of the project's):

    # 1. with torch and transformers: small random configurations of each backbone, exported by
    #    torch.onnx's dynamo and TorchScript exporters, and torch's float64 features and gradients
    python3 -m venv /tmp/hfenv && /tmp/hfenv/bin/pip install torch torchvision transformers onnx onnxscript
    /tmp/hfenv/bin/python bench/hf_survey.py make --dir build/hf_survey
    # 2. in the runtime environment: transform each file, compare, run the export's own check
    .venv/runtime/bin/python bench/hf_survey.py check --dir build/hf_survey

No weights are downloaded: each model is built from a small configuration (64 x 64 images, two to
four blocks) with transformers' random initialisation, then its norm affines, tokens, position
embeddings, layer scales and BatchNorm statistics are redrawn at order 1 (as `export --arch` does), so
a wrong adjoint cannot hide behind unit scales. The features are the model's `last_hidden_state`
(tokens [N, T, D], or maps [N, C, h, w]). The reference is torch autograd of the same module in float64.
Results: bench/results/hf_survey.md.
"""

from __future__ import annotations

import copy
import json
import re
import time
from pathlib import Path

import numpy as np

SIZE = 64
N_IMAGES = 3
EXPORTERS = ("dynamo", "torchscript")


def configs(T) -> dict:
    """name: a function building the backbone from `transformers` (module T)."""
    vit = dict(image_size=SIZE, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    return {
        "ViT": lambda: T.ViTModel(T.ViTConfig(**vit, intermediate_size=128), add_pooling_layer=False),
        "DINOv2": lambda: T.Dinov2Model(T.Dinov2Config(**vit, mlp_ratio=2)),
        "CLIP vision": lambda: T.CLIPVisionModel(T.CLIPVisionConfig(**vit, intermediate_size=128)),
        "ConvNeXt": lambda: T.ConvNextModel(T.ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1])),
        "Swin": lambda: T.SwinModel(
            T.SwinConfig(image_size=SIZE, patch_size=4, embed_dim=32, depths=[1, 1], num_heads=[2, 4], window_size=4)
        ),
        "ResNet": lambda: T.ResNetModel(
            T.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1] * 4)
        ),
    }


def slug(name: str) -> str:
    return name.lower().replace(" ", "_")


# -- step 1: torch and transformers ---------------------------------------------------------------
def make(folder: Path) -> None:
    import torch
    import transformers

    class LastHidden(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(pixel_values=x).last_hidden_state

    def redraw(module) -> None:
        """Order-1 norm affines, tokens, embeddings, layer scales and BatchNorm statistics (seeded)."""
        gen = torch.Generator().manual_seed(10_000)
        with torch.no_grad():
            for name, p in module.named_parameters():
                low = name.lower()
                if p.dim() == 1 and "norm" in low and name.endswith("weight"):
                    p.copy_(0.5 + torch.rand(p.shape, generator=gen))
                elif p.dim() == 1 and "norm" in low and name.endswith("bias"):
                    p.copy_(0.2 * torch.randn(p.shape, generator=gen))
                elif any(
                    k in low
                    for k in ("cls_token", "position", "mask_token", "class_embedding", "layer_scale", "lambda")
                ):
                    p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            for m in module.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                    m.running_var.copy_(0.5 + 1.5 * torch.rand(m.running_var.shape, generator=gen))

    folder.mkdir(parents=True, exist_ok=True)
    versions = f"torch {torch.__version__}; transformers {transformers.__version__}"
    for name, build in configs(transformers).items():
        torch.manual_seed(0)
        net = LastHidden(build()).eval()
        redraw(net)
        x = torch.randn(N_IMAGES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
        row: dict = {"model": name, "versions": versions, "files": {}}
        for exporter in EXPORTERS:
            path = folder / f"{slug(name)}_{exporter}.onnx"
            t0 = time.perf_counter()
            try:
                names = {"input_names": ["pixel_values"]}
                if exporter == "dynamo":
                    batch = {"dynamic_shapes": ({0: torch.export.Dim("batch")},)}
                    torch.onnx.export(net, (x[:2],), str(path), dynamo=True, opset_version=18, **names, **batch)
                else:
                    batch = {"dynamic_axes": {"pixel_values": {0: "batch"}}}
                    torch.onnx.export(net, (x[:2],), str(path), dynamo=False, opset_version=17, **names, **batch)
                row["files"][exporter] = path.name
            except Exception as exc:  # noqa: BLE001 -- a cell per exporter, whatever fails
                first = re.sub(r"\x1b\[[0-9;]*m", "", str(exc).splitlines()[0])[:200]  # no terminal colours
                row.setdefault("export_errors", {})[exporter] = f"{exc.__class__.__name__}: {first}"
            row.setdefault("export_s", {})[exporter] = round(time.perf_counter() - t0, 1)
        net64 = copy.deepcopy(net).double()
        xt = x.double().requires_grad_(True)
        y = net64(xt)
        c = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        (g,) = torch.autograd.grad(y, xt, c)
        np.savez(
            folder / f"{slug(name)}.npz", x=x.numpy(), c=c.numpy().astype(np.float32), f=y.detach().numpy(), g=g.numpy()
        )
        (folder / f"{slug(name)}.json").write_text(json.dumps(row, indent=1))
        print(json.dumps(row), flush=True)


# -- step 2: the runtime environment ---------------------------------------------------------------
def check(folder: Path, out_md: Path) -> None:
    from survey_checks import against_reference, export_verdict

    from pbv_onnx.runtime.modelfile import read_model

    rows = []
    for meta in sorted(folder.glob("*.json")):
        if meta.name == "survey.json":
            continue
        row = json.loads(meta.read_text())
        ref = dict(np.load(folder / f"{slug(row['model'])}.npz"))
        for exporter, file in row["files"].items():
            _, model, _ = read_model(folder / file)
            cell = against_reference(model, SIZE, ref["x"], ref["c"], ref["f"], ref["g"])
            cell["export"] = export_verdict(folder / file, (0.5,) * 3, (0.25,) * 3)
            row.setdefault("results", {})[exporter] = cell
            print(json.dumps({"model": row["model"], "exporter": exporter, **cell}), flush=True)
        rows.append(row)
    order = list(configs(None))  # the names only: nothing is built
    rows.sort(key=lambda r: order.index(r["model"]) if r["model"] in order else len(order))
    out_md.write_text(render(rows))
    (folder / "survey.json").write_text(json.dumps(rows, indent=1))
    print(f"wrote {out_md}")


def render(rows: list[dict]) -> str:
    from survey_checks import table_head

    made_by = (
        "Made by `bench/hf_survey.py` (its docstring: how). Small random configurations (64 x 64 images), "
        "norm affines, tokens and embeddings redrawn at order 1; the features are `last_hidden_state`. "
        "Features and input gradients of onnxruntime float32 against torch autograd in float64 (relative L2, "
        f"worst of {N_IMAGES} random images); `export --onnx`: the export's own check (finite differences of a "
        "float64 copy of the file, on photographs)."
    )
    lines = table_head(
        "Hugging Face vision backbones through torch.onnx and the ONNX adjoint transform",
        made_by,
        rows[0].get("versions", "?") if rows else "?",
        ["model", "exporter", "features", "input_grad", "export --onnx"],
    )
    for r in rows:
        for exporter in EXPORTERS:
            cell = r.get("results", {}).get(exporter)
            if cell is None:
                why = r.get("export_errors", {}).get(exporter, "not run")
                lines.append(f"| {r['model']} | {exporter} | - | - | torch.onnx failed: {why} |")
            elif "transform_error" in cell:
                lines.append(f"| {r['model']} | {exporter} | - | - | {cell['transform_error']} |")
            else:
                errs = f"{cell['features']:.1e} | {cell['input_grad']:.1e}"
                lines.append(f"| {r['model']} | {exporter} | {errs} | {cell['export']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from survey_checks import two_steps

    two_steps(__doc__, "hf_survey", make, check)
