"""What every worker class of the appliance shares, and the thread-based worker classes."""

from __future__ import annotations

import contextlib
from typing import Any

import structlog
from gunicorn.http import errors as http_errors
from gunicorn.workers.gthread import ThreadWorker as _GunicornThreadWorker
from gunicorn.workers.sync import SyncWorker as _GunicornSyncWorker

from app.errors import code_for_http_status
from app.middleware import REQUEST_ID_HEADER, request_id_from
from app.models.runner import Runner
from app.protocols import schema
from app.server.compat import coalesce_writes, write_raw

log = structlog.get_logger(__name__)


#: Statuses of gunicorn's refusals; any other parse error is a 400, as gunicorn has it.
_PARSE_STATUS: tuple[tuple[type[Exception], int, str], ...] = (
    (http_errors.LimitRequestLine, 414, "URI Too Long"),
    (http_errors.LimitRequestHeaders, 431, "Request Header Fields Too Large"),
    (http_errors.ExpectationFailed, 417, "Expectation Failed"),
    (http_errors.UnsupportedTransferCoding, 501, "Not Implemented"),
    (http_errors.ForbiddenProxyRequest, 403, "Forbidden"),
)
# The application's own bad headers, and bad server settings, are not the client's fault.
_SERVER_FAULTS = (
    http_errors.InvalidResponseHeader,
    http_errors.InvalidResponseHeaderName,
    http_errors.ConfigurationProblem,
)


# gunicorn_h1c before 0.6.12 reports an unknown transfer coding as a bad header; gunicorn's
# Python parser answers it 501 (RFC 9112 6.1), and so does the appliance with either parser.
_H1C_UNSUPPORTED_CODING = "Unsupported Transfer-Encoding"


def error_status(exc: BaseException) -> tuple[int, str]:
    """The status and reason for an error gunicorn met before or around the application."""
    if isinstance(exc, http_errors.InvalidHeader) and _H1C_UNSUPPORTED_CODING in str(exc):
        return 501, "Not Implemented"
    if isinstance(exc, http_errors.ParseException) and not isinstance(exc, _SERVER_FAULTS):
        for kind, status, reason in _PARSE_STATUS:
            if isinstance(exc, kind):
                return status, reason
        return 400, "Bad Request"
    return 500, "Internal Server Error"


class ApplianceWorker:
    """What every worker class of the appliance adds to gunicorn's.

    - :attr:`runner`: how this kind of worker runs models; the application loads its
      repository with it (set in the ``post_fork`` hook).
    - :meth:`handle_error`: gunicorn's own refusals answered as
      ``{"error", "error_code", "request_id"}`` JSON instead of gunicorn's HTML page; the
      status follows gunicorn's, and the connection is closed afterwards, as gunicorn does.
    - Responses whose headers go out in one write with their first body bytes
      (:class:`~app.server.compat.CoalescingResponse`).
    """

    runner: type[Runner] = Runner

    def init_process(self) -> None:
        """gunicorn's, with responses written whole (in the worker, after fork)."""
        coalesce_writes()
        super().init_process()  # type: ignore[misc]

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        """Log the refusal as one JSON line and answer it with the JSON error body."""
        status, reason = error_status(exc)
        header = REQUEST_ID_HEADER.upper()
        presented = next((v for k, v in getattr(req, "headers", ()) if k == header), None)
        request_id = request_id_from(presented)
        code = code_for_http_status(status)
        if status >= 500:
            # Details for the operator only; the client learns that it failed.
            log.error("unhandled_error", error=repr(exc), request_id=request_id, exc_info=exc)
            message = "internal error; the request id is in the logs"
        else:
            message = str(exc) or reason
            log.warning(
                "bad_request",
                status=status,
                error_code=code,
                error=message,
                request_id=request_id,
                peer=addr[0] if addr else "",
            )
        body = schema.encode(schema.ErrorBody(message, code, request_id))
        head = (
            f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"{REQUEST_ID_HEADER}: {request_id}\r\n\r\n"
        )
        with contextlib.suppress(OSError):
            write_raw(client, head.encode("latin-1") + body)


class ThreadWorker(ApplianceWorker, _GunicornThreadWorker):  # type: ignore[misc]
    """gunicorn's gthread worker (a pool of request threads), with JSON errors."""


class SyncWorker(ApplianceWorker, _GunicornSyncWorker):  # type: ignore[misc]
    """gunicorn's sync worker (one request at a time), with JSON errors."""
