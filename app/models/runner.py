"""How one worker runs one model version: admission, deadlines, batching, and the thread.

A :class:`Runner` is what the repository hands out for a request. It validates the feed,
admits it through the model's :class:`~app.models.scheduling.Gate` (or its
:class:`~app.models.batching.Batcher`), cancels a run that outlives its deadline, and maps
onnxruntime's failures to domain errors. The worker chooses the kind when it loads the
repository: :class:`Runner` runs sessions on the calling thread (gthread and sync workers, and
``onnx-appliance check``); :class:`CooperativeRunner`, for gevent workers, does that only
while runs are fast and hands slow ones to a helper thread, so the worker's one thread keeps
reading requests, shedding load and answering health checks.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import structlog

from app.models.batching import Batcher
from app.models.cache import ResponseCache
from app.models.drift import Drift
from app.models.errors import InferenceFailed, InferenceTimeout
from app.models.onnx import OnnxModel
from app.models.scheduling import WATCHDOG, Gate, run_in_thread
from app.models.signature import Signature

log = structlog.get_logger(__name__)

#: Inline runs in a row over ``inline_run_us`` (CPU time) that move a model to a helper thread.
SLOW_STREAK = 3
_NODE_RE = re.compile(r"while running (\w+) node")


class Predictor(Protocol):
    """What the fronts need of a served model version (a :class:`Runner`, or a text model's
    runner that tokenizes first)."""

    model: OnnxModel
    signature: Signature

    @property
    def timeout(self) -> float:
        """Default deadline of a request, in seconds from its arrival."""

    def predict(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        deadline: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Arrays in, arrays out."""


