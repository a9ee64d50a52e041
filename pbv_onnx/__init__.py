"""pbv-onnx: parallel backpropagation for shared-feature visualisation, on onnxruntime.

The public API (`import pbv_onnx as pbv`); its modules are imported on first use of a name, so
`import pbv_onnx` stays cheap (the command line's start-up time includes it)::

    engine = pbv.Engine("model.onnx", device="cpu")
    x = engine.preprocess(["a.jpg", "b.png"])                 # float32 [N, 3, H, W]
    ex = pbv.explain_pair(engine, w, x[0], x[1])             # xr.Dataset (role, ...), attrs["similarity"]

See docs/python-api.md.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it
_EXPORTS = {
    # the model
    "Engine": "pbv_onnx.runtime.engine",
    "Preprocessing": "pbv_onnx.runtime.images",
    "load_image": "pbv_onnx.runtime.images",
    "read_info": "pbv_onnx.runtime.modelfile",
    # arrays in, arrays or xarray out
    "features": "pbv_onnx.api",
    "stimulus_features": "pbv_onnx.api",
    "fit_readouts": "pbv_onnx.api",
    "similarity": "pbv_onnx.api",
    "explain_pair": "pbv_onnx.workflows.pair",
    "explain": "pbv_onnx.api",
    "write_report": "pbv_onnx.api",
    # files
    "load_responses": "pbv_onnx.data.responses",
    "make_responses": "pbv_onnx.data.responses",
    "load_readouts": "pbv_onnx.data.readouts",
    "write_readouts": "pbv_onnx.data.readouts",
    "predict": "pbv_onnx.data.readouts",
    "load_features": "pbv_onnx.data.features",
    "write_features": "pbv_onnx.data.features",
    # errors: one class per failure, each with the exit code the command line gives it
    "PbvError": "pbv_onnx.base.errors",
    "UsageError": "pbv_onnx.base.errors",
    "InputDataError": "pbv_onnx.base.errors",
    "ModelError": "pbv_onnx.base.errors",
    "MismatchError": "pbv_onnx.base.errors",
    "OutputError": "pbv_onnx.base.errors",
    "OutputLockedError": "pbv_onnx.base.errors",
    "DependencyError": "pbv_onnx.base.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    """PEP 562: import a public name's module on first use."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pbv_onnx' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
