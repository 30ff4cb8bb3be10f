"""Micro-batching in a real gunicorn worker: merged batches, exact answers, isolation."""

from __future__ import annotations

import shutil
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests import onnx_factory
from tests.conftest import DEMO_MODELS
from tests.e2e.conftest import run_server

BATCHING = (
    "[batching]\nmax_batch_size = 16\nmax_queue_delay_us = 5000\npreferred_batch_sizes = [8, 16]\n"
)


def _histogram(text: str, name: str, model: str) -> tuple[float, float]:
    total = count = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("model") != model:
                continue
            if s.name == f"{name}_sum":
                total += s.value
            elif s.name == f"{name}_count":
                count += s.value
    return total, count


@pytest.mark.parametrize("worker_class", ["auto", "gthread"])
def test_concurrent_clients_get_merged_batches_and_exact_rows(
    tmp_path: Path, worker_class: str
) -> None:
    models = tmp_path / "models"
    shutil.copytree(DEMO_MODELS / "mlp", models / "mlp")
    (models / "mlp" / "model.toml").write_text(BATCHING)
    reference = ort.InferenceSession(str(DEMO_MODELS / "mlp" / "1" / "model.onnx"))
    conf = f'worker_class = "{worker_class}"'
    with run_server(tmp_path, models=models, workers=1, server_conf=conf) as srv:
        listening = next(x for x in srv.log_lines() if x.get("event") == "listening")
        if worker_class == "auto":  # greenlets: every connection can join a batch
            assert listening["worker_class"] == "gevent"
        else:  # as many threads as the largest batch
            assert listening["threads"] >= 16
        barrier = threading.Barrier(16)
        mismatches: list[int] = []
        statuses: Counter[int] = Counter()
        lock = threading.Lock()

        def client(i: int) -> None:
            rng = np.random.default_rng(i)
            session = requests.Session()
            barrier.wait()
            for j in range(10):
                rows = rng.normal(0, 1, (1 + (i + j) % 2, 256)).astype(np.float32)
                if i == 5 and j == 3:  # one malformed request in the middle of the burst
                    body = {
                        "inputs": [
                            {
                                "name": "input",
                                "shape": [1, 255],
                                "datatype": "FP32",
                                "data": [0.0] * 255,
                            }
                        ]
                    }
                else:
                    body = {
                        "inputs": [
                            {
                                "name": "input",
                                "shape": list(rows.shape),
                                "datatype": "FP32",
                                "data": rows.ravel().tolist(),
                            }
                        ]
                    }
                resp = session.post(f"{srv.url}/v2/models/mlp/infer", json=body, timeout=30)
                with lock:
                    statuses[resp.status_code] += 1
                if resp.status_code != 200:
                    continue
                got = np.array(resp.json()["outputs"][0]["data"], dtype=np.float32)
                expected = reference.run(None, {"input": rows})[0].ravel()
                if got.shape != expected.shape or not np.allclose(
                    got, expected, rtol=1e-4, atol=1e-4
                ):
                    with lock:
                        mismatches.append(i)

        with ThreadPoolExecutor(16) as pool:
            for f in [pool.submit(client, i) for i in range(16)]:
                f.result()
        text = requests.get(f"{srv.url}/metrics", timeout=10).text
    assert statuses == {200: 159, 400: 1}, statuses
    assert mismatches == []
    rows, batches = _histogram(text, "onnx_appliance_batch_size", "mlp")
    sent_rows = sum(1 + (i + j) % 2 for i in range(16) for j in range(10))
    assert rows == sent_rows - 1  # every row of every good request ran exactly once
    assert rows / batches > 1.5, (rows, batches)  # merged, not one run per request
    waited, queued = _histogram(text, "onnx_appliance_queue_duration_seconds", "mlp")
    assert queued == 159 and waited > 0


def test_queue_overflow_returns_503(tmp_path: Path) -> None:
    models = tmp_path / "models"
    onnx_factory.save(onnx_factory.slow_batched(), models, "slow")
    (models / "slow" / "model.toml").write_text("[batching]\nmax_batch_size = 1\nmax_queue = 1\n")
    with run_server(tmp_path, models=models, workers=1) as srv:
        body: dict[str, Any] = {
            "inputs": [{"name": "x", "shape": [1, 256], "datatype": "FP32", "data": [1.0] * 256}]
        }

        def one(_: int) -> requests.Response:
            return requests.post(f"{srv.url}/v2/models/slow/infer", json=body, timeout=60)

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(one, range(8)))
    codes = Counter(r.status_code for r in responses)
    assert set(codes) == {200, 503}, codes
    assert codes[200] >= 2
    shed = [r for r in responses if r.status_code == 503]
    assert all(
        r.json()["error_code"] == "OVERLOADED" and r.headers["Retry-After"] == "1" for r in shed
    )
