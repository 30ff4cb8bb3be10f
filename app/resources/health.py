"""Server metadata, liveness and readiness (OIP ``/v2``, ``/v2/health/*``, ``/healthz``...)."""

from __future__ import annotations

import falcon

from app import __version__
from app.errors import ErrorCode
from app.models.repository import Repository
from app.protocols.v2 import EXTENSIONS
from app.resources.common import send_json
from app.resources.errors import render_error

SERVER_NAME = "onnx-appliance"
#: Liveness paths: the protocol's, and the two that load balancers and clients probe.
LIVE_PATHS = ("/v2/health/live", "/healthz", "/health")
#: Readiness paths.
READY_PATHS = ("/v2/health/ready", "/readyz")


class ServerResource:
    """``GET /v2``: server name, version and protocol extensions."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Describe the server."""
        send_json(resp, {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS})


class LiveResource:
    """``GET /v2/health/live``, ``/healthz`` and ``/health``: 200 whenever the process answers."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Report liveness."""
        send_json(resp, {"live": True})


class ReadyResource:
    """``GET /v2/health/ready`` and ``/readyz``: 200 once every model is loaded and warm."""

    def __init__(self, repository: Repository) -> None:
        self._repository = repository

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Report readiness; 503 with Retry-After while any model is still loading."""
        if self._repository.ready:
            send_json(resp, {"ready": True})
        else:
            render_error(req, resp, ErrorCode.MODEL_NOT_READY, "models are still loading")
