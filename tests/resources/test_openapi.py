"""The OpenAPI document covers every route the app serves, with its errors."""

from __future__ import annotations

import falcon.inspect
from falcon.testing import TestClient

from app.middleware import OPEN_PATHS
from app.resources.openapi import build_spec
from app.wsgi import build_repository, create_app
from tests.conftest import DEMO_MODELS, make_settings


def _served_operations() -> set[tuple[str, str]]:
    """(path template, method) of every responder the app really has."""
    settings = make_settings(DEMO_MODELS)
    app = create_app(settings, build_repository(settings))
    return {
        (route.path, method.method.lower())
        for route in falcon.inspect.inspect_routes(app)
        for method in route.methods
        if not method.internal
    }


def test_every_route_and_method_is_documented() -> None:
    spec = build_spec()
    documented = {(path, method) for path, ops in spec["paths"].items() for method in ops}
    assert _served_operations() == documented


def test_every_status_a_route_can_answer_is_listed() -> None:
    spec = build_spec()
    for path, method in _served_operations():
        responses = spec["paths"][path][method]["responses"]
        if path not in OPEN_PATHS:  # with keys configured: no key, or over its rate
            assert {"401", "429"} <= set(responses), (path, method)
        if "requestBody" in spec["paths"][path][method]:
            assert {"400", "408", "413", "415"} <= set(responses), (path, method)


def test_inference_routes_document_errors(client: TestClient) -> None:
    doc = client.simulate_get("/openapi.json").json
    assert doc["openapi"].startswith("3.1")
    infer = doc["paths"]["/v2/models/{model}/infer"]["post"]
    assert {"400", "401", "404", "413", "415", "429", "503", "504"} <= set(infer["responses"])
    assert any(p["name"] == "X-Request-Timeout-Ms" for p in infer["parameters"])
    assert (
        "UNAUTHENTICATED"
        in doc["components"]["schemas"]["Error"]["properties"]["error_code"]["enum"]
    )
    assert infer["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "InferRequest"
    )
    assert doc["components"]["schemas"]["Error"]["required"] == [
        "error",
        "error_code",
        "request_id",
    ]
