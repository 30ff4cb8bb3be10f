"""The monitoring pack against a live appliance and a real Prometheus.

Every metric the dashboard and the rules name must be one the app really exports (read from
a live scrape after traffic that exercises them), and a real Prometheus scraping the app
loads the rules healthy and answers every dashboard query.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from app.files import write_atomically
from app.metrics import FLUSH_INTERVAL_S
from app.models.drift import DriftReference, FeatureReference
from app.models.rollout import Thresholds, state_path, write_state
from app.rollout import new_state
from tests.conftest import DEMO_MODELS, wait_until
from tests.e2e.conftest import Server, add_key, free_port, run_server
from tests.packaging.monitoring.queries import (
    PROMETHEUS_OWN,
    RULES,
    dashboard_queries,
    metric_names,
    recorded,
    rule_expressions,
)

ROW = [0.5] * 30


def _post(server: Server, path: str, body: dict[str, Any], key: str) -> int:
    request = urllib.request.Request(
        server.url + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "X-API-Key": key},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def _scrape(server: Server) -> str:
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
        return str(response.read().decode())


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The demo models, the MLP micro-batching, API keys; traffic that fills every family."""
    tmp = tmp_path_factory.mktemp("monitoring")
    models = tmp / "models"
    shutil.copytree(DEMO_MODELS, models)
    (models / "mlp" / "model.toml").write_text("[batching]\nmax_batch_size = 8\n")
    # Shadow replays of tabular on its version 1, and a rolled-back rollout keeping it on 2.
    table = models / "tabular" / "model.toml"
    table.write_text(table.read_text() + "\n[shadow]\nversion = 1\npercent = 100\n[drift]\n")
    reference = DriftReference(
        model="tabular", captured_at=0, seconds=60,
        inputs={"input": {"0": FeatureReference(10.0, 1.0, 100)}},
    )  # fmt: skip
    write_atomically(tmp / "drift" / "tabular.json", msgspec.json.encode(reference))
    rollout = new_state("tabular", 2, 1, [100], Thresholds())
    rollout.status, rollout.traffic = "rolled_back", {"2": 100, "1": 0}
    write_state(state_path(tmp / "rollouts", "tabular"), rollout)
    keys = tmp / "api-keys"
    key = add_key(keys, "ci")
    slow = add_key(keys, "slow", "--rate", "0.001", "--burst", "1")
    with run_server(
        tmp,
        models=models,
        config=f'[auth]\nkeys_file = "{keys}"\n',
        models_conf=f'rollouts_dir = "{tmp / "rollouts"}"\ndrift_dir = "{tmp / "drift"}"',
    ) as server:
        statuses = [
            _post(server, "/v1/models/tabular:predict", {"instances": [ROW]}, key),
            _post(server, "/v1/models/mlp:predict", {"instances": [[0.1] * 256]}, key),
            _post(server, "/v1/models/nope:predict", {"instances": [ROW]}, key),
            _post(server, "/v1/models/tabular:predict", {"instances": [ROW]}, slow),
            _post(server, "/v1/models/tabular:predict", {"instances": [ROW]}, slow),
        ]
        assert statuses == [200, 200, 404, 200, 429], statuses
        wait_until(
            lambda: "onnx_appliance_shadow_labels_total{" in _scrape_text(server),
            "the shadow replays compared",
        )
        # Drift scores are set at a worker's next flush, a second after its statistics began.
        time.sleep(1.1)
        _post(server, "/v1/models/tabular:predict", {"instances": [ROW]}, key)
        wait_until(lambda: "onnx_appliance_input_drift{" in _scrape_text(server), "a drift score")
        server.extra["key"] = key
        yield server


def _scrape_text(server: Server) -> str:
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as response:
        return str(response.read().decode())


