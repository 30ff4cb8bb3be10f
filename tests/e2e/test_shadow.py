"""Shadow traffic on a real server: answers never wait for the candidate, a failing or wrong
candidate never reaches a client, the agreement is in one scrape, and shadows spend nothing of
a key's rate limit. Over HTTP (OIP and the simple JSON route) and gRPC, gthread and gevent."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as tg

from tests import onnx_factory
from tests.conftest import wait_until
from tests.e2e.conftest import Server, add_key, free_port, run_server, scrape

ROWS = [[1.0, 0.0], [0.0, 1.0], [3.0, 1.0]]
LABELS = [0, 1, 0]
#: Candidate run time: about 0.15 ms a step on one thread, far more than the primary's.
SLOW_STEPS = 3000


def _models(root: Path) -> Path:
    """clf: a slow candidate with the same answers; wrong: swapped labels; broken: a candidate
    that cannot take the primary's input."""
    for name, candidate in (
        ("clf", onnx_factory.classifier(slow_steps=SLOW_STEPS)),
        ("wrong", onnx_factory.classifier(swap=True)),
        ("broken", onnx_factory.features_to_result()),
    ):
        onnx_factory.save(onnx_factory.classifier(), root, name, 1)
        onnx_factory.save(candidate, root, name, 2)
        (root / name / "model.toml").write_text(
            "default_version = 1\n[shadow]\nversion = 2\npercent = 100\nmax_queue = 2\n"
        )
    return root


@pytest.fixture(scope="module", params=["gthread", "gevent"])
def shadow_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp(f"shadow-{request.param}")
    keys = tmp / "api-keys"
    key = add_key(keys, "ci", "--rate", "1000000", "--burst", "1000000")
    limited = add_key(keys, "limited", "--rate", "0.01", "--burst", "4")
    port = free_port()
    conf = f'worker_class = "{request.param}"\ngrpc_bind = "127.0.0.1:{port}"'
    with run_server(
        tmp,
        models=_models(tmp / "models"),
        workers=1,
        server_conf=conf,
        config=f'[auth]\nkeys_file = "{keys}"\n',
    ) as server:
        server.extra.update(grpc=f"127.0.0.1:{port}", key=key, limited=limited)
        yield server


def _infer(server: Server, model: str, key: str = "") -> requests.Response:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [3, 2], "data": ROWS}]}
    return requests.post(
        f"{server.url}/v2/models/{model}/infer",
        json=body,
        headers={"X-API-Key": key or server.extra["key"]},
        timeout=30,
    )


def _labels(response: requests.Response) -> list[int]:
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert response.json()["model_version"] == "1"
    return list(outputs["label"]["data"])


def _value(server: Server, name: str, **labels: str) -> float:
    """The sample with exactly these labels (0 before it exists)."""
    return scrape(server, name, **labels).get((), 0.0)


def _outcome(server: Server, model: str, outcome: str) -> float:
    return _value(
        server, "onnx_appliance_shadow_requests_total",
        model=model, version="1", candidate="2", outcome=outcome,
    )  # fmt: skip


def _handled(server: Server, model: str) -> float:
    """Shadow jobs of ``model`` that ran or were dropped (a busy worker drops them: requests
    in a row can leave its loop no idle moment)."""
    return sum(_outcome(server, model, o) for o in ("compared", "dropped", "failed"))


