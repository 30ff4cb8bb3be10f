"""The OpenAPI document covers every route the app serves, with its errors."""

from __future__ import annotations

from falcon.testing import TestClient

from app.resources.openapi import build_spec
from app.wsgi import build_repository, create_app
from tests.conftest import DEMO_MODELS, make_settings


def _served_templates() -> set[str]:
    settings = make_settings(DEMO_MODELS)
    app = create_app(settings, build_repository(settings))
    templates = set()
    for node in app._router._roots:  # walk Falcon's routing tree
        stack = [node]
        while stack:
            current = stack.pop()
            if current.resource is not None:
                templates.add(current.uri_template)
            stack.extend(current.children)
    return templates


def test_every_route_is_documented() -> None:
    spec = build_spec()
    assert _served_templates() == set(spec["paths"])


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
