"""Rollout state files: ``<models.rollouts_dir>/<model>.json``.

``onnx-appliance rollout`` (:mod:`app.rollout`) writes one per model it moves; the file's
``traffic`` then replaces the weights of that model's ``model.toml`` at the next (re)load, so
writing the file and reloading is what applies a step. The file is written whole and renamed
into place; one the server cannot use (unreadable, or naming a version that is gone) is
ignored with a warning, never a failed start.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec
import structlog

from app.files import write_atomically

log = structlog.get_logger(__name__)

Status = Literal["running", "complete", "rolled_back"]
#: Largest rollout file read (its decisions list is bounded by the steps and holds).
MAX_FILE_BYTES = 1 << 20


class Thresholds(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """When the controller holds or rolls back, relative to the primary.

    Attributes:
        interval_s: Seconds each step runs before it is judged.
        min_requests: Candidate requests (or shadow comparisons) a step needs to be judged;
            fewer hold the step for another interval.
        max_holds: Intervals a step may be held for lack of traffic before rolling back.
        max_error_increase: Largest candidate 5xx ratio above the primary's (0.01 = 1 point).
        max_latency_ratio: Largest candidate p99 as a multiple of the primary's.
        min_latency_ms: p99 differences smaller than this never count (histogram resolution).
        min_agreement: Smallest share of shadow comparisons that agree.
        max_abs_difference: Numeric shadow answers agree when no value differs by more.
    """

    interval_s: float = 60.0
    min_requests: int = 50
    max_holds: int = 5
    max_error_increase: float = 0.01
    max_latency_ratio: float = 1.5
    min_latency_ms: float = 5.0
    min_agreement: float = 0.99
    max_abs_difference: float = 1e-3


class Decision(msgspec.Struct, kw_only=True):
    """One judgement of a step, kept in the state file."""

    at: float
    step: int
    percent: int
    verdict: Literal["advance", "hold", "rollback", "complete"]
    reason: str
    evidence: dict[str, float] = msgspec.field(default_factory=dict)


class RolloutState(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A rollout of one model, as the controller left it.

    Attributes:
        model: The model.
        primary: The version serving before the rollout, and after a rollback.
        candidate: The version rolled out.
        steps: Candidate traffic percentages, in order, ending at 100.
        step: Index of the step applied (its traffic is ``traffic``).
        status: ``running`` until ``complete`` or ``rolled_back``.
        traffic: Weights by version that the server applies at its next (re)load.
        reloaded: Whether the server was reloaded since ``traffic`` was written.
        window_start: When the current judging window began (epoch seconds).
        baseline: Counter values at the window's start, by sample key.
        holds: Intervals the current step has been held.
        thresholds: When to hold or roll back.
        decisions: Every judgement so far.
    """

    model: str
    primary: int
    candidate: int
    steps: list[int]
    step: int
    status: Status
    traffic: dict[str, int]
    reloaded: bool = False
    window_start: float = 0.0
    baseline: dict[str, float] = msgspec.field(default_factory=dict)
    holds: int = 0
    thresholds: Thresholds = msgspec.field(default_factory=Thresholds)
    decisions: list[Decision] = msgspec.field(default_factory=list)


class RolloutFileError(Exception):
    """A rollout file that cannot be read or written."""


def shares(weights: Mapping[str, int]) -> dict[str, float]:
    """Traffic weights by version as percentages of the requests naming no version."""
    total = sum(weights.values())
    return {version: 100 * weight / total for version, weight in weights.items()}


def state_path(directory: Path, model: str) -> Path:
    """Where the state of ``model``'s rollout lives."""
    return directory / f"{model}.json"


def read_state(path: Path) -> RolloutState | None:
    """The state in ``path``, or None when there is none.

    Raises:
        RolloutFileError: the file exists but is unreadable or malformed.
    """
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RolloutFileError(f"{path} is unreadable: {exc.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise RolloutFileError(f"{path} is larger than {MAX_FILE_BYTES} bytes")
    try:
        return msgspec.json.decode(data, type=RolloutState)
    except msgspec.DecodeError as exc:
        raise RolloutFileError(f"{path} is not a rollout state: {exc}") from None


def write_state(path: Path, state: RolloutState) -> None:
    """Write ``state`` whole: a temporary file, flushed, renamed over ``path`` (mode 0644,
    readable by the service).

    Raises:
        RolloutFileError: the folder cannot be written.
    """
    data = msgspec.json.format(msgspec.json.encode(state), indent=2) + b"\n"
    try:
        write_atomically(path, data)
    except OSError as exc:
        raise RolloutFileError(f"cannot write {path}: {exc.strerror or exc}") from None


def traffic_override(directory: Path | None, model: str, versions: set[int]) -> RolloutState | None:
    """The rollout whose traffic replaces ``model.toml``'s for ``model``, if one applies.

    A file that is unreadable, for another model, or names versions the model no longer has
    is ignored (logged): the model then serves as its ``model.toml`` says.
    """
    if directory is None:
        return None
    path = state_path(directory, model)
    try:
        state = read_state(path)
    except RolloutFileError as exc:
        log.warning("rollout_file_ignored", model=model, error=str(exc))
        return None
    if state is None:
        return None
    problem = _unusable(state, model, versions)
    if problem:
        log.warning("rollout_file_ignored", model=model, path=str(path), error=problem)
        return None
    return state


def _unusable(state: RolloutState, model: str, versions: set[int]) -> str:
    if state.model != model:
        return f"it is the rollout of model {state.model!r}"
    weights: dict[str, Any] = state.traffic
    named = {int(v) for v in weights if v.isdigit()}
    if len(named) != len(weights) or not named <= versions:
        return f"its traffic names versions this model does not have: {sorted(weights)}"
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        return "its traffic weights are negative or add up to 0"
    return ""
