"""The OpenAPI document is generated from the app's routes and wire types, valid and complete."""

from __future__ import annotations

from typing import Any

import falcon
import falcon.inspect
import pytest
from falcon.testing import TestClient
from openapi_spec_validator import validate

from app.errors import ErrorCode
from app.middleware import OPEN_PATHS
from app.resources.openapi import ERROR_DOCS, build_spec
from app.wsgi import build_repository, create_app
from tests.conftest import DEMO_MODELS, make_settings


@pytest.fixture(scope="module")
def app() -> falcon.App[Any, Any]:
    settings = make_settings(DEMO_MODELS)
    return create_app(settings, build_repository(settings))


@pytest.fixture(scope="module")
def spec(app: falcon.App[Any, Any]) -> dict[str, Any]:
    return TestClient(app).simulate_get("/openapi.json").json  # type: ignore[no-any-return]


def _served_operations(app: falcon.App[Any, Any]) -> set[tuple[str, str]]:
    """(path template, method) of every responder the app really has."""
    return {
        (route.path, method.method.lower())
        for route in falcon.inspect.inspect_routes(app)
        for method in route.methods
        if not method.internal
    }


def test_the_document_is_valid_openapi_3_1(spec: dict[str, Any]) -> None:
    assert spec["openapi"] == "3.1.0"
    validate(spec)


def test_every_route_and_method_is_documented(
    app: falcon.App[Any, Any], spec: dict[str, Any]
) -> None:
    documented = {(path, method) for path, ops in spec["paths"].items() for method in ops}
    assert _served_operations(app) == documented


def test_a_route_without_a_description_stops_the_document(app: falcon.App[Any, Any]) -> None:
    class Undocumented:
        def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
            """Nothing."""

    extra = create_app(make_settings(DEMO_MODELS), build_repository(make_settings(DEMO_MODELS)))
    extra.add_route("/extra", Undocumented())
    with pytest.raises(LookupError, match="GET /extra"):
        build_spec(extra, OPEN_PATHS)


def test_every_status_a_route_can_answer_is_listed(
    app: falcon.App[Any, Any], spec: dict[str, Any]
) -> None:
    for path, method in _served_operations(app):
        operation = spec["paths"][path][method]
        responses = operation["responses"]
        assert "500" in responses
        if path not in OPEN_PATHS:  # with keys configured: no key, or over its rate
            assert {"401", "429"} <= set(responses), (path, method)
        else:
            assert "401" not in responses, (path, method)
        if "requestBody" in operation:
            assert {"400", "408", "413", "415"} <= set(responses), (path, method)


def test_bodies_come_from_the_wire_types(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    infer = spec["paths"]["/v2/models/{model}/infer"]["post"]
    assert infer["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/InferRequest"
    }
    assert "application/octet-stream" in infer["requestBody"]["content"]
    assert any(p["name"] == "X-Request-Timeout-Ms" for p in infer["parameters"])
    assert {"400", "404", "503", "504"} <= set(infer["responses"])
    shape = schemas["RequestInput"]["properties"]["shape"]
    assert shape["items"] == {"type": "integer", "minimum": 0}
    assert schemas["ErrorBody"]["required"] == ["error", "error_code", "request_id"]
    codes = schemas["ErrorCode"]["enum"]
    assert sorted(codes) == sorted(ErrorCode)
    predict = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
    assert len(predict["schema"]["oneOf"]) == 2  # rows or columns, or one keyed row


def test_every_code_is_explained() -> None:
    assert set(ERROR_DOCS) == set(ErrorCode)


def test_the_document_is_built_on_its_first_request_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.resources import openapi

    calls: list[int] = []
    real = openapi.build_spec

    def counting(*args: Any) -> dict[str, Any]:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(openapi, "build_spec", counting)
    settings = make_settings(DEMO_MODELS)
    client = TestClient(create_app(settings, build_repository(settings)))
    assert calls == []  # a worker starts without walking every route
    first = client.simulate_get("/openapi.json")
    second = client.simulate_get("/openapi.json")
    assert first.status_code == second.status_code == 200
    assert first.content == second.content and calls == [1]
