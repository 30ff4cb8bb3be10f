"""``GET /openapi.json``: an OpenAPI 3.1 document generated from what the app really serves.

The routes and methods come from Falcon's own account of the app (``falcon.inspect``); each
responder says what it takes and answers with :func:`documented`; the body schemas come from
the wire Structs (:mod:`app.protocols.schema`). A responder without a description stops the
document from being built, so a route cannot exist without being documented.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import falcon
import falcon.inspect

from app import __version__
from app.errors import HTTP_STATUS, ErrorCode
from app.protocols import schema

F = TypeVar("F", bound=Callable[..., Any])
_JSON = "application/json"
_BINARY = "application/octet-stream"
_EVENTS = "text/event-stream"
_E = ErrorCode

#: What each code means, for the responses' descriptions.
ERROR_DOCS: dict[ErrorCode, str] = {
    _E.INVALID_INPUT: "malformed body, or inputs that do not fit the model",
    _E.INFERENCE_FAILED: "onnxruntime rejected values that passed validation",
    _E.UNAUTHENTICATED: "missing or wrong API key while keys are configured",
    _E.FORBIDDEN: "refused by the proxy protocol or TLS checks",
    _E.MODEL_NOT_FOUND: "unknown model or version",
    _E.NOT_FOUND: "no such route",
    _E.METHOD_NOT_ALLOWED: "method not allowed on this route",
    _E.REQUEST_TIMEOUT: "the body did not arrive within limits.body_timeout_ms; the "
    "connection is closed",
    _E.PAYLOAD_TOO_LARGE: "body (decoded too), batch or tensor over the configured limit",
    _E.URI_TOO_LONG: "request line over 4094 bytes",
    _E.UNSUPPORTED_MEDIA_TYPE: "Content-Type other than JSON (or binary tensor data where "
    "taken), or a Content-Encoding other than gzip or identity",
    _E.EXPECTATION_FAILED: "an Expect header other than 100-continue",
    _E.RATE_LIMITED: "the API key's rate limit is exhausted; Retry-After is set",
    _E.HEADERS_TOO_LARGE: "too many or too large headers",
    _E.INTERNAL: "unexpected failure; details are in the server log under the request id",
    _E.NOT_IMPLEMENTED: "a Transfer-Encoding other than chunked",
    _E.OVERLOADED: "too many requests queued for the model; Retry-After is set",
    _E.MODEL_NOT_READY: "the model is still loading; Retry-After is set",
    _E.TIMEOUT: "the request's deadline passed before or during inference",
}
#: Codes any operation with a request body can answer.
BODY_ERRORS = (
    _E.INVALID_INPUT,
    _E.REQUEST_TIMEOUT,
    _E.PAYLOAD_TOO_LARGE,
    _E.UNSUPPORTED_MEDIA_TYPE,
)
#: Codes of every route that runs a model.
INFERENCE_ERRORS = (
    _E.MODEL_NOT_FOUND,
    _E.MODEL_NOT_READY,
    _E.INFERENCE_FAILED,
    _E.OVERLOADED,
    _E.TIMEOUT,
)
#: Codes any route that needs a key can answer, once keys are configured.
KEY_ERRORS = (_E.UNAUTHENTICATED, _E.RATE_LIMITED)


@dataclass(frozen=True)
class Operation:
    """What one responder takes and answers, for the document.

    Attributes:
        summary: One line.
        responses: Body types of a 200 (one of them); empty for a body that is no JSON.
        requests: Body types it reads (one of them); empty for none.
        errors: Codes of its own failures (those every route or body can have are added).
        binary: Also takes and answers binary tensor data (application/octet-stream).
        deadline: Takes ``X-Request-Timeout-Ms``.
        media: Media type of a non-JSON 200.
        events: Types of the Server-Sent Events it may answer with instead (``data`` lines).
        websocket: What the route speaks after a 101 (it answers no 200), or "".
        form: JSON schema of the ``multipart/form-data`` body it takes (file uploads), or
            None.
    """

    summary: str
    responses: tuple[Any, ...] = ()
    requests: tuple[Any, ...] = ()
    errors: tuple[ErrorCode, ...] = ()
    binary: bool = False
    deadline: bool = False
    media: str = _JSON
    events: tuple[Any, ...] = ()
    websocket: str = ""
    form: Any = None


_OPERATIONS: dict[str, Operation] = {}


def documented(
    summary: str,
    *,
    response: Any = None,
    request: Any = None,
    errors: Iterable[ErrorCode] = (),
    binary: bool = False,
    deadline: bool = False,
    media: str = _JSON,
    events: Any = None,
    websocket: str = "",
    form: Any = None,
) -> Callable[[F], F]:
    """Describe a responder for the OpenAPI document.

    ``response`` and ``request`` are wire types, or unions of them (``A | B``) where a route
    takes or answers one of several forms.
    """

    def mark(responder: F) -> F:
        _OPERATIONS[responder.__qualname__] = Operation(
            summary,
            _members(response),
            _members(request),
            tuple(errors),
            binary,
            deadline,
            media,
            _members(events),
            websocket,
            form,
        )
        return responder

    return mark


def _members(kind: Any) -> tuple[Any, ...]:
    if kind is None:
        return ()
    args = getattr(kind, "__args__", None)
    is_union = type(kind).__name__ in ("UnionType", "_UnionGenericAlias")
    return tuple(args) if is_union and args else (kind,)


def build_spec(app: falcon.App[Any, Any], open_paths: Iterable[str] = ()) -> dict[str, Any]:
    """The OpenAPI document of every route and method ``app`` has.

    Args:
        app: The finished app.
        open_paths: Routes that need no API key (so never answer 401 or 429).

    Raises:
        LookupError: a responder has no :func:`documented` description.
    """
    routes: list[tuple[str, str, Operation]] = []
    for route in falcon.inspect.inspect_routes(app):
        for responder in route.methods:
            if responder.internal:
                continue
            name = f"{route.class_name}.{responder.function_name}"
            operation = _OPERATIONS.get(name)
            if operation is None:
                raise LookupError(
                    f"{responder.method} {route.path} ({name}) is not documented: "
                    "describe it with @documented"
                )
            routes.append((route.path, responder.method.lower(), operation))
    types = list(
        dict.fromkeys(
            [schema.ErrorBody]
            + [t for _, _, op in routes for t in (*op.responses, *op.requests, *op.events)]
        )
    )
    refs, components = schema.components(tuple(types))
    ref_of = dict(zip(types, refs, strict=True))
    open_set = frozenset(open_paths)
    paths: dict[str, Any] = {}
    for path, verb, operation in routes:
        paths.setdefault(path, {})[verb] = _operation(
            path, operation, ref_of, needs_key=path not in open_set
        )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "onnx-appliance",
            "version": __version__,
            "description": "Open Inference Protocol v2 and simple JSON inference over ONNX "
            "models. Every error is an ErrorBody with a stable error_code.",
        },
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
        # Keys are needed only once the operator configures some; health and metrics never.
        "security": [{"bearer": []}, {"apiKey": []}, {}],
    }


_PARAMETER_RE = re.compile(r"{(\w+)}")
_PATH_PARAMETERS = {
    "model": {"type": "string"},
    "version": {"type": "string", "pattern": "^[1-9][0-9]*$"},
}
_REQUEST_ID = {
    "name": "X-Request-ID",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
    "description": "Echoed on the response; generated when absent or malformed.",
}
_TIMEOUT = {
    "name": "X-Request-Timeout-Ms",
    "in": "header",
    "required": False,
    "schema": {"type": "integer", "minimum": 1},
    "description": "Shorten the request's deadline (never lengthen it).",
}


_BINARY_SCHEMA = {
    "type": "string",
    "format": "binary",
    "description": "A JSON header of Inference-Header-Content-Length bytes, then raw "
    "little-endian tensors.",
}


def _content(types: tuple[Any, ...], ref_of: dict[Any, Any]) -> dict[str, Any]:
    refs = [ref_of[t] for t in types]
    return {"schema": refs[0] if len(refs) == 1 else {"oneOf": refs}}


def _operation(
    path: str, operation: Operation, ref_of: dict[Any, Any], *, needs_key: bool
) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": _PATH_PARAMETERS[name]}
        for name in _PARAMETER_RE.findall(path)
    ]
    if operation.deadline:
        parameters.append(_TIMEOUT)
    parameters.append(_REQUEST_ID)
    ok: dict[str, Any] = {}
    if operation.responses:
        ok[_JSON] = _content(operation.responses, ref_of)
    else:
        ok[operation.media] = {}
    if operation.binary:
        ok[_BINARY] = {"schema": _BINARY_SCHEMA}
    if operation.events:
        ok[_EVENTS] = {
            "schema": {
                "type": "string",
                "description": "Server-Sent Events (when the body asks to stream); the data "
                "of each is JSON of one of: "
                + ", ".join(ref_of[t]["$ref"].rsplit("/", 1)[-1] for t in operation.events),
            }
        }
    codes = [*operation.errors, _E.INTERNAL]
    if needs_key:
        codes += KEY_ERRORS
    result: dict[str, Any] = {"summary": operation.summary, "parameters": parameters}
    if operation.form is not None:
        result["requestBody"] = {
            "required": True,
            "content": {"multipart/form-data": {"schema": operation.form}},
        }
        codes += BODY_ERRORS
    if operation.requests:
        body: dict[str, Any] = {_JSON: _content(operation.requests, ref_of)}
        if operation.binary:
            body[_BINARY] = {"schema": _BINARY_SCHEMA}
        result["requestBody"] = {"required": True, "content": body}
        codes += BODY_ERRORS
    success = (
        {"101": {"description": f"Switching Protocols: {operation.websocket}"}}
        if operation.websocket
        else {"200": {"description": "OK", "content": ok}}
    )
    result["responses"] = success | _errors(codes, ref_of[schema.ErrorBody])
    return result


def _errors(codes: Iterable[ErrorCode], error_ref: Any) -> dict[str, Any]:
    by_status: dict[int, list[ErrorCode]] = {}
    for code in dict.fromkeys(codes):
        by_status.setdefault(HTTP_STATUS[code], []).append(code)
    return {
        str(status): {
            "description": "; ".join(f"{c.value}: {ERROR_DOCS[c]}" for c in members),
            "content": {_JSON: {"schema": error_ref}},
        }
        for status, members in sorted(by_status.items())
    }


class OpenApiResource:
    """Serve the OpenAPI document of the app, built when it is first asked for.

    Building it walks every route with falcon's inspector, which reads each responder's
    source: ~50 ms that every worker would otherwise spend before it answered anything.

    Args:
        app: The app it documents, with every route it will have by the first request.
        open_paths: Routes that need no API key.
    """

    def __init__(self, app: falcon.App[Any, Any], open_paths: Iterable[str]) -> None:
        self._app = app
        self._open_paths = tuple(open_paths)
        self._body: bytes | None = None

    @documented("This document (OpenAPI 3.1)", media=_JSON)
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Return the document."""
        if self._body is None:
            self._body = schema.encode(build_spec(self._app, self._open_paths))
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self._body
