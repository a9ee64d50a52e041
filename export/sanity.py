"""Model-randomisation sanity check (Adebayo et al. 2018): re-export a backbone with its top blocks
randomised, cumulatively from the cut downwards, through the normal export pipeline.

    python -m pbv_onnx.export.sanity --arch mobilenet_v2 --layer features.18 --weights W.pth \
        --blocks features.18 features.17 features.16 --out-dir build/demo/sanity [export options]

writes OUT_DIR/cascade-1.onnx (features.18 randomised), cascade-2.onnx (18 and 17), ... and
OUT_DIR/cascade.json naming the blocks of each. A randomised block gets the weights of a freshly
built, seeded torchvision model (its own initialisation, batch-norm statistics reset), so the
randomised model is one the architecture could have started training from.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from pbv_onnx.base.atomic import atomic_file
from pbv_onnx.export import backbone
from pbv_onnx.export.pipeline import export_model


def randomised_state(
    state: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor], blocks: Sequence[str]
) -> dict[str, torch.Tensor]:
    """`state` with every tensor of the modules named in `blocks` (and below them) taken from `fresh`."""
    prefixes = tuple(b.rstrip(".") + "." for b in blocks)
    missing = [b for b, p in zip(blocks, prefixes) if not any(k.startswith(p) for k in state)]
    if missing:
        raise ValueError(f"no weights under {', '.join(missing)}")
    return {k: (fresh[k].clone() if k.startswith(prefixes) else v) for k, v in state.items()}


def export_cascade(
    arch: str,
    layer: str,
    weights: str,
    blocks: Sequence[str],
    out_dir: str | Path,
    seed: int = 0,
    **export_options,
) -> list[Path]:
    """Export `arch` cut at `layer` once per cascade level k = 1..len(blocks), with blocks[:k] randomised."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trained = backbone.load_backbone(arch, weights)
    state = trained.model.state_dict()
    # the builder's own init (Adebayo et al.'s re-initialisation), not the export's order-1 redraw
    fresh = backbone.load_backbone(arch, "none", seed, redraw=False).model.state_dict()
    spec = export_options.pop("preprocessing", None) or backbone.build_preprocessing(
        trained.preprocessing,
        export_options.pop("resize", None),
        export_options.pop("crop", None),
        export_options.pop("mean", None),
        export_options.pop("std", None),
    )
    paths = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(1, len(blocks) + 1):
            pth = Path(tmp) / f"cascade-{k}.pth"
            torch.save(randomised_state(state, fresh, blocks[:k]), pth)
            out = out_dir / f"cascade-{k}.onnx"
            export_model(out, arch, layer, str(pth), seed=seed, preprocessing=spec, force=True, **export_options)
            paths.append(out)
    manifest = {
        "arch": arch,
        "layer": layer,
        "weights": str(weights),
        "seed": seed,
        "levels": [{"model": p.name, "randomised": list(blocks[: k + 1])} for k, p in enumerate(paths)],
    }
    with atomic_file(out_dir / "cascade.json", True) as tmp_file:
        tmp_file.write_text(json.dumps(manifest, indent=2) + "\n")
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", required=True)
    ap.add_argument("--layer", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--blocks", nargs="+", required=True, help="modules randomised cumulatively, top first")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resize", default=None)
    ap.add_argument("--mean", type=float, nargs=3, default=None)
    ap.add_argument("--std", type=float, nargs=3, default=None)
    a = ap.parse_args(argv)
    paths = export_cascade(
        a.arch,
        a.layer,
        a.weights,
        a.blocks,
        a.out_dir,
        a.seed,
        resize=a.resize,
        mean=None if a.mean is None else tuple(a.mean),
        std=None if a.std is None else tuple(a.std),
        progress=None,
    )
    print("\n".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
