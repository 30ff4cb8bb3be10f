"""Request and inference metrics recorded by the middleware and the serving layer."""

from __future__ import annotations

import shutil
from pathlib import Path

from falcon.testing import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app import __version__
from app.metrics import Metrics
from app.wsgi import build_repository, create_app
from tests.conftest import DEMO_MODELS, make_settings

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