class Runner:
    """Runs one model version on the calling thread.

    Args:
        model: A loaded model version.
    """

    def __init__(self, model: OnnxModel) -> None:
        self.model = model
        self.signature = model.signature
        self._all_outputs = [s.name for s in model.signature.outputs]
        options = model.options
        self.gate = Gate(options.max_concurrency, options.max_queue)
        self.batcher = (
            Batcher(model.label, options.batching, self.run, self._report_batch)
            if options.batching is not None
            else None
        )
        self.cache = ResponseCache(options.cache) if options.cache is not None else None
        self.drift: Drift | None = None

    @property
    def timeout(self) -> float:
        """Default deadline of a request to this model, in seconds from its arrival."""
        return self.model.options.timeout

    def predict(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        deadline: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Validate, answer from the response cache if the model has one and the request is
        in it, else wait for a run slot (or a batch) and run one inference.

        Args:
            inputs: Arrays by input name.
            outputs: Output names to compute; ``None`` for all.
            deadline: ``time.monotonic()`` by which the answer is due; a run still going
                then is cancelled. ``None`` waits as long as it takes.

        Returns:
            Arrays by output name, in the order asked for (or the model's order).

        Raises:
            InvalidInput, PayloadTooLarge: the feed does not fit the model.
            Overloaded: too many requests queued for this model.
            InferenceTimeout: the deadline passed before or during the run.
            InferenceFailed: onnxruntime rejected the values.
        """
        self.model.validate(inputs)
        if self.drift is not None:
            self.drift.observe(inputs)
        if outputs is None:
            names = self._all_outputs
        else:
            names = list(outputs)
            self.signature.check_outputs(names)
        if self.cache is None:
            return self._predict(inputs, names, deadline)
        key = self.cache.key(names, inputs)
        found = self.cache.get(key) if key is not None else None
        if self.model.observer is not None:
            self.model.observer.cache_lookup(
                self.model.name, self.model.version_str, found is not None
            )
        if found is not None:
            return dict(zip(names, found, strict=True))
        answer = self._predict(inputs, names, deadline)
        if key is not None:
            self.cache.put(key, [answer[name] for name in names])
        return answer

    def _predict(
        self, inputs: Mapping[str, np.ndarray], names: list[str], deadline: float | None
    ) -> dict[str, np.ndarray]:
        """Admission (or a batch) and the run."""
        if self.batcher is not None:
            return dict(zip(names, self.batcher.submit(inputs, names, deadline), strict=True))
        self.gate.acquire(deadline, repr(self.model.name))
        try:
            return dict(zip(names, self.run(names, inputs, deadline), strict=True))
        finally:
            self.gate.release()

    def run(
        self, names: list[str], inputs: Mapping[str, np.ndarray], deadline: float | None
    ) -> list[np.ndarray]:
        """One session run under the deadline, inline or elsewhere as this runner does it,
        without admission (batchers call this once they have the slot).

        Raises:
            InferenceTimeout: the deadline passed before or during the run.
            InferenceFailed: onnxruntime rejected the values.
        """
        model = self.model
        options, token = None, 0
        if deadline is not None:
            if time.monotonic() >= deadline:
                raise InferenceTimeout(
                    f"model {model.name!r} could not start before the request's deadline"
                )
            options = model.run_options()
            token = WATCHDOG.watch(deadline, options)
        start = time.perf_counter()
        try:
            results = self._execute(names, inputs, options)
        except Exception as exc:
            if options is not None and options.terminate:
                raise InferenceTimeout(
                    f"inference of model {model.name!r} overran the request's deadline and "
                    "was cancelled"
                ) from None
            log.warning(
                "inference_failed", model=model.name, version=model.version_str, error=str(exc)
            )
            raise InferenceFailed(
                f"model {model.name!r} could not run on these inputs{_client_message(exc)}"
            ) from None
        finally:
            if token:
                WATCHDOG.done(token)
        if model.observer is not None:
            model.observer.inference(model.name, model.version_str, time.perf_counter() - start)
        return results

    def _execute(
        self, names: list[str], inputs: Mapping[str, np.ndarray], options: Any
    ) -> list[np.ndarray]:
        """One session run, here on the calling thread."""
        return self.model.run(names, inputs, options)

    def _report_batch(self, rows: int, waits: list[float]) -> None:
        model = self.model
        if model.observer is not None:
            model.observer.batch(model.name, model.version_str, rows, waits)


class CooperativeRunner(Runner):
    """Runs one model version in a gevent worker: inline while fast, else in a helper thread.

    A model whose warm-up took at most ``inline_run_us`` (or that was never warmed up: then
    it is slow until shown otherwise) runs on the worker's own thread, which costs nothing
    but holds every other connection for the length of the run. Once ``SLOW_STREAK`` runs in
    a row take longer than that (run time depends on the inputs too), its runs go to a helper
    thread for good: the first of them by wall time, the others by CPU time. One slow run is
    not enough: a garbage collection can land in any run.
    """

    def __init__(self, model: OnnxModel) -> None:
        super().__init__(model)
        warmup = model.warmup_seconds
        self.inline_run_us = model.options.inline_run_us
        self.offload = warmup is None or warmup * 1e6 > self.inline_run_us
        self._slow_streak = 0

    def _execute(
        self, names: list[str], inputs: Mapping[str, np.ndarray], options: Any
    ) -> list[np.ndarray]:
        """One session run, inline or in a helper thread."""
        if self.offload:
            return run_in_thread(self.model.run, names, inputs, options)
        # Wall time, which bounds CPU time from above and needs no system call, judges
        # the first slow run; the runs after it are timed in this thread's CPU time, so
        # that runs the OS preempted do not make a streak.
        clock = time.thread_time if self._slow_streak else time.perf_counter
        start = clock()
        results = self.model.run(names, inputs, options)
        took = clock() - start
        self._slow_streak = self._slow_streak + 1 if took * 1e6 > self.inline_run_us else 0
        if self._slow_streak >= SLOW_STREAK:
            self.offload = True
            log.warning(
                "model_runs_offloaded",
                model=self.model.name,
                version=self.model.version_str,
                run_cpu_ms=round(took * 1000, 3),
                inline_run_us=self.inline_run_us,
            )
        return results


def _client_message(exc: Exception) -> str:
    # onnxruntime's text names its source files and C++ internals; the client gets the
    # operator that failed, the operator's log gets the full text.
    match = _NODE_RE.search(str(exc))
    return f" (the {match.group(1)} operator rejected them)" if match else ""
