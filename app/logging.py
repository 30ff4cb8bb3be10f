"""Structured logs: structlog's production chain, with gunicorn's own logs rendered through it.

Every line is one JSON object on stderr (journald picks it up under systemd) with an ISO UTC
timestamp, the level, the event and whatever is bound in contextvars (``request_id``...).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import orjson
import structlog
from gunicorn.glogging import Logger as GunicornBaseLogger

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _add_pid(logger: Any, name: str, event: dict[str, Any]) -> dict[str, Any]:
    # Which gunicorn worker wrote the line; read per call because workers fork.
    event["pid"] = os.getpid()
    return event


def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _add_pid,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]


def _renderer(fmt: str) -> Any:
    if fmt == "console":
        return structlog.dev.ConsoleRenderer(colors=False)
    return structlog.processors.JSONRenderer(serializer=orjson.dumps)


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    """Configure structlog and the standard library's root logger the same way.

    Args:
        level: debug, info, warning or error.
        fmt: ``json`` or ``console``.
    """
    numeric = _LEVELS[level]
    renderer = _renderer(fmt)
    structlog.configure(
        processors=[*_shared_processors(), renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # orjson renders bytes; the console renderer renders str.
        logger_factory=(
            structlog.BytesLoggerFactory(sys.stderr.buffer)
            if fmt == "json"
            else structlog.PrintLoggerFactory(sys.stderr)
        ),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(stdlib_formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)


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

    The access log is off: the app's middleware writes one richer line per request.
    """

    #: Set by the CLI from the settings before gunicorn starts.
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
