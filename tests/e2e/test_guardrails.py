"""Guardrails on real gunicorn: keys and shared rate limits, shedding, deadlines, reloads."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from app.metrics import FLUSH_INTERVAL_S
from tests import onnx_factory
from tests.conftest import DEMO_MODELS, wait_until
from tests.e2e.conftest import CLI, Server, add_key, run_server, wait_for_event

GOOD = {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": [0.5] * 30}]}


class Load:
    """Client threads sending requests until stopped (bounded by ``limit`` seconds)."""

    def __init__(
        self,
        send: Callable[[requests.Session], requests.Response],
        threads: int = 4,
        limit: float = 60,
    ) -> None:
        self.results: list[tuple[int, str]] = []
        self._send = send
        self._stop = threading.Event()
        self._limit = limit
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        session = requests.Session()
        end = time.monotonic() + self._limit
        while not self._stop.is_set() and time.monotonic() < end:
            try:
                resp = self._send(session)
                self.results.append((resp.status_code, resp.headers.get("X-Model-Version", "")))
            except requests.RequestException as exc:
                self.results.append((0, type(exc).__name__))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    @property
    def failed(self) -> list[tuple[int, str]]:
        return [r for r in self.results if r[0] != 200]


@pytest.mark.parametrize("workers", [2, 4])
def test_rate_limit_holds_for_the_whole_appliance(tmp_path: Path, workers: int) -> None:
    keys = tmp_path / "api-keys"
    rate = 20
    token = add_key(keys, "limited", "--rate", str(rate), "--burst", "5")
    config = f'[auth]\nkeys_file = "{keys}"\n'
    with run_server(tmp_path, config=config, workers=workers) as srv:
        statuses: Counter[int] = Counter()
        lock = threading.Lock()
        end = time.monotonic() + 10

        def hammer() -> None:
            session = requests.Session()
            while time.monotonic() < end:
                resp = session.post(
                    f"{srv.url}/v2/models/tabular/infer",
                    json=GOOD,
                    headers={"X-API-Key": token},
                    timeout=10,
                )
                with lock:
                    statuses[resp.status_code] += 1

        with ThreadPoolExecutor(8) as pool:
            for f in [pool.submit(hammer) for _ in range(8)]:
                f.result()
    assert set(statuses) == {200, 429}, statuses
    per_second = statuses[200] / 10
    assert rate * 0.8 <= per_second <= rate * 1.2, statuses


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("slow")
    models = tmp / "models"
    onnx_factory.save(onnx_factory.slow_loop(), models, "slow")
    # Its run time follows an input value, not the input size, so warm-up cannot tell that it
    # is slow: the operator says so (inline_run_us = 0: always in a helper thread).
    (models / "slow" / "model.toml").write_text(
        "max_concurrency = 1\nmax_queue = 1\ntimeout_ms = 20000\ninline_run_us = 0\n"
    )
    shutil.copytree(DEMO_MODELS / "tabular", models / "tabular")
    with run_server(tmp, models=models, workers=1) as srv:
        yield srv


def slow_request(
    url: str, steps: int, headers: dict[str, str] | None = None, **params: Any
) -> tuple[requests.Response, float]:
    body: dict[str, Any] = {
        "inputs": [
            {"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1.0]},
            {"name": "n", "shape": [], "datatype": "INT64", "data": [steps]},
        ]
    }
    if params:
        body["parameters"] = params
    start = time.monotonic()
    resp = requests.post(
        f"{url}/v2/models/slow/infer", json=body, headers=headers or {}, timeout=60
    )
    return resp, time.monotonic() - start


def test_queue_full_is_shed_at_once(slow_server: Server) -> None:
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(slow_request, slow_server.url, 3000) for _ in range(4)]
        results = [f.result() for f in futures]
    codes = Counter(r.status_code for r, _ in results)
    assert codes == {200: 2, 503: 2}, codes
    for resp, elapsed in results:
        if resp.status_code == 503:
            assert resp.json()["error_code"] == "OVERLOADED"
            assert resp.headers["Retry-After"] == "1"
            assert elapsed < 0.3, elapsed  # shed without waiting for the slow ones
    assert slow_request(slow_server.url, 1)[0].status_code == 200


def test_request_that_cannot_start_in_time_gets_504(slow_server: Server) -> None:
    with ThreadPoolExecutor(2) as pool:
        busy = pool.submit(slow_request, slow_server.url, 5000)
        time.sleep(0.1)
        resp, elapsed = slow_request(slow_server.url, 1, {"X-Request-Timeout-Ms": "150"})
        assert busy.result()[0].status_code == 200
    assert resp.status_code == 504
    assert resp.json()["error_code"] == "TIMEOUT"
    assert "could not start" in resp.json()["error"]
    assert 0.1 < elapsed < 0.6, elapsed


@pytest.mark.parametrize("how", ["header", "oip_parameter"])
def test_overrunning_inference_is_cancelled_and_the_worker_recovers(
    slow_server: Server, how: str
) -> None:
    if how == "header":
        resp, elapsed = slow_request(slow_server.url, 10_000_000, {"X-Request-Timeout-Ms": "300"})
    else:
        resp, elapsed = slow_request(slow_server.url, 10_000_000, timeout=300_000)
    assert resp.status_code == 504
    assert "overran" in resp.json()["error"]
    assert elapsed < 1.5, elapsed  # cancelled, not run for minutes
    after, elapsed = slow_request(slow_server.url, 2)
    assert after.status_code == 200 and elapsed < 0.5
    assert requests.get(f"{slow_server.url}/v2/health/ready", timeout=5).status_code == 200
    assert "WORKER TIMEOUT" not in slow_server.log_path.read_text()


def test_reloads_and_a_version_switch_lose_no_request(tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(DEMO_MODELS / "tabular", models / "tabular")
    (models / "tabular" / "model.toml").unlink()  # newest version is the default
    pidfile = tmp_path / "master.pid"
    with run_server(tmp_path, models=models, server_conf=f'pidfile = "{pidfile}"') as srv:

        def send(session: requests.Session) -> requests.Response:
            return session.post(f"{srv.url}/v2/models/tabular/infer", json=GOOD, timeout=30)

        with Load(send, threads=4) as load:
            time.sleep(1)
            srv.process.send_signal(signal.SIGHUP)
            wait_for_event(srv, "reload_complete", 1)
            time.sleep(0.5)
            subprocess.run(
                [CLI, "reload", "--pidfile", str(pidfile)],
                check=True,
                timeout=30,
                capture_output=True,
            )
            wait_for_event(srv, "reload_complete", 2)
            shutil.copytree(models / "tabular" / "1", models / "tabular" / "3")
            srv.process.send_signal(signal.SIGHUP)
            wait_for_event(srv, "reload_complete", 3)
            time.sleep(1)
        lines = srv.log_lines()
    assert len(load.results) > 200
    assert load.failed == [], Counter(load.failed)
    versions = [v for _, v in load.results]
    assert versions[0] == "2"
    assert versions[-20:] == ["3"] * 20  # the new version serves afterwards
    assert "WORKER TIMEOUT" not in json.dumps(lines)
    generations = {x["generation"] for x in lines if x.get("event") == "worker_ready"}
    assert generations == {0, 1, 2, 3}


def test_invalid_repository_on_reload_keeps_the_old_one(tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(DEMO_MODELS / "tabular", models / "tabular")
    with run_server(tmp_path, models=models) as srv:

        def send(session: requests.Session) -> requests.Response:
            return session.post(f"{srv.url}/v2/models/tabular/infer", json=GOOD, timeout=30)

        with Load(send, threads=2) as load:
            (models / "tabular" / "model.toml").write_text("default_version = 9\n")
            srv.process.send_signal(signal.SIGHUP)
            wait_for_event(srv, "reload_refused")
            # A model that validates but cannot be loaded by onnxruntime: new workers fail.
            (models / "tabular" / "model.toml").unlink()
            (models / "broken" / "1").mkdir(parents=True)
            onnx_factory.save(onnx_factory.zipmap_classifier(), models, "broken")
            srv.process.send_signal(signal.SIGHUP)
            wait_for_event(srv, "reload_refused", 2)
            time.sleep(0.5)
        refused = [x for x in srv.log_lines() if x.get("event") == "reload_refused"]
        assert "default_version 9" in refused[0]["error"]
        assert "new worker" in refused[1]["error"]
        assert requests.get(f"{srv.url}/v2/models/broken", timeout=5).status_code == 404
        assert srv.process.poll() is None
    assert load.failed == []
    assert {v for _, v in load.results} == {"2"}


def test_revoked_key_stops_working_after_reload(tmp_path: Path) -> None:
    keys = tmp_path / "api-keys"
    token = add_key(keys, "temp")
    keep = add_key(keys, "keep")
    with run_server(tmp_path, config=f'[auth]\nkeys_file = "{keys}"\n') as srv:

        def infer(key: str) -> int:
            return requests.post(
                f"{srv.url}/v2/models/tabular/infer",
                json=GOOD,
                headers={"Authorization": f"Bearer {key}"},
                timeout=10,
            ).status_code

        assert infer(token) == 200
        assert (
            requests.post(f"{srv.url}/v2/models/tabular/infer", json=GOOD, timeout=10).status_code
            == 401
        )
        subprocess.run(
            [CLI, "keys", "--file", str(keys), "revoke", "temp"],
            check=True,
            timeout=30,
            capture_output=True,
        )
        srv.process.send_signal(signal.SIGHUP)
        wait_for_event(srv, "reload_complete")
        time.sleep(0.3)
        assert infer(token) == 401
        assert infer(keep) == 200
        listed = subprocess.run(
            [CLI, "keys", "--file", str(keys), "list"],
            check=True,
            timeout=30,
            capture_output=True,
            text=True,
        ).stdout
        assert "keep" in listed and "temp" not in listed and keep not in listed
        assert not any(x.get("event") == "auth_open" for x in srv.log_lines())
        assert token not in srv.log_path.read_text() and keep not in srv.log_path.read_text()


def test_worker_recycling_loses_nothing_and_metrics_stay_bounded(tmp_path: Path) -> None:
    with run_server(tmp_path, server_conf="max_requests = 40\nmax_requests_jitter = 10") as srv:

        def send(session: requests.Session) -> requests.Response:
            return session.post(
                f"{srv.url}/v1/models/regression:predict",
                json={"instances": [[0.1] * 10]},
                timeout=30,
            )

        with Load(send, threads=4, limit=8) as load:
            time.sleep(8)
        served: list[float] = []

        def all_counted() -> bool:
            text = requests.get(f"{srv.url}/metrics", timeout=10).text
            served.append(
                sum(
                    s.value
                    for f in text_string_to_metric_families(text)
                    if f.name == "onnx_appliance_requests"
                    for s in f.samples
                    if s.name.endswith("_total") and s.labels["model"] == "regression"
                )
            )
            return served[-1] >= len(load.results)

        # A live worker that does not answer the scrape writes its counts within
        # FLUSH_INTERVAL_S; recycled ones wrote theirs as they exited.
        wait_until(all_counted, "every request counted", timeout=FLUSH_INTERVAL_S + 2)
        files = sorted(p.name for p in srv.metrics_dir.glob("*.db"))
        log = srv.log_path.read_text()
    assert len(load.results) > 200
    assert load.failed == [], Counter(load.failed)
    assert log.count("worker_ready") >= 6, "workers were not recycled"
    assert "WORKER TIMEOUT" not in log
    assert served[-1] == len(load.results)  # recycled workers' counts were kept, not lost
    # Per live worker a counter, a histogram and two live-gauge files, plus one archive per
    # type: it does not grow with the number of recycled workers.
    assert len(files) <= 2 * 4 + 2, files
