"""``GET /openapi.json``: an OpenAPI 3.1 description of every route, body and error."""

from __future__ import annotations

from typing import Any

import falcon
import orjson

from app import __version__
from app.errors import ErrorCode
from app.middleware import OPEN_PATHS
from app.models.signature import DATATYPE_TO_NUMPY

_JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": _ref("Error")}}}


_ERRORS = {
    "400": _error("Malformed body, or inputs that do not fit the model (INVALID_INPUT)."),
    "401": _error("Missing or wrong API key while keys are configured (UNAUTHENTICATED)."),
    "404": _error("Unknown model or version (MODEL_NOT_FOUND)."),
    "405": _error("Method not allowed on this route (METHOD_NOT_ALLOWED)."),
    "408": _error(
        "The body did not arrive within limits.body_timeout_ms (REQUEST_TIMEOUT); the "
        "connection is closed."
    ),
    "413": _error("Body, batch or tensor over the configured limit (PAYLOAD_TOO_LARGE)."),
    "415": _error(
        "Content-Type other than JSON or binary tensor data, or a Content-Encoding other "
        "than gzip or identity (UNSUPPORTED_MEDIA_TYPE)."
    ),
    "500": _error("Unexpected failure; details are in the server log (INTERNAL)."),
    "429": _error("The API key's rate limit is exhausted (RATE_LIMITED); Retry-After is set."),
    "503": _error(
        "Model not ready yet (MODEL_NOT_READY) or too many requests queued (OVERLOADED); "
        "Retry-After is set."
    ),
    "504": _error("The request's deadline passed before or during inference (TIMEOUT)."),
}
_READ_ERRORS = {k: v for k, v in _ERRORS.items() if k in ("401", "404", "405", "429", "500", "503")}

_MODEL = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
_VERSION = {
    "name": "version",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[1-9][0-9]*$"},
}
_TIMEOUT = {
    "name": "X-Request-Timeout-Ms",
    "in": "header",
    "required": False,
    "schema": {"type": "integer", "minimum": 1},
    "description": "Shorten the request's deadline (never lengthen it).",
}
_REQUEST_ID = {
    "name": "X-Request-ID",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
    "description": "Echoed on the response; generated when absent or malformed.",
}


def _op(
    summary: str,
    response: str,
    *,
    body: str | None = None,
    errors: dict[str, Any],
    params: list[dict[str, Any]] | None = None,
    binary: bool = False,
) -> dict[str, Any]:
    ok_content: dict[str, Any] = {_JSON: {"schema": _ref(response)}}
    if binary:
        ok_content["application/octet-stream"] = {
            "schema": {"type": "string", "format": "binary"},
            "description": "JSON header of Inference-Header-Content-Length bytes, then "
            "raw little-endian tensors.",
        }
    op: dict[str, Any] = {
        "summary": summary,
        "parameters": [*(params or []), _REQUEST_ID],
        "responses": {"200": {"description": "OK", "content": ok_content}, **errors},
    }
    if body is not None and body != "RepositoryIndexRequest":
        op["parameters"].insert(0, _TIMEOUT)
    if body is not None:
        content: dict[str, Any] = {_JSON: {"schema": _ref(body)}}
        if binary:
            content["application/octet-stream"] = {"schema": {"type": "string", "format": "binary"}}
        op["requestBody"] = {"required": True, "content": content}
    return op


def _model_routes(prefix: str, params: list[dict[str, Any]], pinned: str) -> dict[str, Any]:
    return {
        f"{prefix}": {
            "get": _op(
                f"Model metadata ({pinned})", "ModelMetadata", errors=_READ_ERRORS, params=params
            )
        },
        f"{prefix}/ready": {
            "get": _op(
                f"Model readiness ({pinned})", "ModelReady", errors=_READ_ERRORS, params=params
            )
        },
        f"{prefix}/infer": {
            "post": _op(
                f"Inference, Open Inference Protocol ({pinned})",
                "InferResponse",
                body="InferRequest",
                errors=_ERRORS,
                params=params,
                binary=True,
            )
        },
    }


