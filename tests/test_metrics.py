"""Request and inference metrics recorded by the middleware and the serving layer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from falcon.testing import TestClient
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from app import __version__
from app.metrics import Metrics, observe_all
from app.wsgi import build_repository, create_app
from tests.conftest import DEMO_MODELS, ROOT, make_settings

GOOD = {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": [0.5] * 30}]}


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_requests_and_inferences_are_counted() -> None:
    settings = make_settings(DEMO_MODELS)
    metrics = Metrics()
    repository = build_repository(settings, metrics)
    repository.load()
    client = TestClient(create_app(settings, repository, metrics))
    for _ in range(3):
        client.simulate_post("/v2/models/tabular/versions/1/infer", json=GOOD)
    client.simulate_post("/v2/models/tabular/infer", json={"inputs": []})
    client.simulate_post("/v2/models/nope/infer", json=GOOD)
    got = samples(client.simulate_get("/metrics").text)

    def count(route: str, status: str, model: str, version: str) -> float:
        return got[
            (
                "onnx_appliance_requests_total",
                frozenset(
                    {
                        ("route", route),
                        ("method", "POST"),
                        ("status", status),
                        ("model", model),
                        ("version", version),
                        ("key", ""),
                    }
                ),
            )
        ]

    infer = "/v2/models/{model}/versions/{version}/infer"
    assert count(infer, "200", "tabular", "1") == 3
    assert count("/v2/models/{model}/infer", "400", "tabular", "2") == 1
    assert count("/v2/models/{model}/infer", "404", "", "") == 1  # unknown names: no label
    assert (
        got[
            (
                "onnx_appliance_inference_duration_seconds_count",
                frozenset({("model", "tabular"), ("version", "1")}),
            )
        ]
        == 3
    )
    assert got[("onnx_appliance_requests_in_flight", frozenset())] == 1  # the scrape itself
    assert got[("onnx_appliance_build_info", frozenset({("version", __version__)}))] == 1


def test_metrics_route_can_be_switched_off() -> None:
    settings = make_settings(DEMO_MODELS, metrics={"enabled": False})
    client = TestClient(create_app(settings, build_repository(settings)))
    assert client.simulate_get("/metrics").status_code == 404


def test_cache_hits_and_misses_are_counted(tmp_path: Path) -> None:
    shutil.copytree(DEMO_MODELS / "tabular", tmp_path / "tabular")
    (tmp_path / "tabular" / "model.toml").write_text("default_version = 2\n[cache]\n")
    settings = make_settings(tmp_path)
    metrics = Metrics()
    repository = build_repository(settings, metrics)
    repository.load()
    client = TestClient(create_app(settings, repository, metrics))
    answers = [client.simulate_post("/v2/models/tabular/infer", json=GOOD) for _ in range(3)]
    assert [a.status_code for a in answers] == [200] * 3
    assert answers[0].json["outputs"] == answers[2].json["outputs"]
    got = samples(client.simulate_get("/metrics").text)

    def lookups(result: str) -> float:
        labels = frozenset({("model", "tabular"), ("version", "2"), ("result", result)})
        return got[("onnx_appliance_cache_lookups_total", labels)]

    assert (lookups("miss"), lookups("hit")) == (1, 2)
    runs = ("onnx_appliance_inference_duration_seconds_count", frozenset(
        {("model", "tabular"), ("version", "2")}
    ))  # fmt: skip
    assert got[runs] == 1


def test_observe_all_matches_one_observe_per_value() -> None:
    bounds = (0.001, 0.01, 0.1, 1.0)
    values = [0.0, 0.0005, 0.001, 0.001, 0.0011, 0.05, 0.1, 0.7, 1.0, 3.0, 250.0]
    one, batch = CollectorRegistry(), CollectorRegistry()
    by_one = Histogram("h", "help", buckets=bounds, registry=one)
    by_batch = Histogram("h", "help", buckets=bounds, registry=batch)
    for value in values:
        by_one.observe(value)
    observe_all(by_batch, values)
    expected, got = samples(generate_latest(one).decode()), samples(generate_latest(batch).decode())
    total = ("h_sum", frozenset())
    for created in (expected, got):
        del created[("h_created", frozenset())]
    # Bucket counts and the count are exact; the sum may differ in the order of additions.
    assert abs(got.pop(total) - expected.pop(total)) <= len(values) * 2**-52 * sum(values)
    assert got == expected
    assert expected[("h_bucket", frozenset({("le", "0.001")}))] == 4  # bounds are inclusive


def test_request_updates_are_written_when_the_registry_is_read() -> None:
    metrics = Metrics()
    value = metrics.registry.get_sample_value
    for _ in range(3):
        metrics.request_started()
    metrics.inference("m", "1", 0.002)
    metrics.request("/r", "POST", 200, "m", "1", "", 0.004)
    metrics.request("/r", "POST", 429, "m", "1", "k", 0.001, "RATE_LIMITED")
    labels = {"route": "/r", "method": "POST", "model": "m", "version": "1"}
    assert value("onnx_appliance_requests_total", {**labels, "status": "200", "key": ""}) == 1
    assert value("onnx_appliance_requests_total", {**labels, "status": "429", "key": "k"}) == 1
    errors = {"route": "/r", "model": "m", "version": "1", "code": "RATE_LIMITED"}
    assert value("onnx_appliance_errors_total", errors) == 1
    durations = {"route": "/r", "model": "m", "version": "1"}
    assert value("onnx_appliance_request_duration_seconds_count", durations) == 2
    assert value("onnx_appliance_request_duration_seconds_sum", durations) == 0.005
    runs = {"model": "m", "version": "1"}
    assert value("onnx_appliance_inference_duration_seconds_count", runs) == 1
    assert value("onnx_appliance_requests_in_flight") == 1  # three started, two answered
    metrics.request("/r", "POST", 200, "m", "1", "", 0.004)
    assert value("onnx_appliance_requests_in_flight") == 0


_SHARED_FILES = """
import json, os, sys, threading, time
os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
from prometheus_client import CollectorRegistry, multiprocess
from app.metrics import FLUSH_AT, FLUSH_INTERVAL_S, Metrics

