"""Every failure as ``{"error", "error_code", "request_id"}`` JSON with the right status.

Domain errors carry a stable code; this module maps codes to HTTP statuses. Falcon's own
errors (unknown route, wrong method) and anything unexpected are rendered the same way; an
unexpected exception is logged with its traceback and the client sees only a generic 500.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import falcon
import orjson
import structlog

from app.models.errors import ServingError

log = structlog.get_logger(__name__)

STATUS_BY_CODE: dict[str, int] = {
    "INVALID_INPUT": 400,
    "INFERENCE_FAILED": 400,
    "UNAUTHENTICATED": 401,
    "FORBIDDEN": 403,
    "MODEL_NOT_FOUND": 404,
    "NOT_FOUND": 404,
    "METHOD_NOT_ALLOWED": 405,
    "REQUEST_TIMEOUT": 408,
    "PAYLOAD_TOO_LARGE": 413,
    "URI_TOO_LONG": 414,
    "UNSUPPORTED_MEDIA_TYPE": 415,
    "EXPECTATION_FAILED": 417,
    "RATE_LIMITED": 429,
    "HEADERS_TOO_LARGE": 431,
    "INTERNAL": 500,
    "NOT_IMPLEMENTED": 501,
    "OVERLOADED": 503,
    "MODEL_NOT_READY": 503,
    "TIMEOUT": 504,
}
#: The code for a status that Falcon or gunicorn produce themselves.
CODE_BY_STATUS = {
    400: "INVALID_INPUT",
    401: "UNAUTHENTICATED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    408: "REQUEST_TIMEOUT",
    413: "PAYLOAD_TOO_LARGE",
    414: "URI_TOO_LONG",
    415: "UNSUPPORTED_MEDIA_TYPE",
    417: "EXPECTATION_FAILED",
    429: "RATE_LIMITED",
    431: "HEADERS_TOO_LARGE",
    500: "INTERNAL",
    501: "NOT_IMPLEMENTED",
    503: "OVERLOADED",
    504: "TIMEOUT",
}
#: Seconds a client should wait before retrying a 503.
RETRY_AFTER_SECONDS = "1"


class ApiError(Exception):
    """An HTTP-level failure outside the serving layer (body too large, bad media type).

    Args:
        code: Stable error code; its status comes from :data:`STATUS_BY_CODE`.
        message: Human message for the client.
        headers: Extra response headers.
    """

    def __init__(self, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def render_error(
    req: falcon.Request,
    resp: falcon.Response,
    status: int,
    code: str,
    message: str,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Write the error body and status onto ``resp``."""
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    request_id = getattr(req.context, "request_id", "")
    resp.data = orjson.dumps({"error": message, "error_code": code, "request_id": request_id})
    if status == 503 and not (headers and "Retry-After" in headers):
        resp.set_header("Retry-After", RETRY_AFTER_SECONDS)
    for name, value in (headers or {}).items():
        resp.set_header(name, value)


def handle_serving_error(
    req: falcon.Request, resp: falcon.Response, ex: ServingError, params: Any
) -> None:
    """Map a domain error to its status."""
    render_error(req, resp, STATUS_BY_CODE.get(ex.code, 500), ex.code, ex.message)


def handle_api_error(req: falcon.Request, resp: falcon.Response, ex: ApiError, params: Any) -> None:
    """Render an HTTP-level error raised by a resource or middleware."""
    render_error(req, resp, STATUS_BY_CODE.get(ex.code, 500), ex.code, ex.message, ex.headers)


def handle_http_error(
    req: falcon.Request, resp: falcon.Response, ex: falcon.HTTPError, params: Any
) -> None:
    """Render Falcon's own errors (404 route, 405 method...) in the same JSON shape."""
    status = ex.status_code
    code = CODE_BY_STATUS.get(status, "INTERNAL" if status >= 500 else "INVALID_INPUT")
    message = ex.description or ex.title or "error"
    if status == 404:
        message = "no such route"
    elif status == 405:
        allowed = dict(ex.headers or {}).get("Allow", "")
        message = f"method {req.method} is not allowed here; allowed: {allowed}"
    render_error(req, resp, status, code, message, dict(ex.headers or {}))


def handle_unexpected(
    req: falcon.Request, resp: falcon.Response, ex: Exception, params: Any
) -> None:
    """Log the traceback for the operator; tell the client only that it failed."""
    log.exception("unhandled_error", error_type=type(ex).__name__)
    render_error(req, resp, 500, "INTERNAL", "internal error; the request id is in the logs")


def install(app: falcon.App[Any, Any]) -> None:
    """Register the handlers (Falcon picks the most specific class for each exception)."""
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(falcon.HTTPError, handle_http_error)
    app.add_error_handler(ServingError, handle_serving_error)
    app.add_error_handler(ApiError, handle_api_error)
