"""Domain errors raised by the serving and protocol layers, each with its stable code."""

from __future__ import annotations

from app.errors import ApplianceError, ErrorCode


class ServingError(ApplianceError):
    """Base class: a request the serving layer cannot satisfy."""


class InvalidInput(ServingError):
    """The request does not fit the model's signature or the protocol."""

    code = ErrorCode.INVALID_INPUT


class PayloadTooLarge(ServingError):
    """The request asks for more rows or elements than the configured limits allow."""

    code = ErrorCode.PAYLOAD_TOO_LARGE


class UnsupportedInput(ServingError):
    """The input is in a format the model does not take (an image format, say)."""

    code = ErrorCode.UNSUPPORTED_MEDIA_TYPE


class ModelNotFound(ServingError):
    """No such model, or no such version of it."""

    code = ErrorCode.MODEL_NOT_FOUND


class ModelNotReady(ServingError):
    """The model exists but is not loaded and warmed up yet."""

    code = ErrorCode.MODEL_NOT_READY


class InferenceFailed(ServingError):
    """onnxruntime rejected inputs that passed validation (for example a value out of range)."""

    code = ErrorCode.INFERENCE_FAILED


class Overloaded(ServingError):
    """Too many requests are already running or queued for this model; retry shortly."""

    code = ErrorCode.OVERLOADED


class InferenceTimeout(ServingError):
    """The request's deadline passed before or during its inference."""

    code = ErrorCode.TIMEOUT


class RepositoryError(Exception):
    """The model repository (or one model in it) cannot be served; message is one line."""
