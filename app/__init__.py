"""onnx-appliance: serve ONNX models over HTTP with Falcon, gunicorn and onnxruntime."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("onnx-appliance")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
