"""The middleware: request ids, one structured log line per request, API keys on every
route and method (key ids in logs and metrics, never the key) and per-key rate limits."""

from __future__ import annotations

from pathlib import Path

import falcon.inspect
import falcon.testing
import pytest
from falcon.testing import TestClient
from structlog.testing import capture_logs

from app.keys import KeyStore, new_key
from app.metrics import Metrics
from app.models.repository import Repository
from app.ratelimit import RateLimiter, create_state
from app.settings import Settings
from app.wsgi import build_repository, create_app
from tests.conftest import DEMO_MODELS, make_settings

GOOD = {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": [0.5] * 30}]}


def test_well_formed_request_id_is_echoed(client: TestClient) -> None:
    result = client.simulate_get("/v2", headers={"X-Request-ID": "abc-123.x:y_z"})
    assert result.headers["X-Request-ID"] == "abc-123.x:y_z"


@pytest.mark.parametrize("bad", ["", "has space", "x" * 129, "semi;colon", 'quote"'])
def test_malformed_request_id_is_replaced(client: TestClient, bad: str) -> None:
    result = client.simulate_get("/v2", headers={"X-Request-ID": bad})
    generated = result.headers["X-Request-ID"]
    assert generated != bad
    assert len(generated) == 32


def test_one_log_line_per_request_without_inputs(client: TestClient) -> None:
    secret_value = 0.123456789
    body = {
        "inputs": [
            {"name": "input", "shape": [1, 30], "datatype": "FP32", "data": [secret_value] * 30}
        ]
    }
    with capture_logs() as logs:
        client.simulate_post(
            "/v2/models/tabular/infer",
            json=body,
            headers={"X-Request-ID": "log-test-1", "Authorization": "Bearer sekrit"},
        )
    lines = [e for e in logs if e["event"] == "request"]
    assert len(lines) == 1
    line = lines[0]
    assert line["route"] == "/v2/models/{model}/infer"
    assert line["status"] == 200
    assert line["model"] == "tabular"
    assert line["version"] == "2"
    assert line["method"] == "POST"
    assert line["duration_ms"] > 0
    assert str(secret_value) not in repr(logs)
    assert "sekrit" not in repr(logs)


def test_errors_are_logged_with_status(client: TestClient) -> None:
    with capture_logs() as logs:
        client.simulate_post("/v2/models/nope/infer", json=GOOD)
    (line,) = [e for e in logs if e["event"] == "request"]
    assert line["status"] == 404
    assert line["model"] is None


# -- API keys and rate limits -------------------------------------------------------------

OPEN = {"/v2/health/live", "/v2/health/ready", "/healthz", "/health", "/readyz", "/metrics"}
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"]
RECORD, TOKEN = new_key("ci")
SLOW_RECORD, SLOW_TOKEN = new_key("slow", rate=1, burst=2)


@pytest.fixture
def keyed(tmp_path: Path, demo_settings: Settings, demo_repository: Repository):  # type: ignore[no-untyped-def]
    store = KeyStore({"ci": RECORD, "slow": SLOW_RECORD})
    path = tmp_path / "rl.bin"
    create_state(path, len(store.keys))
    metrics = Metrics()
    app = create_app(demo_settings, demo_repository, metrics, store, RateLimiter(path))
    return falcon.testing.TestClient(app)


def _paths() -> list[str]:
    """Every route the app has, with the demo's names in it."""
    settings = make_settings(DEMO_MODELS)
    app = create_app(settings, build_repository(settings))
    return [
        route.path.replace("{model}", "tabular").replace("{version}", "1")
        for route in falcon.inspect.inspect_routes(app)
    ]


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize(
    "credential",
    [
        None,
        "Bearer wrong",
        "Bearer ",
        "Bearer    ",
        "X-API-Key:",
        "X-API-Key:   ",
        "X-API-Key:oa_ci_x",
        "Basic " + TOKEN,
    ],
)
def test_every_route_and_method_needs_a_key(
    keyed: falcon.testing.TestClient, path: str, credential: str | None
) -> None:
    headers = {}
    if credential and credential.startswith("X-API-Key:"):
        headers["X-API-Key"] = credential.split(":", 1)[1]
    elif credential:
        headers["Authorization"] = credential
    for method in METHODS:
        result = keyed.simulate_request(method, path, headers=headers, json=GOOD)
        assert result.status_code < 500, (method, path, result.text)
        if path in OPEN:
            assert result.status_code in (200, 405), (method, path)
            continue
        assert result.status_code in (401, 405), (method, path, result.status_code)
        if method != "HEAD":
            assert result.json["error_code"] in ("UNAUTHENTICATED", "METHOD_NOT_ALLOWED")
            assert "prediction" not in result.text and "outputs" not in result.text
        if result.status_code == 401:
            assert result.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("header", ["Authorization", "X-API-Key"])
def test_valid_key_is_served(keyed: falcon.testing.TestClient, header: str) -> None:
    value = f"Bearer {TOKEN}" if header == "Authorization" else TOKEN
    result = keyed.simulate_post("/v2/models/tabular/infer", json=GOOD, headers={header: value})
    assert result.status_code == 200, result.text
    assert (
        keyed.simulate_get("/v2/models/tabular/infer", headers={header: value}).status_code == 405
    )


def test_key_id_in_logs_and_metrics_never_the_key(keyed: falcon.testing.TestClient) -> None:
    with capture_logs() as logs:
        keyed.simulate_post(
            "/v2/models/tabular/infer", json=GOOD, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        keyed.simulate_post(
            "/v2/models/tabular/infer", json=GOOD, headers={"Authorization": f"Bearer {TOKEN}x"}
        )
    (ok, denied) = [e for e in logs if e["event"] == "request"]
    assert ok["key_id"] == "ci" and ok["status"] == 200
    assert denied["status"] == 401 and denied["key_id"] is None
    assert TOKEN not in repr(logs) and RECORD.digest.hex() not in repr(logs)
    text = keyed.simulate_get("/metrics").text
    assert 'key="ci"' in text and TOKEN not in text


def test_rate_limited_key_gets_429_with_retry_after(keyed: falcon.testing.TestClient) -> None:
    headers = {"X-API-Key": SLOW_TOKEN}
    statuses = [
        keyed.simulate_post("/v2/models/tabular/infer", json=GOOD, headers=headers)
        for _ in range(4)
    ]
    assert [r.status_code for r in statuses] == [200, 200, 429, 429]
    assert statuses[2].json["error_code"] == "RATE_LIMITED"
    assert int(statuses[2].headers["Retry-After"]) >= 1
    # Another key is not affected.
    other = keyed.simulate_post("/v2/models/tabular/infer", json=GOOD, headers={"X-API-Key": TOKEN})
    assert other.status_code == 200


def test_errors_are_counted_by_code_and_latency_by_version(
    tmp_path: Path, demo_settings: Settings, demo_repository: Repository
) -> None:
    store = KeyStore({"slow": SLOW_RECORD})
    path = tmp_path / "rl.bin"
    create_state(path, 1)
    metrics = Metrics()
    client = falcon.testing.TestClient(
        create_app(demo_settings, demo_repository, metrics, store, RateLimiter(path))
    )
    headers = {"X-API-Key": SLOW_TOKEN}
    route = "/v2/models/{model}/infer"
    for _ in range(4):
        client.simulate_post("/v2/models/tabular/infer", json=GOOD, headers=headers)
    value = metrics.registry.get_sample_value
    # The key's limit refuses before routing: counted without route, model or version.
    refused = {"route": "unmatched", "model": "", "version": "", "code": "RATE_LIMITED"}
    assert value("onnx_appliance_errors_total", refused) == 2.0  # a burst of 2, then 429s
    served = {"route": route, "model": "tabular", "version": "2"}
    assert value("onnx_appliance_request_duration_seconds_count", served) == 2.0
    assert value("onnx_appliance_errors_total", {**served, "code": "RATE_LIMITED"}) is None
    client.simulate_post("/v2/models/nope/infer", json=GOOD)  # no key
    unknown = {**refused, "code": "UNAUTHENTICATED"}
    assert value("onnx_appliance_errors_total", unknown) == 1.0


def test_open_mode_without_keys(client: falcon.testing.TestClient) -> None:
    assert client.simulate_post("/v2/models/tabular/infer", json=GOOD).status_code == 200


def test_default_rate_from_settings(tmp_path: Path, demo_repository: Repository) -> None:
    settings = make_settings(DEMO_MODELS, auth={"rate": 0.5, "burst": 1})
    store = KeyStore({"ci": RECORD})
    path = tmp_path / "rl.bin"
    create_state(path, 1)
    client = falcon.testing.TestClient(
        create_app(settings, demo_repository, Metrics(), store, RateLimiter(path))
    )
    headers = {"X-API-Key": TOKEN}
    first = client.simulate_post("/v2/models/tabular/infer", json=GOOD, headers=headers)
    second = client.simulate_post("/v2/models/tabular/infer", json=GOOD, headers=headers)
    assert (first.status_code, second.status_code) == (200, 429)
    assert second.headers["Retry-After"] == "2"
