"""Prometheus metrics, summed over all gunicorn workers in multiprocess mode.

When ``PROMETHEUS_MULTIPROC_DIR`` is set (the CLI sets it before any worker starts), every
worker writes its values to files there and a scrape of any worker aggregates all of them;
gunicorn's ``child_exit`` hook marks dead workers so their live gauges drop out.

What every request records (in flight, count, duration, errors, inference time) is queued in
the process and written in batches: at most :data:`FLUSH_INTERVAL_S` later by a writer
thread, at once when a scrape or a read of the registry comes, and at worker exit.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import fcntl
import os
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict

from app import __version__
from app.logging import call_periodically, current_pid

log = structlog.get_logger(__name__)

PREFIX = "onnx_appliance"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


#: Seconds a request's metrics may wait in the worker before the writer thread writes them.
FLUSH_INTERVAL_S = 0.5
#: Queued updates past which the request that queues one writes them all itself.
FLUSH_AT = 4096
_STARTED = ("started",)


def multiprocess_enabled() -> bool:
    """True when metric values live in files shared by the workers."""
    return bool(os.environ.get(MULTIPROC_ENV))


if multiprocess_enabled():
    # prometheus_client asks the kernel for the pid on every increment, to notice a fork:
    # seven system calls per request. The pid kept current at fork tells it the same.
    values.ValueClass = values.MultiProcessValue(current_pid)


class Metrics:
    """The appliance's metrics, registered in a registry of their own.

    Args:
        registry: Where to register; a fresh one by default, so tests can build many apps.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # Registered first, so any collection of this registry sees the queue written.
        r.register(_FlushOnCollect(self))
        self._queue: collections.deque[tuple[Any, ...]] = collections.deque()
        self._flush_lock = threading.Lock()
        self._requests_in_flight = 0
        self._writer = False
        self._shared = multiprocess_enabled()
        _INSTANCES.add(self)
        self.requests = Counter(
            f"{PREFIX}_requests",
            "HTTP requests answered, by route, method, status, model, version and API key id.",
            ["route", "method", "status", "model", "version", "key"],
            registry=r,
        )
        self.request_duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time from request received to response ready, by route, model and version.",
            ["route", "model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            f"{PREFIX}_errors",
            "Error answers by route, model, version and error code (RATE_LIMITED: a key's "
            "limit, OVERLOADED: shed at admission, TIMEOUT: past the deadline...).",
            ["route", "model", "version", "code"],
            registry=r,
        )
        self.worker_starts = Counter(
            f"{PREFIX}_worker_starts",
            "Workers that loaded their models and began serving (start, reload, recycle or "
            "replacement of one that died).",
            registry=r,
        )
        self.inference_duration = Histogram(
            f"{PREFIX}_inference_duration_seconds",
            "Time spent in onnxruntime per session run, by model and version.",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size",
            "Rows per session run of batching models, by model and version.",
            ["model", "version"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.queue_duration = Histogram(
            f"{PREFIX}_queue_duration_seconds",
            "Time requests waited for their batch, by model and version.",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_tokens_histogram = Histogram(
            f"{PREFIX}_batch_tokens",
            "Padded tokens (rows x the longest) per session run of text models.",
            ["model", "version"],
            buckets=(16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536),
            registry=r,
        )
        self.tokens_total = Counter(
            f"{PREFIX}_tokens",
            "Tokens of the texts text models were asked to process (after truncation).",
            ["model", "version"],
            registry=r,
        )
        self.prompt_tokens_total = Counter(
            f"{PREFIX}_prompt_tokens",
            "Prompt tokens of generation requests, by model and version.",
            ["model", "version"],
            registry=r,
        )
        self.generated_tokens_total = Counter(
            f"{PREFIX}_generated_tokens",
            "Tokens generated, by model and version.",
            ["model", "version"],
            registry=r,
        )
        self.time_to_first_token = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Time from a generation request queued to its first token, by model and version.",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            f"{PREFIX}_inter_token_latency_seconds",
            "Time between a generation's consecutive tokens, by model and version.",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.active_sequences_gauge = Gauge(
            f"{PREFIX}_active_sequences",
            "Sequences generating right now (all live workers), by model and version.",
            ["model", "version"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.cache_lookups = Counter(
            f"{PREFIX}_cache_lookups",
            "Response cache lookups of models that cache, by model, version and result "
            "(hit or miss).",
            ["model", "version", "result"],
            registry=r,
        )
        shadow = ["model", "version", "candidate"]
        self.shadow_requests = Counter(
            f"{PREFIX}_shadow_requests",
            "Requests replayed on a shadow candidate, by model, the version that answered, "
            "candidate and outcome (compared, dropped: queue full or stale, failed, "
            "incomparable: an output missing or of another shape).",
            [*shadow, "outcome"],
            registry=r,
        )
        self.shadow_duration = Histogram(
            f"{PREFIX}_shadow_duration_seconds",
            "Time the shadow candidate took to answer a replayed request.",
            ["model", "candidate"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.shadow_labels_total = Counter(
            f"{PREFIX}_shadow_labels",
            "Rows of label outputs (or of class scores' best class) compared with the shadow "
            "candidate's, by output and result (same or different).",
            [*shadow, "output", "result"],
            registry=r,
        )
        self.shadow_abs_difference = Histogram(
            f"{PREFIX}_shadow_abs_difference",
            "Largest absolute difference per row of numeric outputs between the version that "
            "answered and the shadow candidate.",
            [*shadow, "output"],
            buckets=(1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.1, 1.0, 10.0, 100.0),
            registry=r,
        )
        self.shadow_cosine = Histogram(
            f"{PREFIX}_shadow_cosine_distance",
            "1 - cosine similarity per row of numeric outputs (embeddings, scores) between the "
            "version that answered and the shadow candidate.",
            [*shadow, "output"],
            buckets=(1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.1, 0.5, 1.0, 2.0),
            registry=r,
        )
        feature = ["model", "version", "input", "feature"]
        self.input_rows = Counter(
            f"{PREFIX}_input_rows",
            "Rows seen per input feature of models with [drift] (summed each second).",
            feature,
            registry=r,
        )
        self.input_sum = Gauge(
            f"{PREFIX}_input_sum",
            "Sum of the values per input feature of models with [drift]; with "
            "input_rows_total and input_squares_total, their mean and variance over any window.",
            feature,
            registry=r,
            multiprocess_mode="sum",
        )
        self.input_squares = Counter(
            f"{PREFIX}_input_squares",
            "Sum of the squared values per input feature of models with [drift].",
            feature,
            registry=r,
        )
        self.input_drift_score = Gauge(
            f"{PREFIX}_input_drift",
            "Drift score of each input against its reference: the largest shift of a "
            "feature's recent mean, in reference standard deviations (the worst live worker).",
            ["model", "version", "input"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.traffic_share = Gauge(
            f"{PREFIX}_traffic_share_percent",
            "Percent of the requests naming no version that each version gets (model.toml's "
            "traffic, or a rollout's), as loaded by the live workers.",
            ["model", "version"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.rollout = Gauge(
            f"{PREFIX}_rollout_percent",
            "Candidate traffic of a model's rollout (onnx-appliance rollout), by primary, "
            "candidate and status (running, complete, rolled_back), as loaded by the live "
            "workers.",
            ["model", "primary", "candidate", "status"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.in_flight = Gauge(
            f"{PREFIX}_requests_in_flight",
            "Requests being handled right now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.models_loaded = Gauge(
            f"{PREFIX}_models_loaded",
            "Model versions loaded and warmed up in each live worker.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.build_info = Gauge(
            f"{PREFIX}_build_info",
            "Always 1; the label carries the appliance version.",
            ["version"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.build_info.labels(__version__).set(1)
        self._batch_children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._shadow_children: dict[tuple[str, ...], Any] = {}

    def request_started(self) -> None:
        """Count a request in flight until its :meth:`request` (every front calls both)."""
        self._queue.append(_STARTED)

    def request(
        self,
        route: str,
        method: str,
        status: int,
        model: str,
        version: str,
        key_id: str,
        seconds: float,
        error_code: str = "",
    ) -> None:
        """Count one answered request, of any front (HTTP, gRPC), and time it."""
        self._enqueue(("request", route, method, status, model, version, key_id, seconds))
        if error_code:
            self._queue.append(("error", route, model, version, error_code))

    def inference(self, model: str, version: str, seconds: float) -> None:
        """Record one session run (the serving layer's inference observer)."""
        self._enqueue(("inference", model, version, seconds))

    def _enqueue(self, update: tuple[Any, ...]) -> None:
        # A deque's append is atomic, so request threads, gRPC threads and the writer need
        # no lock between them; only writers take one.
        queue = self._queue
        queue.append(update)
        if len(queue) > FLUSH_AT:
            self.flush()
        elif not self._writer and self._shared:
            self._start_writer()

    def _start_writer(self) -> None:
        self._writer = True
        call_periodically("metrics-writer", FLUSH_INTERVAL_S, self._write)

    def _write(self) -> None:
        try:
            self.flush()
        except Exception as exc:  # the writer must outlive one failed write
            log.error("metrics_write_failed", error=str(exc))

    def _after_fork(self) -> None:
        # The writer thread stays behind, and what the parent queued is the parent's.
        self._writer = False
        self._queue.clear()
        self._flush_lock = threading.Lock()

    def flush(self) -> None:
        """Write every queued request update into the metric values (files, when shared)."""
        with self._flush_lock:
            counts: collections.Counter[tuple[Any, ...]] = collections.Counter()
            errors: collections.Counter[tuple[str, ...]] = collections.Counter()
            durations: dict[tuple[str, ...], list[float]] = collections.defaultdict(list)
            runs: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
            started = 0
            queue = self._queue
            while queue:
                update = queue.popleft()
                kind = update[0]
                if kind == "request":
                    _, route, method, status, model, version, key_id, seconds = update
                    counts[(route, method, status, model, version, key_id)] += 1
                    durations[(route, model, version)].append(seconds)
                elif kind == "inference":
                    runs[(update[1], update[2])].append(update[3])
                elif kind == "error":
                    errors[update[1:]] += 1
                else:
                    started += 1
            in_flight = self._requests_in_flight + started - sum(counts.values())
            if in_flight != self._requests_in_flight:
                self._requests_in_flight = in_flight
                self.in_flight.set(in_flight)
            for (route, method, status, model, version, key_id), n in counts.items():
                self.requests.labels(route, method, str(status), model, version, key_id).inc(n)
            for (route, model, version), seconds in durations.items():
                observe_all(self.request_duration.labels(route, model, version), seconds)
            for labels, n in errors.items():
                self.errors.labels(*labels).inc(n)
            for (model, version), seconds in runs.items():
                observe_all(self.inference_duration.labels(model, version), seconds)

    def batch(self, model: str, version: str, rows: int, waits: list[float]) -> None:
        """Record one (micro-)batch and how long its requests queued."""
        children = self._batch_children.get((model, version))
        if children is None:
            children = self._batch_children[(model, version)] = (
                self.batch_size.labels(model, version),
                self.queue_duration.labels(model, version),
            )
        children[0].observe(rows)
        for wait in waits:
            children[1].observe(wait)

    def batch_tokens(self, model: str, version: str, padded: int) -> None:
        """Record one text model run's padded size."""
        self.batch_tokens_histogram.labels(model, version).observe(padded)

    def tokens(self, model: str, version: str, count: int) -> None:
        """Count a request's tokens."""
        self.tokens_total.labels(model, version).inc(count)

    def prompt_tokens(self, model: str, version: str, count: int) -> None:
        """Count a generation request's prompt tokens."""
        self.prompt_tokens_total.labels(model, version).inc(count)

    def generated_tokens(self, model: str, version: str, count: int) -> None:
        """Count generated tokens."""
        self.generated_tokens_total.labels(model, version).inc(count)

    def first_token(self, model: str, version: str, seconds: float) -> None:
        """Record a time to first token."""
        self.time_to_first_token.labels(model, version).observe(seconds)

    def inter_token(self, model: str, version: str, seconds: float) -> None:
        """Record the time between two tokens of a generation."""
        self.inter_token_latency.labels(model, version).observe(seconds)

    def active_sequences(self, model: str, version: str, count: int) -> None:
        """Set how many sequences this worker is generating."""
        self.active_sequences_gauge.labels(model, version).set(count)

    def cache_lookup(self, model: str, version: str, hit: bool) -> None:
        """Count a response cache hit or miss."""
        self.cache_lookups.labels(model, version, "hit" if hit else "miss").inc()

    def _shadow_child(self, family: Any, *labels: str) -> Any:
        # Children cached as for requests: every label comes from a bounded set.
        key = (str(id(family)), *labels)
        child = self._shadow_children.get(key)
        if child is None:
            child = self._shadow_children[key] = family.labels(*labels)
        return child

    def shadow_outcome(self, model: str, version: str, candidate: str, outcome: str) -> None:
        """Count a shadow job's outcome."""
        self._shadow_child(self.shadow_requests, model, version, candidate, outcome).inc()

    def shadow_run(self, model: str, candidate: str, seconds: float) -> None:
        """Time a shadow candidate's answer."""
        self._shadow_child(self.shadow_duration, model, candidate).observe(seconds)

    def shadow_labels(
        self, model: str, version: str, candidate: str, output: str, same: int, different: int
    ) -> None:
        """Count label rows that agreed with the shadow candidate, and those that did not."""
        for result, rows in (("same", same), ("different", different)):
            if rows:
                family = self.shadow_labels_total
                self._shadow_child(family, model, version, candidate, output, result).inc(rows)

    def shadow_differences(
        self,
        model: str,
        version: str,
        candidate: str,
        output: str,
        abs_diff: Any,
        cosine_distance: Any,
    ) -> None:
        """Record per-row differences of a numeric output from the shadow candidate's."""
        diff = self._shadow_child(self.shadow_abs_difference, model, version, candidate, output)
        cosine = self._shadow_child(self.shadow_cosine, model, version, candidate, output)
        for value in abs_diff.tolist():
            diff.observe(value)
        for value in cosine_distance.tolist():
            cosine.observe(value)

    def input_stats(
        self, model: str, version: str, name: str, features: Sequence[str],
        rows: Any, sums: Any, squares: Any,
    ) -> None:  # fmt: skip
        """Add a second's input statistics of one input, feature by feature."""
        for i, feature in enumerate(features):
            if rows[i]:
                self.input_rows.labels(model, version, name, feature).inc(float(rows[i]))
                self.input_sum.labels(model, version, name, feature).inc(float(sums[i]))
                self.input_squares.labels(model, version, name, feature).inc(float(squares[i]))

    def input_drift(self, model: str, version: str, name: str, score: float) -> None:
        """Set an input's drift score."""
        self.input_drift_score.labels(model, version, name).set(score)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type; all workers' values in multiprocess mode."""
        if multiprocess_enabled():
            self.flush()  # this worker's own requests, up to this one
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            with _directory_lock(fcntl.LOCK_SH):
                return generate_latest(registry), CONTENT_TYPE
        return generate_latest(self.registry), CONTENT_TYPE


_INSTANCES: weakref.WeakSet[Metrics] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for metrics in list(_INSTANCES):
        metrics._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _FlushOnCollect:
    """A collector with no metrics of its own: collecting writes the metrics' queue first."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = weakref.ref(metrics)

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        metrics = self._metrics()
        if metrics is not None:
            metrics.flush()
        return []


def observe_all(histogram: Any, values: Sequence[float]) -> None:
    """``histogram.observe(v)`` for every value, with one write per bucket hit and one for the sum.

    prometheus_client has no batch observe; this uses the child's buckets (one value each,
    not cumulative) and sum as its own ``observe`` does, which a test compares against.
    """
    hits = collections.Counter(bisect.bisect_left(histogram._upper_bounds, v) for v in values)
    for index, n in hits.items():
        histogram._buckets[index].inc(n)
    histogram._sum.inc(sum(values))


def mark_process_dead(pid: int) -> None:
    """Drop a dead worker's live gauges (gunicorn ``child_exit`` hook)."""
    if multiprocess_enabled():
        multiprocess.mark_process_dead(pid)


@contextlib.contextmanager
def _directory_lock(mode: int) -> Iterator[None]:
    # Scrapes read the files shared; compaction rewrites them exclusive, so a scrape never
    # sees a dead worker's counts both in its own file and in the archive.
    path = Path(os.environ[MULTIPROC_ENV]) / ".compaction.lock"
    with path.open("a") as lock:
        fcntl.flock(lock, mode)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def compact_dead_worker(pid: int) -> None:
    """Fold a dead worker's counters and histograms into one archive file per type.

    Without this, every recycled or reloaded worker leaves its files behind and the
    directory (and each scrape) grows without bound. Totals are unchanged: archived values
    are added, exactly as the collector would have added the dead worker's file.
    """
    if not multiprocess_enabled():
        return
    directory = Path(os.environ[MULTIPROC_ENV])
    with _directory_lock(fcntl.LOCK_EX):
        # Summed gauges (input sums) too: their dead workers' values still count.
        for kind in ("counter", "histogram", "summary", "gauge_sum"):
            dead = directory / f"{kind}_{pid}.db"
            if not dead.exists():
                continue
            archive = MmapedDict(str(directory / f"{kind}_archive.db"))
            try:
                for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(str(dead)):
                    current, _ = archive.read_value(key)
                    archive.write_value(key, current + value, timestamp)
            finally:
                archive.close()
            dead.unlink()
