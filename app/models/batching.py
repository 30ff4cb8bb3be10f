"""Dynamic micro-batching inside one worker, one batch at a time per model version.

Request threads validate their inputs, then enqueue them. There is no batcher thread of its
own: the request thread that finds the model idle becomes the *leader*. It takes the oldest
request, gathers more that are compatible (same non-batch shapes, dtypes and requested
outputs) until the batch is full, a preferred size is reached with nobody else waiting, or
the queue delay runs out; it concatenates them along dimension 0, runs the session once and
hands every caller exactly its own rows. Requests that arrive during a run wait in the queue
and form the next batch; once the leader's own request is answered, it hands the lead to the
thread of the oldest waiting request, which is woken for its answer anyway.

Why not a dedicated batcher thread: waking it and then waking the caller costs two thread
switches per batch, which in CPython cost more than a small model's whole run (measured at
one caller: 5.3k vs 11.9k runs/s). A lone request here runs at once in its own thread.

If a merged run fails, each request is run on its own so one bad request never fails its
batch-mates.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

import numpy as np
import structlog

from app.models.errors import InferenceFailed, InferenceTimeout, Overloaded, ServingError

log = structlog.get_logger(__name__)
T = TypeVar("T")

#: Runs a (possibly merged) feed: (output names, inputs, deadline) -> outputs in order.
RunFn = Callable[[list[str], Mapping[str, np.ndarray], float | None], list[np.ndarray]]
#: Reports (rows in the batch, seconds each request waited in the queue).
BatchReport = Callable[[int, list[float]], None]


@dataclass(frozen=True, slots=True)
class BatchingOptions:
    """``[batching]`` in ``model.toml``.

    Attributes:
        max_batch_size: Most rows in one merged run.
        max_queue_delay: Seconds the oldest request may wait for company.
        max_queue: Requests that may wait; beyond that callers get Overloaded.
        preferred_batch_sizes: Sizes worth running at once without waiting any longer.
    """

    max_batch_size: int = 32
    max_queue_delay: float = 0.0005
    max_queue: int = 256
    preferred_batch_sizes: tuple[int, ...] = ()


@dataclass(slots=True, eq=False)  # identity: requests hold arrays, and queues compare
class Waiter(Generic[T]):
    """One caller's place in a :class:`LeaderQueue`."""

    deadline: float | None
    enqueued: float = field(default_factory=time.monotonic)
    #: Set when the request is answered, or when its thread is given the lead.
    wake: threading.Event = field(default_factory=threading.Event)
    answered: bool = False
    lead: bool = False
    result: T | None = None
    error: ServingError | None = None


@dataclass(slots=True, eq=False)
class _Request(Waiter[list[np.ndarray]]):
    inputs: Mapping[str, np.ndarray] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    rows: int = 0
    key: tuple[object, ...] = ()


W = TypeVar("W", bound=Waiter[Any])


class LeaderQueue(Generic[W, T]):
    """Requests wait in a queue; whoever finds nobody leading runs batches for everyone.

    Subclasses say how a batch is collected (:meth:`_collect`) and run
    (:meth:`_execute_batch`); this class hands the lead on and lets waiters leave at their
    deadlines.

    Args:
        label: ``name/version`` for messages.
        max_queue: Requests that may wait; beyond that callers get Overloaded.
    """

    def __init__(self, label: str, max_queue: int) -> None:
        self.label = label
        self._max_queue = max_queue
        self._queue: collections.deque[W] = collections.deque()
        # An RLock knows its owner: with a plain Lock, notify() probes ownership with a
        # failed acquire, and gevent's Lock yields to other greenlets on that.
        self._cond = threading.Condition(threading.RLock())
        self._leading = False  # a thread is collecting or running a batch

    @property
    def state(self) -> tuple[bool, int]:
        """(a batch is being collected or run, requests waiting) right now."""
        return self._leading, len(self._queue)

    def _wait_for(self, request: W) -> T:
        """Queue ``request`` and return its result once a leader (maybe this thread) ran it.

        Raises:
            Overloaded: the queue is full.
            InferenceTimeout: the deadline passed first.
            ServingError: the run failed for this request.
        """
        deadline = request.deadline
        with self._cond:
            if len(self._queue) >= self._max_queue:
                raise Overloaded(
                    f"model {self.label} has {len(self._queue)} requests queued; retry later"
                )
            self._queue.append(request)
            lead = not self._leading
            if lead:
                self._leading = True
            else:
                self._cond.notify()  # a leader may be waiting for company
        while not request.answered:
            if lead:
                self._lead(request)
                lead = False
                continue
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            request.wake.wait(timeout)
            with self._cond:
                request.wake.clear()
                if request.answered:
                    break
                if request.lead:
                    request.lead, lead = False, True
                    continue
                if deadline is None or time.monotonic() < deadline:
                    continue
                queued = request in self._queue
                if queued:
                    self._queue.remove(request)
            # Past its deadline: a queued request never runs; one in a running batch is
            # given a moment to finish.
            if queued or not (request.wake.wait(0.005) and request.answered):
                raise InferenceTimeout(
                    f"model {self.label}: the request's deadline passed "
                    "while it waited for its batch"
                )
        if request.error is not None:
            raise request.error
        if request.result is None:  # answered without a result: only if the run was lost
            raise InferenceTimeout(f"model {self.label}: the batch produced no answer")
        return cast(T, request.result)

    def _lead(self, own: W) -> None:
        """Run batches until ``own`` is answered, then pass the lead on (or give it up)."""
        try:
            while not own.answered:
                batch = self._collect()
                if batch:
                    self._execute(batch)
        finally:
            with self._cond:
                if not own.answered and own in self._queue:
                    self._queue.remove(own)  # leading failed: this thread is leaving
                if self._queue:
                    successor = self._queue[0]
                    successor.lead = True
                    successor.wake.set()
                else:
                    self._leading = False

    def _collect(self) -> list[W]:
        """Take the next batch off the queue (waiting for company if it is worth it)."""
        raise NotImplementedError

    def _execute_batch(self, batch: list[W]) -> None:
        """Run ``batch`` and answer every request in it."""
        raise NotImplementedError

    def _answer(self, request: W) -> None:
        request.answered = True
        request.wake.set()

    def _expire(self, batch: list[W]) -> list[W]:
        """Answer the requests whose deadline passed in the queue; the others are live."""
        now = time.monotonic()
        live = []
        for request in batch:
            if request.deadline is not None and request.deadline <= now:
                request.error = InferenceTimeout(
                    f"model {self.label} could not start before the request's deadline"
                )
                self._answer(request)
            else:
                live.append(request)
        return live

    def _execute(self, batch: list[W]) -> None:
        try:
            self._execute_batch(batch)
        except Exception as exc:  # a bug must fail these requests, not hang them
            log.error("batch_failed", model=self.label, error=repr(exc))
            for request in batch:
                if not request.answered:
                    request.error = InferenceFailed(f"model {self.label}: the batch failed")
                    self._answer(request)


