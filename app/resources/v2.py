"""Open Inference Protocol model routes: metadata, readiness, inference, repository index."""

from __future__ import annotations

import falcon

from app.errors import ErrorCode
from app.models.errors import InvalidInput
from app.protocols import schema, v2
from app.resources.common import (
    BINARY_TYPE,
    JSON_TYPES,
    RepositoryResource,
    deadline,
    mirror,
    read_body,
    require_media_type,
    resolve,
    send,
)
from app.resources.openapi import INFERENCE_ERRORS, documented

_INFER_TYPES = JSON_TYPES | {BINARY_TYPE}
_E = ErrorCode


class ModelsResource(RepositoryResource):
    """``/v2/models/{model}[/versions/{version}]`` with the ``ready`` and ``infer`` suffixes.

    Routed twice, with and without a version; Falcon passes ``version`` only when it is in
    the path.
    """

    @documented(
        "Model metadata",
        response=schema.ModelMetadata,
        errors=(_E.MODEL_NOT_FOUND, _E.MODEL_NOT_READY),
    )
    def on_get(
        self, req: falcon.Request, resp: falcon.Response, model: str, version: str | None = None
    ) -> None:
        """Model metadata; without a version, the default version's signature."""
        runner = resolve(req, self._repository, model, version)
        versions = (
            [runner.signature.version]
            if version is not None
            else [v for v, _ in self._repository.entry(model).states()]
        )
        send(resp, v2.model_metadata(runner.signature, versions))

    @documented(
        "Model readiness",
        response=schema.ModelReady,
        errors=(_E.MODEL_NOT_FOUND, _E.MODEL_NOT_READY),
    )
    def on_get_ready(
        self, req: falcon.Request, resp: falcon.Response, model: str, version: str | None = None
    ) -> None:
        """200 when that version (or the default) is ready; 404 unknown, 503 loading."""
        send(resp, v2.model_ready(resolve(req, self._repository, model, version).signature))

    @documented(
        "Inference, Open Inference Protocol (JSON, or binary tensor data both ways)",
        response=schema.InferResponse,
        request=schema.InferRequest,
        errors=INFERENCE_ERRORS,
        binary=True,
        deadline=True,
    )
    def on_post_infer(
        self, req: falcon.Request, resp: falcon.Response, model: str, version: str | None = None
    ) -> None:
        """Run an inference request, JSON or with binary tensor data."""
        require_media_type(req, _INFER_TYPES)
        runner = resolve(req, self._repository, model, version)
        header_length = _header_length(req)
        body = read_body(req, self._limits)
        request = v2.parse_infer(
            body, header_length, runner.signature, self._limits.max_tensor_elements
        )
        due = deadline(req, runner, request.timeout)
        results = runner.predict(request.inputs, request.outputs, due)
        mirror(
            req, self._repository, runner, results,
            lambda shadow, due: shadow.predict(request.inputs, request.outputs, due),
        )  # fmt: skip
        data, json_length = v2.encode_infer(runner.signature, request, results)
        resp.set_header("X-Model-Version", runner.signature.version)
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


class RepositoryIndexResource(RepositoryResource):
    """``POST /v2/repository/index``: every model version and its state (read-only)."""

    @documented(
        "Every model version and its state (read-only)",
        response=list[schema.RepositoryIndexEntry],
        request=schema.RepositoryIndexRequest,
    )
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        """List the repository; ``{"ready": true}`` keeps only ready versions."""
        only_ready = v2.parse_index_request(self._json_body(req))
        versions = ((m.name, m.version_str, m.state) for m in self._repository.models())
        send(resp, v2.repository_index(versions, only_ready))
