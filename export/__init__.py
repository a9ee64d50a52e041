"""The export stage (the only code that imports torch): a backbone and its gradient graph -> ONNX."""

from pbv_onnx.export.pipeline import ExportResult, export_model

__all__ = ["ExportResult", "export_model"]
