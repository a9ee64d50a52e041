"""The exported model on onnxruntime: metadata, one session per graph, batched features and VJPs."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DependencyError, ModelError, UsageError
from .images import Preprocessing

FORMAT_VERSION = 1
# Graph I/O names fixed by the export format (METHOD.md section 5).
IMAGE, COTANGENT, FEATURES, INPUT_GRAD = "image", "cotangent", "features", "input_grad"


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
        raise ModelError(path, "not a pbv-onnx model (no format_version in its metadata; export it with `pbv-onnx export`)")
    out: dict[str, Any] = {}
    for key, value in props.items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    if int(out["format_version"]) != FORMAT_VERSION:
        raise ModelError(path, f"model format version {out['format_version']} is not supported (this pbv-onnx reads {FORMAT_VERSION})")
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


def load_model_proto(path: str | os.PathLike):
    """Parse an ONNX file safely (external data checked, not loaded yet)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ModelError(path, "model file not found")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types on garbage
        raise ModelError(path, f"not a readable ONNX model ({exc.__class__.__name__})") from None
    _check_external_data(model, path)
    if any(t.external_data for t in model.graph.initializer):
        from onnx.external_data_helper import load_external_data_for_model
        load_external_data_for_model(model, str(path.parent))
    return model


def read_info(path: str | os.PathLike, model=None) -> ModelInfo:
    """Read a model's metadata and hash without creating a session."""
    path = Path(path)
    if model is None:
        model = load_model_proto(path)
    meta = parse_metadata({p.key: p.value for p in model.metadata_props}, path)
    return ModelInfo(path=path, sha256=file_sha256(path), arch=str(meta["arch"]),
                     layer=str(meta["layer"]), pool=str(meta.get("pool", "none")),
                     feature_shape=tuple(int(v) for v in meta["feature_shape"]),
                     preprocessing=Preprocessing.from_dict(meta["preprocessing"]), metadata=meta)


def choose_providers(device: str) -> list[str]:
    """`auto|cuda|cpu` -> onnxruntime execution providers, CUDA only where it can run."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise DependencyError(None, "--device cuda: onnxruntime has no CUDA provider here "
                                  "(install pbv-onnx[gpu] on a machine with an NVIDIA GPU)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device != "auto":
        raise UsageError(None, f"--device must be auto, cuda or cpu, not {device!r}")
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class Engine:
    """One exported model: a session for features + VJP, a forward-only session made on demand."""

    def __init__(self, path: str | os.PathLike, device: str = "auto", batch_size: int = 16,
                 threads: int | None = None, verbose: bool = False):
        import onnxruntime as ort

        if batch_size < 1:
            raise UsageError(None, f"--batch-size must be at least 1, not {batch_size}")
        self.path = Path(path)
        self._proto = load_model_proto(self.path)
        self.info = read_info(self.path, self._proto)
        self.batch_size = batch_size
        self._providers = choose_providers(device)
        self._options = ort.SessionOptions()
        self._options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            self._options.intra_op_num_threads = threads
        self._options.log_severity_level = 3
        try:
            self._vjp = ort.InferenceSession(self._proto.SerializeToString(), self._options,
                                             providers=self._providers)
        except Exception as exc:
            raise ModelError(self.path, f"onnxruntime cannot load the model ({exc})") from None
        names = {i.name for i in self._vjp.get_inputs()} | {o.name for o in self._vjp.get_outputs()}
        if not {IMAGE, COTANGENT, FEATURES, INPUT_GRAD} <= names:
            raise ModelError(self.path, "graph lacks the image/cotangent -> features/input_grad interface")
        self._fwd = None
        self.provider = self._vjp.get_providers()[0]
        if verbose:
            print(f"pbv-onnx: {self.path.name} on {self.provider}", file=sys.stderr)

    # -- sessions -------------------------------------------------------------------------
    def _forward_session(self):
        """The features-only subgraph of the same file: a forward pass costs a forward pass."""
        if self._fwd is None:
            import onnx
            import onnxruntime as ort
            from onnx.utils import Extractor

            sub = Extractor(self._proto).extract_model([IMAGE], [FEATURES])
            sub.metadata_props.extend(self._proto.metadata_props)
            self._fwd = ort.InferenceSession(sub.SerializeToString(), self._options,
                                             providers=self._providers)
            del onnx
        return self._fwd

    # -- checks ---------------------------------------------------------------------------
    def _check_images(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[1:] != self.info.input_shape:
            raise UsageError(None, f"images must be [N, {', '.join(map(str, self.info.input_shape))}], got {list(images.shape)}")
        return images

    def _check_cotangents(self, cotangents: np.ndarray, n: int) -> np.ndarray:
        cotangents = np.ascontiguousarray(cotangents, dtype=np.float32)
        want = (n, *self.info.feature_shape)
        if cotangents.shape != want:
            if cotangents.ndim == 2 and cotangents.shape == (n, self.info.n_features):
                return cotangents.reshape(want)
            raise UsageError(None, f"cotangents must be {list(want)}, got {list(cotangents.shape)}")
        return cotangents

    # -- compute --------------------------------------------------------------------------
    def features(self, images: np.ndarray) -> np.ndarray:
        """Latent features [N, *feature_shape] of preprocessed images [N, 3, H, W]."""
        images = self._check_images(images)
        sess = self._forward_session()
        out = [sess.run([FEATURES], {IMAGE: images[i:i + self.batch_size]})[0]
               for i in range(0, len(images), self.batch_size)]
        return np.concatenate(out) if out else np.empty((0, *self.info.feature_shape), np.float32)

    def vjp(self, images: np.ndarray, cotangents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(features, J_phi(x)^T cotangent) per sample, in batches of `batch_size`."""
        images = self._check_images(images)
        cotangents = self._check_cotangents(cotangents, len(images))
        feats, grads = [], []
        for i in range(0, len(images), self.batch_size):
            f, g = self._vjp.run([FEATURES, INPUT_GRAD], {IMAGE: images[i:i + self.batch_size],
                                                          COTANGENT: cotangents[i:i + self.batch_size]})
            feats.append(f)
            grads.append(g)
        if not feats:
            return (np.empty((0, *self.info.feature_shape), np.float32),
                    np.empty((0, *self.info.input_shape), np.float32))
        return np.concatenate(feats), np.concatenate(grads)