def build_spec() -> dict[str, Any]:
    """The OpenAPI document."""
    tensor_in = {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "datatype": {"enum": list(DATATYPE_TO_NUMPY)},
            "data": {
                "description": "Row-major values, flat or nested; omitted when "
                "parameters.binary_data_size is given."
            },
            "parameters": {
                "type": "object",
                "properties": {"binary_data_size": {"type": "integer", "minimum": 0}},
            },
        },
    }
    tensor_out = {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "datatype": {"type": "string"},
            "data": {"type": "array"},
            "parameters": {"type": "object"},
        },
    }
    spec_tensor = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "datatype": {"type": "string"},
            "shape": {
                "type": "array",
                "items": {"type": "integer"},
                "description": "-1 marks a dynamic dimension",
            },
        },
    }
    schemas: dict[str, Any] = {
        "Error": {
            "type": "object",
            "required": ["error", "error_code", "request_id"],
            "properties": {
                "error": {"type": "string"},
                "error_code": {
                    "type": "string",
                    "enum": sorted(ErrorCode),
                },
                "request_id": {"type": "string"},
            },
        },
        "ServerMetadata": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "extensions": {"type": "array", "items": {"type": "string"}},
            },
        },
        "Live": {"type": "object", "properties": {"live": {"type": "boolean"}}},
        "Ready": {"type": "object", "properties": {"ready": {"type": "boolean"}}},
        "ModelMetadata": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "versions": {"type": "array", "items": {"type": "string"}},
                "platform": {"type": "string", "const": "onnxruntime_onnx"},
                "inputs": {"type": "array", "items": spec_tensor},
                "outputs": {"type": "array", "items": spec_tensor},
            },
        },
        "ModelReady": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "ready": {"type": "boolean"},
            },
        },
        "InferRequest": {
            "type": "object",
            "required": ["inputs"],
            "properties": {
                "id": {"type": "string"},
                "parameters": {
                    "type": "object",
                    "properties": {"binary_data_output": {"type": "boolean"}},
                },
                "inputs": {"type": "array", "minItems": 1, "items": tensor_in},
                "outputs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {
                            "name": {"type": "string"},
                            "parameters": {
                                "type": "object",
                                "properties": {"binary_data": {"type": "boolean"}},
                            },
                        },
                    },
                },
            },
        },
        "InferResponse": {
            "type": "object",
            "properties": {
                "model_name": {"type": "string"},
                "model_version": {"type": "string"},
                "id": {"type": "string"},
                "outputs": {"type": "array", "items": tensor_out},
            },
        },
        "RepositoryIndexRequest": {"type": "object", "properties": {"ready": {"type": "boolean"}}},
        "RepositoryIndex": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "version": {"type": "string"},
                    "state": {"enum": ["READY", "LOADING", "UNAVAILABLE"]},
                    "reason": {"type": "string"},
                },
            },
        },
        "PredictRequest": {
            "type": "object",
            "required": ["instances"],
            "properties": {
                "instances": {
                    "type": "array",
                    "minItems": 1,
                    "description": "One row per instance: the input's value, or an "
                    "object keyed by input name for several inputs.",
                }
            },
        },
        "PredictResponse": {
            "type": "object",
            "properties": {
                "predictions": {},
                "model_name": {"type": "string"},
                "model_version": {"type": "string"},
            },
        },
        "ModelStatus": {
            "type": "object",
            "properties": {
                "model_name": {"type": "string"},
                "default_version": {"type": "string"},
                "model_version_status": {"type": "array", "items": {"type": "object"}},
            },
        },
    }
    health = {"500": _ERRORS["500"]}
    paths: dict[str, Any] = {
        "/v2": {"get": _op("Server metadata", "ServerMetadata", errors=health)},
        "/v2/health/live": {"get": _op("Liveness", "Live", errors=health)},
        "/v2/health/ready": {
            "get": _op(
                "Readiness: every model loaded and warm", "Ready", errors={"503": _ERRORS["503"]}
            )
        },
        "/healthz": {"get": _op("Liveness (alias)", "Live", errors=health)},
        "/health": {"get": _op("Liveness (alias)", "Live", errors=health)},
        "/readyz": {"get": _op("Readiness (alias)", "Ready", errors={"503": _ERRORS["503"]})},
        **_model_routes("/v2/models/{model}", [_MODEL], "default version"),
        **_model_routes(
            "/v2/models/{model}/versions/{version}", [_MODEL, _VERSION], "pinned version"
        ),
        "/v2/repository/index": {
            "post": _op(
                "Every model version and its state (read-only)",
                "RepositoryIndex",
                body="RepositoryIndexRequest",
                errors={k: _ERRORS[k] for k in ("400", "413", "415")},
            )
        },
        "/v1/models/{model}": {
            "get": _op(
                "Versions of a model and their state",
                "ModelStatus",
                errors=_READ_ERRORS,
                params=[_MODEL],
            )
        },
        "/v1/models/{model}:predict": {
            "post": _op(
                "Predict with instances (default version)",
                "PredictResponse",
                body="PredictRequest",
                errors=_ERRORS,
                params=[_MODEL],
            )
        },
        "/v1/models/{model}/versions/{version}:predict": {
            "post": _op(
                "Predict with instances (pinned version)",
                "PredictResponse",
                body="PredictRequest",
                errors=_ERRORS,
                params=[_MODEL, _VERSION],
            )
        },
        "/predict": {
            "post": _op(
                "Predict with the default model",
                "PredictResponse",
                body="PredictRequest",
                errors=_ERRORS,
            )
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics, summed over all workers",
                "responses": {
                    "200": {"description": "Text exposition format", "content": {"text/plain": {}}}
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {"200": {"description": "OpenAPI 3.1", "content": {_JSON: {}}}},
            }
        },
    }
    _add_common_statuses(paths)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "onnx-appliance",
            "version": __version__,
            "description": "Open Inference Protocol v2 and simple JSON inference over ONNX models.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
        # Keys are needed only once the operator configures some; health and metrics never.
        "security": [{"bearer": []}, {"apiKey": []}, {}],
    }


def _add_common_statuses(paths: dict[str, Any]) -> None:
    """Statuses that every operation of a kind can answer, whatever its own errors.

    Every route but the open ones answers 401 without a valid key and 429 past the key's
    rate once keys are configured; every operation with a body can be malformed, slow,
    too large or of a type or encoding not read here.
    """
    for path, operations in paths.items():
        for operation in operations.values():
            responses = operation["responses"]
            codes = ["500"]
            if path not in OPEN_PATHS:
                codes += ["401", "429"]
            if "requestBody" in operation:
                codes += ["400", "408", "413", "415"]
            for code in codes:
                responses.setdefault(code, _ERRORS[code])
            operation["responses"] = dict(sorted(responses.items()))


class OpenApiResource:
    """Serve the OpenAPI document, rendered once."""

    def __init__(self, metrics_enabled: bool = True) -> None:
        spec = build_spec()
        if not metrics_enabled:
            del spec["paths"]["/metrics"]
        self._body = orjson.dumps(spec)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Return the document."""
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self._body
