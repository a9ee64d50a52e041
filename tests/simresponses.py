"""Simulated recordings with a known answer: channels that are noisy linear maps of a model's features."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pbv_onnx.data.responses import make_responses
from pbv_onnx.runtime.engine import Engine
from pbv_onnx.runtime.images import load_batch


def stimulus_images(rng: np.random.Generator, n: int, kind: str, size: int = 16) -> np.ndarray:
    """uint8 [n, size, size, 3]: smooth blobs for 'body', striped textures for 'object'."""
    if kind == "body":
        lo = rng.standard_normal((n, 4, 4, 3))
        x = np.repeat(np.repeat(lo, size // 4, 1), size // 4, 2) + 0.3 * rng.standard_normal((n, size, size, 3))
    else:
        phase = rng.uniform(0, 2 * np.pi, (n, 1, 1, 3))
        freq = rng.uniform(0.5, 2.0, (n, 1, 1, 1))
        rows = np.arange(size)[None, :, None, None]
        x = np.sin(freq * rows + phase) + 0.3 * rng.standard_normal((n, size, size, 3))
    return np.clip(128 + 60 * x, 0, 255).astype(np.uint8)


def write_images(folder: Path, arrays: np.ndarray, prefix: str) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, a in enumerate(arrays):
        name = f"{prefix}{i:04d}.png"
        Image.fromarray(a).save(folder / name)
        names.append(name)
    return names


@dataclass
class Simulation:
    ds: object  # responses Dataset (channel, stimulus, repetition)
    path: Path  # where it would live: image files are relative to its folder
    features: np.ndarray  # [S, D] model features of the stimuli
    signal: np.ndarray  # [C, S] noise-free responses
    weight: np.ndarray  # [C, D] true readouts
    bias: np.ndarray  # [C]
    noise_sd: np.ndarray  # [C] per-trial noise standard deviation
    is_pref: np.ndarray  # [S] bool


def simulate(
    folder: Path,
    model: Path,
    n_body: int,
    n_object: int,
    channels: int,
    reps: int,
    noise: float = 1.0,
    seed: int = 0,
    phases: bool = False,
) -> Simulation:
    """Write stimulus images under `folder/images` and simulate trial responses.

    Channel c's true response is w_c . phi(x) + b_c; each trial adds Gaussian noise whose sd is
    `noise` times the sd of the channel's signal over the body images.
    """
    rng = np.random.default_rng(seed)
    imgs = np.concatenate([stimulus_images(rng, n_body, "body"), stimulus_images(rng, n_object, "object")])
    names = write_images(folder / "images", imgs[:n_body], "body") + write_images(
        folder / "images", imgs[n_body:], "object"
    )
    engine = Engine(model, device="cpu", batch_size=64)
    feats = (
        engine.features(load_batch([folder / "images" / n for n in names], engine.info.preprocessing))
        .reshape(len(names), -1)
        .astype(np.float64)
    )
    weight = receptive_fields(rng, channels, engine.info.feature_shape)
    bias = rng.uniform(5, 10, channels)
    signal = weight @ feats.T + bias[:, None]
    is_pref = np.arange(len(names)) < n_body
    noise_sd = noise * signal[:, is_pref].std(1)
    trials = signal[:, :, None] + noise_sd[:, None, None] * rng.standard_normal((channels, len(names), reps))
    cats = ["body"] * n_body + ["object"] * n_object
    ds = make_responses(
        trials,
        [f"ch{c}" for c in range(channels)],
        [f"s{i:04d}" for i in range(len(names))],
        cats,
        file=[f"images/{n}" for n in names],
        region=["aSTS"] * channels,
        repetition=np.arange(reps),
        phase=(["early", "late"] * reps)[:reps] if phases else None,
        preferred="body",
        units="spikes/s",
    )
    return Simulation(
        ds=ds,
        path=folder / "responses.nc",
        features=feats,
        signal=signal,
        weight=weight,
        bias=bias,
        noise_sd=noise_sd,
        is_pref=is_pref,
    )


def receptive_fields(rng: np.random.Generator, channels: int, feature_shape) -> np.ndarray:
    """[C, D] readouts shaped like receptive fields: a Gaussian spatial profile at a random place
    times random weights over the feature maps (C order of feature_shape)."""
    k, h, w = feature_shape
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.empty((channels, k * h * w))
    for c in range(channels):
        cy, cx = rng.uniform(0, h - 1), rng.uniform(0, w - 1)
        spatial = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (h / 4) ** 2))
        out[c] = (rng.standard_normal(k)[:, None, None] * spatial[None]).ravel()
    return out


def noise_ceiling(signal: np.ndarray, noise_sd: np.ndarray, reps: int) -> np.ndarray:
    """Expected r between the true signal and the recorded mean of `reps` trials, per channel:
    sqrt(var_s / (var_s + sigma^2 / reps)), var_s the signal variance over the given stimuli."""
    var_s = signal.var(1)
    return np.sqrt(var_s / (var_s + noise_sd**2 / reps))
