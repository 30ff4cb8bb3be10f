"""Open Inference Protocol model routes: metadata, readiness, inference, repository index."""

from __future__ import annotations

import falcon

from app.errors import ErrorCode
from app.models.errors import InvalidInput
from app.models.repository import Repository
from app.protocols import v2
from app.resources.common import (
    BINARY_TYPE,
    JSON_TYPES,
    deadline,
    read_body,
    require_media_type,
    resolve,
    send_json,
)
from app.resources.errors import ApiError
from app.settings import LimitsSettings

_INFER_TYPES = JSON_TYPES | {BINARY_TYPE}


class ModelsResource:
    """``/v2/models/{model}[/versions/{version}]`` with the ``ready`` and ``infer`` suffixes.

    Routed twice, with and without a version; Falcon passes ``version`` only when it is in
    the path.
    """

    def __init__(self, repository: Repository, limits: LimitsSettings) -> None:
        self._repository = repository
        self._limits = limits

    def on_get(
        self, req: falcon.Request, resp: falcon.Response, model: str, version: str | None = None
    ) -> None:
        """Model metadata; without a version, the default version's signature."""
        served = resolve(req, self._repository, model, version)
        doc = served.metadata()
        if version is None:
            doc["versions"] = [v["version"] for v in self._repository.entry(model).version_states()]
        send_json(resp, doc)

    def on_get_ready(
        self, req: falcon.Request, resp: falcon.Response, model: str, version: str | None = None
    ) -> None:
        """200 when that version (or the default) is ready; 404 unknown, 503 loading."""
        served = resolve(req, self._repository, model, version)
        send_json(resp, {"name": served.name, "version": served.version_str, "ready": True})

    def on_post_infer(
        self, req: falcon.Request, resp: falcon.Response, model: str, version: str | None = None
    ) -> None:
        """Run an inference request, JSON or with binary tensor data."""
        require_media_type(req, _INFER_TYPES)
        served = resolve(req, self._repository, model, version)
        header_length = _header_length(req)
        body = read_body(req, self._limits)
        request = v2.parse_infer(body, header_length, served, self._limits.max_tensor_elements)
        due = deadline(req, served, request.timeout)
        results = served.predict(request.inputs, request.outputs, due)
        data, json_length = v2.encode_infer(served, request, results)
        resp.set_header("X-Model-Version", served.version_str)
        resp.data = data
        if json_length is None:
            resp.content_type = falcon.MEDIA_JSON
        else:
            resp.content_type = BINARY_TYPE
            resp.set_header(v2.HEADER_LENGTH, str(json_length))


def _header_length(req: falcon.Request) -> int | None:
    raw = req.get_header(v2.HEADER_LENGTH)
    if raw is None:
        return None
    if not raw.strip().isdigit():
        raise InvalidInput(f"{v2.HEADER_LENGTH} must be a non-negative integer")
    return int(raw)


class RepositoryIndexResource:
    """``POST /v2/repository/index``: every model version and its state (read-only)."""

    def __init__(self, repository: Repository, limits: LimitsSettings) -> None:
        self._repository = repository
        self._limits = limits

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        """List the repository; ``{"ready": true}`` keeps only ready versions."""
        require_media_type(req, JSON_TYPES)
        body = read_body(req, self._limits)
        only_ready = False
        if body.strip():
            doc = v2.parse_json(body)
            if not isinstance(doc, dict) or not isinstance(doc.get("ready", False), bool):
                raise ApiError(
                    ErrorCode.INVALID_INPUT, 'body must be an object like {"ready": true}'
                )
            only_ready = doc.get("ready", False)
        index = [
            dict(item, reason="")
            for item in self._repository.index()
            if not only_ready or item["state"] == "READY"
        ]
        send_json(resp, index)