def test_answers_never_wait_for_a_slow_candidate(shadow_server: Server) -> None:
    latencies = []
    for _ in range(12):
        start = time.perf_counter()
        assert _labels(_infer(shadow_server, "clf")) == LABELS
        latencies.append(time.perf_counter() - start)
    wait_until(
        lambda: (
            _outcome(shadow_server, "clf", "compared") + _outcome(shadow_server, "clf", "dropped")
            >= 12
        ),
        "every shadow job compared or dropped",
        timeout=60,
    )
    runs = _value(shadow_server, "onnx_appliance_shadow_duration_seconds_count", model="clf",
                  candidate="2")  # fmt: skip
    mean_run = _value(shadow_server, "onnx_appliance_shadow_duration_seconds_sum", model="clf",
                      candidate="2") / runs  # fmt: skip
    # Twelve answers in a row while the candidate takes far longer for each: had any answer
    # waited for its shadow, it would have taken at least one candidate run.
    assert max(latencies) < mean_run, (latencies, mean_run)
    # The queue holds two; the rest were dropped, not queued without bound.
    assert _outcome(shadow_server, "clf", "dropped") >= 1
    same = {"model": "clf", "version": "1", "candidate": "2", "output": "label"}
    labels = "onnx_appliance_shadow_labels_total"
    assert _value(shadow_server, labels, **same, result="same") >= 3
    assert _value(shadow_server, labels, **same, result="different") == 0


def test_a_wrong_candidate_shows_in_the_agreement_only(shadow_server: Server) -> None:
    before = _handled(shadow_server, "wrong")
    for _ in range(3):
        assert _labels(_infer(shadow_server, "wrong")) == LABELS
    wait_until(lambda: _handled(shadow_server, "wrong") == before + 3, "three shadow jobs")
    label = {"model": "wrong", "version": "1", "candidate": "2", "output": "label"}
    compared = _outcome(shadow_server, "wrong", "compared")
    assert compared >= 1
    # Every row of every comparison disagrees (the labels are swapped).
    labels = "onnx_appliance_shadow_labels_total"
    assert _value(shadow_server, labels, **label, result="different") == 3 * compared
    assert _value(shadow_server, labels, **label, result="same") == 0


def test_a_failing_candidate_never_fails_a_client(shadow_server: Server) -> None:
    for _ in range(5):
        assert _labels(_infer(shadow_server, "broken")) == LABELS
    wait_until(lambda: _handled(shadow_server, "broken") >= 5, "five shadow jobs")
    assert _outcome(shadow_server, "broken", "failed") >= 1
    failures = [e for e in shadow_server.log_lines() if e.get("event") == "shadow_failed"]
    assert failures and all(e["model"] == "broken" for e in failures)
    assert not [e for e in shadow_server.log_lines() if e.get("level") == "error"]


def test_shadows_spend_nothing_of_a_key_rate_limit(shadow_server: Server) -> None:
    limited = shadow_server.extra["limited"]
    statuses = [_infer(shadow_server, "wrong", limited).status_code for _ in range(5)]
    # A burst of four, refilled at 0.01/s: four answers; a shadow counted would cut it to two.
    assert statuses == [200, 200, 200, 200, 429]


def test_simple_json_and_grpc_requests_are_mirrored(shadow_server: Server) -> None:
    before = _handled(shadow_server, "wrong")
    response = requests.post(
        f"{shadow_server.url}/v1/models/wrong:predict",
        json={"instances": ROWS},
        headers={"X-API-Key": shadow_server.extra["key"]},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    client = tg.InferenceServerClient(shadow_server.extra["grpc"])
    tensor = tg.InferInput("x", [3, 2], "FP32")
    tensor.set_data_from_numpy(np.array(ROWS, dtype=np.float32))
    result = client.infer(
        "wrong", [tensor], headers={"authorization": f"Bearer {shadow_server.extra['key']}"}
    )
    assert result.as_numpy("label").tolist() == LABELS
    wait_until(lambda: _handled(shadow_server, "wrong") == before + 2, "two more shadow jobs")
    # Naming the candidate is not mirrored onto itself.
    response = requests.post(
        f"{shadow_server.url}/v2/models/wrong/versions/2/infer",
        json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [3, 2], "data": ROWS}]},
        headers={"X-API-Key": shadow_server.extra["key"]},
        timeout=30,
    )
    assert response.status_code == 200
    time.sleep(0.5)
    assert _handled(shadow_server, "wrong") == before + 2
