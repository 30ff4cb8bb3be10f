"""Structured logs: structlog's production chain, with gunicorn's own logs rendered through it.

Every line is one JSON object on stderr (journald picks it up under systemd) with an ISO UTC
timestamp, the level, the event and whatever is bound in contextvars (``request_id``...).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import functools
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import PurePath
from typing import Any, BinaryIO

import orjson
import structlog
from gunicorn.glogging import Logger as GunicornBaseLogger

#: Name of the logger that writes one line per request.
ACCESS_LOGGER = "app.access"
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


_PID = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _PID.__setitem__(0, os.getpid()))


def current_pid() -> int:
    """This process's pid, kept current across fork without a system call per use."""
    return _PID[0]


def call_periodically(name: str, interval: float, fn: Callable[[], None]) -> None:
    """Call ``fn`` every ``interval`` seconds, for the rest of the process, from a daemon
    thread (a greenlet once gevent has patched threading)."""

    def run() -> None:
        while True:
            time.sleep(interval)
            fn()

    threading.Thread(target=run, name=name, daemon=True).start()


def _add_pid(logger: Any, name: str, event: dict[str, Any]) -> dict[str, Any]:
    # Which gunicorn worker wrote the line.
    event["pid"] = _PID[0]
    return event


def _add_timestamp(logger: Any, name: str, event: dict[str, Any]) -> dict[str, Any]:
    # ISO 8601 UTC with microseconds, as structlog's TimeStamper(fmt="iso", utc=True) writes
    # it, but the date and time of day formatted once a second instead of per line.
    now = time.time()
    second = int(now)
    event["timestamp"] = f"{_iso_second(second)}.{int((now - second) * 1e6):06d}Z"
    return event


@functools.lru_cache(maxsize=1)
def _iso_second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _add_pid,
        _add_timestamp,
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]


def _renderer(fmt: str) -> Any:
    if fmt == "console":
        return structlog.dev.ConsoleRenderer(colors=False)
    return structlog.processors.JSONRenderer(serializer=orjson.dumps)


class BufferedLogger:
    """A structlog logger that writes whole lines in batches, from one thread per process.

    Writing every request's line with its own system call costs a worker about a tenth of
    its time under load. Lines are queued and written every ``interval`` seconds (or sooner
    when many wait); warnings and errors are written at once, and the queue is drained at
    exit, so only a process killed outright can lose the last fraction of a second.

    Args:
        stream: Binary stream to write to (stderr).
        interval: Seconds between writes.
    """

    def __init__(self, stream: BinaryIO, interval: float = 0.05) -> None:
        self._stream = stream
        self._interval = interval
        self._lines: collections.deque[bytes] = collections.deque()
        self._lock = threading.Lock()
        self._writer = False
        atexit.register(self.flush)
        # Threads do not survive fork, and lines the parent queued are the parent's to write.
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        self._writer = False
        self._lines.clear()
        self._lock = threading.Lock()

    def _start_writer(self) -> None:
        self._writer = True
        call_periodically("log-writer", self._interval, self.flush)

    def flush(self) -> None:
        """Write every queued line now."""
        with self._lock:
            if not self._lines:
                return
            chunk = []
            while self._lines:
                chunk.append(self._lines.popleft())
            with contextlib.suppress(OSError, ValueError):
                self._stream.write(b"".join(chunk))
                self._stream.flush()

    def msg(self, message: bytes) -> None:
        """Queue one rendered line."""
        self._lines.append(message + b"\n")
        if not self._writer:
            self._start_writer()
        if len(self._lines) > 1000:
            self.flush()

    def urgent(self, message: bytes) -> None:
        """Write one line now, after everything queued before it."""
        self.msg(message)
        self.flush()

    debug = info = msg
    warning = warn = error = err = critical = exception = fatal = failure = urgent


class _Immediate:
    """The shared buffered logger, but every line is written at once."""

    def __init__(self, logger: BufferedLogger) -> None:
        self.msg = logger.urgent
        self.debug = self.info = self.warning = self.warn = self.error = self.err = self.msg
        self.critical = self.exception = self.fatal = self.failure = self.msg


