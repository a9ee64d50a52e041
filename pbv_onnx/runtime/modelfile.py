"""The model file contract: graph I/O names, metadata, reading, hashing and the parts of the graph."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pbv_onnx.base.errors import ModelError
from pbv_onnx.runtime.images import Preprocessing

FORMAT_VERSION = 1
# Metadata key: true when K cotangents per image share one forward pass (see Engine.vjp_multi):
# through the `cotangents` input where the graph has one, else through `cotangent` itself
# (models exported before the two layouts were split).
MULTI_COTANGENT = "multi_cotangent"
# Graph I/O names fixed by the export format (docs/method.md section 5) ...
IMAGE, COTANGENT, FEATURES, INPUT_GRAD = "image", "cotangent", "features", "input_grad"
# ... and the multi-cotangent pair beside them: cotangents [N*K, ...] image-major -> input_grads.
# Its default is an empty batch, so (image, cotangent) alone still runs the whole graph.
COTANGENTS, INPUT_GRADS = "cotangents", "input_grads"
# Pooled models (pool != "none") also output the map before pooling, [N, *map_shape] (the shared
# map, docs/formats.md, needs it); older pooled models lack it and still work without shared maps.
FEATURE_MAP = "feature_map"
# Export defaults (export/, and the torch-free CLI's help): ScatterElements(reduction=add), needed
# by the max-pool adjoint, is opset >= 16; verification limits, relative L2 against torch autograd:
# features, and input_grad (raised to FLOOR_FACTOR x the fp32-vs-fp64 difference where larger).
DEFAULT_OPSET = 17
DEFAULT_TOLERANCE = 1e-4
DEFAULT_GRAD_TOLERANCE = 5e-2
FLOOR_FACTOR = 10.0


@dataclass(frozen=True)
class ModelInfo:
    """What a model file says about itself (its `metadata_props`) plus its content hash."""

    path: Path
    sha256: str
    arch: str
    layer: str
    pool: str
    feature_shape: tuple[int, ...]
    preprocessing: Preprocessing
    metadata: dict[str, Any]

    @property
    def n_features(self) -> int:
        return int(np.prod(self.feature_shape))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, *self.preprocessing.input_size)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_metadata(props: dict[str, str], path: Path) -> dict[str, Any]:
    """Decode the JSON-valued metadata_props written by the export stage."""
    if "format_version" not in props:
        raise ModelError(
            path, "not a pbv-onnx model (no format_version in its metadata; export it with `pbv-onnx export`)"
        )
    out: dict[str, Any] = {}
    for key, value in props.items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    if int(out["format_version"]) != FORMAT_VERSION:
        raise ModelError(
            path,
            f"model format version {out['format_version']} is not supported (this pbv-onnx reads {FORMAT_VERSION})",
        )
    for key in ("arch", "layer", "feature_shape", "preprocessing"):
        if key not in out:
            raise ModelError(path, f"model metadata lacks {key!r}")
    return out


def _check_external_data(model, path: Path) -> None:
    """Refuse external-data references that leave the model's folder."""
    from onnx.external_data_helper import _get_all_tensors  # noqa: PLC2701

    root = path.resolve().parent
    for tensor in _get_all_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location":
                target = (root / entry.value).resolve()
                if root not in target.parents and target != root:
                    raise ModelError(path, f"external data {entry.value!r} points outside the model's folder")


def read_model(path: str | os.PathLike):
    """Read an ONNX file once: (its bytes, the parsed model with external data checked and loaded,
    whether it has external data).

    The bytes are what gets hashed and run, so the recorded sha256 is of exactly the graph used.
    """
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ModelError(path, "model file not found")
    try:
        data = path.read_bytes()
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf raises several unrelated types on garbage
        raise ModelError(path, f"not a readable ONNX model ({exc.__class__.__name__})") from None
    _check_external_data(model, path)
    external = any(t.external_data for t in model.graph.initializer)
    if external:
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(model, str(path.parent))
    return data, model, external


def read_info(path: str | os.PathLike, data: bytes | None = None, model=None) -> ModelInfo:
    """Read a model's metadata and hash without creating a session (from `read_model`'s result if given)."""
    path = Path(path)
    if data is None or model is None:
        data, model, _ = read_model(path)
    meta = parse_metadata({p.key: p.value for p in model.metadata_props}, path)
    return ModelInfo(
        path=path,
        sha256=hashlib.sha256(data).hexdigest(),
        arch=str(meta["arch"]),
        layer=str(meta["layer"]),
        pool=str(meta.get("pool", "none")),
        feature_shape=tuple(int(v) for v in meta["feature_shape"]),
        preprocessing=Preprocessing.from_dict(meta["preprocessing"]),
        metadata=meta,
    )


def has_split_passes(proto) -> bool:
    """Whether an exported graph holds both backward passes (`cotangent` one per image beside
    `cotangents` K per image), each to be run as its own part."""
    return COTANGENTS in {i.name for i in proto.graph.input}


def subgraph(proto, inputs: list[str], outputs: list[str]):
    """The part of an exported graph that computes `outputs` from `inputs` (with the model's
    metadata): onnxruntime runs every node of a graph, asked for its outputs or not."""
    from onnx.utils import Extractor

    sub = Extractor(proto).extract_model(inputs, outputs)
    sub.metadata_props.extend(proto.metadata_props)
    return sub


def features_subgraph(proto):
    """The image -> features part: a forward pass costs a forward pass."""
    return subgraph(proto, [IMAGE], [FEATURES])


def vjp_subgraph(proto):
    """(image, cotangent) -> (features, input_grad): one cotangent per image."""
    return subgraph(proto, [IMAGE, COTANGENT], [FEATURES, INPUT_GRAD])


def multi_subgraph(proto):
    """(image, cotangents) -> (features, input_grads): K cotangents per image; `cotangents` a
    plain input there, without the whole graph's empty default."""
    sub = subgraph(proto, [IMAGE, COTANGENTS], [FEATURES, INPUT_GRADS])
    keep = [t for t in sub.graph.initializer if t.name != COTANGENTS]
    del sub.graph.initializer[:]
    sub.graph.initializer.extend(keep)
    return sub
