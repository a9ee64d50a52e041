"""timm backbones through torch.onnx and the ONNX adjoint transform, against torch autograd.

Two steps, two environments (timm is not a dependency of the project's):

    # 1. with torch and timm: each architecture with random weights, exported by torch.onnx
    #    (TorchScript, opset 17, dynamic batch), and torch's float64 features and gradients
    /tmp/hfenv/bin/pip install timm        # the environment of bench/hf_survey.py
    /tmp/hfenv/bin/python bench/timm_survey.py make --dir build/timm_survey
    # 2. in the runtime environment: transform each file and compare
    .venv/runtime/bin/python bench/timm_survey.py check --dir build/timm_survey

No weights are downloaded: `timm.create_model(name, pretrained=False, num_classes=0)` (the pooled
features a readout would use), transformers at 64 x 64 (EVA-02 at 56) and two blocks where timm lets
the depth be set, CNNs at 64 x 64; norm affines, tokens, position embeddings, layer scales and
BatchNorm statistics redrawn at order 1. The reference is torch autograd of the same module in float64.
Results: bench/results/timm_survey.md.
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
# name: create_model keywords (img_size where the architecture takes one)
ARCHS = {
    "vit_small_patch16_224": {"img_size": SIZE},
    "deit_tiny_patch16_224": {"img_size": SIZE},
    "beit_base_patch16_224": {"img_size": SIZE, "depth": 2},
    "eva02_tiny_patch14_224": {"img_size": 56},
    "cait_xxs24_224": {"img_size": SIZE, "depth": 2},
    "levit_128s": {"img_size": SIZE},
    "mixer_s16_224": {"img_size": SIZE},
    "swinv2_cr_tiny_ns_224": {"img_size": SIZE, "window_size": 4},
    "maxvit_nano_rw_256": {"img_size": SIZE},
    "coat_lite_tiny": {"img_size": SIZE},
    "pvt_v2_b0": {},
    "mobilevit_xxs": {},
    "edgenext_xx_small": {},
    "poolformer_s12": {},
    "convnextv2_atto": {},
    "efficientnet_b0": {},
    "mobilenetv3_small_100": {},
    "ghostnet_100": {},
    "regnety_002": {},
    "resnet50d": {},
}


def make(folder: Path) -> None:
    import timm
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    versions = f"torch {torch.__version__}; timm {timm.__version__}"
    for name, kw in ARCHS.items():
        row: dict = {"model": name, "size": kw.get("img_size", SIZE), "versions": versions}
        t0 = time.perf_counter()
        try:
            torch.manual_seed(0)
            net = timm.create_model(name, pretrained=False, num_classes=0, **kw).eval()
            redraw(net)
            x = torch.randn(N_IMAGES, 3, row["size"], row["size"], generator=torch.Generator().manual_seed(2))
            path = folder / f"{name}.onnx"
            torch.onnx.export(net, (x[:2],), str(path), dynamo=False, opset_version=17, input_names=["x"],
                              dynamic_axes={"x": {0: "batch"}})  # fmt: skip
            net64 = copy.deepcopy(net).double()
            xt = x.double().requires_grad_(True)
            y = net64(xt)
            c = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
            (g,) = torch.autograd.grad(y, xt, c)
            np.savez(
                folder / f"{name}.npz", x=x.numpy(), c=c.numpy().astype(np.float32), f=y.detach().numpy(), g=g.numpy()
            )
            row["exported"] = True
        except Exception as exc:  # noqa: BLE001 -- a row per model, whatever fails
            first = re.sub(r"\x1b\[[0-9;]*m", "", str(exc).splitlines()[0] if str(exc) else repr(exc))[:200]
            row["exported"] = False
            row["error"] = f"{exc.__class__.__name__}: {first}"
        row["make_s"] = round(time.perf_counter() - t0, 1)
        (folder / f"{name}.json").write_text(json.dumps(row, indent=1))
        print(json.dumps(row), flush=True)


def redraw(net) -> None:
    """Order-1 norm affines, tokens, embeddings, layer scales and BatchNorm statistics (seeded)."""
    import torch

    gen = torch.Generator().manual_seed(1)
    scales = ("cls_token", "pos_embed", "gamma", "layer_scale", "ls1", "ls2", "relative_position", "dist_token")
    with torch.no_grad():
        for name, p in net.named_parameters():
            low = name.lower()
            if p.dim() == 1 and any(k in low for k in ("norm", "bn", ".ln")) and name.endswith("weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif p.dim() == 1 and any(k in low for k in ("norm", "bn")) and name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            elif any(k in low for k in scales):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(m.running_var.shape, generator=gen))


def check(folder: Path, out_md: Path) -> None:
    from survey_checks import against_reference

    from pbv_onnx.runtime.modelfile import read_model

    rows = []
    for name in ARCHS:
        meta = folder / f"{name}.json"
        if not meta.exists():
            continue
        row = json.loads(meta.read_text())
        if row.get("exported"):
            ref = dict(np.load(folder / f"{name}.npz"))
            _, model, _ = read_model(folder / f"{name}.onnx")
            row.update(against_reference(model, row["size"], ref["x"], ref["c"], ref["f"], ref["g"]))
        rows.append(row)
        print(json.dumps({k: row.get(k) for k in ("model", "features", "input_grad", "transform_error")}), flush=True)
    out_md.write_text(render(rows))
    print(f"wrote {out_md}")


def render(rows: list[dict]) -> str:
    from survey_checks import table_head

    made_by = (
        "Made by `bench/timm_survey.py` (its docstring: how). Random weights, norm affines, tokens and layer "
        "scales redrawn at order 1, `num_classes=0` (pooled features); torch.onnx's TorchScript exporter, "
        "opset 17. Features and input gradients of onnxruntime float32 against torch autograd in float64 "
        f"(relative L2, worst of {N_IMAGES} random images)."
    )
    lines = table_head(
        "timm backbones through torch.onnx and the ONNX adjoint transform",
        made_by,
        rows[0].get("versions", "?") if rows else "?",
        ["model", "input", "features", "input_grad", "note"],
    )
    for r in rows:
        if not r.get("exported"):
            lines.append(f"| {r['model']} | {r['size']} | - | - | torch.onnx failed: {r.get('error', '?')} |")
        elif "transform_error" in r:
            lines.append(f"| {r['model']} | {r['size']} | - | - | {r['transform_error']} |")
        else:
            lines.append(f"| {r['model']} | {r['size']} | {r['features']:.1e} | {r['input_grad']:.1e} | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from survey_checks import two_steps

    two_steps(__doc__, "timm_survey", make, check)
