"""Simple JSON routes: ``/v1/models/{m}[/versions/{v}]:predict``, ``/v1/models/{m}``,
``/predict``."""

from __future__ import annotations

import falcon

from app.errors import ErrorCode
from app.models.repository import Repository
from app.protocols import schema, v1
from app.resources.common import (
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

_E = ErrorCode


class PredictResource(RepositoryResource):
    """Predictions for a named model or the default one, in the three body forms of
    :mod:`app.protocols.v1` (rows, columns, one row keyed by input names).

    Args:
        repository: The models.
        limits: Body and batch limits.
    """

    @documented(
        "Predict: rows, columns, or one row keyed by input names",
        response=schema.PredictResponse | schema.PredictColumnsResponse | schema.OneRow,
        request=schema.PredictRequest | schema.OneRow,
        errors=INFERENCE_ERRORS,
        deadline=True,
    )
    def on_post(
        self,
        req: falcon.Request,
        resp: falcon.Response,
        model: str | None = None,
        version: str | None = None,
    ) -> None:
        """Predict with the model in the path, or the default model for ``/predict``."""
        require_media_type(req, JSON_TYPES)
        runner = resolve(req, self._repository, model or self._repository.default_model, version)
        body = read_body(req, self._limits)
        form, inputs = v1.parse_predict(body, runner.signature, self._limits.max_batch_rows)
        results = runner.predict(inputs, deadline=deadline(req, runner))
        mirror(
            req,
            self._repository,
            runner,
            results,
            lambda shadow, due: shadow.predict(inputs, None, due),
        )
        resp.set_header("X-Model-Version", runner.signature.version)
        send(resp, v1.encode_predict(runner.signature, form, results))

    on_post_versioned = on_post


class ModelStatusResource:
    """``GET /v1/models/{model}``: each version with its state, TensorFlow Serving style."""

    def __init__(self, repository: Repository) -> None:
        self._repository = repository

    @documented(
        "Versions of a model and their state",
        response=schema.ModelStatus,
        errors=(_E.MODEL_NOT_FOUND,),
    )
    def on_get(self, req: falcon.Request, resp: falcon.Response, model: str) -> None:
        """List the model's versions and states."""
        entry = self._repository.entry(model)
        req.context.model = entry.name
        send(resp, v1.model_status(entry.name, entry.default_version, entry.states()))
