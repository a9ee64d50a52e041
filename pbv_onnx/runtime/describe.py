"""What an exported model says about itself, for people: `pbv-onnx info`, the HTML report."""

from __future__ import annotations

import os
from typing import Any


def describe_weights(record: dict[str, Any] | None) -> str:
    """One line on where a model's weights came from, e.g. "random weights (seed 0)"."""
    record = record or {}
    source = record.get("source")
    if source == "none":
        return f"random weights (seed {record.get('seed', '-')})"
    if source == "file":
        return f"state_dict file {record.get('path', '-')}" + _sha(record)
    if source == "torchvision":
        return f"torchvision {record.get('name', '-')}" + _sha(record)
    if source == "module":
        return f"a {record.get('class', 'torch')} module given to the export"
    if source == "onnx":
        return f"the ONNX file {record.get('file', '-')}" + _sha(record)
    if not record:
        return "not recorded"
    return ", ".join(f"{k} {_text(v)}" for k, v in record.items() if v is not None)


def _conversions(meta: dict[str, Any]) -> str:
    """What export --onnx changed in the file it was given (batch size, layout, precision), or ""."""
    weights = meta.get("weights") if isinstance(meta.get("weights"), dict) else {}
    done = []
    if isinstance(meta.get("batch_free"), dict):
        n = meta["batch_free"].get("rewrites", "?")
        done.append(f"its fixed batch size freed ({n} rewrite{'' if n == 1 else 's'}, checked)")
    if weights.get("input_layout"):
        done.append("channels-last input, a Transpose put first")
    if weights.get("layer_layout"):
        done.append(f"layer {weights['layer_layout']}")
    if weights.get("precision"):
        done.append("float16 computed in float32")
    return "; ".join(done)


def _sha(record: dict[str, Any]) -> str:
    return f" (sha256 {record['sha256']})" if record.get("sha256") else ""


def _text(value: Any) -> str:
    """A metadata value as text: "none" for a missing one, sizes as HxW."""
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return f"{value[0]}x{value[1]}"
    return str(value)


def _error(name: str, value: Any) -> str:
    return f"{name} {value:.1e}" if isinstance(value, (int, float)) else f"{name} {_text(value)}"


def describe_model(path: str | os.PathLike) -> dict[str, Any]:
    """Everything `pbv-onnx info` prints: metadata, content hash, size, shapes."""
    from pbv_onnx.runtime.modelfile import read_info

    info = read_info(path)
    return {
        "path": str(info.path),
        "sha256": info.sha256,
        "size_bytes": info.path.stat().st_size,
        "n_features": info.n_features,
        "input_shape": list(info.input_shape),
        "metadata": info.metadata,
    }


def format_info(info: dict[str, Any]) -> str:
    """A human-readable summary of `describe_model`'s dict (no Python None in it)."""
    meta = info["metadata"]
    pre = meta["preprocessing"]
    ver = meta.get("verification", {})
    resize = pre["resize"]
    resize = f"shorter side {resize}" if isinstance(resize, int) else _text(resize)
    crop = f"crop {_text(pre['crop'])}" if pre.get("crop") is not None else "no crop"
    lines = [
        f"model:              {info['path']} ({info['size_bytes'] / 1e6:.1f} MB, sha256 {info['sha256']})",
        f"backbone:           {meta['arch']} cut at {meta['layer'] or '(output)'}, pool {meta.get('pool') or 'none'}",
        f"features:           {meta['feature_shape']} ({info['n_features']} values)",
        f"input:              {info['input_shape']}; resize {resize}, {crop}, "
        f"mean {pre['mean']}, std {pre['std']}, {pre.get('interpolation') or 'bilinear'}",
        f"weights:            {describe_weights(meta.get('weights'))}",
        "versions:           " + ", ".join(f"{k} {_text(v)}" for k, v in meta.get("versions", {}).items()),
    ]
    converted = _conversions(meta)
    if converted:
        lines.append(f"converted:          {converted}")
    errors = ver.get("errors", {}) if isinstance(ver, dict) else {}
    for name in ("ort_vs_torch32", "torch32_vs_torch64", "ort_vs_float64"):
        if isinstance(errors.get(name), dict):
            lines.append(f"{name + ':':<20}" + ", ".join(_error(k, v) for k, v in errors[name].items()))
    if isinstance(ver, dict) and ver:
        lines.append(f"verified on:        {ver.get('inputs') or '-'}")
    elif ver:
        lines.append(f"verification:       {ver}")
    return "\n".join(lines)
