"""Reference capture from the server's own exposition text (``onnx-appliance drift``)."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import generate_latest

from app.drift import TooLittleTraffic, capture_reference, input_totals, reference_from
from app.metrics import Metrics
from app.models.drift import Drift, DriftOptions


def test_the_reference_is_the_windows_mean_and_spread() -> None:
    metrics = Metrics()
    # Two versions of the model and two workers' worth of flushes: all count.
    first = Drift("clf", "1", DriftOptions(None, 60, 32), metrics)
    second = Drift("clf", "2", DriftOptions(None, 60, 32), metrics)
    other = Drift("other", "1", DriftOptions(None, 60, 32), metrics)
    first.observe({"x": np.full((50, 2), 100.0)})  # before the window: not in the reference
    first.flush()
    window = np.random.default_rng(3).normal(-2, 0.5, (400, 2))

    def scrape() -> str:
        return generate_latest(metrics.registry).decode()

    def traffic(seconds: float) -> None:
        first.observe({"x": window[:300]})
        second.observe({"x": window[300:]})
        other.observe({"x": window + 50})
        for drift in (first, second, other):
            drift.flush()

    reference = capture_reference(scrape, "clf", 5, 400, sleep=traffic)
    assert reference.model == "clf" and reference.seconds == 5
    for i in range(2):
        feature = reference.inputs["x"][str(i)]
        assert feature.rows == 400
        assert feature.mean == pytest.approx(window[:, i].mean(), rel=1e-9)
        assert feature.std == pytest.approx(window[:, i].std(), rel=1e-6)
    with pytest.raises(TooLittleTraffic, match="had 400 rows in the window; 401 are needed"):
        capture_reference(scrape, "clf", 5, 401, sleep=traffic)
    with pytest.raises(TooLittleTraffic, match="reported no input statistics"):
        reference_from("nope", {}, input_totals(scrape(), "nope"), 5, 1, 0)
