"""The export stage (the only code that imports torch): a backbone and its gradient graph -> ONNX.

`pipeline` (torch) loads on first use, so the torch-free graph transform (export/graph/) imports
without torch."""

__all__ = ["ExportResult", "export_model"]


def __getattr__(name: str):
    if name in __all__:
        from pbv_onnx.export import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
