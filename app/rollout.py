"""The gradual rollout controller behind ``onnx-appliance rollout``.

It moves a model's traffic from its primary version to a candidate in steps (1 → 5 → 25 →
50 → 100 % by default). Each step is a rollout state file (:mod:`app.models.rollout`) whose
weights the server takes at a graceful reload, which the controller asks for and then
confirms from the server's own ``traffic_share_percent`` gauges. After each interval it reads
the server's metrics and judges the candidate against the primary over that window: its 5xx
ratio, its p99 latency, and the agreement of the shadow comparisons; it then advances, holds
(too little traffic to judge) or rolls back to the primary. Every transition is written to the
state file before it is acted on, so a controller stopped at any moment resumes where it
was: a step already applied is not applied again, and none is skipped.
"""

from __future__ import annotations

import itertools
import math
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog
from prometheus_client.parser import text_string_to_metric_families

from app.client import NoMetrics, local_metrics
from app.models.rollout import (
    Decision,
    RolloutState,
    Thresholds,
    read_state,
    shares,
    state_path,
    write_state,
)

log = structlog.get_logger("app.rollout")

DEFAULT_STEPS = (1, 5, 25, 50, 100)
_FAMILIES = (
    "onnx_appliance_requests_total",
    "onnx_appliance_request_duration_seconds_bucket",
    "onnx_appliance_shadow_requests_total",
    "onnx_appliance_shadow_labels_total",
    "onnx_appliance_shadow_abs_difference_bucket",
)


class RolloutError(Exception):
    """The rollout cannot go on (the server does not answer or does not reload)."""


def traffic_for(state: RolloutState, percent: int) -> dict[str, int]:
    """Weights giving the candidate ``percent`` % and the primary the rest."""
    return {str(state.primary): 100 - percent, str(state.candidate): percent}


# -- reading the server's metrics ------------------------------------------------------------


