"""Settings-level limits reach every model: default deadline, run slots, queue depth."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import falcon.testing
import pytest

from app.wsgi import build_repository, create_app
from tests import onnx_factory
from tests.conftest import make_settings


def slow_body(steps: int) -> dict[str, object]:
    return {
        "inputs": [
            {"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1.0]},
            {"name": "n", "shape": [], "datatype": "INT64", "data": [steps]},
        ]
    }


@pytest.fixture(scope="module")
def slow_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("slowrepo")
    onnx_factory.save(onnx_factory.slow_loop(), root, "slow")
    return root


def client_for(root: Path, **limits: int) -> falcon.testing.TestClient:
    settings = make_settings(root, limits=limits)
    repository = build_repository(settings)
    repository.load()
    return falcon.testing.TestClient(create_app(settings, repository))


def test_default_deadline_from_settings(slow_dir: Path) -> None:
    client = client_for(slow_dir, timeout_ms=200)
    start = time.monotonic()
    result = client.simulate_post("/v2/models/slow/infer", json=slow_body(10_000_000))
    assert result.status_code == 504
    assert result.json["error_code"] == "TIMEOUT"
    assert time.monotonic() - start < 1.5
    # A client cannot ask for more than the configured deadline...
    result = client.simulate_post(
        "/v2/models/slow/infer",
        json=slow_body(10_000_000),
        headers={"X-Request-Timeout-Ms": "60000"},
    )
    assert result.status_code == 504
    # ...nor buy time with a forged edge timestamp from the future.
    result = client.simulate_post(
        "/v2/models/slow/infer",
        json=slow_body(10_000_000),
        headers={"X-Request-Start": f"t={time.time() + 3600}"},
    )
    assert result.status_code == 504
    assert client.simulate_post("/v2/models/slow/infer", json=slow_body(1)).status_code == 200


def test_edge_arrival_time_counts_against_the_deadline(slow_dir: Path) -> None:
    client = client_for(slow_dir, timeout_ms=500)
    queued_at_edge = time.time() - 1.0  # waited a second in NGINX/gunicorn queues already
    result = client.simulate_post(
        "/v2/models/slow/infer",
        json=slow_body(1),
        headers={"X-Request-Start": f"t={queued_at_edge:.3f}"},
    )
    assert result.status_code == 504
    assert "could not start" in result.json["error"]


@pytest.mark.parametrize("value", ["0", "-5", "soon", "1.5"])
def test_bad_timeout_header(slow_dir: Path, value: str) -> None:
    client = client_for(slow_dir)
    result = client.simulate_post(
        "/v2/models/slow/infer", json=slow_body(1), headers={"X-Request-Timeout-Ms": value}
    )
    assert result.status_code == 400
    assert result.json["error_code"] == "INVALID_INPUT"


def test_bad_oip_timeout_parameter(slow_dir: Path) -> None:
    client = client_for(slow_dir)
    body = slow_body(1) | {"parameters": {"timeout": "fast"}}
    assert client.simulate_post("/v2/models/slow/infer", json=body).status_code == 400


def test_queue_depth_from_settings(slow_dir: Path) -> None:
    client = client_for(slow_dir, max_concurrency=1, max_queue=0)
    busy = threading.Thread(
        target=client.simulate_post,
        args=("/v2/models/slow/infer",),
        kwargs={"json": slow_body(3000)},
    )
    busy.start()
    time.sleep(0.1)
    result = client.simulate_post("/v2/models/slow/infer", json=slow_body(1))
    busy.join(30)
    assert result.status_code == 503
    assert result.json["error_code"] == "OVERLOADED"
    assert result.headers["Retry-After"] == "1"
