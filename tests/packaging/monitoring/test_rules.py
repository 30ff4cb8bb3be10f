"""The Prometheus rules: valid for promtool, and every alert unit-tested both ways."""

from __future__ import annotations

import subprocess
from typing import Any

import yaml

from tests.packaging.monitoring.queries import RULES, RULES_TEST, rules


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_promtool_checks_the_rules() -> None:
    result = _promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = _promtool("test", "rules", str(RULES_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_firing_and_quiet() -> None:
    alerts = {r["alert"] for g in rules()["groups"] for r in g["rules"] if "alert" in r}
    cases: list[dict[str, Any]] = [
        case for test in yaml.safe_load(RULES_TEST.read_text())["tests"]
        for case in test["alert_rule_test"]
    ]  # fmt: skip
    fired = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert fired == alerts, alerts ^ fired
    assert quiet == alerts, alerts ^ quiet


def test_every_alert_says_how_urgent_and_what_to_look_at() -> None:
    for group in rules()["groups"]:
        for rule in group["rules"]:
            if "alert" not in rule:
                continue
            assert rule["labels"]["severity"] in {"page", "ticket", "warning"}, rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
            assert rule["alert"].startswith("OnnxAppliance")
