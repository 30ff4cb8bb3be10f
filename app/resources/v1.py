"""Simple JSON routes: ``/v1/models/{m}[/versions/{v}]:predict``, ``/v1/models/{m}``,
``/predict``."""

from __future__ import annotations

import falcon

from app.models.repository import Repository
from app.protocols import v1
from app.protocols.v2 import parse_json
from app.resources.common import (
    JSON_TYPES,
    deadline,
    read_body,
    require_media_type,
    resolve,
    send_json,
)
from app.settings import LimitsSettings

# TensorFlow Serving's names for the states clients poll for.
_TF_STATES = {"READY": "AVAILABLE", "LOADING": "LOADING", "UNAVAILABLE": "UNAVAILABLE"}


class PredictResource:
    """Predictions for a named model or the default one, in the three body forms of
    :mod:`app.protocols.v1` (rows, columns, one row keyed by input names).

    Args:
        repository: The models.
        limits: Body and batch limits.
    """

    def __init__(self, repository: Repository, limits: LimitsSettings) -> None:
        self._repository = repository
        self._limits = limits

    def on_post(
        self,
        req: falcon.Request,
        resp: falcon.Response,
        model: str | None = None,
        version: str | None = None,
    ) -> None:
        """Predict with the model in the path, or the default model for ``/predict``."""
        require_media_type(req, JSON_TYPES)
        served = resolve(req, self._repository, model or self._repository.default_model, version)
        body = read_body(req, self._limits)
        form, inputs = v1.parse_predict(parse_json(body), served, self._limits.max_batch_rows)
        results = served.predict(inputs, deadline=deadline(req, served))
        resp.set_header("X-Model-Version", served.version_str)
        send_json(resp, v1.encode_predict(served, form, results))

    on_post_versioned = on_post


class ModelStatusResource:
    """``GET /v1/models/{model}``: each version with its state, TensorFlow Serving style."""

    def __init__(self, repository: Repository) -> None:
        self._repository = repository

    def on_get(self, req: falcon.Request, resp: falcon.Response, model: str) -> None:
        """List the model's versions and states."""
        entry = self._repository.entry(model)
        req.context.model = entry.name
        send_json(
            resp,
            {
                "model_name": entry.name,
                "default_version": str(entry.default_version),
                "model_version_status": [
                    {
                        "version": v["version"],
                        "state": _TF_STATES[v["state"]],
                        "status": {"error_code": "OK", "error_message": ""},
                    }
                    for v in entry.version_states()
                ],
            },
        )
