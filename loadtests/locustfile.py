"""Locust scenarios for onnx-appliance: one user class per real workload.

Run through ``make loadtest`` (loadtests/loadtest.py), which starts the appliance behind NGINX
with TLS on loopback, runs each scenario of ``loadtests/slo.toml`` headless for a bounded time
and checks its SLOs. By hand::

    locust -f loadtests/locustfile.py --headless -u 10 -r 10 -t 20s \\
        --host https://localhost:8443 TabularSingle

``LOADTEST_CA`` names the CA file that verifies the server (unset: the system's store);
``LOADTEST_API_KEY`` is sent as ``X-API-Key`` when set; ``LOADTEST_VERSIONS_OUT`` is where the
canary user writes the versions it saw (JSON), at the end of the run.
"""

from __future__ import annotations

import json
import os
import random
import ssl
from collections import Counter
from typing import Any

from locust import constant_throughput, events, task
from locust.contrib.fasthttp import FastHttpUser

# Per-user request rate: the offered load is users x this, so a run measures latency at a
# known load instead of whatever the client machine can push.
RATE = float(os.environ.get("LOADTEST_USER_RATE", "20"))

_rng = random.Random(2026)  # noqa: S311 - payload variety, not secrets
TABULAR_ROWS = [[round(_rng.gauss(10, 5), 3) for _ in range(30)] for _ in range(256)]
MLP_ROWS = [[round(_rng.gauss(0, 1), 4) for _ in range(256)] for _ in range(64)]
REVIEWS = [
    "the delivery was fast and the staff were friendly",
    "terrible service, the parcel arrived broken and nobody answered",
    "great value, would buy again",
    "the screen stopped working after two days",
    "friendly support and a quick refund",
]
VERSIONS: Counter[str] = Counter()


def _ssl_context() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=os.environ.get("LOADTEST_CA") or None)


def _tensor(name: str, rows: list[list[Any]], datatype: str = "FP32") -> dict[str, Any]:
    return {
        "name": name,
        "shape": [len(rows), len(rows[0])],
        "datatype": datatype,
        "data": [x for row in rows for x in row],
    }


class ApplianceUser(FastHttpUser):
    """Common to every scenario: TLS verified against the lab CA, JSON, optional API key."""

    abstract = True
    wait_time = constant_throughput(RATE)
    insecure = False
    ssl_context_factory = staticmethod(_ssl_context)

    def on_start(self) -> None:
        self.headers = {"Content-Type": "application/json"}
        if key := os.environ.get("LOADTEST_API_KEY"):
            self.headers["X-API-Key"] = key

    def infer(
        self, model: str, inputs: list[dict[str, Any]], rows: int, name: str
    ) -> dict[str, Any] | None:
        """One OIP v2 inference; fails unless every output has ``rows`` rows and the answer
        names the version that served it.

        Returns:
            The answer, or None when it counted as a failure.
        """
        body = json.dumps({"inputs": inputs})
        with self.client.post(
            f"/v2/models/{model}/infer",
            data=body,
            headers=self.headers,
            name=name,
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {(response.text or '')[:200]}")
                return None
            answer: dict[str, Any] = response.json()
            outputs = answer.get("outputs") or []
            if not outputs or any(o["shape"][0] != rows for o in outputs):
                response.failure(f"unexpected outputs: {str(outputs)[:200]}")
                return None
            if not answer.get("model_version"):
                response.failure("no model_version in the response")
                return None
            return answer


class TabularSingle(ApplianceUser):
    """One row of the tabular classifier per request: the common online case."""

    @task
    def predict(self) -> None:
        row = _rng.choice(TABULAR_ROWS)
        self.infer("tabular", [_tensor("input", [row])], 1, "tabular b1")


class TabularBatch(ApplianceUser):
    """64 rows of the tabular classifier per request: a client that batches itself."""

    @task
    def predict(self) -> None:
        start = _rng.randrange(0, len(TABULAR_ROWS) - 64)
        rows = TABULAR_ROWS[start : start + 64]
        self.infer("tabular", [_tensor("input", rows)], 64, "tabular b64")


class Text(ApplianceUser):
    """Raw text to the sentiment model (tokenising happens in the graph)."""

    @task
    def classify(self) -> None:
        review = _rng.choice(REVIEWS)
        self.infer("sentiment", [_tensor("text", [[review]], "BYTES")], 1, "sentiment b1")


class Heavy(ApplianceUser):
    """The compute-heavy MLP, one row per request."""

    @task
    def predict(self) -> None:
        self.infer("mlp", [_tensor("input", [_rng.choice(MLP_ROWS)])], 1, "mlp b1")


class Mixed(ApplianceUser):
    """Mixed traffic across models and protocols, weighted like a typical day."""

    @task(6)
    def tabular(self) -> None:
        self.infer("tabular", [_tensor("input", [_rng.choice(TABULAR_ROWS)])], 1, "mixed tabular")

    @task(2)
    def text(self) -> None:
        review = _rng.choice(REVIEWS)
        self.infer("sentiment", [_tensor("text", [[review]], "BYTES")], 1, "mixed sentiment")

    @task(1)
    def heavy(self) -> None:
        self.infer("mlp", [_tensor("input", [_rng.choice(MLP_ROWS)])], 1, "mixed mlp")

    @task(1)
    def simple_json(self) -> None:
        body = json.dumps({"instances": [_rng.choice(TABULAR_ROWS)]})
        with self.client.post(
            "/v1/models/tabular:predict",
            data=body,
            headers=self.headers,
            name="mixed tabular v1 API",
            catch_response=True,
        ) as response:
            if response.status_code != 200 or len(response.json().get("predictions", [])) != 1:
                response.failure(f"HTTP {response.status_code}: {(response.text or '')[:200]}")


class Canary(ApplianceUser):
    """Requests that name no version; counts which version served each (the canary split)."""

    @task
    def predict(self) -> None:
        row = _rng.choice(TABULAR_ROWS)
        answer = self.infer("tabular", [_tensor("input", [row])], 1, "canary tabular")
        if answer is not None:
            VERSIONS[str(answer["model_version"])] += 1


@events.test_stop.add_listener
def _write_versions(**_: Any) -> None:
    if (path := os.environ.get("LOADTEST_VERSIONS_OUT")) and VERSIONS:
        with open(path, "w", encoding="utf-8") as out:  # noqa: PTH123 - gevent-friendly
            json.dump(dict(VERSIONS), out)
