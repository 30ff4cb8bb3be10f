"""gunicorn integration: the configuration built from settings, hooks, and the application.

Nobody writes gunicorn flags by hand: ``onnx-appliance serve`` builds them here. Models are
never loaded in the master (``preload_app`` stays off: onnxruntime thread pools do not survive
fork); each worker scans the repository, creates its sessions and warms them up before it
accepts a connection, so a worker that answers is a ready worker.
"""

from __future__ import annotations

import os
from typing import Any

import structlog
from gunicorn.app.base import BaseApplication

from app.logging import GunicornLogger
from app.metrics import Metrics, mark_process_dead
from app.settings import Settings, cpu_count

log = structlog.get_logger(__name__)
WORKER_BOOT_ERROR = 3


def gunicorn_options(settings: Settings) -> dict[str, Any]:
    """gunicorn settings derived from ours."""
    s = settings.server
    options: dict[str, Any] = {
        "bind": list(s.bind),
        "workers": settings.effective_workers(),
        "worker_class": s.worker_class,
        "threads": s.threads if s.worker_class == "gthread" else 1,
        "timeout": s.timeout,
        "graceful_timeout": s.graceful_timeout,
        "keepalive": s.keepalive,
        "backlog": s.backlog,
        "max_requests": s.max_requests,
        "max_requests_jitter": s.max_requests_jitter,
        "preload_app": False,
        "proc_name": "onnx-appliance",
        "logger_class": GunicornLogger,
        "loglevel": settings.logging.level,
        "accesslog": None,
        # gunicorn applies this umask only while it creates unix sockets.
        "umask": 0o777 & ~s.socket_mode,
        "post_fork": post_fork,
        "child_exit": child_exit,
        "when_ready": when_ready,
    }
    if s.control_socket:
        options["control_socket"] = s.control_socket
    else:
        options["control_socket_disable"] = True
    return options


def post_fork(server: Any, worker: Any) -> None:
    """Pin the new worker to one core when ``server.cpu_affinity`` is on."""
    settings: Settings = server.app.settings
    if settings.server.cpu_affinity:
        cores = sorted(os.sched_getaffinity(0))
        core = cores[worker.age % len(cores)]
        os.sched_setaffinity(0, {core})


def child_exit(server: Any, worker: Any) -> None:
    """Drop the dead worker's live gauges from the shared metrics."""
    mark_process_dead(worker.pid)


def when_ready(server: Any) -> None:
    """Say where the master listens; workers then log each model as it becomes ready."""
    app: ApplianceApplication = server.app
    log.info(
        "listening",
        addresses=[str(lst) for lst in server.LISTENERS],
        workers=app.settings.effective_workers(),
        models=app.model_names,
        cores=cpu_count(),
    )


class ApplianceApplication(BaseApplication):  # type: ignore[misc]
    """gunicorn application whose ``load`` runs in each worker after fork.

    Args:
        settings: Validated settings.
        model_names: Names found by the master's scan, for the start-up log line.
        model_file: Serve this single ``.onnx`` file instead of the repository.
        model_name: Name for ``model_file`` (default: the file's stem).
    """

    def __init__(
        self, settings: Settings, model_names: list[str], model_file: str = "", model_name: str = ""
    ) -> None:
        self.settings = settings
        self.model_names = model_names
        self.model_file = model_file
        self.model_name = model_name
        super().__init__()

    def load_config(self) -> None:
        """Copy our options into gunicorn's config."""
        for key, value in gunicorn_options(self.settings).items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        """Scan, load and warm up the models in this worker, then build the app."""
        from app.models.errors import RepositoryError
        from app.wsgi import build_repository, create_app

        metrics = Metrics()
        try:
            repository = build_repository(self.settings, metrics, self.model_file, self.model_name)
            repository.load()
        except RepositoryError as exc:
            # One line instead of a traceback; exit status 3 makes the master halt
            # ("worker failed to boot") rather than respawn forever.
            log.error("worker_boot_failed", error=str(exc))
            raise SystemExit(WORKER_BOOT_ERROR) from None
        metrics.models_loaded.set(sum(1 for _ in repository.models()))
        log.info("worker_ready", models=repository.names)
        return create_app(self.settings, repository, metrics)
