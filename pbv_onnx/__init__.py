"""pbv-onnx: parallel backpropagation for shared-feature visualisation, on onnxruntime."""

__version__ = "0.1.0"