def sample_key(name: str, labels: dict[str, str]) -> str:
    """A flat key for one sample: ``name{a="x",b="y"}`` with labels in order."""
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def parse_samples(text: str, model: str) -> dict[str, float]:
    """The counter samples of ``model`` the judgement needs, from an exposition text."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in _FAMILIES and sample.labels.get("model") == model:
                found[sample_key(sample.name, sample.labels)] = sample.value
    return found


def _labels(key: str) -> tuple[str, dict[str, str]]:
    name, _, rest = key.partition("{")
    labels = {}
    for part in rest.rstrip("}").split('",'):
        if part:
            k, _, v = part.partition('="')
            labels[k] = v.rstrip('"')
    return name, labels


@dataclass(frozen=True, slots=True)
class Evidence:
    """What one window showed, primary against candidate."""

    primary_requests: float
    primary_error_ratio: float
    primary_p99_ms: float
    candidate_requests: float
    candidate_error_ratio: float
    candidate_p99_ms: float
    shadow_replays: float
    shadow_failed_ratio: float
    shadow_rows: float
    shadow_agreement: float

    def as_dict(self) -> dict[str, float]:
        """Rounded values, for the log and the state file."""
        return {k: round(getattr(self, k), 6) for k in self.__dataclass_fields__}


def window_evidence(
    state: RolloutState, before: dict[str, float], after: dict[str, float]
) -> Evidence:
    """Compare the primary and the candidate over the window between two readings."""
    delta = {k: max(v - before.get(k, 0.0), 0.0) for k, v in after.items()}
    primary, candidate = str(state.primary), str(state.candidate)
    requests = {primary: [0.0, 0.0], candidate: [0.0, 0.0]}  # total, 5xx
    buckets: dict[str, dict[float, float]] = {primary: {}, candidate: {}}
    replays = failed = same = different = numeric_rows = numeric_close = 0.0
    close_bound = _bucket_at_most(state.thresholds.max_abs_difference, delta)
    for key, value in delta.items():
        name, labels = _labels(key)
        version = labels.get("version", "")
        if name == "onnx_appliance_requests_total" and version in requests:
            requests[version][0] += value
            if labels.get("status", "").startswith("5"):
                requests[version][1] += value
        elif name == "onnx_appliance_request_duration_seconds_bucket" and version in buckets:
            bound = float(labels["le"])
            buckets[version][bound] = buckets[version].get(bound, 0.0) + value
        elif labels.get("candidate") != candidate:
            continue
        elif name == "onnx_appliance_shadow_requests_total":
            replays += value
            failed += value if labels.get("outcome") == "failed" else 0.0
        elif name == "onnx_appliance_shadow_labels_total":
            if labels.get("result") == "same":
                same += value
            else:
                different += value
        elif name == "onnx_appliance_shadow_abs_difference_bucket":
            bound = float(labels["le"])
            if math.isinf(bound):
                numeric_rows += value
            elif bound == close_bound:
                numeric_close += value
    rows = same + different + numeric_rows
    return Evidence(
        primary_requests=requests[primary][0],
        primary_error_ratio=_ratio(requests[primary][1], requests[primary][0]),
        primary_p99_ms=_quantile(0.99, buckets[primary]) * 1000,
        candidate_requests=requests[candidate][0],
        candidate_error_ratio=_ratio(requests[candidate][1], requests[candidate][0]),
        candidate_p99_ms=_quantile(0.99, buckets[candidate]) * 1000,
        shadow_replays=replays,
        shadow_failed_ratio=_ratio(failed, replays),
        shadow_rows=rows,
        shadow_agreement=_ratio(same + numeric_close, rows) if rows else 1.0,
    )


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole else 0.0


def _bucket_at_most(limit: float, samples: dict[str, float]) -> float:
    """The largest abs-difference bucket bound within ``limit`` (the smallest if none is)."""
    bounds = sorted(
        {
            float(_labels(k)[1]["le"])
            for k in samples
            if k.startswith("onnx_appliance_shadow_abs_difference_bucket")
        }
        - {math.inf}
    )
    within = [b for b in bounds if b <= limit]
    return within[-1] if within else (bounds[0] if bounds else math.nan)


def _quantile(q: float, cumulative: dict[float, float]) -> float:
    """Prometheus' histogram_quantile over cumulative bucket counts (seconds)."""
    bounds = sorted(cumulative)
    if not bounds or cumulative[bounds[-1]] <= 0:
        return 0.0
    total = cumulative[bounds[-1]]
    rank = q * total
    previous_bound, previous_count = 0.0, 0.0
    for bound in bounds:
        count = cumulative[bound]
        if count >= rank:
            if math.isinf(bound):
                return previous_bound
            inside = count - previous_count
            share = (rank - previous_count) / inside if inside else 0.0
            return previous_bound + (bound - previous_bound) * share
        previous_bound, previous_count = bound, count
    return previous_bound


def judge(state: RolloutState, evidence: Evidence) -> tuple[str, str]:
    """``(verdict, reason)``: ``rollback``, ``hold`` or ``advance``."""
    t = state.thresholds
    if evidence.shadow_rows >= t.min_requests and evidence.shadow_agreement < t.min_agreement:
        return "rollback", (
            f"shadow agreement {evidence.shadow_agreement:.4f} is below {t.min_agreement}"
        )
    if (
        evidence.shadow_replays >= t.min_requests
        and evidence.shadow_failed_ratio > t.max_error_increase
    ):
        return "rollback", (
            f"the candidate failed {evidence.shadow_failed_ratio:.2%} of shadow replays"
        )
    if evidence.shadow_replays and evidence.shadow_rows < t.min_requests:
        # The model mirrors to the candidate: its comparisons are evidence the step needs
        # (a busy server drops replays first, so they can lag its own requests).
        return "hold", (
            f"{evidence.shadow_rows:.0f} shadow comparisons in the window; "
            f"{t.min_requests} are needed to judge"
        )
    if evidence.candidate_requests < t.min_requests:
        return "hold", (
            f"{evidence.candidate_requests:.0f} candidate requests in the window; "
            f"{t.min_requests} are needed to judge"
        )
    # At 100 % the primary gets nothing: its last judged window is the reference.
    reference = _primary_reference(state, evidence)
    if evidence.candidate_error_ratio > reference[0] + t.max_error_increase:
        return "rollback", (
            f"candidate 5xx ratio {evidence.candidate_error_ratio:.2%} against the primary's "
            f"{reference[0]:.2%}"
        )
    slower = evidence.candidate_p99_ms - reference[1]
    if evidence.candidate_p99_ms > reference[1] * t.max_latency_ratio and slower > t.min_latency_ms:
        return "rollback", (
            f"candidate p99 {evidence.candidate_p99_ms:.1f} ms against the primary's "
            f"{reference[1]:.1f} ms"
        )
    return "advance", "within every threshold"