class Batcher(LeaderQueue[_Request, list[np.ndarray]]):
    """Merges concurrent requests for one model version.

    Args:
        label: ``name/version`` for messages.
        options: Batching limits.
        run: Runs a feed on the session.
        report: Receives batch sizes and queue times (metrics).
    """

    def __init__(
        self, label: str, options: BatchingOptions, run: RunFn, report: BatchReport | None = None
    ) -> None:
        super().__init__(label, options.max_queue)
        self.options = options
        self._run = run
        self._report = report
        self._preferred = frozenset(options.preferred_batch_sizes)

    def submit(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str], deadline: float | None
    ) -> list[np.ndarray]:
        """Queue validated inputs and wait for this request's rows of the outputs.

        Raises:
            Overloaded: the queue is full.
            InferenceTimeout: the deadline passed first.
            ServingError: the run failed for this request.
        """
        first = next(iter(inputs.values()))
        key = (
            tuple(outputs),
            tuple((n, a.dtype.str, a.shape[1:]) for n, a in sorted(inputs.items())),
        )
        rows = int(first.shape[0])
        return self._wait_for(
            _Request(deadline, inputs=inputs, outputs=list(outputs), rows=rows, key=key)
        )

    def _collect(self) -> list[_Request]:
        opts = self.options
        with self._cond:
            if not self._queue:
                return []
            head = self._queue.popleft()
            batch, rows = [head], head.rows
            close_at = head.enqueued + opts.max_queue_delay
            while rows < opts.max_batch_size:
                match = self._take_compatible(head.key, opts.max_batch_size - rows)
                if match is not None:
                    batch.append(match)
                    rows += match.rows
                    continue
                if rows in self._preferred:
                    break  # a preferred size and nobody compatible is waiting: go now
                remaining = close_at - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
        return batch

    def _take_compatible(self, key: tuple[object, ...], room: int) -> _Request | None:
        for i, request in enumerate(self._queue):
            if request.key == key and request.rows <= room:
                del self._queue[i]
                return request
        return None

    def _execute_batch(self, batch: list[_Request]) -> None:
        live = self._expire(batch)
        if not live:
            return
        if self._report is not None:
            now = time.monotonic()
            self._report(sum(r.rows for r in live), [now - r.enqueued for r in live])
        if len(live) == 1:
            self._run_alone(live[0])
            return
        names = live[0].outputs
        feed = {name: np.concatenate([r.inputs[name] for r in live]) for name in live[0].inputs}
        deadlines = [r.deadline for r in live]
        deadline = None if None in deadlines else max(d for d in deadlines if d is not None)
        try:
            results = self._run(names, feed, deadline)
        except ServingError:
            # One request may have poisoned the batch: give each its own answer.
            for request in live:
                self._run_alone(request)
            return
        offset = 0
        for request in live:
            request.result = [out[offset : offset + request.rows] for out in results]
            offset += request.rows
            self._answer(request)

    def _run_alone(self, request: _Request) -> None:
        try:
            request.result = self._run(request.outputs, request.inputs, request.deadline)
        except ServingError as exc:
            request.error = exc
        self._answer(request)
