"""Every failure as ``{"error", "error_code", "request_id"}`` JSON with the code's status.

Errors carry an :class:`~app.errors.ErrorCode`; the status comes from
:data:`~app.errors.HTTP_STATUS`. Falcon's own errors (unknown route, wrong method) and anything
unexpected are rendered the same way; an unexpected exception is logged with its traceback and
the client sees only a generic 500.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import falcon
import structlog

from app.errors import HTTP_STATUS, ApplianceError, ErrorCode, code_for_http_status
from app.protocols import schema
from app.protocols.schema import ErrorBody

log = structlog.get_logger(__name__)

#: Seconds a client should wait before retrying a 503.
RETRY_AFTER_SECONDS = "1"
#: Routes whose errors take OpenAI's shape (``{"error": {"message", "type", ...}}``), which
#: OpenAI's clients read; ``error_code`` and ``request_id`` are there too.
OPENAI_PATHS = frozenset(
    {"/v1/embeddings", "/v1/models", "/v1/completions", "/v1/chat/completions"}
)
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}


class ApiError(ApplianceError):
    """A failure of the HTTP exchange itself (body too large or too slow, bad media type,
    missing key), raised by resources and middleware with the code it calls for.

    Args:
        code: The error's code; its status comes from the table.
        message: Human message for the client.
        headers: Extra response headers.
    """

    def __init__(
        self, code: ErrorCode, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message, code, headers)


def render_error(
    req: falcon.Request,
    resp: falcon.Response,
    code: ErrorCode,
    message: str,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Write the error body and the code's status onto ``resp``."""
    status = HTTP_STATUS[code]
    req.context.error_code = code.value
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = schema.encode(error_document(req, code, message))
    if status == 503 and not (headers and "Retry-After" in headers):
        resp.set_header("Retry-After", RETRY_AFTER_SECONDS)
    for name, value in (headers or {}).items():
        resp.set_header(name, value)


def error_document(
    req: falcon.Request, code: ErrorCode, message: str
) -> ErrorBody | schema.OpenAIErrorBody:
    """The error body for ``req``'s route (also sent as the last event of a broken stream)."""
    request_id = getattr(req.context, "request_id", "")
    if req.path in OPENAI_PATHS:
        status = HTTP_STATUS[code]
        kind = _OPENAI_TYPES.get(
            status, "invalid_request_error" if status < 500 else "server_error"
        )
        error = schema.OpenAIError(message=message, type=kind, code=code.lower())
        return schema.OpenAIErrorBody(error, code, request_id)
    return ErrorBody(message, code, request_id)


def handle_appliance_error(
    req: falcon.Request, resp: falcon.Response, ex: ApplianceError, params: Any
) -> None:
    """Render a domain or HTTP-level error with its code."""
    render_error(req, resp, ex.code, ex.message, ex.headers)


def handle_http_error(
    req: falcon.Request, resp: falcon.Response, ex: falcon.HTTPError, params: Any
) -> None:
    """Render Falcon's own errors (404 route, 405 method...) in the same JSON shape."""
    code = code_for_http_status(ex.status_code)
    message = ex.description or ex.title or "error"
    if code is ErrorCode.NOT_FOUND:
        message = "no such route"
    elif code is ErrorCode.METHOD_NOT_ALLOWED:
        allowed = dict(ex.headers or {}).get("Allow", "")
        message = f"method {req.method} is not allowed here; allowed: {allowed}"
    render_error(req, resp, code, message, dict(ex.headers or {}))


def handle_unexpected(
    req: falcon.Request, resp: falcon.Response, ex: Exception, params: Any
) -> None:
    """Log the traceback for the operator; tell the client only that it failed."""
    log.exception("unhandled_error", error_type=type(ex).__name__)
    render_error(req, resp, ErrorCode.INTERNAL, "internal error; the request id is in the logs")


def install(app: falcon.App[Any, Any]) -> None:
    """Register the handlers (Falcon picks the most specific class for each exception)."""
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(falcon.HTTPError, handle_http_error)
    app.add_error_handler(ApplianceError, handle_appliance_error)
