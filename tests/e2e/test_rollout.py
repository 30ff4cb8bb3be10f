"""``onnx-appliance rollout`` against a real server under load: a good candidate reaches 100 %
with no failed request, a slower one and a wrong one are rolled back at the first step, and a
controller killed mid-rollout resumes without applying a step twice or skipping one."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests import onnx_factory
from tests.conftest import wait_until
from tests.e2e.conftest import CLI, Clients, Server, json_lines, run_server, scrape

ROWS = [[1.0, 0.0], [0.0, 1.0], [3.0, 1.0]]
STEPS = "10,50,100"
#: Judge fast: a two-second window, and ten candidate requests are evidence enough.
FAST = ("--interval-s", "2", "--min-requests", "10", "--max-holds", "5")


def _models(root: Path) -> Path:
    for name, candidate, table in (
        ("good", onnx_factory.classifier(), ""),
        # The same answers, about 0.15 ms x 300 steps slower per request.
        ("slow", onnx_factory.classifier(slow_steps=300), ""),
        # Swapped labels, seen by the shadow comparisons before it serves anyone.
        ("wrong", onnx_factory.classifier(swap=True), "[shadow]\nversion = 2\npercent = 100\n"),
        ("resumed", onnx_factory.classifier(), ""),
    ):
        onnx_factory.save(onnx_factory.classifier(), root, name, 1)
        onnx_factory.save(candidate, root, name, 2)
        (root / name / "model.toml").write_text(f"default_version = 1\n{table}")
    return root


@pytest.fixture(scope="module")
def rollout_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("rollout")
    with run_server(
        tmp,
        models=_models(tmp / "models"),
        server_conf=f'pidfile = "{tmp / "server.pid"}"',
        models_conf=f'rollouts_dir = "{tmp / "rollouts"}"',
    ) as server:
        server.extra["config"] = tmp / "appliance.toml"
        server.extra["rollouts"] = tmp / "rollouts"
        yield server


class Load(Clients):
    """Three clients posting to one model until stopped (at most ``limit`` seconds)."""

    def __init__(self, server: Server, model: str, limit: float = 180) -> None:
        super().__init__(3, limit)
        self.statuses: Counter[int] = Counter()
        self.versions: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._url = f"{server.url}/v2/models/{model}/infer"

    def send(self, index: int) -> None:
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [3, 2], "data": ROWS}]}
        session = requests.Session()
        while self.running():
            try:
                response = session.post(self._url, json=body, timeout=30)
                status, version = response.status_code, response.headers.get("X-Model-Version")
            except requests.RequestException:
                status, version = 0, None
            with self._lock:
                self.statuses[status] += 1
                self.versions[version or "-"] += 1


def _rollout(server: Server, model: str, *extra: str, timeout: float = 150) -> tuple[int, str]:
    result = subprocess.run(
        [CLI, "rollout", model, "--to", "2", "--config", str(server.extra["config"]),
         "--steps", STEPS, *FAST, *extra],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    return result.returncode, result.stderr


def _state(server: Server, model: str) -> dict[str, Any]:
    path: Path = server.extra["rollouts"] / f"{model}.json"
    state: dict[str, Any] = json.loads(path.read_text())
    return state


def _events(stderr: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    return [line for line in lines if str(line.get("event", "")).startswith("rollout_")]


def test_a_good_candidate_reaches_all_traffic_without_a_failed_request(
    rollout_server: Server,
) -> None:
    with Load(rollout_server, "good") as load:
        code, stderr = _rollout(rollout_server, "good")
        time.sleep(1)  # requests on the final traffic too
    assert code == 0, stderr
    assert set(load.statuses) == {200}, load.statuses
    assert load.versions["1"] > 0 and load.versions["2"] > 0
    state = _state(rollout_server, "good")
    assert state["status"] == "complete" and state["traffic"] == {"1": 0, "2": 100}
    assert [d["percent"] for d in state["decisions"] if d["verdict"] != "hold"] == [10, 50, 100]
    assert [d["verdict"] for d in state["decisions"] if d["verdict"] != "hold"] == [
        "advance", "advance", "complete",
    ]  # fmt: skip
    events = _events(stderr)
    assert [e["percent"] for e in events if e["event"] == "rollout_step_applied"] == [10, 50, 100]
    assert scrape(rollout_server, "onnx_appliance_traffic_share_percent", model="good") == {
        ("version=1",): 0.0,
        ("version=2",): 100.0,
    }
    # The gauge is the live workers': those of the last "running" step report it until they
    # have exited, which may take longer than the second above on a loaded machine.
    complete = {("candidate=2", "primary=1", "status=complete"): 100.0}

    def only_complete() -> bool:
        found = scrape(rollout_server, "onnx_appliance_rollout_percent", model="good")
        time.sleep(0.05)
        return found == complete

    wait_until(only_complete, "the rollout's last workers to exit", timeout=30)


def test_a_slower_candidate_is_rolled_back_at_the_first_step(rollout_server: Server) -> None:
    with Load(rollout_server, "slow") as load:
        code, stderr = _rollout(rollout_server, "slow")
        time.sleep(1)
    assert code == 1, stderr
    assert set(load.statuses) == {200}, load.statuses
    state = _state(rollout_server, "slow")
    assert state["status"] == "rolled_back" and state["traffic"] == {"1": 100, "2": 0}
    judged = [d for d in state["decisions"] if d["verdict"] != "hold"]
    assert [(d["percent"], d["verdict"]) for d in judged] == [(10, "rollback")]
    assert "p99" in judged[0]["reason"]
    assert judged[0]["evidence"]["candidate_p99_ms"] > judged[0]["evidence"]["primary_p99_ms"]
    assert scrape(rollout_server, "onnx_appliance_traffic_share_percent", model="slow") == {
        ("version=1",): 100.0,
        ("version=2",): 0.0,
    }
    # After the rollback every request goes to the primary again.
    before = load.versions["2"]
    with Load(rollout_server, "slow") as after:
        time.sleep(1)
    assert after.versions["2"] == 0 and after.versions["1"] > 0, (before, after.versions)


def test_a_wrong_candidate_is_rolled_back_on_shadow_agreement(rollout_server: Server) -> None:
    with Load(rollout_server, "wrong") as load:
        code, stderr = _rollout(rollout_server, "wrong")
    assert code == 1, stderr
    assert set(load.statuses) == {200}, load.statuses
    state = _state(rollout_server, "wrong")
    judged = [d for d in state["decisions"] if d["verdict"] != "hold"]
    assert [(d["percent"], d["verdict"]) for d in judged] == [(10, "rollback")]
    assert "shadow agreement" in judged[0]["reason"]
    assert judged[0]["evidence"]["shadow_agreement"] < 0.5


def test_a_killed_controller_resumes_without_repeating_or_skipping_a_step(
    rollout_server: Server,
) -> None:
    config = str(rollout_server.extra["config"])
    command = [CLI, "rollout", "resumed", "--to", "2", "--config", config, "--steps", STEPS,
               "--interval-s", "4", "--min-requests", "10"]  # fmt: skip
    log_path = rollout_server.log_path.parent / "controller.log"
    with Load(rollout_server, "resumed") as load:
        with log_path.open("w") as log:
            first = subprocess.Popen(command, stderr=log)

        def applied() -> list[int]:
            return [
                e["percent"]
                for e in json_lines(log_path)
                if e.get("event") == "rollout_step_applied"
            ]

        try:
            wait_until(lambda: applied() == [10, 50], "the second step applied", timeout=60)
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(10)
        second = subprocess.run(command, capture_output=True, text=True, timeout=150, check=False)
    assert second.returncode == 0, second.stderr
    assert set(load.statuses) == {200}, load.statuses
    events = _events(second.stderr)
    assert events[0]["event"] == "rollout_resumed" and events[0]["step"] == 1
    # The resumed controller judged 50 % (already applied) and applied only 100 %.
    assert [e["percent"] for e in events if e["event"] == "rollout_step_applied"] == [100]
    state = _state(rollout_server, "resumed")
    judged = [d for d in state["decisions"] if d["verdict"] != "hold"]
    assert [(d["percent"], d["verdict"]) for d in judged] == [
        (10, "advance"), (50, "advance"), (100, "complete"),
    ]  # fmt: skip
