"""``onnx-appliance drift``: capture a model's reference window of input statistics.

The server's workers add every input feature's rows, sum and sum of squares to shared
metrics (:mod:`app.models.drift`). Two readings ``seconds`` apart give each feature's mean and
standard deviation over that window, which the operator vouches for as good traffic; the
reference is written to ``<models.drift_dir>/<model>.json``, and the workers score the
recent inputs against it from the next second on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from app.models.drift import DriftReference, FeatureReference

_FAMILIES = {
    "onnx_appliance_input_rows_total": 0,
    "onnx_appliance_input_sum": 1,
    "onnx_appliance_input_squares_total": 2,
}


class TooLittleTraffic(Exception):
    """The window held too few rows of some input to be a reference."""


def input_totals(text: str, model: str) -> dict[tuple[str, str], list[float]]:
    """``(input, feature) -> [rows, sum, squares]`` of ``model``, over all its versions."""
    totals: dict[tuple[str, str], list[float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            slot = _FAMILIES.get(sample.name)
            if slot is None or sample.labels.get("model") != model:
                continue
            key = (sample.labels["input"], sample.labels["feature"])
            totals.setdefault(key, [0.0, 0.0, 0.0])[slot] += sample.value
    return totals


def reference_from(
    model: str,
    before: dict[tuple[str, str], list[float]],
    after: dict[tuple[str, str], list[float]],
    seconds: float,
    min_rows: int,
    now: float,
) -> DriftReference:
    """Each feature's mean and standard deviation over the window between two readings.

    Raises:
        TooLittleTraffic: an input had fewer than ``min_rows`` rows (or none at all).
    """
    inputs: dict[str, dict[str, FeatureReference]] = {}
    for key, end in after.items():
        start = before.get(key, [0.0, 0.0, 0.0])
        rows, total, squares = (e - s for e, s in zip(end, start, strict=True))
        if rows < min_rows:
            raise TooLittleTraffic(
                f"input {key[0]!r} feature {key[1]} had {rows:.0f} rows in the window; "
                f"{min_rows} are needed (a longer window, or more traffic)"
            )
        mean = total / rows
        variance = max(squares / rows - mean * mean, 0.0)
        inputs.setdefault(key[0], {})[key[1]] = FeatureReference(mean, math.sqrt(variance), rows)
    if not inputs:
        raise TooLittleTraffic(
            f"model {model!r} reported no input statistics: is [drift] in its model.toml, "
            "and did it get requests in the window?"
        )
    return DriftReference(model=model, captured_at=now, seconds=seconds, inputs=inputs)


def capture_reference(
    scrape: Callable[[], str],
    model: str,
    seconds: float,
    min_rows: int,
    sleep: Callable[[float], None] = time.sleep,
) -> DriftReference:
    """Read the totals, wait ``seconds``, read them again: the window's reference.

    The workers add their sums to the shared metrics once a second, so each reading lags
    the traffic by up to a second, at both edges alike.

    Raises:
        TooLittleTraffic: too few rows in the window.
        NoMetrics: the server does not answer.
    """
    before = input_totals(scrape(), model)
    sleep(seconds)
    after = input_totals(scrape(), model)
    return reference_from(model, before, after, seconds, min_rows, time.time())


def reference_path(directory: Path, model: str) -> Path:
    """Where the workers look for ``model``'s reference."""
    return directory / f"{model}.json"
