"""Helpers shared by the resources: bounded body reads, media types, model lookup."""

from __future__ import annotations

import time
from typing import Any

import falcon
import orjson

from app.errors import ApiError
from app.models.onnx import OnnxModel
from app.models.repository import Repository

TIMEOUT_HEADER = "X-Request-Timeout-Ms"
JSON_TYPES = frozenset({"application/json", ""})
BINARY_TYPE = "application/octet-stream"


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
            "UNSUPPORTED_MEDIA_TYPE", f"Content-Type {mt!r} is not supported here; send {kinds}"
        )


def read_body(req: falcon.Request, limit: int) -> bytes:
    """Read the whole body, refusing more than ``limit`` bytes without buffering them.

    Raises:
        ApiError: PAYLOAD_TOO_LARGE.
    """
    declared = req.content_length
    if declared is not None and declared > limit:
        raise ApiError(
            "PAYLOAD_TOO_LARGE", f"request body of {declared} bytes is over the limit of {limit}"
        )
    data: bytes = req.bounded_stream.read(limit + 1)
    if len(data) > limit:
        raise ApiError("PAYLOAD_TOO_LARGE", f"request body is over the limit of {limit} bytes")
    return data


def resolve(
    req: falcon.Request, repository: Repository, name: str, version: str | None = None
) -> OnnxModel:
    """Find the serving model version and label the request with it.

    Requests that name no version follow the model's traffic split, sticky per request id.
    """
    model = repository.get(name, version, routing_key=req.context.request_id)
    req.context.model = model.name
    req.context.version = model.version_str
    return model


def send_json(resp: falcon.Response, doc: Any, status: int = 200) -> None:
    """Write ``doc`` as the JSON body (numpy arrays allowed)."""
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def deadline(req: falcon.Request, model: OnnxModel, client_timeout: float | None = None) -> float:
    """When the answer is due, on the monotonic clock.

    The model's timeout counts from the request's arrival: at NGINX when it sends
    ``X-Request-Start: t=<epoch seconds>``, else at this worker. A client may shorten it with
    ``X-Request-Timeout-Ms`` (or the OIP ``timeout`` parameter, ``client_timeout`` here, in
    seconds), never lengthen it.

    Raises:
        ApiError: INVALID_INPUT for a malformed timeout header.
    """
    timeout = model.options.timeout
    raw = req.get_header(TIMEOUT_HEADER)
    if raw is not None:
        if not raw.strip().isdigit() or int(raw) <= 0:
            raise ApiError("INVALID_INPUT", f"{TIMEOUT_HEADER} must be a positive integer")
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
