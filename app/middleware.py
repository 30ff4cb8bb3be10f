"""Per-request context: request id, one structured log line, and request metrics."""

from __future__ import annotations

import itertools
import os
import re
import time
import uuid
from typing import Any

import falcon
import structlog

from app.errors import ErrorCode
from app.keys import KeyStore
from app.logging import log_request
from app.metrics import Metrics
from app.ratelimit import RateLimiter, retry_after
from app.resources.errors import ApiError
from app.resources.health import LIVE_PATHS, READY_PATHS

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})
#: Routes anyone may call: probes for load balancers and orchestrators, and the scrape
#: (NGINX restricts /metrics to its allow-list). They arrive every few seconds, so they are
#: logged only at debug level when they succeed.
OPEN_PATHS = frozenset({*LIVE_PATHS, *READY_PATHS, "/metrics"})


class _IdSource:
    """Unique 32-hex-digit ids: a random prefix per process and a counter.

    A uuid4 per request reads the kernel's random source every time, which showed up in
    profiles; ids need to be unique, not unguessable.
    """

    def __init__(self) -> None:
        self._reset()
        # A new prefix in every forked worker, so workers never share one.
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._prefix = uuid.uuid4().hex[:16]
        self._counter = itertools.count()

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):016x}"


_IDS = _IdSource()


def request_id_from(value: str | None) -> str:
    """The client's request id when well formed, else a fresh unique one."""
    if value and _REQUEST_ID_RE.match(value):
        return value
    return _IDS.next()


class RequestContext:
    """Binds the request id into logs, echoes it, logs and counts every request.

    Resources set ``req.context.model`` and ``req.context.version`` once they know which
    model version serves the request; those become log fields and metric labels.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Start the clock and bind the request id."""
        ctx = req.context
        ctx.start = time.perf_counter()
        ctx.arrived = time.monotonic()
        ctx.request_id = request_id_from(req.get_header(REQUEST_ID_HEADER))
        ctx.model = ""
        ctx.version = ""
        ctx.key_id = ""
        ctx.error_code = ""
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=ctx.request_id)
        self._metrics.request_started()

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: Any, req_succeeded: bool
    ) -> None:
        """Echo the request id, record metrics and write the request's log line."""
        ctx = req.context
        resp.set_header(REQUEST_ID_HEADER, ctx.request_id)
        duration = time.perf_counter() - ctx.start
        route = req.uri_template or "unmatched"
        method = req.method if req.method in _METHODS else "other"
        status = resp.status_code
        self._metrics.request(
            route, method, status, ctx.model, ctx.version, ctx.key_id, duration, ctx.error_code
        )
        log_request(
            {
                "method": method,
                "route": route,
                "status": status,
                "duration_ms": round(duration * 1000, 3),
                "model": ctx.model or None,
                "version": ctx.version or None,
                "key_id": ctx.key_id or None,
                "request_id": ctx.request_id,
            },
            quiet=route in OPEN_PATHS and status < 400,
        )


class Authenticator:
    """Requires an API key when keys are configured, and applies each key's rate limit.

    Args:
        keys: The configured keys; when empty every request passes (open mode).
        limiter: Shared token buckets, or None for no rate limiting.
        rate: Default requests per second per key (0: unlimited).
        burst: Default bucket size per key.
    """

    def __init__(
        self, keys: KeyStore, limiter: RateLimiter | None, rate: float, burst: int
    ) -> None:
        self._keys = keys
        self._limiter = limiter
        self._rate = rate
        self._burst = burst

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Authenticate, then take a token from the key's bucket.

        Raises:
            ApiError: UNAUTHENTICATED (401) or RATE_LIMITED (429 with Retry-After).
        """
        if not self._keys.enabled or req.path in OPEN_PATHS or req.method == "OPTIONS":
            return
        req.context.key_id = self.admit(_presented_key(req))

    def admit(self, token: str) -> str:
        """Check a presented key and take a token from its bucket (every front does this).

        Returns:
            The key's id ("" when no keys are configured).

        Raises:
            ApiError: UNAUTHENTICATED, or RATE_LIMITED with the seconds to wait.
        """
        if not self._keys.enabled:
            return ""
        key = self._keys.verify(token) if token else None
        if key is None:
            raise ApiError(
                ErrorCode.UNAUTHENTICATED,
                "a valid API key is required: send Authorization: Bearer <key> or X-API-Key",
                {"WWW-Authenticate": 'Bearer realm="onnx-appliance"'},
            )
        structlog.contextvars.bind_contextvars(key_id=key.id)
        if self._limiter is None:
            return key.id
        rate = self._rate if key.rate is None else key.rate
        burst = self._burst if key.burst is None else key.burst
        wait = self._limiter.take(self._keys.slots[key.id], rate, burst)
        if wait > 0:
            raise ApiError(
                ErrorCode.RATE_LIMITED,
                f"rate limit of {rate:g} requests per second for this key exceeded",
                {"Retry-After": retry_after(wait)},
            )
        return key.id


def _presented_key(req: falcon.Request) -> str:
    auth = req.get_header("Authorization") or ""
    scheme, _, value = auth.strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return (req.get_header("X-API-Key") or "").strip()
