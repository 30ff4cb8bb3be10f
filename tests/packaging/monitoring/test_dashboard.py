"""The Grafana dashboard: importable JSON whose every query is valid PromQL.

That each metric it names is one the app exports is checked against a live scrape in
tests/e2e/test_monitoring.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.packaging.monitoring.queries import dashboard, dashboard_queries, metric_names


def test_dashboard_is_importable_anywhere() -> None:
    doc = dashboard()
    assert doc["uid"] == "onnx-appliance" and doc["title"]
    assert "id" not in doc  # an id belongs to one Grafana; import assigns its own
    assert isinstance(doc["schemaVersion"], int)
    (source,) = [v for v in doc["templating"]["list"] if v["type"] == "datasource"]
    assert source["query"] == "prometheus"
    for panel in doc["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and panel["description"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_panels_have_unique_ids_and_do_not_overlap() -> None:
    panels = dashboard()["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, panel["title"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine


def test_dashboard_shows_what_operators_ask_for() -> None:
    titles = " | ".join(p["title"].lower() for p in dashboard()["panels"])
    names = set().union(*(metric_names(q) for q in dashboard_queries()))
    for wanted in ("request rate", "errors by code", "latency", "canary share", "queue time",
                   "batch size", "rate-limited and shed", "worker starts"):  # fmt: skip
        assert wanted in titles, wanted
    assert {
        "onnx_appliance_requests_total",
        "onnx_appliance_errors_total",
        "onnx_appliance_request_duration_seconds_bucket",
        "onnx_appliance_queue_duration_seconds_bucket",
        "onnx_appliance_batch_size_bucket",
        "onnx_appliance_worker_starts_total",
    } <= names


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    # promtool parses the PromQL of recording rules: one rule per dashboard query.
    queries = [q for q in dashboard_queries() if not q.startswith("label_values(")]
    document = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query{i}", "expr": q} for i, q in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump(document))
    result = subprocess.run(
        ["promtool", "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout
