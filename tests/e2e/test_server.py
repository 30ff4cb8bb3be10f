"""The real server started by the CLI: tritonclient, simple JSON, unix socket, metrics, logs."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import requests
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families

from app.metrics import FLUSH_INTERVAL_S
from tests.conftest import DEMO_MODELS, wait_until
from tests.e2e.conftest import Server, UnixHTTPConnection, children, run_server

RNG = np.random.default_rng(7)


def reference(model: str, version: int, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(DEMO_MODELS / model / str(version) / "model.onnx"))
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds), strict=True))


@pytest.fixture(scope="module")
def client(server: Server) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")


class TestTritonClient:
    def test_server_and_model_metadata(self, client: triton.InferenceServerClient) -> None:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("tabular")
        assert client.is_model_ready("tabular", "1")
        assert not client.is_model_ready("nope")
        meta = client.get_model_metadata("mlp")
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 256]}]
        assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
        index = client.get_model_repository_index()
        assert {(m["name"], m["version"]) for m in index} >= {("tabular", "1"), ("tabular", "2")}

    @pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
    @pytest.mark.parametrize("version", ["", "1"])
    def test_tabular(
        self, client: triton.InferenceServerClient, binary: bool, version: str
    ) -> None:
        x = RNG.normal(10, 5, (4, 30)).astype(np.float32)
        inp = triton.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        outputs = [
            triton.InferRequestedOutput(n, binary_data=binary) for n in ("label", "probabilities")
        ]
        result = client.infer(
            "tabular", [inp], model_version=version, outputs=outputs, request_id="tc-1"
        )
        expected = reference("tabular", int(version or 2), {"input": x})
        assert result.get_response()["model_version"] == (version or "2")
        assert result.get_response()["id"] == "tc-1"
        np.testing.assert_array_equal(result.as_numpy("label"), expected["label"])
        np.testing.assert_allclose(
            result.as_numpy("probabilities"), expected["probabilities"], rtol=1e-6
        )

    @pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
    def test_mlp_batch(self, client: triton.InferenceServerClient, binary: bool) -> None:
        x = RNG.normal(0, 1, (32, 256)).astype(np.float32)
        inp = triton.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        result = client.infer(
            "mlp", [inp], outputs=[triton.InferRequestedOutput("logits", binary_data=binary)]
        )
        np.testing.assert_allclose(
            result.as_numpy("logits"),
            reference("mlp", 1, {"input": x})["logits"],
            rtol=1e-5,
            atol=1e-6,
        )

    @pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
    def test_text_bytes(self, client: triton.InferenceServerClient, binary: bool) -> None:
        texts = np.array(
            [
                ["great product, works exactly as described"],
                ["awful product, it broke after one day"],
            ],
            dtype=object,
        )
        inp = triton.InferInput("text", [2, 1], "BYTES")
        inp.set_data_from_numpy(texts, binary_data=binary)
        result = client.infer(
            "sentiment",
            [inp],
            outputs=[
                triton.InferRequestedOutput("label", binary_data=binary),
                triton.InferRequestedOutput("probabilities", binary_data=binary),
            ],
        )
        labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label")]
        expected = reference("sentiment", 1, {"text": texts})
        assert labels == expected["label"].tolist() == ["positive", "negative"]
        np.testing.assert_allclose(
            result.as_numpy("probabilities"), expected["probabilities"], rtol=1e-6
        )

    def test_errors_reach_the_client(self, client: triton.InferenceServerClient) -> None:
        inp = triton.InferInput("input", [1, 29], "FP32")
        inp.set_data_from_numpy(np.zeros((1, 29), dtype=np.float32))
        with pytest.raises(triton.InferenceServerException, match="expects"):
            client.infer("tabular", [inp])


class TestSimpleJson:
    def test_predict(self, server: Server) -> None:
        rows = RNG.normal(10, 5, (3, 30)).astype(np.float32)
        resp = requests.post(
            f"{server.url}/v1/models/tabular/versions/1:predict",
            json={"instances": rows.tolist()},
            timeout=10,
        )
        assert resp.status_code == 200
        expected = reference("tabular", 1, {"input": rows})
        assert [p["label"] for p in resp.json()["predictions"]] == expected["label"].tolist()
        assert resp.headers["X-Model-Version"] == "1"

    def test_default_model_and_aliases(self, server: Server) -> None:
        resp = requests.post(f"{server.url}/predict", json={"instances": [[1.0] * 30]}, timeout=10)
        assert resp.json()["model_name"] == "tabular"
        assert requests.get(f"{server.url}/healthz", timeout=5).status_code == 200
        assert requests.get(f"{server.url}/readyz", timeout=5).status_code == 200
        status = requests.get(f"{server.url}/v1/models/tabular", timeout=5).json()
        assert len(status["model_version_status"]) == 2

    def test_request_id_round_trip(self, server: Server) -> None:
        resp = requests.get(f"{server.url}/v2", headers={"X-Request-ID": "e2e-rid-1"}, timeout=5)
        assert resp.headers["X-Request-ID"] == "e2e-rid-1"


class TestBadInputOnTheRealServer:
    @pytest.mark.parametrize(
        ("body", "headers", "status"),
        [
            (b"{not json", {"Content-Type": "application/json"}, 400),
            (b"[" * 100_000, {"Content-Type": "application/json"}, 400),
            (b'{"inputs": []}', {"Content-Type": "text/plain"}, 415),
            (b"x" * (9 * 1024 * 1024), {"Content-Type": "application/json"}, 413),
            (
                b'{"inputs":[{"name":"input","shape":[1000000000000,30],"datatype":"FP32",'
                b'"data":[1]}]}',
                {"Content-Type": "application/json"},
                413,
            ),
        ],
        ids=["malformed", "deep", "media_type", "too_large", "absurd_shape"],
    )
    def test_clear_error_and_still_serving(
        self, server: Server, body: bytes, headers: dict[str, str], status: int
    ) -> None:
        resp = requests.post(
            f"{server.url}/v2/models/tabular/infer", data=body, headers=headers, timeout=30
        )
        assert resp.status_code == status
        assert set(resp.json()) == {"error", "error_code", "request_id"}
        good = requests.post(
            f"{server.url}/v2/models/tabular/infer",
            json={
                "inputs": [
                    {"name": "input", "shape": [1, 30], "datatype": "FP32", "data": [1.0] * 30}
                ]
            },
            timeout=10,
        )
        assert good.status_code == 200

    def test_encoded_path_tricks(self, server: Server) -> None:
        for path in (
            "/v2/models/..%2F..%2Fetc%2Fpasswd/infer",
            "/v2/models/%2e%2e/infer",
            "/v2/models/tabular%2F..%2F..%2Fx/ready",
        ):
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
                sock.sendall(
                    f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                    "Connection: close\r\n\r\n{}".encode()
                )
                reply = b""
                while chunk := sock.recv(65536):
                    reply += chunk
            head, _, body = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 404"), reply
            assert b"passwd" not in body


def test_unix_socket(server: Server) -> None:
    conn = UnixHTTPConnection(server.socket_path)
    body = json.dumps(
        {"inputs": [{"name": "input", "shape": [1, 10], "datatype": "FP32", "data": [0.01] * 10}]}
    )
    conn.request(
        "POST",
        "/v2/models/regression/versions/1/infer",
        body=body,
        headers={"Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    assert resp.status == 200
    doc = json.loads(resp.read())
    expected = reference("regression", 1, {"input": np.full((1, 10), 0.01, np.float32)})
    np.testing.assert_allclose(
        doc["outputs"][0]["data"], expected["variable"].reshape(-1), rtol=1e-6
    )
    mode = Path(server.socket_path).stat().st_mode & 0o777
    assert mode == 0o660


def _scrape(server: Server) -> str:
    return requests.get(f"{server.url}/metrics", timeout=10).text


def test_metrics_sum_over_workers_and_pass_promtool(server: Server) -> None:
    time.sleep(FLUSH_INTERVAL_S + 0.1)  # earlier tests' requests are all written by now
    before = _model_requests(_scrape(server), "mlp")
    x = [0.1] * 256

    def predict(_: int) -> int:
        # A new connection per request, so both workers get some of them.
        return requests.post(
            f"{server.url}/v1/models/mlp:predict",
            json={"instances": [x]},
            headers={"Connection": "close"},
            timeout=10,
        ).status_code

    def serving_pids() -> Counter[int]:
        return Counter(
            line["pid"]
            for line in server.log_lines()
            if line.get("event") == "request" and line.get("model") == "mlp"
        )

    # Which worker accepts is the kernel's choice, and an idle gevent worker may win every
    # time: send in rounds (bounded) until the log shows both workers served.
    sent, deadline = 0, time.monotonic() + 30
    with ThreadPoolExecutor(4) as pool:
        while time.monotonic() < deadline and (sent < 60 or len(serving_pids()) < 2):
            assert set(pool.map(predict, range(20))) == {200}
            sent += 20
    texts: list[str] = []

    def all_counted() -> bool:
        texts.append(_scrape(server))
        return _model_requests(texts[-1], "mlp") - before == sent

    # The worker that does not answer the scrape writes its counts within FLUSH_INTERVAL_S.
    wait_until(all_counted, f"{sent} requests counted", timeout=FLUSH_INTERVAL_S + 2)
    text = texts[-1]
    assert len(serving_pids()) == 2, serving_pids()  # both workers served, the scrape sums them
    check = subprocess.run(
        ["promtool", "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip() == "" and check.stderr.strip() == ""
    families = {f.name for f in text_string_to_metric_families(text)}
    assert {
        "onnx_appliance_requests",
        "onnx_appliance_request_duration_seconds",
        "onnx_appliance_inference_duration_seconds",
        "onnx_appliance_requests_in_flight",
        "onnx_appliance_models_loaded",
    } <= families
    loaded = [
        s.value
        for f in text_string_to_metric_families(text)
        if f.name == "onnx_appliance_models_loaded"
        for s in f.samples
    ]
    assert loaded == [6.0]  # six model versions in the demo repository


def _model_requests(text: str, model: str) -> float:
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        if f.name == "onnx_appliance_requests"
        for s in f.samples
        if s.name.endswith("_total") and s.labels["model"] == model
    )


def test_logs_are_json_with_request_lines(server: Server) -> None:
    requests.get(f"{server.url}/v2/models/tabular", headers={"X-Request-ID": "log-e2e"}, timeout=5)
    time.sleep(0.2)
    lines = server.log_lines()  # every line parses as JSON, gunicorn's included
    assert any(
        line.get("logger") == "gunicorn.error" and "Booting worker" in line["event"]
        for line in lines
    )
    (line,) = [x for x in lines if x.get("request_id") == "log-e2e"]
    assert line["event"] == "request"
    assert line["route"] == "/v2/models/{model}"
    assert line["status"] == 200
    assert line["timestamp"].endswith("Z")
    assert any(x.get("event") == "auth_open" and x["level"] == "warning" for x in lines)
    listening = next(x for x in lines if x.get("event") == "listening")
    assert set(listening["models"]) == {"digits", "mlp", "regression", "sentiment", "tabular"}


def test_readiness_comes_after_warm_up(tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(DEMO_MODELS, models)
    # A long warm-up on the heavy model makes the loading window easy to see.
    (models / "mlp" / "model.toml").write_text("warmup_runs = 1500\n")
    with run_server(tmp_path, models=models) as srv:
        ready_at = srv.extra["ready_at"]
        lines = srv.log_lines()
    booted = {x["pid"]: x for x in lines if x.get("event") == "worker_ready"}
    assert booted, "no worker reported ready"
    first_ready = min(_ts(x["timestamp"]) for x in booted.values())
    assert first_ready <= ready_at
    for pid in booted:
        warmed = [x for x in lines if x.get("event") == "model_ready" and x["pid"] == pid]
        assert len(warmed) == 6
        assert max(_ts(x["timestamp"]) for x in warmed) <= _ts(booted[pid]["timestamp"])
    assert first_ready - srv.started > 0.05  # the warm-up really took time before readiness


def _ts(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def test_single_model_file_with_affinity_and_control_socket(tmp_path: Path) -> None:
    control = tmp_path / "gunicorn.ctl"
    model = DEMO_MODELS / "regression" / "1" / "model.onnx"
    with run_server(
        tmp_path,
        "--model",
        str(model),
        "--name",
        "diabetes",
        "--cpu-affinity",
        "--control-socket",
        str(control),
    ) as srv:
        resp = requests.post(f"{srv.url}/predict", json={"instances": [[0.0] * 10]}, timeout=10)
        assert resp.status_code == 200
        assert resp.json()["model_name"] == "diabetes"
        assert requests.get(f"{srv.url}/v2/models/tabular", timeout=5).status_code == 404
        deadline = time.monotonic() + 10  # gunicorn opens it once the workers are spawned
        while not control.is_socket() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert control.is_socket(), srv.log_path.read_text()
        pids = children(srv.process.pid)
        import os

        affinities = [os.sched_getaffinity(pid) for pid in pids]
        assert all(len(a) == 1 for a in affinities), affinities
        if (os.cpu_count() or 1) > 1:
            assert len({tuple(a) for a in affinities}) == 2
    assert srv.process.returncode == 0  # SIGTERM is a graceful, clean stop
