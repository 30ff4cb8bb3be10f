"""The appliance's error vocabulary: one code per kind of failure, and its status per front.

Every failure a client can see carries an :class:`ErrorCode`. The serving layer raises
:class:`ApplianceError` subclasses with a code; each front maps the code through its table
(:data:`HTTP_STATUS` for REST and NGINX's own error pages, :data:`GRPC_STATUS` for gRPC). Every
code is in every table, so there is no fallback to a default status.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType


class ErrorCode(enum.StrEnum):
    """Stable codes, sent as ``error_code`` in every error body."""

    INVALID_INPUT = "INVALID_INPUT"
    INFERENCE_FAILED = "INFERENCE_FAILED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    FORBIDDEN = "FORBIDDEN"
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    NOT_FOUND = "NOT_FOUND"
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
    REQUEST_TIMEOUT = "REQUEST_TIMEOUT"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    URI_TOO_LONG = "URI_TOO_LONG"
    UNSUPPORTED_MEDIA_TYPE = "UNSUPPORTED_MEDIA_TYPE"
    EXPECTATION_FAILED = "EXPECTATION_FAILED"
    RATE_LIMITED = "RATE_LIMITED"
    HEADERS_TOO_LARGE = "HEADERS_TOO_LARGE"
    INTERNAL = "INTERNAL"
    NOT_IMPLEMENTED = "NOT_IMPLEMENTED"
    OVERLOADED = "OVERLOADED"
    MODEL_NOT_READY = "MODEL_NOT_READY"
    TIMEOUT = "TIMEOUT"


_E = ErrorCode

#: The HTTP status of every code.
HTTP_STATUS: Mapping[ErrorCode, int] = MappingProxyType(
    {
        _E.INVALID_INPUT: 400,
        _E.INFERENCE_FAILED: 400,
        _E.UNAUTHENTICATED: 401,
        _E.FORBIDDEN: 403,
        _E.MODEL_NOT_FOUND: 404,
        _E.NOT_FOUND: 404,
        _E.METHOD_NOT_ALLOWED: 405,
        _E.REQUEST_TIMEOUT: 408,
        _E.PAYLOAD_TOO_LARGE: 413,
        _E.URI_TOO_LONG: 414,
        _E.UNSUPPORTED_MEDIA_TYPE: 415,
        _E.EXPECTATION_FAILED: 417,
        _E.RATE_LIMITED: 429,
        _E.HEADERS_TOO_LARGE: 431,
        _E.INTERNAL: 500,
        _E.NOT_IMPLEMENTED: 501,
        _E.OVERLOADED: 503,
        _E.MODEL_NOT_READY: 503,
        _E.TIMEOUT: 504,
    }
)

#: The gRPC status (``grpc.StatusCode`` member name) of every code.
GRPC_STATUS: Mapping[ErrorCode, str] = MappingProxyType(
    {
        _E.INVALID_INPUT: "INVALID_ARGUMENT",
        _E.INFERENCE_FAILED: "INVALID_ARGUMENT",
        _E.UNAUTHENTICATED: "UNAUTHENTICATED",
        _E.FORBIDDEN: "PERMISSION_DENIED",
        _E.MODEL_NOT_FOUND: "NOT_FOUND",
        _E.NOT_FOUND: "UNIMPLEMENTED",
        _E.METHOD_NOT_ALLOWED: "UNIMPLEMENTED",
        _E.REQUEST_TIMEOUT: "DEADLINE_EXCEEDED",
        _E.PAYLOAD_TOO_LARGE: "RESOURCE_EXHAUSTED",
        _E.URI_TOO_LONG: "INVALID_ARGUMENT",
        _E.UNSUPPORTED_MEDIA_TYPE: "INVALID_ARGUMENT",
        _E.EXPECTATION_FAILED: "FAILED_PRECONDITION",
        _E.RATE_LIMITED: "RESOURCE_EXHAUSTED",
        _E.HEADERS_TOO_LARGE: "RESOURCE_EXHAUSTED",
        _E.INTERNAL: "INTERNAL",
        _E.NOT_IMPLEMENTED: "UNIMPLEMENTED",
        _E.OVERLOADED: "UNAVAILABLE",
        _E.MODEL_NOT_READY: "UNAVAILABLE",
        _E.TIMEOUT: "DEADLINE_EXCEEDED",
    }
)

#: The code for an HTTP status that Falcon or gunicorn produce on their own.
CODE_FOR_HTTP_STATUS: Mapping[int, ErrorCode] = MappingProxyType(
    {
        400: _E.INVALID_INPUT,
        401: _E.UNAUTHENTICATED,
        403: _E.FORBIDDEN,
        404: _E.NOT_FOUND,
        405: _E.METHOD_NOT_ALLOWED,
        408: _E.REQUEST_TIMEOUT,
        413: _E.PAYLOAD_TOO_LARGE,
        414: _E.URI_TOO_LONG,
        415: _E.UNSUPPORTED_MEDIA_TYPE,
        417: _E.EXPECTATION_FAILED,
        429: _E.RATE_LIMITED,
        431: _E.HEADERS_TOO_LARGE,
        500: _E.INTERNAL,
        501: _E.NOT_IMPLEMENTED,
        503: _E.OVERLOADED,
        504: _E.TIMEOUT,
    }
)


def code_for_http_status(status: int) -> ErrorCode:
    """The code for a status produced outside the app's own code (Falcon, gunicorn).

    A status not in :data:`CODE_FOR_HTTP_STATUS` is a client error (INVALID_INPUT) below 500
    and INTERNAL from 500 on; the answer then carries that code's status.
    """
    return CODE_FOR_HTTP_STATUS.get(status, _E.INVALID_INPUT if status < 500 else _E.INTERNAL)


class ApplianceError(Exception):
    """A failure the client is told about: a stable code and a message written for it.

    Messages never contain a file path, a traceback or an internal identifier.

    Args:
        message: Human message for the client.
        code: Overrides the class's code.
        headers: Extra response headers (``Retry-After``, ``WWW-Authenticate``...).
    """

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(
        self,
        message: str,
        code: ErrorCode | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})
