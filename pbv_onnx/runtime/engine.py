"""The engine: one exported model on onnxruntime, one session per graph part, batched features and VJPs."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from pbv_onnx.base.errors import DependencyError, ModelError, UsageError
from pbv_onnx.runtime.fp16 import PRECISIONS, to_fp16
from pbv_onnx.runtime.layout import blocked_products, sample_shapes
from pbv_onnx.runtime.modelfile import (
    COTANGENT,
    COTANGENTS,
    FEATURE_MAP,
    FEATURES,
    IMAGE,
    INPUT_GRAD,
    INPUT_GRADS,
    MULTI_COTANGENT,
    features_subgraph,
    has_split_passes,
    multi_subgraph,
    read_info,
    read_model,
    subgraph,
    vjp_subgraph,
)
from pbv_onnx.runtime.sessions import (
    Rewrite,
    choose_providers,
    create_session,
    preload_cuda_libraries,
    provider_name,
    quiet_cuda_log,
    session_options,
    with_cuda_options,
)

# The rewrite of the K-per-image graph's optimised form (layout.py), versioned: its cache key.
BLOCKED_PRODUCTS = "blocked-products-1"


class Engine:
    """One exported model: sessions for features + VJP (one cotangent per image, and K per image)
    and a forward-only one, each made on first use.

    `precision="fp16"` (CUDA only) runs a float16 copy of the graph; compare it with fp32 before
    trusting it (bench/gpu_check.py does). `cuda_options` override the CUDA provider's options
    (sessions.CUDA_OPTIONS). `io_binding` feeds and fetches through an IO binding instead of a
    plain run; by default (None) where the session runs on CUDA, not on the CPU provider (its
    speed on CUDA is measured both ways by bench/gpu_check.py; results: docs/performance.md).
    `fixed_shapes` pads every call to a few fixed input shapes, one session per shape (`pads`); by
    default where the session runs on CUDA, whose provider plans its convolutions again whenever a
    session's input shape changes. Each session has its own GPU memory arena.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        device: str = "auto",
        batch_size: int = 16,
        threads: int | None = None,
        precision: str = "fp32",
        cuda_options: dict[str, str] | None = None,
        io_binding: bool | None = None,
        fixed_shapes: bool | None = None,
    ):
        if batch_size < 1:
            raise UsageError(None, f"batch_size must be at least 1, not {batch_size}", param="batch_size")
        if precision not in PRECISIONS:
            raise UsageError(None, f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        self.path = Path(path)
        data, self._proto, external = read_model(self.path)
        self.info = read_info(self.path, data, self._proto)
        self.batch_size = batch_size
        # Exported with both layouts (cotangent one per image, cotangents K per image): each runs
        # as its own part of the graph. Earlier models take K per image through `cotangent`
        # where their metadata says so.
        self._split = has_split_passes(self._proto)
        # Several cotangents per image in one call (one forward pass for all): models that say so.
        self.multi = self._split or bool(self.info.metadata.get(MULTI_COTANGENT, False))
        self._providers = with_cuda_options(choose_providers(device), cuda_options)
        if precision == "fp16" and provider_name(self._providers[0]) != "CUDAExecutionProvider":
            raise UsageError(None, "precision fp16 needs the CUDA provider (device=cuda)", param="device")
        self.precision = precision
        self._options = session_options(threads, cpu=provider_name(self._providers[0]) == "CPUExecutionProvider")
        if precision == "fp16":
            self._proto = to_fp16(self._proto)
        # fp32 runs the very bytes that were checked and hashed (a model with external data runs
        # from its path: that data lies in its folder, checked above); fp16 runs the converted copy.
        if precision == "fp16":
            source = self._proto.SerializeToString()
        elif external:
            source = str(self.path)
        else:
            source = data
        del data
        # fp16 graphs are not cached (keyed by the file's hash, they would collide with fp32)
        self._cache_id = self.info.sha256 if precision == "fp32" else None
        graph = self._proto.graph
        names = {i.name for i in graph.input} | {o.name for o in graph.output}
        if not {IMAGE, COTANGENT, FEATURES, INPUT_GRAD} <= names:
            raise ModelError(self.path, "graph lacks the image/cotangent -> features/input_grad interface")
        if self._split and INPUT_GRADS not in names:
            raise ModelError(self.path, f"graph has a {COTANGENTS!r} input but no {INPUT_GRADS!r} output")
        # Sessions are made on first use: `features`, `fit` and `predict` never build the gradient
        # graph's session, the slowest to make (docs/performance.md).
        self._device = device
        self._vjp_source = (lambda: vjp_subgraph(self._proto).SerializeToString()) if self._split else source
        self._vjp_sess = None
        self._vjp_cache = "off"
        self._fwd = None
        self._map_sess = None
        # pooled models exported since the format gained it output the map before pooling
        self._map_output = next((o for o in graph.output if o.name == FEATURE_MAP), None)
        self._map_shape: tuple[int, ...] | None = None
        self._multi_sess = None
        self._multi_shaped: dict[tuple[int, int], Any] = {}  # padded calls: one session per shape
        self._cuda_missing: str | None = None
        self._on_cuda = False  # set by the first session made (all use the same providers)
        self.io_binding = io_binding
        self.fixed_shapes = fixed_shapes

    # -- sessions -------------------------------------------------------------------------
    def _session(self, source, graph: str, rewrite: Rewrite | None = None):
        """A session for `source` (the VJP graph or the features subgraph), checked to run where asked."""
        if self._cuda_missing is None:
            self._cuda_missing = ""
            if provider_name(self._providers[0]) == "CUDAExecutionProvider":
                self._cuda_missing = preload_cuda_libraries()
                quiet_cuda_log()
        try:
            sess, status = create_session(source, self._options, self._providers, self._cache_id, graph, rewrite)
        except Exception as exc:
            raise ModelError(self.path, f"onnxruntime cannot load the model ({exc})") from None
        self._on_cuda = sess.get_providers()[0] == "CUDAExecutionProvider"
        if self._device == "cuda" and not self._on_cuda:
            # onnxruntime falls back to the CPU when the CUDA provider cannot load
            raise DependencyError(
                self.path,
                "device=cuda: onnxruntime's CUDA provider did not load ("
                + (self._cuda_missing or "no usable NVIDIA GPU and driver?")
                + "); CUDA and "
                "cuDNN come with pip install 'onnxruntime-gpu[cuda,cudnn]'; or use device=cpu",
                param="device",
            )
        return sess, status

    @property
    def _vjp(self):
        """The session of features + VJP, one cotangent per image (the whole graph of a model
        exported before the layouts were split)."""
        if self._vjp_sess is None:
            self._vjp_sess, self._vjp_cache = self._session(self._vjp_source, "vjp")
            self._vjp_source = None  # the session holds the model now
        return self._vjp_sess

    def _forward_session(self):
        """The features-only subgraph of the same file: a forward pass costs a forward pass."""
        if self._fwd is None:
            self._fwd, _ = self._session(lambda: features_subgraph(self._proto).SerializeToString(), "features")
        return self._fwd

    def _map_session(self):
        """The image -> feature_map subgraph of a pooled model (the map before pooling)."""
        if self._map_sess is None:
            self._map_sess, _ = self._session(
                lambda: subgraph(self._proto, [IMAGE], [FEATURE_MAP]).SerializeToString(), "feature_map"
            )
        return self._map_sess

    @property
    def _multi(self):
        """The session of features + VJP, K cotangents per image ([N*K, ...], image-major)."""
        if not self._split:
            return self._vjp
        if self._multi_sess is None:
            self._multi_sess = self._new_multi_session()
        return self._multi_sess

    def _new_multi_session(self):
        """A new session of the K-per-image part of the graph (the rewrite applies on the CPU)."""
        written = {}  # the graph as written, made (and read by the rewrite) only on a cache miss

        def source() -> bytes:
            written["graph"] = multi_subgraph(self._proto)
            return written["graph"].SerializeToString()

        rewrite = Rewrite(
            BLOCKED_PRODUCTS,
            self._multi_probe,
            lambda optimised: blocked_products(optimised, sample_shapes(written["graph"])),
        )
        return self._session(source, "multi", rewrite)[0]

    def _multi_for(self, images: int, per_image: int):
        """The K-per-image session for calls of `images` x `per_image` cotangents: where calls are
        padded, one session per such shape, so that no session ever sees a second input shape (on
        CUDA a session fed alternating shapes plans its convolutions again at each change, which costs
        far more than the call; docs/performance.md). Models exported
        before the passes were split run both layouts in their one session."""
        sess = self._multi
        if not (self.pads and self._split):
            return sess
        key = (images, per_image)
        if key not in self._multi_shaped:
            self._multi_shaped[key] = sess if not self._multi_shaped else self._new_multi_session()
        return self._multi_shaped[key]

    def _multi_probe(self) -> dict[str, np.ndarray]:
        """Feeds on which a rewritten K-per-image graph must agree with onnxruntime's: 2 images (so
        a product that paired a gradient with another image's mask shows), one cotangent each (the
        rewrite leaves the [N, K] views as they are; the probe is most of the rewrite's cost)."""
        rng = np.random.default_rng(0)
        return {
            IMAGE: rng.standard_normal((2, *self.info.input_shape)).astype(np.float32),
            COTANGENTS: rng.standard_normal((2, *self.info.feature_shape)).astype(np.float32),
        }

    @property
    def cache(self) -> str:
        """Where the gradient graph's session came from: "hit" | "stored" | "off" (sessions.create_session)."""
        self._vjp  # noqa: B018  (made on first use)
        return self._vjp_cache

    @property
    def provider(self) -> str:
        """The execution provider the model runs on (of a session already made, else of the VJP graph's)."""
        sess = self._vjp_sess or self._fwd or self._multi_sess or self._vjp
        return sess.get_providers()[0]

    def _run(self, sess, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One session call: a plain run, or through an IO binding (outputs on the session's device
        until fetched) where `binds`."""
        if not self.binds:
            return sess.run(outputs, feeds)
        binding = sess.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name in outputs:
            binding.bind_output(name, "cuda" if self._on_cuda else "cpu")
        sess.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def _padded(self, rows: np.ndarray, *lead: int) -> np.ndarray:
        """`rows` zero-padded to `lead` along its leading axes where calls are padded (`pads`), else
        as is."""
        if not self.pads or rows.shape[: len(lead)] == lead:
            return rows
        out = np.zeros((*lead, *rows.shape[len(lead) :]), rows.dtype)
        out[tuple(slice(0, n) for n in rows.shape[: len(lead)])] = rows
        return out

    @property
    def binds(self) -> bool:
        """Whether calls go through an IO binding: `io_binding`, or by default on CUDA."""
        return self.io_binding if self.io_binding is not None else self._on_cuda

    @property
    def pads(self) -> bool:
        """Whether calls are padded with zero rows to fixed shapes (`batch_size` rows; K-per-image
        calls to a power of two of cotangents per image): `fixed_shapes`, or by default on CUDA."""
        return self.fixed_shapes if self.fixed_shapes is not None else self._on_cuda

    # -- checks ---------------------------------------------------------------------------
    def _check_images(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[1:] != self.info.input_shape:
            raise UsageError(
                None, f"images must be [N, {', '.join(map(str, self.info.input_shape))}], got {list(images.shape)}"
            )
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
    def preprocess(self, images) -> np.ndarray:
        """Image files, PIL images or HxWx3 uint8 arrays (one or many) -> float32 [N, 3, H, W], as
        the model's recorded preprocessing makes them."""
        from pbv_onnx.runtime.images import preprocess_images

        return preprocess_images(images, self.info.preprocessing)

    def features(self, images: np.ndarray) -> np.ndarray:
        """Flattened latent features [N, D], D = prod(feature_shape), of preprocessed images [N, 3, H, W]."""
        return self.feature_maps(images).reshape(len(images), -1)

    def feature_maps(self, images: np.ndarray) -> np.ndarray:
        """Latent features in the layer's own shape [N, *feature_shape] of preprocessed images [N, 3, H, W]."""
        images = self._check_images(images)
        sess, bs = self._forward_session(), self.batch_size
        out = []
        for i in range(0, len(images), bs):
            chunk = images[i : i + bs]
            out.append(self._run(sess, [FEATURES], {IMAGE: self._padded(chunk, bs)})[0][: len(chunk)])
        if not out:
            return np.empty((0, *self.info.feature_shape), np.float32)
        return out[0] if len(out) == 1 else np.concatenate(out)  # one call: no copy

    @property
    def pooled(self) -> bool:
        """Whether the features are pooled at the cut (the model's `pool` is not "none")."""
        return self.info.pool != "none"

    @property
    def has_spatial_maps(self) -> bool:
        """Whether `spatial_maps` can answer: unpooled models always, pooled ones with a `feature_map` output."""
        return not self.pooled or self._map_output is not None

    @property
    def map_shape(self) -> tuple[int, ...]:
        """The per-image shape of `spatial_maps`: the feature shape of an unpooled model, the pre-pool
        map's ([C, h, w], or [T, D] for tokens) of a pooled one."""
        if not self.pooled:
            return tuple(self.info.feature_shape)
        self._require_map()
        if self._map_shape is None:
            dims = self._map_output.type.tensor_type.shape.dim[1:]
            if dims and all(d.HasField("dim_value") for d in dims):
                self._map_shape = tuple(int(d.dim_value) for d in dims)
            else:  # not declared in the graph: one forward pass on a blank image tells
                blank = np.zeros((1, *self.info.input_shape), np.float32)
                self._map_shape = tuple(self.spatial_maps(blank).shape[1:])
        return self._map_shape

    def _require_map(self) -> None:
        if self._map_output is None:
            raise ModelError(
                self.path,
                f"pooled model (pool {self.info.pool}) without the pre-pool output {FEATURE_MAP!r} (exported "
                "before the format had it): re-export it for shared maps",
            )

    def spatial_maps(self, images: np.ndarray) -> np.ndarray:
        """The latent map at the cut in its own layout, of preprocessed images [N, 3, H, W]: the map
        before pooling [N, *map_shape] for a pooled model (its `feature_map` output), the features in
        their own shape for an unpooled one. ModelError for a pooled model exported without it."""
        if not self.pooled:
            return self.feature_maps(images)
        self._require_map()
        images = self._check_images(images)
        sess, bs = self._map_session(), self.batch_size
        out = [
            self._run(sess, [FEATURE_MAP], {IMAGE: self._padded(images[i : i + bs], bs)})[0][: len(images[i : i + bs])]
            for i in range(0, len(images), bs)
        ]
        if not out:
            return np.empty((0, *self.map_shape), np.float32)
        return out[0] if len(out) == 1 else np.concatenate(out)

    def vjp(self, images: np.ndarray, cotangents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(features, J_phi(x)^T cotangent) per sample, in batches of `batch_size`.

        Rows that repeat an image (e.g. one object explained for several channels) share one
        forward pass: they go through `vjp_multi` where the model supports it.
        """
        images = self._check_images(images)
        cotangents = self._check_cotangents(cotangents, len(images))
        if self.multi and len(images) > 1:
            groups = duplicate_groups(images)
            if len(groups) < len(images):
                return self._vjp_grouped(images, cotangents, groups)
        return self._vjp_rows(images, cotangents)

    def _vjp_rows(self, images: np.ndarray, cotangents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        feats, grads = [], []
        sess, bs = self._vjp, self.batch_size
        for i in range(0, len(images), bs):
            chunk, cot = images[i : i + bs], cotangents[i : i + bs]
            f, g = self._run(
                sess, [FEATURES, INPUT_GRAD], {IMAGE: self._padded(chunk, bs), COTANGENT: self._padded(cot, bs)}
            )
            feats.append(f[: len(chunk)])
            grads.append(g[: len(chunk)])
        if not feats:
            return (
                np.empty((0, *self.info.feature_shape), np.float32),
                np.empty((0, *self.info.input_shape), np.float32),
            )
        if len(feats) == 1:  # one call: onnxruntime's own arrays, no copy
            return feats[0], grads[0]
        return np.concatenate(feats), np.concatenate(grads)

    def _vjp_grouped(
        self, images: np.ndarray, cotangents: np.ndarray, groups: list[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """vjp() for rows grouped by identical image: one vjp_multi call per group size, and the
        images seen once through the one-per-image pass, which is faster for them than the
        K-per-image pass at K = 1 (docs/performance.md)."""
        feats = np.empty((len(images), *self.info.feature_shape), np.float32)
        grads = np.empty((len(images), *self.info.input_shape), np.float32)
        for k in sorted({len(g) for g in groups}):
            idx = np.stack([g for g in groups if len(g) == k])  # [m, k] rows, one image each
            if k == 1:
                feats[idx[:, 0]], grads[idx[:, 0]] = self._vjp_rows(images[idx[:, 0]], cotangents[idx[:, 0]])
                continue
            f, g = self.vjp_multi(images[idx[:, 0]], cotangents[idx])
            feats[idx] = f[:, None]
            grads[idx] = g
        return feats, grads

    def vjp_multi(self, images: np.ndarray, cotangents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """K cotangents per image: images [N, 3, H, W], cotangents [N, K, *feature_shape] (or
        [N, K, D]) -> (features [N, *feature_shape], input_grad [N, K, 3, H, W]).

        Each image's forward pass runs once for its K backward passes (up to `batch_size` rows per
        call; larger K is split, repeating the forward pass per part), through the graph's
        `cotangents` part (or, in models exported before the passes were split, `cotangent`
        itself). Models exported before either layout existed get each image repeated K times
        (same result, K forward passes).
        """
        images = self._check_images(images)
        n, fs = len(images), self.info.feature_shape
        cot = np.ascontiguousarray(cotangents, dtype=np.float32)
        if cot.ndim >= 2 and cot.shape[0] == n and cot.shape[2:] == (self.info.n_features,):
            cot = cot.reshape(n, cot.shape[1], *fs)
        if cot.ndim < 2 or cot.shape[0] != n or cot.shape[2:] != fs:
            raise UsageError(None, f"cotangents must be [{n}, K, {', '.join(map(str, fs))}], got {list(cot.shape)}")
        K = cot.shape[1]
        grads = np.empty((n, K, *self.info.input_shape), np.float32)
        if K == 0 or n == 0:
            return self.feature_maps(images), grads
        if not self.multi:
            f, g = self._vjp_rows(np.repeat(images, K, axis=0), cot.reshape(n * K, *fs))
            return f[::K], g.reshape(grads.shape)
        feats = np.empty((n, *fs), np.float32)
        self._multi  # noqa: B018  (the first session decides where calls are padded)
        kc = min(K, self.batch_size)  # cotangents per image per call
        if self.pads:  # a power of two: at most log2(batch_size) + 1 shapes
            kc = min(1 << (kc - 1).bit_length(), self.batch_size)
        ni = max(1, self.batch_size // kc)  # images per call
        sess = self._multi_for(ni, kc)
        cot_in, grad_out = (COTANGENTS, INPUT_GRADS) if self._split else (COTANGENT, INPUT_GRAD)
        for i in range(0, n, ni):
            for j in range(0, K, kc):
                c = cot[i : i + ni, j : j + kc]
                m, k = c.shape[:2]
                fed = self._padded(c, ni, kc)
                f, g = self._run(
                    sess,
                    [FEATURES, grad_out],
                    {IMAGE: self._padded(images[i : i + ni], ni), cot_in: fed.reshape(-1, *fs)},
                )
                feats[i : i + m] = f[:m]
                grads[i : i + m, j : j + k] = g.reshape(*fed.shape[:2], *self.info.input_shape)[:m, :k]
        return feats, grads


def duplicate_groups(images: np.ndarray) -> list[np.ndarray]:
    """Row indices grouped by identical image (bitwise), in order of first appearance.

    Rows are bucketed by a hash of every 61st value (hashing whole images costs several per cent of
    a small model's VJP; docs/performance.md); rows in one bucket are compared in full, so equal
    samples of different images only cost a comparison, never a wrong group."""
    buckets: dict[bytes, list[list[int]]] = {}
    out: list[list[int]] = []
    flat = images.reshape(len(images), -1)
    for i, img in enumerate(images):
        key = hashlib.blake2b(np.ascontiguousarray(flat[i, ::61]).tobytes(), digest_size=16).digest()
        for group in buckets.setdefault(key, []):
            if np.array_equal(images[group[0]], img):
                group.append(i)
                break
        else:
            buckets[key].append([i])
            out.append(buckets[key][-1])
    return [np.asarray(g) for g in out]
