"""The PromQL of the monitoring pack: every dashboard query and every rule expression."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import ROOT

MONITORING = ROOT / "packaging" / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
RULES = MONITORING / "onnx-appliance.rules.yml"
RULES_TEST = Path(__file__).resolve().parent / "rules_test.yml"
# Grafana's variables, replaced by what they stand for when the query runs.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$job": ".*", "$model": ".*"}
# Series Prometheus makes itself, not the app.
PROMETHEUS_OWN = {"up"}


def dashboard() -> dict[str, Any]:
    """The dashboard document."""
    return dict(json.loads(DASHBOARD.read_text()))


def rules() -> dict[str, Any]:
    """The rules document."""
    return dict(yaml.safe_load(RULES.read_text()))


def dashboard_queries() -> list[str]:
    """Every panel's and variable's query, with Grafana's variables filled in."""
    doc = dashboard()
    found = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    found += [v["definition"] for v in doc["templating"]["list"] if v["type"] == "query"]
    return [substitute(q) for q in found]


def substitute(query: str) -> str:
    """``query`` as Grafana sends it to Prometheus."""
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        query = query.replace(name, GRAFANA_VARIABLES[name])
    return query


def rule_expressions() -> list[str]:
    """Every recording and alerting rule's expression."""
    return [rule["expr"] for group in rules()["groups"] for rule in group["rules"]]


def recorded() -> set[str]:
    """The series the rules record themselves."""
    return {r["record"] for g in rules()["groups"] for r in g["rules"] if "record" in r}


def metric_names(query: str) -> set[str]:
    """The metric names a PromQL query selects (label_values' metric included)."""
    query = re.sub(r"label_values\((.*),\s*\w+\)", r"\1", query)  # a label, not a metric
    query = re.sub(r'"(?:[^"\\]|\\.)*"', '""', query)  # no names inside strings
    query = re.sub(r"\{[^}]*\}", "{}", query)  # nor label names
    query = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", query)
    words = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b(?!\s*\()", query))
    keywords = {"and", "or", "unless", "offset", "bool", "inf", "nan", "group_left", "group_right"}
    return {w for w in words if w.lower() not in keywords and not re.fullmatch(r"\d+\w*", w)}