def in_files(name):
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry.get_sample_value(name, LABELS) or 0.0

LABELS = {"route": "/r", "method": "POST", "status": "200", "model": "m", "version": "1",
          "key": ""}
REQUESTS = "onnx_appliance_requests_total"
metrics = Metrics()
metrics.request_started()
metrics.request("/r", "POST", 200, "m", "1", "", 0.001)
queued = in_files(REQUESTS)
start = time.monotonic()
while in_files(REQUESTS) < 1 and time.monotonic() - start < 5:
    time.sleep(0.01)
written_after = time.monotonic() - start

def answer(n):
    for _ in range(n):
        metrics.request_started()
        metrics.request("/r", "POST", 200, "m", "1", "", 0.001)

threads = [threading.Thread(target=answer, args=(FLUSH_AT,)) for _ in range(3)]
for t in threads:
    t.start()
for t in threads:
    t.join()
metrics.flush()
concurrent = in_files(REQUESTS)
registry = CollectorRegistry()
multiprocess.MultiProcessCollector(registry)
in_flight = registry.get_sample_value("onnx_appliance_requests_in_flight", {})
pid = os.fork()
if pid == 0:  # a child's updates are its own; the parent's queue is not written twice
    answer(2)
    metrics.flush()
    os._exit(0)
os.waitpid(pid, 0)
metrics.flush()
print(json.dumps({"queued": queued, "written_after": written_after, "concurrent": concurrent,
                  "in_flight": in_flight, "after_fork": in_files(REQUESTS),
                  "interval": FLUSH_INTERVAL_S, "per_thread": FLUSH_AT}))
"""


def test_a_workers_updates_reach_the_shared_files_within_the_interval(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-c", _SHARED_FILES, str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    assert got["queued"] == 0  # not written by the request itself
    assert got["written_after"] <= got["interval"] + 0.5  # but by the writer thread
    # Three threads queueing while the writer and inline writes drain: none lost.
    assert got["concurrent"] == 1 + 3 * got["per_thread"]
    assert got["in_flight"] == 0
    assert got["after_fork"] == got["concurrent"] + 2
