"""`make loadtest`: Locust through NGINX+TLS, SLOs judged, reports written, misses fail the run."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests.loadtest import DEFAULT_SLO, Scenario, judge, load_slo
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

SLO = """
[defaults]
run_time = "4s"
user_rate = 10.0
max_error_ratio = 0.0

[scenario.canary]
user_class = "Canary"
users = 10
user_rate = 25.0
p95_ms = 200
p99_ms = 500
min_rps = 60
canary_version = "1"
canary_share = 0.10
canary_tolerance = 0.06

[scenario.impossible]
user_class = "Mixed"
users = 5
p95_ms = 0.001
p99_ms = 0.001
min_rps = 1000000
"""


def test_the_bundled_slo_file_names_real_user_classes() -> None:
    # Parsed, not imported: importing Locust monkey-patches this test process with gevent.
    tree = ast.parse((ROOT / "loadtests" / "locustfile.py").read_text())
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    scenarios = load_slo(DEFAULT_SLO)
    assert {s.name for s in scenarios} >= {
        "tabular_single",
        "tabular_batch",
        "text",
        "heavy",
        "mixed",
        "canary",
    }
    for scenario in scenarios:
        assert scenario.user_class in classes, scenario.user_class


def test_judge_flags_each_missed_objective() -> None:
    s = Scenario("x", "TabularSingle", 1, 1.0, "1s", 10, 20, 0.01, 100, "1", 0.1, 0.02)
    stats = {
        "Request Count": "1000",
        "Failure Count": "20",
        "Requests/s": "90",
        "95%": "9",
        "99%": "25",
    }
    outcome = judge(s, stats, {"1": 50, "2": 950})
    missed = {what for what, _, ok in outcome.checks if not ok}
    assert missed == {"p99", "errors", "throughput", "canary v1 share"}
    assert not outcome.passed
    good = judge(
        s,
        dict(stats, **{"Failure Count": "0", "Requests/s": "100", "99%": "20"}),
        {"1": 100, "2": 900},
    )
    assert good.passed, good.line()


def test_headless_run_reports_and_fails_on_a_missed_slo(tmp_path: Path) -> None:
    slo = tmp_path / "slo.toml"
    slo.write_text(SLO)
    out = tmp_path / "reports"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "loadtests" / "loadtest.py"),
            "--slo",
            str(slo),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert "PASS canary:" in run.stdout, run.stdout
    assert "FAIL impossible:" in run.stdout
    assert "p99" in run.stdout and "MISSED" in run.stdout
    assert "loadtest FAIL: 1/2 scenarios" in run.stdout
    summary = json.loads((out / "summary.json").read_text())
    canary = summary["scenarios"]["canary"]
    assert canary["passed"] and canary["failed"] == 0 and canary["sent"] > 200
    assert 0.04 <= canary["canary_share"] <= 0.16
    for name in ("canary", "impossible"):
        assert (out / f"{name}_stats.csv").stat().st_size > 0
        assert "<html" in (out / f"{name}.html").read_text()[:2000].lower()
