"""Input statistics, drift scores and payload capture in one worker, with real metrics."""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgspec
import numpy as np
import pytest

from app.metrics import Metrics
from app.models.drift import (
    CaptureOptions,
    Drift,
    DriftOptions,
    DriftReference,
    FeatureReference,
    feature_names,
    features,
)
from app.models.errors import RepositoryError
from app.models.onnx import RuntimeOptions
from app.models.repository import Repository
from tests import onnx_factory

RNG = np.random.default_rng(7)


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def _reference(path: Path, mean: float, std: float, names: tuple[str, ...] = ("0", "1")) -> None:
    reference = DriftReference(
        model="clf", captured_at=0, seconds=60,
        inputs={"x": {n: FeatureReference(mean, std, 1000) for n in names}},
    )  # fmt: skip
    path.write_bytes(msgspec.json.encode(reference))


def test_sums_per_feature_reach_the_metrics_once_flushed(tmp_path: Path) -> None:
    metrics = Metrics()
    drift = Drift("clf", "1", DriftOptions(None, 60, 32), metrics)
    batches = [RNG.normal(3, 2, (n, 2)).astype(np.float32) for n in (1, 5, 40)]
    for batch in batches:
        drift.observe({"x": batch})
    labels = {"model": "clf", "version": "1", "input": "x"}
    drift.flush()
    every = np.concatenate(batches).astype(np.float64)
    for i in range(2):
        feature = {**labels, "feature": str(i)}
        assert _value(metrics, "onnx_appliance_input_rows_total", **feature) == 46
        assert _value(metrics, "onnx_appliance_input_sum", **feature) == pytest.approx(
            every[:, i].sum(), rel=1e-12
        )
        assert _value(metrics, "onnx_appliance_input_squares_total", **feature) == pytest.approx(
            np.square(every[:, i]).sum(), rel=1e-12
        )
    # No reference yet: no score.
    assert metrics.registry.get_sample_value("onnx_appliance_input_drift", labels) is None


def test_the_score_tells_a_shifted_input_from_a_steady_one(tmp_path: Path) -> None:
    reference = tmp_path / "clf.json"
    _reference(reference, mean=3.0, std=2.0)
    metrics = Metrics()
    drift = Drift("clf", "1", DriftOptions(reference, 60, 32), metrics)
    labels = {"model": "clf", "version": "1", "input": "x"}
    drift.observe({"x": RNG.normal(3, 2, (4000, 2))})
    drift.flush()
    # The mean of 4000 draws is within 6 standard errors (6 * 2 / sqrt(4000) = 0.19) of 3:
    # a score below 0.1 reference standard deviations.
    assert 0 <= _value(metrics, "onnx_appliance_input_drift", **labels) < 0.1
    fresh = Drift("clf", "1", DriftOptions(reference, 60, 32), metrics)
    fresh.observe({"x": RNG.normal(3, 2, (4000, 2)) + np.array([0, 6.0])})
    fresh.flush()
    assert 2.9 < _value(metrics, "onnx_appliance_input_drift", **labels) < 3.1
    # A new reference (the operator marks another window) is taken at the next flush.
    _reference(reference, mean=3.0, std=0.5)
    os.utime(reference, (1, 1))
    fresh.flush()
    assert 11.5 < _value(metrics, "onnx_appliance_input_drift", **labels) < 12.5


def test_the_recent_window_forgets_the_past(tmp_path: Path) -> None:
    reference = tmp_path / "clf.json"
    _reference(reference, mean=0.0, std=1.0)
    metrics = Metrics()
    drift = Drift("clf", "1", DriftOptions(reference, 1, 32), metrics)
    drift.observe({"x": np.full((1000, 2), 5.0)})
    drift.flush(now=0.0)
    drift.observe({"x": np.zeros((1000, 2))})
    # Twenty time constants later the old rows weigh e^-20 of the new ones.
    drift.flush(now=20.0)
    labels = {"model": "clf", "version": "1", "input": "x"}
    assert _value(metrics, "onnx_appliance_input_drift", **labels) < 1e-6


def test_feature_layout() -> None:
    assert feature_names((5, 3), 32) == ["0", "1", "2"]
    assert feature_names((5, 100), 4) == ["0", "1", "2", "3"]
    assert feature_names((5,), 32) == ["value"]
    assert feature_names((5, 2, 2), 32) == ["mean"]
    images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    got = features(images, 32)
    assert got is not None and got.shape == (2, 1)
    assert got[1, 0] == images[1].mean()
    assert features(np.array(["a", "bb"], dtype=object), 32) is None


