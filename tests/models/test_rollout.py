"""Rollout state files: written whole, read back, and ignored (never fatal) when unusable."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.models.onnx import RuntimeOptions
from app.models.repository import Repository
from app.models.rollout import (
    RolloutFileError,
    Thresholds,
    read_state,
    state_path,
    traffic_override,
    write_state,
)
from app.rollout import new_state
from tests import onnx_factory


def _repository(root: Path) -> Path:
    for version in (1, 2):
        onnx_factory.save(onnx_factory.classifier(), root, "clf", version)
    (root / "clf" / "model.toml").write_text('default_version = 1\ntraffic = {"1" = 100}\n')
    return root


def test_a_state_round_trips_readable_by_others(tmp_path: Path) -> None:
    state = new_state("clf", 1, 2, [5, 100], Thresholds(interval_s=3))
    path = state_path(tmp_path / "rollouts", "clf")
    write_state(path, state)
    assert path.stat().st_mode & 0o777 == 0o644
    assert read_state(path) == state
    assert read_state(tmp_path / "rollouts" / "other.json") is None
    assert [p.name for p in path.parent.iterdir()] == ["clf.json"]  # no temporary left


@pytest.mark.parametrize(
    "content", [b"{not json", b'{"model": "clf"}', b"x" * (1 << 21), b'{"unknown": 1}']
)
def test_a_malformed_file_is_an_error_to_the_cli(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "clf.json"
    path.write_bytes(content)
    with pytest.raises(RolloutFileError, match=str(path)):
        read_state(path)


def test_the_rollout_traffic_replaces_model_toml_at_scan(tmp_path: Path) -> None:
    root = _repository(tmp_path / "models")
    rollouts = tmp_path / "rollouts"
    state = new_state("clf", 1, 2, [25, 100], Thresholds())
    write_state(state_path(rollouts, "clf"), state)
    entry = Repository.scan(root, RuntimeOptions(), rollouts=rollouts).entry("clf")
    assert entry.rollout == state
    assert entry.traffic_shares() == {"1": 75.0, "2": 25.0}
    # Without the folder the model serves as its model.toml says.
    assert Repository.scan(root, RuntimeOptions()).entry("clf").traffic_shares() == {"1": 100.0}


@pytest.mark.parametrize(
    ("traffic", "model"),
    [
        ({"1": 50, "3": 50}, "clf"),  # version 3 is gone
        ({"1": 0, "2": 0}, "clf"),
        ({"1": -5, "2": 10}, "clf"),
        ({"one": 100}, "clf"),
        ({"1": 100}, "other"),  # another model's file under this name
    ],
)
def test_an_unusable_rollout_file_is_ignored_not_fatal(
    tmp_path: Path, traffic: dict[str, int], model: str
) -> None:
    root = _repository(tmp_path / "models")
    rollouts = tmp_path / "rollouts"
    state = new_state(model, 1, 2, [100], Thresholds())
    state.traffic = traffic
    write_state(rollouts / "clf.json", state)
    entry = Repository.scan(root, RuntimeOptions(), rollouts=rollouts).entry("clf")
    assert entry.rollout is None
    assert entry.traffic_shares() == {"1": 100.0}


def test_an_unreadable_rollout_file_is_ignored(tmp_path: Path) -> None:
    rollouts = tmp_path / "rollouts"
    rollouts.mkdir()
    (rollouts / "clf.json").write_text("{")
    assert traffic_override(rollouts, "clf", {1, 2}) is None
    assert traffic_override(None, "clf", {1, 2}) is None