def test_every_metric_the_pack_names_is_exported(served: Server) -> None:
    exported = {
        sample.name
        for family in text_string_to_metric_families(_scrape(served))
        for sample in family.samples
    }
    wanted = set().union(*(metric_names(q) for q in dashboard_queries() + rule_expressions()))
    missing = wanted - exported - recorded() - PROMETHEUS_OWN
    assert not missing, f"named by the dashboard or the rules, not exported: {sorted(missing)}"
    # The check can fail: the names it compares are really there.
    assert {"onnx_appliance_errors_total", "onnx_appliance_batch_size_bucket"} <= exported


def _samples(server: Server) -> list[Sample]:
    return [s for family in text_string_to_metric_families(_scrape(server)) for s in family.samples]


def test_error_codes_and_worker_starts_are_counted_in_a_live_scrape(served: Server) -> None:
    def starts() -> float:
        (value,) = [
            s.value for s in _samples(served) if s.name == "onnx_appliance_worker_starts_total"
        ]
        return float(value)

    # Readiness answers once one worker is up; the other may still be warming up.
    wait_until(lambda: starts() >= 2, "both workers started")
    assert starts() == 2.0  # two workers, each counted once

    def errors() -> dict[tuple[str, str], float]:
        return {
            (s.labels["code"], s.labels["route"]): s.value
            for s in _samples(served)
            if s.name == "onnx_appliance_errors_total"
        }

    not_found = ("MODEL_NOT_FOUND", "/v1/models/{model}:predict")
    # Either worker may have answered; the other writes its counts within FLUSH_INTERVAL_S.
    wait_until(lambda: not_found in errors(), "the 404 counted", timeout=FLUSH_INTERVAL_S + 2)
    assert errors()[not_found] == 1.0
    assert errors()[("RATE_LIMITED", "unmatched")] >= 1.0


def _prometheus_query(port: int, query: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=10) as response:
        return dict(json.loads(response.read()))


@pytest.fixture(scope="module")
def prometheus(served: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A real Prometheus scraping the app every second, with the pack's rules loaded."""
    tmp = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "onnx-appliance",
                "static_configs": [{"targets": [f"127.0.0.1:{served.port}"]}],
            }
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def scraped_thrice() -> bool:
            try:
                result = _prometheus_query(port, 'count_over_time(up{job="onnx-appliance"}[1m])')
            except OSError:
                return False
            values = result["data"]["result"]
            return bool(values) and float(values[0]["value"][1]) >= 3

        wait_until(scraped_thrice, "three scrapes by Prometheus", timeout=60)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def test_prometheus_loads_the_rules_healthy(prometheus: int) -> None:
    url = f"http://127.0.0.1:{prometheus}/api/v1/rules"

    def evaluated() -> bool:
        with urllib.request.urlopen(url, timeout=10) as response:
            groups = json.loads(response.read())["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return len(rules) > 0 and all(
            r.get("lastEvaluation", "0001").startswith("2") for r in rules
        )

    wait_until(evaluated, "every rule evaluated once", timeout=30)
    with urllib.request.urlopen(url, timeout=10) as response:
        groups = json.loads(response.read())["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == len(rule_expressions())
    assert all(r["health"] == "ok" for r in rules), [r for r in rules if r["health"] != "ok"]
    firing = [r["name"] for r in rules if r.get("state") == "firing"]
    assert not firing  # a healthy appliance raises no alert


def test_prometheus_answers_every_dashboard_query(prometheus: int, served: Server) -> None:
    answered: dict[str, list[Any]] = {}
    for panel_query in dashboard_queries():
        query = panel_query
        if query.startswith("label_values("):  # Grafana's own function: its series query
            query = query[len("label_values(") : query.rindex(",")]
        result = _prometheus_query(prometheus, query)
        assert result["status"] == "success", (query, result)
        answered[query] = result["data"]["result"]
    with_data = [q for q, r in answered.items() if r]
    # Every panel that the traffic above feeds shows data (a timeout or shed panel may not).
    for name in ("requests_total", "request_duration_seconds_bucket", "batch_size_bucket",
                 "worker_starts_total", "models_loaded", "build_info"):  # fmt: skip
        assert any(f"onnx_appliance_{name}" in q for q in with_data), name
