"""gunicorn's settings, derived from the appliance's settings and its repository."""

from __future__ import annotations

from typing import Any

import structlog

from app.logging import gunicorn_logger
from app.models.repository import Repository
from app.server import hooks
from app.server.hooks import WORKER_CLASSES
from app.settings import Settings

log = structlog.get_logger(__name__)


def worker_model(settings: Settings, repository: Repository) -> tuple[str, int]:
    """Worker class and threads: explicit settings win, else gevent.

    gevent serves every connection of a worker on one thread, so requests never pay a
    thread hand-off and batching models gather from all of them. A gthread worker needs
    about as many request threads as its largest batch to gather full batches.

    Returns:
        The setting's worker class name and the threads per worker (1 unless gthread).
    """
    largest = repository.largest_batch
    chosen = settings.server.worker_class
    worker_class = "gevent" if chosen == "auto" else chosen
    threads = settings.server.threads or (max(4, min(64, largest)) if largest else 4)
    if worker_class == "sync" and largest:
        log.warning(
            "batching_without_threads",
            detail="sync workers take one request at a "
            "time, so batching models never merge requests; use gevent or gthread",
        )
    return worker_class, threads if worker_class == "gthread" else 1


def gunicorn_options(settings: Settings, repository: Repository) -> dict[str, Any]:
    """gunicorn settings derived from ours and from what the repository needs.

    Nobody writes gunicorn flags by hand: ``onnx-appliance serve`` builds them here.
    Models are never loaded in the master (``preload_app`` stays off: onnxruntime thread
    pools do not survive fork).
    """
    s = settings.server
    worker_class, threads = worker_model(settings, repository)
    options: dict[str, Any] = {
        "bind": list(s.bind),
        "workers": settings.effective_workers(),
        "worker_class": WORKER_CLASSES[worker_class],
        "threads": threads,
        "worker_connections": s.worker_connections,
        "timeout": s.timeout,
        "graceful_timeout": s.graceful_timeout,
        "keepalive": s.keepalive,
        "backlog": s.backlog,
        "http_parser": s.http_parser,
        "max_requests": s.max_requests,
        "max_requests_jitter": s.max_requests_jitter,
        "preload_app": False,
        "proc_name": "onnx-appliance",
        "logger_class": gunicorn_logger(settings.logging.format),
        "loglevel": settings.logging.level,
        "accesslog": None,
        "pidfile": s.pidfile or None,
        # gunicorn applies this umask only while it creates unix sockets.
        "umask": 0o777 & ~s.socket_mode,
        "post_fork": hooks.post_fork,
        "post_worker_init": hooks.post_worker_init,
        "child_exit": hooks.child_exit,
        "when_ready": hooks.when_ready,
        "worker_exit": hooks.worker_exit,
    }
    if s.control_socket:
        options["control_socket"] = s.control_socket
    else:
        options["control_socket_disable"] = True
    return options
