"""One version of one model: an onnxruntime session, its signature, validation and warm-up."""

from __future__ import annotations

import enum
import itertools
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import structlog

from app.models.batching import Batcher, BatchingOptions
from app.models.errors import (
    InferenceFailed,
    InferenceTimeout,
    InvalidInput,
    PayloadTooLarge,
    RepositoryError,
)
from app.models.scheduling import WATCHDOG, Gate, cooperative, run_in_thread
from app.models.signature import ORT_TO_DATATYPE, TensorSpec, dims_from_ort

log = structlog.get_logger(__name__)

#: Inline runs in a row over ``inline_run_us`` (CPU time) that move a model to a helper thread.
SLOW_STREAK = 3
_NODE_RE = re.compile(r"while running (\w+) node")


class InferenceObserver(Protocol):
    """Receives what the serving layer measures (a worker's metrics implement it)."""

    def inference(self, model: str, version: str, seconds: float) -> None:
        """One session run took ``seconds``."""

    def batch(self, model: str, version: str, rows: int, waits: list[float]) -> None:
        """A (micro-)batch of ``rows`` ran; each request in it had waited ``waits`` seconds."""


class ModelState(enum.StrEnum):
    """Life cycle of a model version inside one worker."""

    UNAVAILABLE = "UNAVAILABLE"
    LOADING = "LOADING"
    READY = "READY"


@dataclass(frozen=True, slots=True)
class RuntimeOptions:
    """How a session is built and warmed up.

    Attributes:
        intra_op_threads: Threads one operator may use.
        inter_op_threads: Threads for independent graph branches.
        warmup_runs: Inference runs on synthetic inputs before the model is ready.
        max_batch_rows: Largest first dimension accepted on batched inputs.
        timeout: Default deadline of a request, in seconds from its arrival.
        max_concurrency: Session runs of this model at once, per worker.
        max_queue: Requests that may wait for a run slot, per worker; more are shed.
        batching: Dynamic batching limits, or None to run each request on its own.
        inline_run_us: In a gevent worker, a model whose warm-up (the fastest run at each
            warm-up batch size) took at most this long runs on the worker's own thread; a
            slower one, one never warmed up, and one whose runs exceed it in CPU time
            ``SLOW_STREAK`` times in a row run in a helper thread, so the worker keeps serving.
    """

    intra_op_threads: int = 1
    inter_op_threads: int = 1
    warmup_runs: int = 3
    max_batch_rows: int = 1024
    timeout: float = 30.0
    max_concurrency: int = 1
    max_queue: int = 64
    batching: BatchingOptions | None = None
    inline_run_us: int = 1000


