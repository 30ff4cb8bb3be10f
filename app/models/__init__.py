"""Serving layer: ONNX sessions, signatures and the model repository. Knows nothing of HTTP."""
