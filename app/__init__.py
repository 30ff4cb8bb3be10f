"""onnx-appliance: serve ONNX models over HTTP with Falcon, gunicorn and onnxruntime."""

# Kept equal to pyproject.toml's version by tests/test_version.py. Written out rather than
# read with importlib.metadata, whose import costs the master a tenth of its start-up.
__version__ = "0.1.0"
