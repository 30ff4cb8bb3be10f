"""Dynamic micro-batching: one batcher thread per model version, inside one worker.

Request threads validate their inputs, then enqueue them. The batcher takes the oldest
request, gathers more that are compatible (same non-batch shapes, dtypes and requested
outputs) until the batch is full, a preferred size is reached with nobody else waiting, or the
queue delay runs out; it concatenates them along dimension 0, runs the session once and hands
every caller exactly its own rows. If a merged run fails, each request is run on its own so one
bad request never fails its batch-mates.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from app.models.errors import InferenceTimeout, Overloaded, ServingError

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


@dataclass(slots=True)
class _Request:
    inputs: Mapping[str, np.ndarray]
    outputs: list[str]
    deadline: float | None
    rows: int
    key: tuple[object, ...]
    enqueued: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    result: list[np.ndarray] | None = None
    error: ServingError | None = None
    abandoned: bool = False


class Batcher:
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
        self.label = label
        self.options = options
        self._run = run
        self._report = report
        self._queue: collections.deque[_Request] = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._preferred = frozenset(options.preferred_batch_sizes)

    def start(self) -> None:
        """Start the batcher thread (in the worker, after fork)."""
        self._thread = threading.Thread(
            target=self._loop, name=f"batcher-{self.label}", daemon=True
        )
        self._thread.start()

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
        request = _Request(inputs, list(outputs), deadline, int(first.shape[0]), key)
        with self._cond:
            if len(self._queue) >= self.options.max_queue:
                raise Overloaded(
                    f"model {self.label} has {len(self._queue)} requests queued; retry later"
                )
            self._queue.append(request)
            self._cond.notify()
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not request.done.wait(timeout):
            with self._cond:
                request.abandoned = True  # the batcher skips it if it has not started
            # A run already under way may still finish within a moment; give it that.
            if not request.done.wait(0.005):
                raise InferenceTimeout(
                    f"model {self.label}: the request's deadline passed "
                    "while it waited for its batch"
                )
        if request.error is not None:
            raise request.error
        if request.result is None:  # done without an answer: only if the run was lost
            raise InferenceTimeout(f"model {self.label}: the batch produced no answer")
        return request.result

    # -- batcher thread ------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            batch = self._collect()
            if batch:
                self._execute(batch)

    def _collect(self) -> list[_Request]:
        opts = self.options
        with self._cond:
            while not self._queue:
                self._cond.wait()
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

    def _execute(self, batch: list[_Request]) -> None:
        now = time.monotonic()
        live = []
        for request in batch:
            if request.abandoned or (request.deadline is not None and request.deadline <= now):
                request.error = InferenceTimeout(
                    f"model {self.label} could not start before the request's deadline"
                )
                request.done.set()
            else:
                live.append(request)
        if not live:
            return
        if self._report is not None:
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
            request.done.set()

    def _run_alone(self, request: _Request) -> None:
        try:
            request.result = self._run(request.outputs, request.inputs, request.deadline)
        except ServingError as exc:
            request.error = exc
        request.done.set()