def _primary_reference(state: RolloutState, evidence: Evidence) -> tuple[float, float]:
    if evidence.primary_requests >= state.thresholds.min_requests:
        return evidence.primary_error_ratio, evidence.primary_p99_ms
    for decision in reversed(state.decisions):
        seen = decision.evidence
        if seen.get("primary_requests", 0) >= state.thresholds.min_requests:
            return seen["primary_error_ratio"], seen["primary_p99_ms"]
    return evidence.primary_error_ratio, evidence.primary_p99_ms


# -- the controller ---------------------------------------------------------------------------


class Controller:
    """Drives one model's rollout against one server.

    Args:
        path: The model's rollout state file.
        address: A bind address of the server (for its metrics).
        reload: Asks the server for a graceful reload.
        reload_timeout: Seconds a reload may take to show in the server's gauges.
        clock: Wall-clock time (tests may pass their own).
        sleep: How to wait.
    """

    def __init__(
        self,
        path: Path,
        address: str,
        reload: Callable[[], None],
        reload_timeout: float,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.path = path
        self.address = address
        self._reload = reload
        self.reload_timeout = reload_timeout
        self._clock = clock
        self._sleep = sleep

    def scrape(self) -> str:
        """The server's metrics text.

        Raises:
            RolloutError: the server does not answer, or has no metrics.
        """
        try:
            return local_metrics(self.address)
        except NoMetrics as exc:
            raise RolloutError(str(exc)) from None

    def _save(self, state: RolloutState) -> None:
        write_state(self.path, state)

    def run(self, state: RolloutState) -> RolloutState:
        """Drive ``state`` to ``complete`` or ``rolled_back``, saving every transition.

        Raises:
            RolloutError: the server stopped answering or would not reload; the state file
                says where the rollout stands, and running it again resumes there.
        """
        while True:
            if not state.reloaded:
                self._apply(state)
            if state.status != "running":
                return state
            self._wait_for_window(state)
            after = parse_samples(self.scrape(), state.model)
            evidence = window_evidence(state, state.baseline, after)
            verdict, reason = judge(state, evidence)
            percent = state.steps[state.step]
            if verdict == "hold" and state.holds >= state.thresholds.max_holds:
                verdict = "rollback"
                reason += f"; held {state.holds} times already"
            if verdict == "advance" and state.step == len(state.steps) - 1:
                verdict = "complete"
            state.decisions.append(
                Decision(
                    at=self._clock(),
                    step=state.step,
                    percent=percent,
                    verdict=verdict,  # type: ignore[arg-type]
                    reason=reason,
                    evidence=evidence.as_dict(),
                )
            )
            log.info(
                f"rollout_judged_{verdict}",
                model=state.model,
                candidate=state.candidate,
                percent=percent,
                reason=reason,
                **evidence.as_dict(),
            )
            if verdict == "advance":
                state.step += 1
                state.holds = 0
                state.traffic = traffic_for(state, state.steps[state.step])
                state.reloaded = False
            elif verdict == "hold":
                state.holds += 1
                state.window_start = self._clock()
                state.baseline = after
            elif verdict == "complete":
                state.status = "complete"
                state.reloaded = False  # the same traffic; the workers' gauges then say so
            else:
                state.status = "rolled_back"
                state.traffic = traffic_for(state, 0)
                state.reloaded = False
            self._save(state)

    def _apply(self, state: RolloutState) -> None:
        """Reload the server onto the state's traffic and start the step's window."""
        log.info(
            "rollout_step_applying",
            model=state.model,
            candidate=state.candidate,
            status=state.status,
            traffic=state.traffic,
        )
        self._reload()
        self._confirm(state)
        state.reloaded = True
        state.window_start = self._clock()
        state.baseline = parse_samples(self.scrape(), state.model)
        self._save(state)
        log.info(
            "rollout_step_applied" if state.status == "running" else f"rollout_{state.status}",
            model=state.model,
            candidate=state.candidate,
            status=state.status,
            percent=state.traffic.get(str(state.candidate), 0),
        )

    def _confirm(self, state: RolloutState) -> None:
        """Wait until every live worker serves the state's traffic."""
        wanted = {v: round_share(s) for v, s in shares(state.traffic).items()}
        end = time.monotonic() + self.reload_timeout
        while True:
            served = self._shares(state.model)
            if served == wanted:
                return
            if time.monotonic() >= end:
                raise RolloutError(
                    f"the server did not take traffic {state.traffic} within "
                    f"{self.reload_timeout:g} s (it serves {served}); its log says why"
                )
            self._sleep(0.2)

    def _shares(self, model: str) -> dict[str, float]:
        found: dict[str, float] = {}
        for family in text_string_to_metric_families(self.scrape()):
            if family.name != "onnx_appliance_traffic_share_percent":
                continue
            for sample in family.samples:
                if sample.labels.get("model") == model:
                    found[sample.labels["version"]] = round_share(sample.value)
        return found

    def _wait_for_window(self, state: RolloutState) -> None:
        end = state.window_start + state.thresholds.interval_s
        while (remaining := end - self._clock()) > 0:
            self._sleep(min(remaining, 1.0))


def round_share(value: float) -> float:
    """Shares compared to a millionth of a percent (they travel as decimal text)."""
    return round(value, 6)


def new_state(
    model: str, primary: int, candidate: int, steps: Iterable[int], thresholds: Thresholds
) -> RolloutState:
    """A rollout about to apply its first step."""
    steps = list(steps)
    state = RolloutState(
        model=model,
        primary=primary,
        candidate=candidate,
        steps=steps,
        step=0,
        status="running",
        traffic={},
        thresholds=thresholds,
    )
    state.traffic = traffic_for(state, steps[0])
    return state


def parse_steps(text: str) -> list[int]:
    """``"1,5,25,50,100"`` as a list, checked: rising percentages ending at 100.

    Raises:
        ValueError: with the reason.
    """
    try:
        steps = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--steps {text!r} is not a list of whole percentages") from None
    if not steps or steps[-1] != 100 or steps[0] < 1:
        raise ValueError(f"--steps {text!r} must run from at least 1 up to 100")
    if any(b <= a for a, b in itertools.pairwise(steps)):
        raise ValueError(f"--steps {text!r} must rise at every step")
    if len(steps) > 20:
        raise ValueError(f"--steps {text!r} has more than 20 steps")
    return steps


def reloader(pid: int | None, pidfile: str, command: str) -> Callable[[], None]:
    """How to ask the server for a graceful reload: a command, or SIGHUP to its master."""
    if command:
        argv = shlex.split(command)

        def run_command() -> None:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
            if result.returncode != 0:
                raise RolloutError(
                    f"{command!r} failed ({result.returncode}): {result.stderr.strip()[:300]}"
                )

        return run_command

    def signal_master() -> None:
        try:
            master = pid if pid is not None else int(Path(pidfile).read_text().strip())
            os.kill(master, signal.SIGHUP)
        except (OSError, ValueError) as exc:
            raise RolloutError(f"cannot signal the server for a reload: {exc}") from None

    return signal_master


def load_or_start(
    directory: Path, model: str, start: Callable[[], RolloutState], candidate: int
) -> tuple[RolloutState, bool]:
    """The model's running rollout to resume, or a new one from ``start``; True if resumed.

    Raises:
        ValueError: another candidate's rollout is running.
        RolloutFileError: the state file is unreadable.
    """
    path = state_path(directory, model)
    state = read_state(path)
    if state is not None and state.status == "running":
        if state.candidate != candidate:
            raise ValueError(
                f"a rollout of {model!r} to version {state.candidate} is running "
                f"({path}); let it finish, or remove the file to abandon it"
            )
        return state, True
    return start(), False
