"""CORS: nothing allowed by default; an allow-list answers preflights for its origins."""

from __future__ import annotations

import falcon.testing

from app.models.repository import Repository
from app.wsgi import create_app
from tests.conftest import DEMO_MODELS, make_settings

PREFLIGHT = {
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "content-type, authorization",
}


def test_no_origin_allowed_by_default(client: falcon.testing.TestClient) -> None:
    result = client.simulate_options(
        "/v2/models/tabular/infer", headers={"Origin": "https://evil.example", **PREFLIGHT}
    )
    assert "Access-Control-Allow-Origin" not in result.headers
    result = client.simulate_get("/v2", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in result.headers


def test_allow_list(demo_repository: Repository) -> None:
    settings = make_settings(DEMO_MODELS, cors={"allow_origins": ["https://app.example.com"]})
    client = falcon.testing.TestClient(create_app(settings, demo_repository))
    ok = client.simulate_options(
        "/v2/models/tabular/infer", headers={"Origin": "https://app.example.com", **PREFLIGHT}
    )
    assert ok.status_code == 200
    assert ok.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "POST" in ok.headers["Access-Control-Allow-Methods"]
    assert "authorization" in ok.headers["Access-Control-Allow-Headers"].lower()
    other = client.simulate_options(
        "/v2/models/tabular/infer", headers={"Origin": "https://evil.example", **PREFLIGHT}
    )
    assert "Access-Control-Allow-Origin" not in other.headers
    simple = client.simulate_get("/v2", headers={"Origin": "https://app.example.com"})
    assert simple.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "X-Request-ID" in simple.headers["Access-Control-Expose-Headers"]
