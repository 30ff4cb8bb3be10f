"""gunicorn's server hooks: what the master and each worker do at the points gunicorn offers."""

from __future__ import annotations

import os
from typing import Any

import structlog

from app.logging import flush_logs
from app.metrics import compact_dead_worker, mark_process_dead
from app.server.state import ServingState
from app.settings import cpu_count

log = structlog.get_logger(__name__)

#: gunicorn's import path of each ``server.worker_class``.
WORKER_CLASSES = {
    "gevent": "app.server.gevent_worker.GeventWorker",
    "gthread": "app.server.workers.ThreadWorker",
    "sync": "app.server.workers.SyncWorker",
}


def worker_class_name(path: str) -> str:
    """The setting's name for a worker class's import path."""
    return next((k for k, v in WORKER_CLASSES.items() if v == path), path)


def post_fork(server: Any, worker: Any) -> None:
    """In the new worker: take its way of running models, and pin it to one core when
    ``server.cpu_affinity`` is on."""
    server.app.runner = worker.runner
    settings = server.app.state.settings
    if settings.server.cpu_affinity:
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[worker.age % len(cores)]})


def post_worker_init(worker: Any) -> None:
    """Mark this worker ready: its models are loaded and warm (the reload waits for this)."""
    (worker.app.runtime / "ready" / str(os.getpid())).touch()


def child_exit(server: Any, worker: Any) -> None:
    """Forget a dead worker: readiness marker, live gauges, and fold its counters away."""
    (server.app.runtime / "ready" / str(worker.pid)).unlink(missing_ok=True)
    try:
        mark_process_dead(worker.pid)
        compact_dead_worker(worker.pid)
    except OSError as exc:  # metrics housekeeping must never take the master down
        log.error("metrics_compaction_failed", pid=worker.pid, error=str(exc))


def worker_exit(server: Any, worker: Any) -> None:
    """Let the worker's gRPC calls finish (none are taken any more), then write its queued
    input statistics, request metrics and log lines before it goes."""
    if server.app.grpc_server is not None:
        grace = server.app.state.settings.server.graceful_timeout
        server.app.grpc_server.stop(grace=grace).wait()
    server.app.state.repository.flush_statistics()
    if server.app.metrics is not None:
        server.app.metrics.flush()
    flush_logs()


def when_ready(server: Any) -> None:
    """Say where the master listens and whether the API is open."""
    state: ServingState = server.app.state
    log.info(
        "listening",
        addresses=[str(lst) for lst in server.LISTENERS],
        workers=state.settings.effective_workers(),
        worker_class=worker_class_name(server.cfg.worker_class_str),
        threads=server.cfg.threads,
        worker_connections=server.cfg.worker_connections,
        models=state.repository.names,
        cores=cpu_count(),
    )
    if not state.keys.enabled:
        log.warning(
            "auth_open",
            detail="no API keys configured: every route is open; add one with "
            "`onnx-appliance keys add <id>`",
        )
