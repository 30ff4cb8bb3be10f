"""The rollout controller's judgement, from real exposition text of the appliance's metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from prometheus_client import generate_latest

from app.metrics import Metrics
from app.models.rollout import Decision, Thresholds
from app.rollout import (
    Evidence,
    judge,
    new_state,
    parse_samples,
    parse_steps,
    traffic_for,
    window_evidence,
)

T = Thresholds(min_requests=10, max_error_increase=0.01, max_latency_ratio=1.5, min_latency_ms=5)


def _evidence(**changes: float) -> Evidence:
    values = dict(
        primary_requests=100.0, primary_error_ratio=0.0, primary_p99_ms=10.0,
        candidate_requests=100.0, candidate_error_ratio=0.0, candidate_p99_ms=10.0,
        shadow_replays=0.0, shadow_failed_ratio=0.0, shadow_rows=0.0, shadow_agreement=1.0,
    )  # fmt: skip
    values.update(changes)
    return Evidence(**values)


def _scrape(metrics: Metrics) -> dict[str, float]:
    return parse_samples(generate_latest(metrics.registry).decode(), "clf")


def test_window_evidence_from_the_servers_own_counters() -> None:
    metrics = Metrics()
    state = new_state("clf", 1, 2, [10, 100], T)
    metrics.request("/v2/models/{model}/infer", "POST", 200, "clf", "1", "", 0.002)
    metrics.request("/v2/models/{model}/infer", "POST", 200, "other", "2", "", 9.0)
    before = _scrape(metrics)
    for _ in range(98):
        metrics.request("/v2/models/{model}/infer", "POST", 200, "clf", "1", "", 0.002)
    for _ in range(2):
        metrics.request("/v2/models/{model}/infer", "POST", 503, "clf", "1", "", 0.002)
    for _ in range(10):
        metrics.request("/v1/models/{model}:predict", "POST", 200, "clf", "2", "", 0.2)
    metrics.shadow_outcome("clf", "1", "2", "compared")
    metrics.shadow_outcome("clf", "1", "2", "failed")
    metrics.shadow_labels("clf", "1", "2", "label", 3, 1)
    metrics.shadow_labels("clf", "1", "3", "label", 0, 50)  # another candidate's: not ours
    metrics.shadow_differences("clf", "1", "2", "scores", np.array([0.0, 0.5]), np.zeros(2))
    evidence = window_evidence(state, before, _scrape(metrics))
    assert evidence.primary_requests == 100 and evidence.primary_error_ratio == 0.02
    assert evidence.candidate_requests == 10 and evidence.candidate_error_ratio == 0
    # p99 inside the bucket holding the rank (0.001..0.0025 s, interpolated), 0.1..0.25 s.
    assert 1.0 < evidence.primary_p99_ms <= 2.5
    assert 100.0 < evidence.candidate_p99_ms <= 250.0
    assert evidence.shadow_replays == 2 and evidence.shadow_failed_ratio == 0.5
    # Four label rows (three agree) and two numeric rows (one within 1e-3).
    assert evidence.shadow_rows == 6
    assert evidence.shadow_agreement == pytest.approx(4 / 6)


@pytest.mark.parametrize(
    ("changes", "verdict", "words"),
    [
        ({}, "advance", "within"),
        ({"candidate_requests": 9}, "hold", "9 candidate requests"),
        ({"candidate_error_ratio": 0.02}, "rollback", "5xx ratio"),
        ({"candidate_error_ratio": 0.01}, "advance", "within"),  # at the threshold
        ({"candidate_p99_ms": 16}, "rollback", "p99"),
        ({"candidate_p99_ms": 14.9}, "advance", "within"),  # 1.49x
        ({"primary_p99_ms": 1, "candidate_p99_ms": 5.9}, "advance", "within"),  # under 5 ms more
        ({"shadow_rows": 10, "shadow_agreement": 0.98}, "rollback", "shadow agreement"),
        ({"shadow_replays": 3, "shadow_rows": 9, "shadow_agreement": 0.0}, "hold", "9 shadow"),
        ({"shadow_replays": 3, "shadow_rows": 10}, "advance", "within"),
        ({"shadow_replays": 10, "shadow_failed_ratio": 0.5}, "rollback", "failed"),
        # A candidate that disagrees is rolled back even before it gets requests of its own.
        ({"candidate_requests": 0, "shadow_rows": 50, "shadow_agreement": 0}, "rollback", ""),
    ],
)
def test_judge(changes: dict[str, float], verdict: str, words: str) -> None:
    state = new_state("clf", 1, 2, [10, 100], T)
    got, reason = judge(state, _evidence(**changes))
    assert got == verdict and words in reason


def test_at_full_traffic_the_primarys_last_window_is_the_reference() -> None:
    state = new_state("clf", 1, 2, [50, 100], T)
    state.decisions.append(
        Decision(at=0, step=0, percent=50, verdict="advance", reason="",
                 evidence={"primary_requests": 100, "primary_error_ratio": 0,
                           "primary_p99_ms": 10})
    )  # fmt: skip
    slow = _evidence(primary_requests=0, primary_p99_ms=0, candidate_p99_ms=40)
    assert judge(state, slow)[0] == "rollback"
    assert judge(state, _evidence(primary_requests=0, primary_p99_ms=0))[0] == "advance"


def test_traffic_for_a_step() -> None:
    state = new_state("clf", 3, 7, [1, 100], T)
    assert state.traffic == {"3": 99, "7": 1}
    assert traffic_for(state, 100) == {"3": 0, "7": 100}


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("1,5,25,50,100", ""),
        ("100", ""),
        ("5,50", "up to 100"),
        ("0,100", "at least 1"),
        ("50,25,100", "rise"),
        ("5,5,100", "rise"),
        ("a,100", "whole percentages"),
        (",".join(str(i) for i in range(80, 101)), "more than 20"),
    ],
)
def test_parse_steps(text: str, error: str) -> None:
    if error:
        with pytest.raises(ValueError, match=error):
            parse_steps(text)
    else:
        assert parse_steps(text)[-1] == 100


def test_no_data_gives_no_latency() -> None:
    state = new_state("clf", 1, 2, [100], T)
    evidence = window_evidence(state, {}, {})
    assert evidence.candidate_p99_ms == 0 and evidence.shadow_agreement == 1.0
    assert not math.isnan(evidence.primary_p99_ms)
