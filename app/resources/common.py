"""Helpers shared by the resources: bounded body reads, media types, model lookup."""

from __future__ import annotations

import contextlib
import os
import socket
import time
import zlib
from collections.abc import Mapping
from typing import Any

import falcon
import numpy as np

from app.errors import ErrorCode
from app.models.repository import Repository
from app.models.runner import Predictor
from app.models.scheduling import WATCHDOG
from app.models.shadow import Replay
from app.models.signature import Signature
from app.protocols import schema
from app.resources.errors import ApiError
from app.settings import LimitsSettings

TIMEOUT_HEADER = "X-Request-Timeout-Ms"
JSON_TYPES = frozenset({"application/json", ""})
BINARY_TYPE = "application/octet-stream"
#: WSGI environ key that asks for the connection to be closed after the answer.
CLOSE_CONNECTION = "onnx_appliance.close_connection"
#: WSGI environ key saying that a route took the connection over (a WebSocket): the server
#: must close it without writing an HTTP answer.
HIJACKED = "onnx_appliance.hijacked"
#: WSGI environ key holding shadow jobs to submit once the answer has been sent.
SHADOW_JOBS = "onnx_appliance.shadow_jobs"
_ENCODINGS = frozenset({"identity", "gzip", "x-gzip"})
_CHUNK = 1 << 20


def media_type(req: falcon.Request) -> str:
    """The request's media type without parameters, lower-cased ("" when absent)."""
    return (req.content_type or "").split(";", 1)[0].strip().lower()


def require_media_type(req: falcon.Request, allowed: frozenset[str]) -> None:
    """Refuse bodies we cannot parse with 415 before reading them.

    Raises:
        ApiError: UNSUPPORTED_MEDIA_TYPE.
    """
    mt = media_type(req)
    if mt not in allowed:
        kinds = ", ".join(sorted(t for t in allowed if t))
        raise ApiError(
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            f"Content-Type {mt!r} is not supported here; send {kinds}",
        )


def read_body(req: falcon.Request, limits: LimitsSettings) -> bytes:
    """Read the whole body, decoded, within the size cap and the body timeout.

    Bodies with a Content-Length and chunked ones are read alike, never more than
    ``max_body_bytes`` of them (before and after gzip decoding) and for no longer than
    ``body_timeout_ms`` in all. A refused body leaves the rest unread, so the connection is
    closed after the answer instead of being drained for the next request.

    Raises:
        ApiError: PAYLOAD_TOO_LARGE, REQUEST_TIMEOUT, UNSUPPORTED_MEDIA_TYPE (an encoding
            other than gzip or identity), INVALID_INPUT (a body labelled gzip that is not).
    """
    limit = limits.max_body_bytes
    encoding = (req.get_header("Content-Encoding") or "identity").strip().lower()
    if encoding not in _ENCODINGS:
        close_connection(req)
        raise ApiError(
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            f"Content-Encoding {encoding!r} is not supported here; send gzip or identity",
        )
    declared = req.content_length
    if declared is not None and declared > limit:
        close_connection(req)
        raise ApiError(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"request body of {declared} bytes is over the limit of {limit}",
        )
    # bounded_stream stops at Content-Length; without one (chunked) the server's own stream
    # ends with the body.
    stream = req.bounded_stream if declared is not None else req.stream
    data = _read_within(req, stream, declared, limit, limits.body_timeout_ms / 1000)
    return data if encoding == "identity" else _gunzip(data, limit)


def _read_within(
    req: falcon.Request, stream: Any, declared: int | None, limit: int, timeout: float
) -> bytes:
    chunks: list[bytes] = []
    size = 0
    failed = False
    sock = req.env.get("gunicorn.socket")
    cutoff = _CutOff(sock) if sock is not None else None
    token = WATCHDOG.watch(time.monotonic() + timeout, cutoff) if cutoff is not None else 0
    try:
        # With a Content-Length, reading stops at it rather than asking once more for the end.
        while size <= limit and (declared is None or size < declared):
            data: bytes = stream.read(min(_CHUNK, limit + 1 - size))
            if not data:
                break
            chunks.append(data)
            size += len(data)
    except Exception:  # gunicorn's reader: a malformed chunk, or a body cut off mid-way
        failed = True
    finally:
        if token:
            WATCHDOG.done(token)
    if cutoff is not None and cutoff.fired:
        close_connection(req)
        raise ApiError(
            ErrorCode.REQUEST_TIMEOUT,
            f"the request body did not arrive within {timeout:g} s; the connection is closed",
        )
    if failed:
        close_connection(req)
        raise ApiError(ErrorCode.INVALID_INPUT, "the request body is malformed or ended early")
    if size > limit:
        close_connection(req)
        raise ApiError(
            ErrorCode.PAYLOAD_TOO_LARGE, f"request body is over the limit of {limit} bytes"
        )
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class _CutOff:
    """Ends a body read at its deadline, whatever the worker class and however the client
    trickles: the deadline watchdog sets ``terminate`` (as on onnxruntime's RunOptions), and
    this shuts the connection's reading side, so the blocked read returns at once.

    The shutdown goes through a duplicate of the descriptor: the watchdog is an OS thread,
    and a gevent socket object must only be used from its own hub's thread.
    """

    __slots__ = ("_sock", "fired")

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self.fired = False

    @property
    def terminate(self) -> bool:
        """Whether the deadline passed."""
        return self.fired

    @terminate.setter
    def terminate(self, value: bool) -> None:
        self.fired = True
        with contextlib.suppress(OSError, ValueError):
            fd = self._sock.fileno()
            with socket.socket(fileno=os.dup(fd)) as dup:
                dup.shutdown(socket.SHUT_RD)


