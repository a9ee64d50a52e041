"""The exported model on onnxruntime: model file contract, sessions, layout rewrites, the engine."""