def test_text_lengths_are_a_feature(tmp_path: Path) -> None:
    metrics = Metrics()
    drift = Drift("clf", "1", DriftOptions(None, 60, 32), metrics)
    drift.observe({"s": np.array(["ab", "abcd"], dtype=object)})
    drift.observe_lengths("text", [3, 5, 7])
    drift.flush()
    for name, total in (("s", 6), ("text", 15)):
        labels = {"model": "clf", "version": "1", "input": name, "feature": "length"}
        assert _value(metrics, "onnx_appliance_input_sum", **labels) == total


def _capture(tmp_path: Path, **changes: object) -> CaptureOptions:
    values: dict[str, object] = {
        "directory": tmp_path / "capture" / "clf", "percent": 100.0, "max_file_bytes": 400,
        "max_files": 2, "redact": frozenset({"ssn"}),
    }  # fmt: skip
    values.update(changes)
    return CaptureOptions(**values)  # type: ignore[arg-type]


def test_captured_payloads_are_redacted_bounded_and_rotated(tmp_path: Path) -> None:
    options = DriftOptions(None, 60, 32, _capture(tmp_path))
    drift = Drift("clf", "1", options, None)
    for i in range(40):
        drift.observe({"x": np.array([[i, 1.5]]), "ssn": np.array([[123456789.0]])})
    drift.flush()
    files = sorted((tmp_path / "capture" / "clf").iterdir())
    assert len(files) == 2  # the oldest were removed
    assert all(f.stat().st_size <= 400 for f in files)
    assert all(f.stat().st_mode & 0o777 == 0o640 for f in files)
    lines = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert lines and all(line["inputs"]["ssn"] == "[redacted]" for line in lines)
    assert "123456789" not in "".join(f.read_text() for f in files)
    assert lines[-1]["inputs"]["x"] == [[39.0, 1.5]]


def test_no_payload_is_stored_without_capture_or_when_not_sampled(tmp_path: Path) -> None:
    Drift("clf", "1", DriftOptions(None, 60, 32), None).observe({"x": np.ones((1, 2))})
    sampled = Drift("clf", "1", DriftOptions(None, 60, 32, _capture(tmp_path, percent=1e-9)), None)
    for _ in range(100):
        sampled.observe({"x": np.ones((1, 2))})
    assert not (tmp_path / "capture").exists()


def test_an_unwritable_capture_folder_turns_capture_off(tmp_path: Path) -> None:
    blocker = tmp_path / "capture"
    blocker.write_text("a file where the folder should be")
    drift = Drift("clf", "1", DriftOptions(None, 60, 32, _capture(tmp_path)), None)
    drift.observe({"x": np.ones((1, 2))})  # no exception reaches the request
    assert drift.capture is not None and not drift.capture.enabled


def _drift_repository(root: Path, table: str) -> Path:
    onnx_factory.save(onnx_factory.classifier(), root, "clf", 1)
    (root / "clf" / "model.toml").write_text(f"[drift]\n{table}\n")
    return root


@pytest.mark.parametrize(
    ("table", "capture", "message"),
    [
        ("window_s = 0", None, "window_s 0 is out of range"),
        ("max_features = 0", None, "max_features"),
        ("[drift.capture]\npercent = 1", None, "needs a folder: set models.capture_dir"),
        ("[drift.capture]\npercent = 0", "cap", "percent 0 is out of range"),
        ("[drift.capture]\nmax_files = 0", "cap", "max_files"),
        ("[drift.capture]\nmax_file_mib = 2000", "cap", "max_file_mib"),
        ("[drift.capture]\nshare = 1", "cap", "unknown field"),
    ],
)
def test_bad_drift_settings_are_refused_at_scan(
    tmp_path: Path, table: str, capture: str | None, message: str
) -> None:
    root = _drift_repository(tmp_path / "models", table)
    with pytest.raises(RepositoryError, match=message):
        Repository.scan(root, RuntimeOptions(), capture=tmp_path / capture if capture else None)


def test_redacting_an_input_the_model_lacks_is_refused_at_load(tmp_path: Path) -> None:
    root = _drift_repository(tmp_path / "models", '[drift.capture]\nredact = ["ssn"]')
    repository = Repository.scan(root, RuntimeOptions(warmup_runs=0), capture=tmp_path / "cap")
    with pytest.raises(RepositoryError, match=r"redact names \['ssn'\], which are not inputs"):
        repository.load()


def test_a_loaded_model_observes_what_it_serves(tmp_path: Path) -> None:
    root = _drift_repository(tmp_path / "models", "window_s = 10")
    metrics = Metrics()
    repository = Repository.scan(root, RuntimeOptions(warmup_runs=0), observer=metrics)
    repository.load()
    runner = repository.get("clf")
    runner.predict({"x": np.ones((3, 2), dtype=np.float32)})
    drift = runner.drift  # type: ignore[attr-defined]
    drift.flush()
    labels = {"model": "clf", "version": "1", "input": "x", "feature": "1"}
    assert _value(metrics, "onnx_appliance_input_rows_total", **labels) == 3
