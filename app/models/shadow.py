"""Shadow traffic: a share of a model's requests replayed on a candidate version.

The client gets the primary's answer only. Once that answer has been sent, the front hands
the request's :class:`ShadowJob` to the worker's :class:`ShadowExecutor`, which replays it on
the candidate, compares the two answers and reports the agreement. The executor is one
thread per worker (a greenlet in gevent workers) behind a queue bounded per model; a full
queue drops the job (counted), as does a job that waited longer than its model's timeout,
so under load shadow runs are what goes first. Its OS thread runs at the lowest CPU priority.
A shadow run never goes through rate limits or request metrics, and its failures are only
counted and logged.
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import structlog

from app.models.scheduling import cooperative

if TYPE_CHECKING:
    from app.models.runner import Predictor

log = structlog.get_logger(__name__)

#: How a job replays its request on the candidate: (candidate, deadline) -> outputs.
Replay = Callable[["Predictor", float], Mapping[str, np.ndarray]]


class ShadowObserver(Protocol):
    """Receives what shadow runs measure (a worker's metrics implement it)."""

    def shadow_outcome(self, model: str, version: str, candidate: str, outcome: str) -> None:
        """A job was ``compared``, ``dropped``, ``failed`` or ``incomparable``."""

    def shadow_run(self, model: str, candidate: str, seconds: float) -> None:
        """The candidate answered a replayed request in ``seconds``."""

    def shadow_labels(
        self, model: str, version: str, candidate: str, output: str, same: int, different: int
    ) -> None:
        """Rows of a label output (or of class scores' best class) that agreed or not."""

    def shadow_differences(
        self,
        model: str,
        version: str,
        candidate: str,
        output: str,
        abs_diff: np.ndarray,
        cosine_distance: np.ndarray,
    ) -> None:
        """Per row of a numeric output: the largest absolute difference and 1 - cosine."""


@dataclass(frozen=True, slots=True)
class ShadowOptions:
    """Validated ``[shadow]`` settings of one model.

    Attributes:
        version: The candidate version requests are replayed on.
        percent: Share of the other versions' requests replayed, in percent.
        max_queue: Jobs that may wait per worker; more are dropped.
    """

    version: int
    percent: float
    max_queue: int


@dataclass(slots=True)
class ShadowJob:
    """One request to replay: the primary's answer and how to ask the candidate."""

    shadow: Shadow
    version: str
    answer: Mapping[str, np.ndarray]
    replay: Replay
    queued: float = 0.0

    def submit(self) -> None:
        """Queue the replay (call once the client has its answer); never raises."""
        self.shadow.executor.submit(self)


class Shadow:
    """The shadow of one model: which requests to mirror, where and how to compare.

    Args:
        model: Model name.
        options: The ``[shadow]`` settings.
        candidate: The candidate version's loaded runner.
        labels: The model's class names (a float output as wide as them is class scores).
        executor: The worker's executor.
        observer: Where to report (the worker's metrics).
    """

    def __init__(
        self,
        model: str,
        options: ShadowOptions,
        candidate: Predictor,
        labels: list[str],
        executor: ShadowExecutor,
        observer: ShadowObserver | None,
    ) -> None:
        self.model = model
        self.options = options
        self.candidate = candidate
        self.candidate_version = str(options.version)
        self.labels = labels
        self.executor = executor
        self.observer = observer
        self.pending = 0
        self._share = options.percent / 100

    def wants(self, version: str) -> bool:
        """Whether to mirror a request served by ``version`` (never the candidate's own)."""
        return version != self.candidate_version and (
            self._share >= 1 or random.random() < self._share  # noqa: S311 - sampling only
        )

    def job(self, version: str, answer: Mapping[str, np.ndarray], replay: Replay) -> ShadowJob:
        """A job for a request ``version`` answered with ``answer``."""
        return ShadowJob(self, version, answer, replay)

    def report(self, version: str, outcome: str) -> None:
        """Count a job's outcome."""
        if self.observer is not None:
            self.observer.shadow_outcome(self.model, version, self.candidate_version, outcome)

    def run(self, job: ShadowJob) -> None:
        """Replay ``job`` on the candidate and report how the answers compare."""
        timeout = self.candidate.timeout
        if time.monotonic() - job.queued > timeout:
            self.report(job.version, "dropped")
            return
        start = time.perf_counter()
        try:
            answer = job.replay(self.candidate, time.monotonic() + timeout)
        except Exception as exc:  # the candidate's failure is only ever counted and logged
            self.report(job.version, "failed")
            log.warning(
                "shadow_failed",
                model=self.model,
                version=job.version,
                candidate=self.candidate_version,
                error=str(exc) or type(exc).__name__,
            )
            return
        seconds = time.perf_counter() - start
        if self.observer is not None:
            self.observer.shadow_run(self.model, self.candidate_version, seconds)
        self.report(job.version, "compared" if self.compare(job, answer) else "incomparable")

    def compare(self, job: ShadowJob, answer: Mapping[str, np.ndarray]) -> bool:
        """Report agreement output by output; False when an output cannot be compared."""
        comparable = True
        for name, primary in job.answer.items():
            candidate = answer.get(name)
            if (
                candidate is None
                or np.shape(candidate) != np.shape(primary)
                or not np.ndim(primary)
            ):
                comparable = False
                continue
            ours, theirs = np.asarray(primary), np.asarray(candidate)
            if ours.dtype.kind in "fc" and theirs.dtype.kind in "fc":
                self._differences(job.version, name, ours, theirs)
                if self.labels and ours.ndim == 2 and ours.shape[1] == len(self.labels) > 1:
                    same = int(np.count_nonzero(ours.argmax(1) == theirs.argmax(1)))
                    self._labels(job.version, name, same, len(ours) - same)
            else:
                rows = (ours == theirs).reshape(len(ours), -1).all(axis=1)
                same = int(np.count_nonzero(rows))
                self._labels(job.version, name, same, len(ours) - same)
        return comparable

    def _labels(self, version: str, output: str, same: int, different: int) -> None:
        if self.observer is not None:
            self.observer.shadow_labels(
                self.model, version, self.candidate_version, output, same, different
            )

    def _differences(self, version: str, output: str, ours: np.ndarray, theirs: np.ndarray) -> None:
        a = ours.reshape(len(ours), -1).astype(np.float64)
        b = theirs.reshape(len(theirs), -1).astype(np.float64)
        abs_diff = np.abs(a - b).max(axis=1) if a.shape[1] else np.zeros(len(a))
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        dots = (a * b).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            # Two zero vectors agree; one zero vector against another is as far as it gets.
            cosine = np.where(norms > 0, dots / np.where(norms > 0, norms, 1), 0.0)
            cosine = np.where((norms == 0) & (abs_diff == 0), 1.0, cosine)
        distance = np.clip(1.0 - cosine, 0.0, 2.0)
        if self.observer is not None:
            self.observer.shadow_differences(
                self.model, version, self.candidate_version, output, abs_diff, distance
            )


class ShadowExecutor:
    """The worker's one shadow thread and its queue, bounded per model.

    Jobs are taken oldest first. The thread starts on the first job, so a worker without
    shadows has none; it lives as long as the worker (a daemon).
    """

    def __init__(self) -> None:
        self._jobs: collections.deque[ShadowJob] = collections.deque()
        self._cond = threading.Condition(threading.RLock())
        self._started = False
        self._outstanding = 0  # queued or running

    def submit(self, job: ShadowJob) -> None:
        """Queue ``job``, or drop it (counted) when its model's queue is full."""
        shadow = job.shadow
        with self._cond:
            if shadow.pending >= shadow.options.max_queue:
                full = True
            else:
                full = False
                shadow.pending += 1
                self._outstanding += 1
                job.queued = time.monotonic()
                self._jobs.append(job)
                if not self._started:
                    self._started = True
                    threading.Thread(target=self._loop, name="shadow", daemon=True).start()
                self._cond.notify()
        if full:
            shadow.report(job.version, "dropped")

    def _loop(self) -> None:
        if not cooperative():  # a greenlet shares the OS thread of the requests
            with contextlib.suppress(OSError, AttributeError):
                # Per thread on Linux: shadow runs get the CPU only when requests leave some.
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        idle = _idle_waiter()
        while True:
            with self._cond:
                while not self._jobs:
                    self._cond.wait()
            idle()
            with self._cond:
                job = self._jobs.popleft()
            try:
                job.shadow.run(job)
            except Exception as exc:  # a bug here must not end the thread
                log.error("shadow_error", model=job.shadow.model, error=repr(exc))
            finally:
                with self._cond:
                    job.shadow.pending -= 1
                    self._outstanding -= 1
                    self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no job is queued or running (tests, draining); True when idle."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._outstanding:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True


def _idle_waiter() -> Callable[[], None]:
    """What the executor waits for before each job: in a gevent worker, a moment when no
    request greenlet is ready to run (so a busy worker never runs shadows, and their queue
    fills and drops); elsewhere nothing (the thread's CPU priority does that)."""
    if cooperative():
        import gevent

        wait: Callable[[], None] = gevent.idle
        return wait
    return lambda: None
