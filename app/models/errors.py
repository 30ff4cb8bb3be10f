"""Domain errors raised by the serving and protocol layers.

Each carries a stable ``code``; the HTTP layer maps codes to statuses. Messages are written
for the client and never contain a file path or an internal identifier.
"""

from __future__ import annotations


class ServingError(Exception):
    """Base class: a request the serving layer cannot satisfy."""

    code = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ServingError):
    """The request does not fit the model's signature or the protocol."""

    code = "INVALID_INPUT"


class PayloadTooLarge(ServingError):
    """The request asks for more rows or elements than the configured limits allow."""

    code = "PAYLOAD_TOO_LARGE"


class ModelNotFound(ServingError):
    """No such model, or no such version of it."""

    code = "MODEL_NOT_FOUND"


class ModelNotReady(ServingError):
    """The model exists but is not loaded and warmed up yet."""

    code = "MODEL_NOT_READY"


class InferenceFailed(ServingError):
    """onnxruntime rejected inputs that passed validation (for example a value out of range)."""

    code = "INFERENCE_FAILED"


class RepositoryError(Exception):
    """The model repository (or one model in it) cannot be served; message is one line."""


class Overloaded(ServingError):
    """Too many requests are already running or queued for this model; retry shortly."""

    code = "OVERLOADED"


class InferenceTimeout(ServingError):
    """The request's deadline passed before or during its inference."""

    code = "TIMEOUT"
