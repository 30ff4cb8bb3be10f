"""Server metadata, liveness and readiness (OIP ``/v2``, ``/v2/health/*``, ``/healthz``...)."""

from __future__ import annotations

import falcon

from app import __version__
from app.errors import ErrorCode
from app.models.repository import Repository
from app.protocols import schema, v2
from app.resources.common import send
from app.resources.errors import render_error
from app.resources.openapi import documented

SERVER_NAME = "onnx-appliance"
#: Liveness paths: the protocol's, and the two that load balancers and clients probe.
LIVE_PATHS = ("/v2/health/live", "/healthz", "/health")
#: Readiness paths.
READY_PATHS = ("/v2/health/ready", "/readyz")


class ServerResource:
    """``GET /v2``: server name, version and protocol extensions."""

    @documented("Server metadata", response=schema.ServerMetadata)
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Describe the server."""
        send(resp, v2.server_metadata(SERVER_NAME, __version__))


class LiveResource:
    """``GET /v2/health/live``, ``/healthz`` and ``/health``: 200 whenever the process answers."""

    @documented("Liveness", response=schema.Live)
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Report liveness."""
        send(resp, schema.Live(True))


class ReadyResource:
    """``GET /v2/health/ready`` and ``/readyz``: 200 once every model is loaded and warm."""

    def __init__(self, repository: Repository) -> None:
        self._repository = repository

    @documented(
        "Readiness: every model loaded and warm",
        response=schema.Ready,
        errors=(ErrorCode.MODEL_NOT_READY,),
    )
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Report readiness; 503 with Retry-After while any model is still loading."""
        if self._repository.ready:
            send(resp, schema.Ready(True))
        else:
            render_error(req, resp, ErrorCode.MODEL_NOT_READY, "models are still loading")
