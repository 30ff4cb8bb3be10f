"""The resources' shared steps: reading bodies (size, encodings, media types), choosing the
version (traffic splits, sticky per request id, pinning) and the request's deadline."""

from __future__ import annotations

import gzip
import shutil
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

import falcon.testing
import pytest
from falcon.testing import TestClient

from app.metrics import Metrics
from app.models.errors import RepositoryError
from app.models.repository import Repository
from app.wsgi import build_repository, create_app
from tests import onnx_factory
from tests.conftest import DEMO_MODELS, make_settings, wait_until
from tests.resources.test_errors import GOOD, assert_error, assert_still_serving, raw

# -- bodies ------------------------------------------------------------------------------------


def test_body_over_limit_is_413(extra_client: TestClient) -> None:
    # extra_client keeps the default 8 MiB body limit; send 9 MiB.
    body = b'{"inputs": [' + b" " * (9 * 1024 * 1024) + b"]}"
    result = extra_client.simulate_post("/v2/models/tabular/infer", body=body)
    assert_error(result, 413, "PAYLOAD_TOO_LARGE")


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/xml",
    ],
)
def test_unsupported_content_type_is_415(client: TestClient, content_type: str) -> None:
    result = client.simulate_post(
        "/v2/models/tabular/infer", body=raw(GOOD), headers={"Content-Type": content_type}
    )
    assert_error(result, 415, "UNSUPPORTED_MEDIA_TYPE")
    result = client.simulate_post(
        "/v1/models/tabular:predict",
        body=b'{"instances": [[1]]}',
        headers={"Content-Type": content_type},
    )
    assert_error(result, 415, "UNSUPPORTED_MEDIA_TYPE")
    assert_still_serving(client)


def test_a_gzip_body_is_decoded(client: TestClient) -> None:
    result = client.simulate_post(
        "/v2/models/tabular/infer",
        body=gzip.compress(raw(GOOD)),
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert result.status_code == 200, result.text
    plain = client.simulate_post("/v2/models/tabular/infer", json=GOOD)
    assert result.json["outputs"] == plain.json["outputs"]


@pytest.mark.parametrize(
    ("encoding", "body", "status", "fragment"),
    [
        ("br", raw(GOOD), 415, "Content-Encoding 'br' is not supported"),
        ("deflate", zlib.compress(raw(GOOD)), 415, "Content-Encoding 'deflate'"),
        ("gzip, gzip", raw(GOOD), 415, "Content-Encoding 'gzip, gzip'"),
        ("gzip", raw(GOOD), 400, "labelled gzip but is not gzip data"),
        ("gzip", gzip.compress(raw(GOOD))[:-8], 400, "truncated"),
        ("gzip", gzip.compress(raw(GOOD)) + b"junk", 400, "data after its end"),
        ("gzip", gzip.compress(b" " * (9 * 1024 * 1024)), 413, "decoded request body"),
    ],
)
def test_bodies_in_encodings_not_read_here_are_refused(
    client: TestClient, encoding: str, body: bytes, status: int, fragment: str
) -> None:
    result = client.simulate_post(
        "/v2/models/tabular/infer",
        body=body,
        headers={"Content-Type": "application/json", "Content-Encoding": encoding},
    )
    code = {400: "INVALID_INPUT", 413: "PAYLOAD_TOO_LARGE", 415: "UNSUPPORTED_MEDIA_TYPE"}
    assert_error(result, status, code[status])
    assert fragment in result.json["error"]
    assert_still_serving(client)


def test_json_with_charset_is_accepted(client: TestClient) -> None:
    result = client.simulate_post(
        "/v2/models/tabular/infer",
        body=raw(GOOD),
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert result.status_code == 200


# -- versions: traffic splits and pinning ---------------------------------------------------


@pytest.fixture(scope="module")
def canary(tmp_path_factory: pytest.TempPathFactory) -> falcon.testing.TestClient:
    root = tmp_path_factory.mktemp("canary")
    shutil.copytree(DEMO_MODELS / "tabular", root / "tabular")
    (root / "tabular" / "model.toml").write_text('traffic = { "1" = 90, "2" = 10 }\n')
    settings = make_settings(root)
    metrics = Metrics()
    repository = build_repository(settings, metrics)
    repository.load()
    return falcon.testing.TestClient(create_app(settings, repository, metrics))


def test_split_is_90_10_within_3_points(canary: falcon.testing.TestClient) -> None:
    served = Counter()
    for i in range(2000):
        result = canary.simulate_post(
            "/v2/models/tabular/infer", json=GOOD, headers={"X-Request-ID": f"split-{i}"}
        )
        assert result.headers["X-Model-Version"] == result.json["model_version"]
        served[result.json["model_version"]] += 1
    share = served["1"] / 2000
    assert 0.87 <= share <= 0.93, served
    text = canary.simulate_get("/metrics").text
    for version, count in served.items():
        line = next(
            x
            for x in text.splitlines()
            if x.startswith("onnx_appliance_requests_total")
            and 'route="/v2/models/{model}/infer"' in x
            and f'version="{version}"' in x
        )
        assert float(line.rsplit(" ", 1)[1]) == count


def test_same_request_id_always_lands_on_the_same_version(
    canary: falcon.testing.TestClient,
) -> None:
    for i in range(50):
        versions = {
            canary.simulate_post(
                "/v1/models/tabular:predict",
                json={"instances": [[0.5] * 30]},
                headers={"X-Request-ID": f"sticky-{i}"},
            ).json["model_version"]
            for _ in range(5)
        }
        assert len(versions) == 1


def test_pinned_version_ignores_the_split(canary: falcon.testing.TestClient) -> None:
    for i in range(50):
        result = canary.simulate_post(
            "/v2/models/tabular/versions/2/infer", json=GOOD, headers={"X-Request-ID": f"pin-{i}"}
        )
        assert result.json["model_version"] == "2"


@pytest.mark.parametrize(
    ("traffic", "fragment"),
    [
        ('traffic = { "3" = 10 }', "does not exist"),
        ('traffic = { "1" = -1, "2" = 5 }', "negative"),
        ('traffic = { "1" = 0 }', "add up to 0"),
        ('traffic = { "x" = 1 }', "does not exist"),
    ],
)
def test_bad_splits_are_refused(tmp_path: Path, traffic: str, fragment: str) -> None:
    shutil.copytree(DEMO_MODELS / "tabular", tmp_path / "tabular")
    (tmp_path / "tabular" / "model.toml").write_text(traffic + "\n")
    with pytest.raises(RepositoryError, match=fragment):
        build_repository(make_settings(tmp_path))


# -- deadlines -------------------------------------------------------------------------------


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


def served(root: Path, **limits: int) -> tuple[falcon.testing.TestClient, Repository]:
    settings = make_settings(root, limits=limits)
    repository = build_repository(settings)
    repository.load()
    return falcon.testing.TestClient(create_app(settings, repository)), repository


def client_for(root: Path, **limits: int) -> falcon.testing.TestClient:
    return served(root, **limits)[0]


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
    client, repository = served(slow_dir, max_concurrency=1, max_queue=0)
    busy = threading.Thread(
        target=client.simulate_post,
        args=("/v2/models/slow/infer",),
        kwargs={"json": slow_body(3000)},
    )
    busy.start()
    runner = repository.get("slow")
    wait_until(lambda: runner.gate.load == (1, 0), "the busy request to run")
    result = client.simulate_post("/v2/models/slow/infer", json=slow_body(1))
    busy.join(30)
    assert result.status_code == 503
    assert result.json["error_code"] == "OVERLOADED"
    assert result.headers["Retry-After"] == "1"