class OnnxModel:
    """A loaded (or loadable) ONNX model version.

    The signature is read when the session is created; until :meth:`load` finishes the
    model is not ready. Sessions are safe to run from several threads at once.
    """

    def __init__(
        self,
        name: str,
        version: int,
        path: Path,
        options: RuntimeOptions,
        observer: InferenceObserver | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.version_str = str(version)
        self.path = path
        self.options = options
        self.state = ModelState.UNAVAILABLE
        self.inputs: tuple[TensorSpec, ...] = ()
        self.outputs: tuple[TensorSpec, ...] = ()
        self._inputs_by_name: dict[str, TensorSpec] = {}
        self._output_names: frozenset[str] = frozenset()
        self._session: Any = None
        self._run_options: Any = None
        self.observer = observer
        self.gate = Gate(options.max_concurrency, options.max_queue)
        self.batcher: Batcher | None = None
        # gevent worker (set at load): runs either hold its only thread or go to a helper.
        self.cooperative = False
        self.offload = False
        self._slow_streak = 0

    # -- life cycle -------------------------------------------------------------------------

    def load(self) -> None:
        """Create the session, read the signature and warm up.

        Raises:
            RepositoryError: the file is not a model onnxruntime can serve.
        """
        import onnxruntime as ort  # imported here: workers import it after fork

        self.state = ModelState.LOADING
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.options.intra_op_threads
        opts.inter_op_num_threads = self.options.inter_op_threads
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        # Idle pool threads that spin steal the core from the other workers.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(
                str(self.path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises several unrelated types
            self.state = ModelState.UNAVAILABLE
            raise RepositoryError(f"{self.label}: onnxruntime cannot load it: {exc}") from None
        self.inputs = tuple(self._spec(arg, "input") for arg in session.get_inputs())
        self.outputs = tuple(self._spec(arg, "output") for arg in session.get_outputs())
        self._inputs_by_name = {spec.name: spec for spec in self.inputs}
        self._output_names = frozenset(spec.name for spec in self.outputs)
        self._session = session
        self._run_options = ort.RunOptions
        # Built in the process that runs the model: a gevent worker needs gevent's locks.
        self.gate = Gate(self.options.max_concurrency, self.options.max_queue)
        if self.options.batching is not None:
            self._start_batcher(self.options.batching)
        slowest = self.warmup()
        self.cooperative = cooperative()
        self.offload = self.cooperative and (
            slowest is None or slowest * 1e6 > self.options.inline_run_us
        )
        self.state = ModelState.READY

    def _start_batcher(self, options: BatchingOptions) -> None:
        unbatched = [s.name for s in (*self.inputs, *self.outputs) if not s.batched]
        if unbatched:
            self.state = ModelState.UNAVAILABLE
            raise RepositoryError(
                f"{self.label}: batching needs a dynamic first dimension on every input and "
                f"output; {', '.join(repr(n) for n in unbatched)} has none"
            )
        self.batcher = Batcher(self.label, options, self._run, self._report_batch)

    def _report_batch(self, rows: int, waits: list[float]) -> None:
        if self.observer is not None:
            self.observer.batch(self.name, self.version_str, rows, waits)

    def _spec(self, arg: Any, kind: str) -> TensorSpec:
        datatype = ORT_TO_DATATYPE.get(arg.type)
        if datatype is None:
            hint = (
                " (for scikit-learn classifiers convert with zipmap=False)"
                if "map" in (arg.type)
                else ""
            )
            raise RepositoryError(
                f"{self.label}: {kind} {arg.name!r} has type {arg.type}, which cannot be "
                f"served{hint}"
            )
        return TensorSpec(arg.name, datatype, dims_from_ort(arg.shape))

    def warmup(self) -> float | None:
        """Run the configured number of inferences on synthetic inputs.

        Batch 1, plus every preferred batch size and the largest batch of a batching model,
        so the first real batches do not pay for memory planning.

        Returns:
            Seconds of the slowest batch size's fastest run, or None without warm-up runs.
        """
        if not self.options.warmup_runs:
            return None
        fastest: dict[int, float] = {}
        sizes = {1}
        if self.options.batching is not None:
            sizes |= {
                *self.options.batching.preferred_batch_sizes,
                self.options.batching.max_batch_size,
            }
        for rows, _ in itertools.product(sorted(sizes), range(self.options.warmup_runs)):
            feeds = {spec.name: synthetic_input(spec, rows) for spec in self.inputs}
            try:
                start = time.perf_counter()
                self._session.run(None, feeds)
                took = time.perf_counter() - start
            except Exception as exc:  # a model that cannot run at all must not serve
                self.state = ModelState.UNAVAILABLE
                raise RepositoryError(
                    f"{self.label}: warm-up inference failed ({exc}); set warmup_runs = 0 in "
                    "its model.toml if it needs special inputs"
                ) from None
            fastest[rows] = min(took, fastest.get(rows, took))
        return max(fastest.values())

    @property
    def label(self) -> str:
        """``name/version`` for log lines and operator messages."""
        return f"{self.name}/{self.version}"

    @property
    def ready(self) -> bool:
        """True once the session is loaded and warmed up."""
        return self.state is ModelState.READY

    # -- serving -----------------------------------------------------------------------------

    def input_spec(self, name: str) -> TensorSpec:
        """Spec of the named input.

        Raises:
            InvalidInput: the model has no such input.
        """
        spec = self._inputs_by_name.get(name)
        if spec is None:
            raise InvalidInput(
                f"model {self.name!r} has no input {name!r}; inputs are "
                f"{', '.join(repr(s.name) for s in self.inputs)}"
            )
        return spec

    def validate(self, inputs: Mapping[str, np.ndarray]) -> None:
        """Check a complete feed against the signature and the batch limit.

        Raises:
            InvalidInput: a missing or unknown input, a wrong dtype or shape.
            PayloadTooLarge: more batch rows than allowed.
        """
        missing = [spec.name for spec in self.inputs if spec.name not in inputs]
        if missing:
            raise InvalidInput(
                f"missing input(s) {', '.join(repr(n) for n in missing)} for model {self.name!r}"
            )
        for name, array in inputs.items():
            spec = self.input_spec(name)
            if array.dtype != spec.dtype:
                raise InvalidInput(
                    f"input {name!r} must be {spec.datatype}, got numpy dtype {array.dtype}"
                )
            if not spec.accepts_shape(array.shape):
                raise InvalidInput(
                    f"input {name!r} has shape {list(array.shape)} but model {self.name!r} "
                    f"expects {list(spec.shape)} (-1 is any size)"
                )
            if spec.batched and array.shape[0] > self.options.max_batch_rows:
                raise PayloadTooLarge(
                    f"input {name!r} has {array.shape[0]} rows; the limit for model "
                    f"{self.name!r} is {self.options.max_batch_rows}"
                )

    def check_outputs(self, names: Sequence[str]) -> None:
        """Raise InvalidInput unless every requested output exists."""
        unknown = [n for n in names if n not in self._output_names]
        if unknown:
            raise InvalidInput(
                f"model {self.name!r} has no output(s) {', '.join(repr(n) for n in unknown)}; "
                f"outputs are {', '.join(repr(s.name) for s in self.outputs)}"
            )

    def predict(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        deadline: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Validate, wait for a run slot and run one inference.

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
        self.validate(inputs)
        names = [s.name for s in self.outputs] if outputs is None else list(outputs)
        if outputs is not None:
            self.check_outputs(names)
        if self.batcher is not None:
            return dict(zip(names, self.batcher.submit(inputs, names, deadline), strict=True))
        self.gate.acquire(deadline, repr(self.name))
        try:
            return dict(zip(names, self._run(names, inputs, deadline), strict=True))
        finally:
            self.gate.release()

    def _run(
        self, names: list[str], inputs: Mapping[str, np.ndarray], deadline: float | None
    ) -> list[np.ndarray]:
        options, token = None, 0
        if deadline is not None:
            if time.monotonic() >= deadline:
                raise InferenceTimeout(
                    f"model {self.name!r} could not start before the request's deadline"
                )
            options = self._run_options()
            options.log_severity_level = 4  # a cancelled run is expected, not an error
            token = WATCHDOG.watch(deadline, options)
        start = time.perf_counter()
        offload = self.offload
        # CPU time of this thread, not wall time: a run the OS preempted is not a slow run.
        cpu_start = time.thread_time() if self.cooperative and not offload else None
        try:
            if offload:
                results: list[np.ndarray] = run_in_thread(
                    self._session.run, names, dict(inputs), options
                )
            else:
                results = self._session.run(names, dict(inputs), options)
        except Exception as exc:
            if options is not None and options.terminate:
                raise InferenceTimeout(
                    f"inference of model {self.name!r} overran the request's deadline and "
                    "was cancelled"
                ) from None
            log.warning(
                "inference_failed", model=self.name, version=self.version_str, error=str(exc)
            )
            raise InferenceFailed(
                f"model {self.name!r} could not run on these inputs{_client_message(exc)}"
            ) from None
        finally:
            if token:
                WATCHDOG.done(token)
        took = time.perf_counter() - start
        if cpu_start is not None:
            cpu = time.thread_time() - cpu_start
            # Run time depends on the inputs too: once runs keep holding the worker's only
            # thread too long, this model's runs go to a helper thread from now on. One slow
            # run is not enough: a garbage collection can land in any run.
            self._slow_streak = (
                self._slow_streak + 1 if cpu * 1e6 > self.options.inline_run_us else 0
            )
            if self._slow_streak >= SLOW_STREAK:
                self.offload = True
                log.warning(
                    "model_runs_offloaded",
                    model=self.name,
                    version=self.version_str,
                    run_cpu_ms=round(cpu * 1000, 3),
                    inline_run_us=self.options.inline_run_us,
                )
        if self.observer is not None:
            self.observer.inference(self.name, self.version_str, took)
        return results

    def metadata(self) -> dict[str, Any]:
        """Open Inference Protocol model metadata for this version."""
        return {
            "name": self.name,
            "versions": [self.version_str],
            "platform": "onnxruntime_onnx",
            "inputs": [s.as_dict() for s in self.inputs],
            "outputs": [s.as_dict() for s in self.outputs],
        }


def synthetic_input(spec: TensorSpec, rows: int = 1) -> np.ndarray:
    """An array that fits the spec with ``rows`` in a dynamic first dimension (others 1)."""
    shape = tuple((rows if i == 0 else 1) if d < 0 else d for i, d in enumerate(spec.shape))
    if spec.datatype == "BYTES":
        return np.full(shape, "warm up", dtype=object)
    return np.zeros(shape, dtype=spec.dtype)


def _client_message(exc: Exception) -> str:
    # onnxruntime's text names its source files and C++ internals; the client gets the
    # operator that failed, the operator's log gets the full text.
    match = _NODE_RE.search(str(exc))
    return f" (the {match.group(1)} operator rejected them)" if match else ""