def _gunzip(data: bytes, limit: int) -> bytes:
    decoder = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        body = decoder.decompress(data, limit + 1)
    except zlib.error:
        raise ApiError(
            ErrorCode.INVALID_INPUT, "the request body is labelled gzip but is not gzip data"
        ) from None
    if len(body) > limit:
        raise ApiError(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"the decoded request body is over the limit of {limit} bytes",
        )
    if not decoder.eof or decoder.unused_data:
        raise ApiError(
            ErrorCode.INVALID_INPUT, "the gzip request body is truncated or has data after its end"
        )
    return body


def close_connection(req: falcon.Request) -> None:
    """Close the connection after this answer (see :func:`app.wsgi.closing_connections`)."""
    req.env[CLOSE_CONNECTION] = True


class RepositoryResource:
    """A route family over the repository's models, within the request limits.

    Args:
        repository: The models.
        limits: Body and batch limits.
    """

    def __init__(self, repository: Repository, limits: LimitsSettings) -> None:
        self._repository = repository
        self._limits = limits

    def _json_body(self, req: falcon.Request) -> bytes:
        """The JSON request body, within the limits."""
        require_media_type(req, JSON_TYPES)
        return read_body(req, self._limits)


def label(req: falcon.Request, signature: Signature) -> None:
    """Name the model version serving the request (for logs and metrics)."""
    req.context.model = signature.name
    req.context.version = signature.version


def resolve(
    req: falcon.Request, repository: Repository, name: str, version: str | None = None
) -> Predictor:
    """Find the serving model version and label the request with it.

    Requests that name no version follow the model's traffic split, sticky per request id.
    """
    runner = repository.get(name, version, routing_key=req.context.request_id)
    label(req, runner.signature)
    return runner


def mirror(
    req: falcon.Request,
    repository: Repository,
    runner: Predictor,
    answer: Mapping[str, np.ndarray],
    replay: Replay,
) -> None:
    """Replay the request on the model's shadow candidate, if it has one and this request
    is among those mirrored, once the answer has been sent (see
    :func:`app.server.application.closing_connections`)."""
    job = repository.shadow_job(runner.signature, answer, replay)
    if job is not None:
        req.env.setdefault(SHADOW_JOBS, []).append(job)


def send(resp: falcon.Response, doc: Any) -> None:
    """Write ``doc`` (a wire schema Struct, or lists and dicts of them) as the JSON body."""
    resp.content_type = falcon.MEDIA_JSON
    resp.data = schema.encode(doc)


def deadline(req: falcon.Request, runner: Predictor, client_timeout: float | None = None) -> float:
    """When the answer is due, on the monotonic clock.

    The model's timeout counts from the request's arrival: at NGINX when it sends
    ``X-Request-Start: t=<epoch seconds>``, else at this worker. A client may shorten it with
    ``X-Request-Timeout-Ms`` (or the OIP ``timeout`` parameter, ``client_timeout`` here, in
    seconds), never lengthen it.

    Raises:
        ApiError: INVALID_INPUT for a malformed timeout header.
    """
    timeout = runner.timeout
    raw = req.get_header(TIMEOUT_HEADER)
    if raw is not None:
        if not raw.strip().isdigit() or int(raw) <= 0:
            raise ApiError(ErrorCode.INVALID_INPUT, f"{TIMEOUT_HEADER} must be a positive integer")
        timeout = min(timeout, int(raw) / 1000)
    if client_timeout is not None:
        timeout = min(timeout, client_timeout)
    arrived: float = req.context.arrived
    edge = req.get_header("X-Request-Start")
    if edge and edge.startswith("t="):
        try:
            queued = time.time() - float(edge[2:])
        except ValueError:
            queued = 0.0
        # Only ever earlier than our own arrival: a client cannot buy itself more time.
        arrived -= min(max(queued, 0.0), timeout)
    return arrived + timeout
