"""Request ids and the one structured log line per request."""

from __future__ import annotations

import pytest
from falcon.testing import TestClient
from structlog.testing import capture_logs

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