class BufferedLoggerFactory:
    """Batches the per-request access lines; every other line is written at once.

    Both share one queue, so lines stay in order.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._logger = BufferedLogger(stream)
        self._immediate = _Immediate(self._logger)

    def __call__(self, *args: Any) -> BufferedLogger | _Immediate:
        """The batching logger for ``app.access``, the immediate one for the rest."""
        return self._logger if args and args[0] == ACCESS_LOGGER else self._immediate


class _ChainAccess:
    """Request lines through structlog's whole processor chain (console format, tests)."""

    def __call__(self, fields: dict[str, Any], quiet: bool) -> None:
        access = structlog.get_logger(ACCESS_LOGGER)
        (access.debug if quiet else access.info)("request", **fields)


class _DirectAccess:
    """Request lines rendered straight to JSON: the line the chain renders, at half the cost.

    The chain merges contextvars, which costs most of a line; the fronts pass what they bound
    (``request_id``, ``key_id``) as fields instead.
    """

    def __init__(self, logger: BufferedLogger, level: int) -> None:
        self._logger = logger
        self._level = level

    def __call__(self, fields: dict[str, Any], quiet: bool) -> None:
        level = "debug" if quiet else "info"
        if _LEVELS[level] < self._level:
            return
        fields["event"] = "request"
        fields["level"] = level
        fields["pid"] = _PID[0]
        self._logger.msg(orjson.dumps(_add_timestamp(None, "", fields)))


#: How request lines are written, set by :func:`configure_logging`.
_ACCESS: list[_ChainAccess | _DirectAccess] = [_ChainAccess()]


def log_request(fields: dict[str, Any], quiet: bool = False) -> None:
    """Write one request's access line (event ``request``), at debug level when ``quiet``.

    Args:
        fields: The line's fields, ``request_id`` included; the dict becomes the line.
        quiet: Log at debug level (successful probes and scrapes).
    """
    _ACCESS[0](fields, quiet)


def flush_logs() -> None:
    """Write queued log lines now (before a worker exits)."""
    factory = structlog.get_config().get("logger_factory")
    if isinstance(factory, BufferedLoggerFactory):
        factory._logger.flush()


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    """Configure structlog and the standard library's root logger the same way.

    Args:
        level: debug, info, warning or error.
        fmt: ``json`` or ``console``.
    """
    numeric = _LEVELS[level]
    renderer = _renderer(fmt)
    # orjson renders bytes; the console renderer renders str.
    factory = BufferedLoggerFactory(sys.stderr.buffer) if fmt == "json" else None
    structlog.configure(
        processors=[*_shared_processors(), renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=factory or structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    _ACCESS[0] = _DirectAccess(factory._logger, numeric) if factory else _ChainAccess()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(stdlib_formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # Python's warnings print two plain lines with a source path; here they are log lines.
    warnings.showwarning = _log_warning


def _log_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    structlog.get_logger("py.warnings").warning(
        "python_warning",
        category=category.__name__,
        message=str(message),
        where=f"{PurePath(filename).name}:{lineno}",
    )


def stdlib_formatter(fmt: str = "json") -> logging.Formatter:
    """A formatter that renders standard-library records with the structlog chain."""
    renderer = _renderer(fmt)
    if fmt == "json":

        def render_str(logger: Any, name: str, event: Any) -> str:
            return renderer(logger, name, event).decode()  # type: ignore[no-any-return]

        final: Any = render_str
    else:
        final = renderer
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_shared_processors(), structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, final],
    )


class GunicornLogger(GunicornBaseLogger):  # type: ignore[misc]
    """gunicorn's logger with its error log rendered by the structlog chain.

    The access log is off: the app's middleware writes one richer line per request. Use
    :func:`gunicorn_logger` for a class bound to a log format.
    """

    log_format = "json"

    def setup(self, cfg: Any) -> None:
        """Attach one stderr handler with the structlog formatter to gunicorn's error log."""
        super().setup(cfg)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(stdlib_formatter(self.log_format))
        self.error_log.handlers[:] = [handler]
        self.error_log.propagate = False
        self.access_log.handlers[:] = []
        self.access_log.propagate = False

    def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        """Do nothing: requests are logged by the app."""


def gunicorn_logger(fmt: str) -> type[GunicornLogger]:
    """gunicorn's ``logger_class`` rendering in ``fmt`` (gunicorn instantiates it itself)."""
    return type(f"GunicornLogger_{fmt}", (GunicornLogger,), {"log_format": fmt})
