"""The NGINX site template, rendered and run on loopback in front of a real appliance."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from loadtests.edge import Edge, run_edge
from tests.e2e.conftest import Server, children, run_server

BODY = json.dumps(
    {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": [0.5] * 30}]}
)
JSON = ["-H", "Content-Type: application/json"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Edge]]:
    tmp = tmp_path_factory.mktemp("edge")
    with run_server(tmp) as app, run_edge(tmp, app.socket_path) as edge:
        yield app, edge


def app_requests(app: Server) -> int:
    time.sleep(0.2)  # the app batches its access lines
    return sum(1 for x in app.log_lines() if x.get("event") == "request")


def test_https_prediction_over_http2(stack: tuple[Server, Edge]) -> None:
    _, edge = stack
    result = edge.curl("/v2/models/tabular/infer", "--http2", "-i", *JSON, "-d", BODY)
    assert result.returncode == 0, result.stderr
    head, _, body = result.stdout.partition("\n\n")  # text mode: CRLF is LF
    assert head.startswith("HTTP/2 200")
    headers = dict(line.lower().split(": ", 1) for line in head.splitlines()[1:] if ": " in line)
    assert headers["strict-transport-security"] == "max-age=63072000"
    assert headers["server"] == "nginx"  # no version number
    assert len(headers["x-request-id"]) == 32  # generated at the edge, echoed by the app
    assert json.loads(body)["model_name"] == "tabular"


def test_request_id_passes_through(stack: tuple[Server, Edge]) -> None:
    app, edge = stack
    result = edge.curl("/v2/models/tabular", "-i", "-H", "X-Request-ID: edge-rid-1")
    assert "x-request-id: edge-rid-1" in result.stdout.lower()
    time.sleep(0.2)
    assert any(x.get("request_id") == "edge-rid-1" for x in app.log_lines())
    assert any(x["request_id"] == "edge-rid-1" and x["status"] == 200 for x in edge.access_lines())


def test_plain_http_redirects_with_308(stack: tuple[Server, Edge]) -> None:
    _, edge = stack
    result = edge.curl("/v2/health/ready?x=1", "-i", https=False)
    assert result.stdout.startswith("HTTP/1.1 308")
    assert f"Location: https://appliance.test:{edge.https_port}/v2/health/ready?x=1" in (
        result.stdout
    )


def test_unknown_hosts_are_dropped(stack: tuple[Server, Edge]) -> None:
    _, edge = stack
    plain = edge.curl("/", https=False, host="other.test")
    assert plain.returncode == 52  # empty reply: 444 closes the connection
    tls = edge.curl("/", "-k", host="other.test")
    assert tls.returncode == 35  # TLS handshake refused


def test_oversize_body_is_refused_by_nginx_alone(stack: tuple[Server, Edge]) -> None:
    app, edge = stack
    before = app_requests(app)
    big = edge.prefix / "big.json"
    big.write_text('{"inputs": [' + " " * (2 * 1024 * 1024) + "]}")
    result = edge.curl("/v2/models/tabular/infer", "-i", *JSON, "--data-binary", f"@{big}")
    head, _, body = result.stdout.partition("\n\n")  # text mode: CRLF is LF
    assert " 413" in head.splitlines()[0]
    assert json.loads(body)["error_code"] == "PAYLOAD_TOO_LARGE"
    assert app_requests(app) == before  # never reached the app


def test_metrics_only_from_the_allow_list(tmp_path: Path) -> None:
    with (
        run_server(tmp_path) as app,
        run_edge(tmp_path, app.socket_path, nginx_site_metrics_allow=["10.9.9.9"]) as edge,
    ):
        refused = edge.curl("/metrics", "-o", "/dev/null", "-w", "%{http_code}")
        assert refused.stdout == "403"
        assert edge.curl("/v2/health/live", "-o", "/dev/null", "-w", "%{http_code}").stdout == "200"


def test_metrics_from_an_allowed_address(stack: tuple[Server, Edge]) -> None:
    _, edge = stack
    result = edge.curl("/metrics")
    assert "onnx_appliance_requests_total" in result.stdout


def test_gzip_for_json(stack: tuple[Server, Edge]) -> None:
    _, edge = stack
    result = edge.curl(
        "/openapi.json", "-i", "-H", "Accept-Encoding: gzip", "-o", "/dev/null", "-D", "-"
    )
    assert "content-encoding: gzip" in result.stdout.lower()


def test_burst_over_the_client_limit_gets_429(tmp_path: Path) -> None:
    with (
        run_server(tmp_path) as app,
        run_edge(
            tmp_path, app.socket_path, nginx_site_rate_limit=5, nginx_site_rate_burst=5
        ) as edge,
    ):

        def one(_: int) -> str:
            return edge.curl(
                "/v2/models/tabular/infer",
                *JSON,
                "-d",
                BODY,
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
            ).stdout

        with ThreadPoolExecutor(30) as pool:
            codes = Counter(pool.map(one, range(30)))
        for _ in range(20):  # the bucket refills at 5/s: a quick one is refused
            limited = edge.curl("/v2/models/tabular/infer", "-i", *JSON, "-d", BODY)
            if " 429" in limited.stdout.splitlines()[0]:
                break
    assert codes["429"] > 0, codes
    assert codes["200"] >= 5, codes
    assert set(codes) <= {"200", "429"}, codes  # never 503
    assert limited.stdout.startswith("HTTP/2 429")
    assert "retry-after: 1" in limited.stdout.lower()
    assert '"RATE_LIMITED"' in limited.stdout


def test_a_worker_killed_mid_request_is_retried_not_502(tmp_path: Path) -> None:
    models = tmp_path / "models"
    from tests import onnx_factory

    onnx_factory.save(onnx_factory.slow_loop(), models, "slow")
    with (
        run_server(tmp_path, models=models, workers=2) as app,
        run_edge(tmp_path, app.socket_path) as edge,
    ):
        body = json.dumps(
            {
                "inputs": [
                    {"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1.0]},
                    {"name": "n", "shape": [], "datatype": "INT64", "data": [8000]},
                ]
            }
        )
        results: list[Any] = []

        def call() -> None:
            results.append(
                edge.curl(
                    "/v2/models/slow/infer",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    *JSON,
                    "-d",
                    body,
                )
            )

        thread = threading.Thread(target=call)
        thread.start()
        time.sleep(0.4)  # the request is now running in one of the workers
        busy = [p for p in children(app.process.pid) if _cpu_ticks(p) > 0]
        victim = max(busy, key=_cpu_ticks)
        os.kill(victim, signal.SIGKILL)
        thread.join(60)
    assert results and results[0].stdout == "200", results


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def test_tls_meets_mozilla_intermediate(stack: tuple[Server, Edge]) -> None:
    _, edge = stack
    sslyze = Path(sys.executable).with_name("sslyze")
    result = subprocess.run(
        [
            str(sslyze),
            "--mozilla_config=intermediate",
            f"--certinfo_ca_file={edge.ca}",
            f"appliance.test:{edge.https_port}{{127.0.0.1}}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert f"appliance.test:{edge.https_port}: OK - Compliant." in out, out[-4000:]
