"""Shadow traffic in one worker: real sessions, a real executor thread, real metrics."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from app.metrics import Metrics
from app.models.errors import RepositoryError
from app.models.onnx import RuntimeOptions
from app.models.repository import Repository
from app.models.runner import Predictor
from tests import onnx_factory

OPTS = RuntimeOptions(warmup_runs=1)
ROWS = np.array([[1, 0], [0, 1], [3, 1], [0.5, 2]], dtype=np.float32)


def shadowed(
    root: Path, candidate: str, shadow: str = "version = 2\npercent = 100", labels: bool = False
) -> tuple[Repository, Metrics]:
    """A loaded repository whose model ``clf`` has version 1 and candidate ``candidate`` as
    version 2, shadowed as ``shadow`` says."""
    models = {
        "same": onnx_factory.classifier(),
        "swapped": onnx_factory.classifier(swap=True),
        "wide": onnx_factory.features_to_result(),  # takes 3 features: fails on ours
    }
    onnx_factory.save(onnx_factory.classifier(), root, "clf", 1)
    onnx_factory.save(models[candidate], root, "clf", 2)
    names = 'labels = ["left", "right"]\n' if labels else ""
    (root / "clf" / "model.toml").write_text(f"default_version = 1\n{names}[shadow]\n{shadow}\n")
    metrics = Metrics()
    repository = Repository.scan(root, OPTS, observer=metrics)
    repository.load()
    return repository, metrics


def serve(repository: Repository, rows: np.ndarray = ROWS) -> dict[str, np.ndarray]:
    """What a front does: answer from the routed version, then hand the request over."""
    runner = repository.get("clf")
    answer = runner.predict({"x": rows})
    shadow = repository.shadow("clf", runner.signature.version)
    assert shadow is not None
    shadow.job(
        runner.signature.version,
        answer,
        lambda candidate, due: candidate.predict({"x": rows}, None, due),
    ).submit()
    return answer


def drain(repository: Repository) -> None:
    shadow = repository.entry("clf").shadow
    assert shadow is not None
    assert shadow.executor.wait_idle(10)


def value(metrics: Metrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def test_an_agreeing_and_a_disagreeing_candidate_are_told_apart(tmp_path: Path) -> None:
    agree, agree_metrics = shadowed(tmp_path / "a", "same")
    differ, differ_metrics = shadowed(tmp_path / "b", "swapped")
    for _ in range(5):
        ours = serve(agree)
        theirs = serve(differ)
        # Clients get the primary's answer in both cases.
        np.testing.assert_array_equal(ours["label"], [0, 1, 0, 1])
        np.testing.assert_array_equal(theirs["label"], ours["label"])
    drain(agree)
    drain(differ)
    pair = {"model": "clf", "version": "1", "candidate": "2"}
    for metrics in (agree_metrics, differ_metrics):
        outcome = {**pair, "outcome": "compared"}
        assert value(metrics, "onnx_appliance_shadow_requests_total", **outcome) == 5
        assert value(metrics, "onnx_appliance_shadow_duration_seconds_count", model="clf",
                     candidate="2") == 5  # fmt: skip
    label = {**pair, "output": "label"}
    assert value(agree_metrics, "onnx_appliance_shadow_labels_total", **label, result="same") == 20
    assert value(agree_metrics, "onnx_appliance_shadow_labels_total", **label,
                 result="different") == 0  # fmt: skip
    assert value(differ_metrics, "onnx_appliance_shadow_labels_total", **label,
                 result="different") == 20  # fmt: skip
    # The scores: identical answers sit in the lowest bucket, swapped columns far out.
    scores = {**pair, "output": "scores"}
    for family in ("abs_difference", "cosine_distance"):
        name = f"onnx_appliance_shadow_{family}_bucket"
        assert value(agree_metrics, name, **scores, le="1e-07") == 20
        assert value(differ_metrics, name, **scores, le="0.1") == 0
        assert value(differ_metrics, name, **scores, le="+Inf") == 20
    # Swapped columns: |2 - -1| = 3 on the first row, cosine (-4) / 5 -> distance 1.8.
    assert value(differ_metrics, "onnx_appliance_shadow_abs_difference_bucket", **scores,
                 le="1.0") == 0  # fmt: skip


def test_class_scores_compare_as_labels_when_the_model_names_its_classes(tmp_path: Path) -> None:
    repository, metrics = shadowed(tmp_path, "swapped", labels=True)
    serve(repository)
    drain(repository)
    scores = {"model": "clf", "version": "1", "candidate": "2", "output": "scores"}
    assert value(metrics, "onnx_appliance_shadow_labels_total", **scores, result="different") == 4


def test_a_failing_candidate_is_counted_and_never_reaches_the_client(tmp_path: Path) -> None:
    repository, metrics = shadowed(tmp_path, "wide")
    answer = serve(repository)
    np.testing.assert_array_equal(answer["label"], [0, 1, 0, 1])
    drain(repository)
    failed = {"model": "clf", "version": "1", "candidate": "2", "outcome": "failed"}
    assert value(metrics, "onnx_appliance_shadow_requests_total", **failed) == 1
    # The worker's executor keeps going after a failure.
    serve(repository)
    drain(repository)
    assert value(metrics, "onnx_appliance_shadow_requests_total", **failed) == 2


def test_answers_of_another_shape_are_incomparable(tmp_path: Path) -> None:
    repository, metrics = shadowed(tmp_path, "same")
    runner = repository.get("clf")
    answer = runner.predict({"x": ROWS})
    shadow = repository.shadow("clf", "1")
    assert shadow is not None

    def fewer_rows(candidate: Predictor, due: float) -> Mapping[str, np.ndarray]:
        return candidate.predict({"x": ROWS[:2]}, None, due)

    shadow.job("1", answer, fewer_rows).submit()
    drain(repository)
    outcome = {"model": "clf", "version": "1", "candidate": "2", "outcome": "incomparable"}
    assert value(metrics, "onnx_appliance_shadow_requests_total", **outcome) == 1


def test_a_full_queue_drops_shadow_jobs_and_counts_them(tmp_path: Path) -> None:
    repository, metrics = shadowed(tmp_path, "same", "version = 2\npercent = 100\nmax_queue = 2")
    shadow = repository.shadow("clf", "1")
    assert shadow is not None
    release = threading.Event()
    started = threading.Event()

    def held(candidate: Predictor, due: float) -> Mapping[str, np.ndarray]:
        started.set()
        release.wait(10)
        return candidate.predict({"x": ROWS}, None, due)

    answer = repository.get("clf").predict({"x": ROWS})
    shadow.job("1", answer, held).submit()  # running, and counted against the queue
    assert started.wait(10)
    shadow.job("1", answer, held).submit()  # waiting
    for _ in range(3):
        shadow.job("1", answer, held).submit()  # no room: dropped at once
    labels = {"model": "clf", "version": "1", "candidate": "2"}
    assert value(metrics, "onnx_appliance_shadow_requests_total", **labels, outcome="dropped") == 3
    release.set()
    drain(repository)
    assert value(metrics, "onnx_appliance_shadow_requests_total", **labels, outcome="compared") == 2


def test_which_requests_are_mirrored(tmp_path: Path) -> None:
    repository, _ = shadowed(tmp_path / "all", "same")
    assert repository.shadow("clf", "1") is not None
    assert repository.shadow("clf", "2") is None  # the candidate's own requests
    assert repository.shadow("other", "1") is None
    part, _ = shadowed(tmp_path / "part", "same", "version = 2\npercent = 25")
    draws = 4000
    mirrored = sum(part.shadow("clf", "1") is not None for _ in range(draws))
    # Binomial(4000, 0.25): mean 1000, sd 27.4; six sd either side.
    assert 836 < mirrored < 1164


@pytest.mark.parametrize(
    ("shadow", "message"),
    [
        ("version = 3", "shadow names version 3, which does not exist"),
        ("version = 2\npercent = 0", "percent 0 is out of range"),
        ("version = 2\npercent = 100.5", "percent 100.5 is out of range"),
        ("version = 2\nmax_queue = 0", "max_queue"),
        ("version = 2\nshare = 5", "unknown field"),
        ("percent = 5", "missing required field `version`"),
    ],
)
def test_bad_shadow_settings_are_refused_at_scan(tmp_path: Path, shadow: str, message: str) -> None:
    onnx_factory.save(onnx_factory.classifier(), tmp_path, "clf", 1)
    onnx_factory.save(onnx_factory.classifier(), tmp_path, "clf", 2)
    (tmp_path / "clf" / "model.toml").write_text(f"[shadow]\n{shadow}\n")
    with pytest.raises(RepositoryError, match=message):
        Repository.scan(tmp_path, OPTS)


def test_a_model_with_one_version_has_nothing_to_mirror(tmp_path: Path) -> None:
    onnx_factory.save(onnx_factory.classifier(), tmp_path, "clf", 1)
    (tmp_path / "clf" / "model.toml").write_text("[shadow]\nversion = 1\n")
    with pytest.raises(RepositoryError, match="needs another version"):
        Repository.scan(tmp_path, OPTS)
