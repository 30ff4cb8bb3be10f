"""Input drift: running statistics of a model's inputs against a reference window.

For each numeric input, every feature (a column of a ``[rows, features]`` input, the one value
of a ``[rows]`` input, the mean of each row otherwise) gets a count, a sum and a sum of squares;
text gets the token count of each text, other byte strings their length. Each worker adds
them up in numpy arrays on the request path and, at most once a second, adds them to
Prometheus counters (summed over the workers: what ``onnx-appliance drift`` reads to capture a
reference) and updates exponentially decayed statistics of the recent window (time constant
``window_s``). The drift score of an input is the largest standardised mean shift of its
features: ``|recent mean - reference mean| / reference standard deviation``, exported as a
gauge once a reference exists (``<models.drift_dir>/<model>.json``, re-read when it changes).

Payloads are stored only with ``[drift.capture]``: a sampled share of requests, inputs named
in ``redact`` replaced, written as JSON lines to files of bounded size, the oldest removed.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import msgspec
import numpy as np
import structlog

log = structlog.get_logger(__name__)

#: Seconds between flushes of a worker's sums into the shared counters and the gauge.
FLUSH_S = 1.0
#: Largest request (all inputs, in bytes) whose payload is captured.
MAX_CAPTURED_BYTES = 1 << 20
#: Reference standard deviations below this (of a constant feature) count as this.
MIN_STD = 1e-6
REDACTED = "[redacted]"


class DriftObserver(Protocol):
    """Receives what the drift statistics measure (a worker's metrics implement it)."""

    def input_stats(
        self, model: str, version: str, name: str, features: Sequence[str],
        rows: np.ndarray, sums: np.ndarray, squares: np.ndarray,
    ) -> None:  # fmt: skip
        """Rows, sums and sums of squares per feature since the last flush."""

    def input_drift(self, model: str, version: str, name: str, score: float) -> None:
        """The input's drift score against the reference."""


@dataclass(frozen=True, slots=True)
class CaptureOptions:
    """Validated ``[drift.capture]`` settings.

    Attributes:
        directory: Where this model's files go (``<models.capture_dir>/<model>``).
        percent: Share of requests captured.
        max_file_bytes: A file is closed once it reaches this size.
        max_files: Files kept per model; the oldest are removed.
        redact: Inputs whose values are never written.
    """

    directory: Path
    percent: float
    max_file_bytes: int
    max_files: int
    redact: frozenset[str]


@dataclass(frozen=True, slots=True)
class DriftOptions:
    """Validated ``[drift]`` settings.

    Attributes:
        reference: The reference file (``<models.drift_dir>/<model>.json``), or None.
        window_s: Time constant of the recent statistics, in seconds.
        max_features: Features tracked per input (the first ones).
        capture: Payload capture, or None (the default: no payload is stored).
    """

    reference: Path | None
    window_s: float
    max_features: int
    capture: CaptureOptions | None = None


class FeatureReference(msgspec.Struct):
    """Reference mean and standard deviation of one feature."""

    mean: float
    std: float
    rows: float


class DriftReference(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A reference window of one model: ``inputs[input][feature]``."""

    model: str
    captured_at: float
    seconds: float
    inputs: dict[str, dict[str, FeatureReference]]


def feature_names(shape: Sequence[int], max_features: int) -> list[str]:
    """Feature names of an input of ``shape`` (rows first), as :func:`features` lays them."""
    if len(shape) == 2 and shape[1] > 0:
        return [str(i) for i in range(min(shape[1], max_features))]
    return ["value"] if len(shape) == 1 else ["mean"]


def features(array: np.ndarray, max_features: int) -> np.ndarray | None:
    """``[rows, features]`` float64 values of a numeric input (None for other kinds)."""
    if array.dtype.kind not in "biuf" or array.ndim == 0 or not len(array):
        return None
    values: np.ndarray = array.astype(np.float64, copy=False)
    if values.ndim == 1:
        return values[:, None]
    if values.ndim == 2:
        return values[:, :max_features]
    means: np.ndarray = values.reshape(len(values), -1).mean(axis=1)
    return means[:, None]


@dataclass(slots=True)
class _Stats:
    """Sums of one input since the last flush, and the decayed recent ones."""

    names: list[str]
    rows: np.ndarray
    sums: np.ndarray
    squares: np.ndarray
    recent_rows: np.ndarray
    recent_sums: np.ndarray
    recent_squares: np.ndarray

    @classmethod
    def empty(cls, names: list[str]) -> _Stats:
        zeros = [np.zeros(len(names)) for _ in range(6)]
        return cls(names, *zeros)

    def add(self, values: np.ndarray) -> None:
        self.rows += len(values)
        self.sums += values.sum(axis=0)
        self.squares += np.square(values).sum(axis=0)


class Drift:
    """The input statistics of one model version in one worker.

    Args:
        model: Model name.
        version: Version.
        options: The ``[drift]`` settings.
        observer: Where counters and scores go (the worker's metrics).
    """

    def __init__(
        self, model: str, version: str, options: DriftOptions, observer: DriftObserver | None
    ) -> None:
        self.model = model
        self.version = version
        self.options = options
        self.observer = observer
        self._stats: dict[str, _Stats] = {}
        self._lock = threading.Lock()
        self._flushed = time.monotonic()
        self._reference: DriftReference | None = None
        self._reference_mtime: float | None = None
        self.capture = Capture(model, version, options.capture) if options.capture else None

    # -- the request path --------------------------------------------------------------------

    def observe(self, inputs: Mapping[str, np.ndarray], request_id: str = "") -> None:
        """Add a request's numeric inputs (and byte strings' lengths) to the statistics."""
        limit = self.options.max_features
        with self._lock:
            for name, array in inputs.items():
                values = features(array, limit)
                if values is None and array.dtype.kind in "OSU":
                    values = np.array([[len(v)] for v in array.reshape(-1)], dtype=np.float64)
                if values is None or not len(values):
                    continue
                self._stats_for(name, array, values).add(values)
        if self.capture is not None:
            self.capture.offer(inputs, request_id)
        self._maybe_flush()

    def observe_lengths(self, name: str, lengths: Sequence[int]) -> None:
        """Add the lengths (tokens) of a request's texts."""
        values = np.asarray(lengths, dtype=np.float64)[:, None]
        with self._lock:
            stats = self._stats.get(name)
            if stats is None:
                stats = self._stats[name] = _Stats.empty(["length"])
            stats.add(values)
        self._maybe_flush()

    def _stats_for(self, name: str, array: np.ndarray, values: np.ndarray) -> _Stats:
        stats = self._stats.get(name)
        width = values.shape[1]
        if stats is None or len(stats.names) != width:
            if array.dtype.kind in "OSU":
                names = ["length"]
            else:
                names = feature_names((len(array), *array.shape[1:]), self.options.max_features)
            stats = self._stats[name] = _Stats.empty(names[:width])
        return stats

    def _maybe_flush(self) -> None:
        now = time.monotonic()
        if now - self._flushed >= FLUSH_S:
            self.flush(now)

    # -- once a second -----------------------------------------------------------------------

    def flush(self, now: float | None = None) -> None:
        """Hand the sums to the counters, decay the recent window, update the scores."""
        now = time.monotonic() if now is None else now
        with self._lock:
            elapsed = now - self._flushed
            self._flushed = now
            pending = []
            decay = math.exp(-max(elapsed, 0.0) / self.options.window_s)
            for name, stats in self._stats.items():
                if stats.rows.any():
                    pending.append((name, stats.names, stats.rows, stats.sums, stats.squares))
                stats.recent_rows = stats.recent_rows * decay + stats.rows
                stats.recent_sums = stats.recent_sums * decay + stats.sums
                stats.recent_squares = stats.recent_squares * decay + stats.squares
                zeros = np.zeros(len(stats.names))
                stats.rows, stats.sums, stats.squares = zeros, zeros.copy(), zeros.copy()
            scores = self._scores()
        if self.observer is not None:
            for name, names, rows, sums, squares in pending:
                self.observer.input_stats(
                    self.model, self.version, name, names, rows, sums, squares
                )
            for name, score in scores.items():
                self.observer.input_drift(self.model, self.version, name, score)
        if self.capture is not None:
            self.capture.flush()

    def _scores(self) -> dict[str, float]:
        reference = self.reference()
        if reference is None:
            return {}
        scores = {}
        for name, stats in self._stats.items():
            wanted = reference.inputs.get(name)
            if not wanted:
                continue
            shifts = []
            for i, feature in enumerate(stats.names):
                ref = wanted.get(feature)
                rows = stats.recent_rows[i]
                if ref is None or rows <= 0:
                    continue
                mean = stats.recent_sums[i] / rows
                shifts.append(abs(mean - ref.mean) / max(ref.std, MIN_STD))
            if shifts:
                scores[name] = float(max(shifts))
        return scores

    def reference(self) -> DriftReference | None:
        """The reference, re-read when its file changes (an unusable one counts as none)."""
        path = self.options.reference
        if path is None:
            return None
        try:
            mtime = path.stat().st_mtime
        except OSError:
            self._reference, self._reference_mtime = None, None
            return None
        if mtime != self._reference_mtime:
            self._reference_mtime = mtime
            self._reference = read_reference(path, self.model)
        return self._reference


def read_reference(path: Path, model: str) -> DriftReference | None:
    """The reference in ``path``; None (logged) when it is unreadable or another model's."""
    try:
        data = path.read_bytes()
        reference = msgspec.json.decode(data, type=DriftReference)
    except (OSError, msgspec.DecodeError) as exc:
        log.warning("drift_reference_ignored", model=model, path=str(path), error=str(exc))
        return None
    if reference.model != model:
        log.warning(
            "drift_reference_ignored", model=model, path=str(path),
            error=f"it is the reference of model {reference.model!r}",
        )  # fmt: skip
        return None
    return reference


class Capture:
    """Sampled payloads of one model version in one worker, in rotated JSON-lines files.

    Files are ``<directory>/<pid>-<n>.jsonl`` (mode 0640); once one reaches
    ``max_file_bytes`` the next is opened, and the oldest files of the model beyond
    ``max_files`` are removed. A folder that cannot be written turns capture off (logged);
    serving goes on.
    """

    def __init__(self, model: str, version: str, options: CaptureOptions) -> None:
        self.model = model
        self.version = version
        self.options = options
        self._share = options.percent / 100
        self._file: IO[bytes] | None = None
        self._size = 0
        self._numbers = itertools.count()
        self._lock = threading.Lock()
        self.enabled = True

    def offer(self, inputs: Mapping[str, np.ndarray], request_id: str) -> None:
        """Write the request if it is sampled (and small enough)."""
        if not self.enabled or random.random() >= self._share:  # noqa: S311 - sampling only
            return
        if sum(a.nbytes for a in inputs.values()) > MAX_CAPTURED_BYTES:
            return
        record = {
            "time": round(time.time(), 3),
            "model": self.model,
            "version": self.version,
            "request_id": request_id,
            "inputs": {
                name: REDACTED if name in self.options.redact else _plain(array)
                for name, array in inputs.items()
            },
        }
        line = msgspec.json.encode(record) + b"\n"
        with self._lock:
            try:
                self._write(line)
            except OSError as exc:
                self.enabled = False
                log.warning("capture_disabled", model=self.model, error=str(exc))

    def _write(self, line: bytes) -> None:
        if self._file is None or self._size + len(line) > self.options.max_file_bytes:
            self._file = self._rotate()
        self._file.write(line)
        self._size += len(line)

    def _rotate(self) -> IO[bytes]:
        if self._file is not None:
            self._file.close()
        directory = self.options.directory
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{os.getpid()}-{next(self._numbers)}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        opened = os.fdopen(fd, "ab")
        self._size = 0
        files = sorted(directory.glob("*.jsonl"), key=_age)
        for old in files[: max(len(files) - self.options.max_files, 0)]:
            if old != path:
                old.unlink(missing_ok=True)
        return opened

    def flush(self) -> None:
        """Write buffered lines out (once a second)."""
        with self._lock:
            if self._file is not None:
                try:
                    self._file.flush()
                except OSError as exc:
                    self.enabled = False
                    log.warning("capture_disabled", model=self.model, error=str(exc))


def _age(path: Path) -> tuple[float, str]:
    try:
        return path.stat().st_mtime, path.name
    except OSError:
        return 0.0, path.name


def _plain(array: np.ndarray) -> Any:
    """An input as JSON values: numbers and texts as they are, bytes as their length."""
    if array.dtype.kind == "O":
        return [f"<{len(v)} bytes>" if isinstance(v, bytes) else str(v) for v in array.reshape(-1)]
    if array.dtype.kind == "S":
        return [f"<{len(v)} bytes>" for v in array.reshape(-1)]
    return array.tolist()
