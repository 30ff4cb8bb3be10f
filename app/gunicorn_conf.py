"""gunicorn integration: configuration from settings, hooks, the application and its arbiter.

Nobody writes gunicorn flags by hand: ``onnx-appliance serve`` builds them here. The master
validates everything (settings, repository layout, keys) and keeps that as the *serving
state*; models are never loaded in the master (``preload_app`` stays off: onnxruntime thread
pools do not survive fork). Each worker inherits the state, creates its sessions and warms
them up before it accepts a connection, so a worker that answers is a ready worker.

A reload (``SIGHUP``, ``systemctl reload``, ``onnx-appliance reload``) re-reads the settings,
the repository and the keys in the master; if they are valid it starts new workers, waits
until every one of them is ready, and only then stops the old ones gracefully. Anything
invalid, or new workers that fail to load, leaves the old workers serving the old state.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from gunicorn import sock as gunicorn_sock
from gunicorn import systemd
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter

from app.keys import KeyFileError, KeyStore
from app.logging import GunicornLogger, flush_logs
from app.metrics import Metrics, compact_dead_worker, mark_process_dead
from app.models.errors import RepositoryError
from app.models.repository import Repository
from app.ratelimit import RateLimiter, create_state
from app.settings import Settings, SettingsError, cpu_count, load_settings

log = structlog.get_logger(__name__)
WORKER_BOOT_ERROR = 3


class StartupError(Exception):
    """Settings, repository or keys cannot be served; the message is one line."""


@dataclass(frozen=True)
class ServingState:
    """Everything the master validated, inherited by the workers it forks.

    Attributes:
        settings: Validated settings.
        repository: Scanned (not loaded) repository; each worker loads its own copy.
        keys: API keys.
        limiter_path: Shared rate-limit state, or None when no key is configured.
        generation: 0 at start, +1 per successful reload.
    """

    settings: Settings
    repository: Repository
    keys: KeyStore
    limiter_path: Path | None
    generation: int


# gunicorn's name (or import path) of each worker class setting.
WORKER_CLASSES = {
    "gevent": "app.workers.GeventWorker",
    "gthread": "app.workers.ThreadWorker",
    "sync": "app.workers.SyncWorker",
}


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
    """gunicorn settings derived from ours and from what the repository needs."""
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
        "max_requests": s.max_requests,
        "max_requests_jitter": s.max_requests_jitter,
        "preload_app": False,
        "proc_name": "onnx-appliance",
        "logger_class": GunicornLogger,
        "loglevel": settings.logging.level,
        "accesslog": None,
        "pidfile": s.pidfile or None,
        # gunicorn applies this umask only while it creates unix sockets.
        "umask": 0o777 & ~s.socket_mode,
        "post_fork": post_fork,
        "post_worker_init": post_worker_init,
        "child_exit": child_exit,
        "when_ready": when_ready,
        "worker_exit": worker_exit,
    }
    if s.control_socket:
        options["control_socket"] = s.control_socket
    else:
        options["control_socket_disable"] = True
    return options


def post_fork(server: Any, worker: Any) -> None:
    """Pin the new worker to one core when ``server.cpu_affinity`` is on."""
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
    """Write the worker's queued log lines before it goes."""
    flush_logs()


def when_ready(server: Any) -> None:
    """Say where the master listens and whether the API is open."""
    state: ServingState = server.app.state
    log.info(
        "listening",
        addresses=[str(lst) for lst in server.LISTENERS],
        workers=state.settings.effective_workers(),
        worker_class=next(
            (k for k, v in WORKER_CLASSES.items() if v == server.cfg.worker_class_str),
            server.cfg.worker_class_str,
        ),
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


class ApplianceArbiter(Arbiter):  # type: ignore[misc]
    """gunicorn's arbiter with a reload that never drops below ready capacity."""

    def reload(self) -> None:
        """Validate, start and await new workers, then retire the old ones."""
        app: ApplianceApplication = self.app
        try:
            app.refresh()
        except StartupError as exc:
            log.error("reload_refused", error=str(exc), detail="the previous state keeps serving")
            return
        old = list(self.WORKERS)
        old_address = self.cfg.address
        app.reload()
        self.setup(app)
        if self.cfg.address != old_address:
            log.warning("reload_bind_unchanged", detail="new bind addresses need a restart")
        self.cfg.on_reload(self)
        new = [self.spawn_worker() for _ in range(self.cfg.workers)]
        failure = self._await_ready(new, app.state.settings.server.reload_timeout)
        if failure is None:
            for pid in old:
                self.kill_worker(pid, signal.SIGTERM)
            log.info(
                "reload_complete",
                generation=app.state.generation,
                models=app.state.repository.names,
                workers=new,
            )
            return
        self._discard(new)
        app.rollback()
        app.reload()
        self.setup(app)
        log.error("reload_refused", error=failure, detail="the previous state keeps serving")

    def _await_ready(self, pids: list[int], timeout: float) -> str | None:
        pending = set(pids)
        deadline = time.monotonic() + timeout
        ready_dir = self.app.runtime / "ready"
        while pending:
            for pid in list(pending):
                if (ready_dir / str(pid)).exists():
                    pending.discard(pid)
                    continue
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    self._forget(pid)
                    return f"a new worker exited with status {status >> 8} while loading models"
            if time.monotonic() > deadline:
                return f"new workers were not ready within {timeout}s"
            time.sleep(0.02)
        return None

    def _discard(self, pids: list[int]) -> None:
        for pid in pids:
            if pid in self.WORKERS:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
                self._forget(pid)

    def _forget(self, pid: int) -> None:
        worker = self.WORKERS.pop(pid, None)
        if worker is not None:
            with contextlib.suppress(Exception):
                worker.tmp.close()
            self.cfg.child_exit(self, worker)


class ApplianceApplication(BaseApplication):  # type: ignore[misc]
    """gunicorn application whose ``load`` runs in each worker after fork.

    Args:
        config_path: Settings file (None: the default location if present).
        overrides: Command-line overrides, re-applied on every reload.
        model_file: Serve this single ``.onnx`` file instead of the repository.
        model_name: Name for ``model_file`` (default: the file's stem).
        runtime: Directory for readiness markers and rate-limit state.
        settings: Settings the caller already read and validated from the same sources
            (read here when omitted); reloads always read them afresh.

    Raises:
        StartupError: the settings, repository or keys cannot be served.
    """

    def __init__(
        self,
        config_path: Path | None,
        overrides: Mapping[str, Mapping[str, Any]],
        model_file: str = "",
        model_name: str = "",
        runtime: Path | None = None,
        settings: Settings | None = None,
    ) -> None:
        self.config_path = config_path
        self.overrides = overrides
        self.model_file = model_file
        self.model_name = model_name
        self.runtime = runtime or Path(tempfile.mkdtemp(prefix="onnx-appliance-"))
        (self.runtime / "ready").mkdir(parents=True, exist_ok=True)
        self.state = self._prepare(0, settings)
        self.previous = self.state
        super().__init__()

    def _prepare(self, generation: int, settings: Settings | None = None) -> ServingState:
        from app.wsgi import build_repository

        try:
            settings = settings or load_settings(
                self.config_path, overrides=self.overrides, check_repository=not self.model_file
            )
            repository = build_repository(settings, None, self.model_file, self.model_name)
            keys = KeyStore.load(Path(settings.auth.keys_file))
        except (SettingsError, RepositoryError, KeyFileError) as exc:
            raise StartupError(str(exc)) from None
        if settings.auth.required and not keys.enabled:
            raise StartupError(
                f"auth.required is set but {settings.auth.keys_file} holds no key; add one with "
                "`onnx-appliance keys add <id>`"
            )
        limiter_path = None
        if keys.enabled:
            # A fresh file per generation: slots follow the key list, which may have changed.
            limiter_path = self.runtime / f"ratelimit.{generation}.bin"
            create_state(limiter_path, len(keys.keys))
        return ServingState(settings, repository, keys, limiter_path, generation)

    def refresh(self) -> None:
        """Re-read settings, repository and keys for a reload.

        Raises:
            StartupError: they are not valid; the current state stays.
        """
        state = self._prepare(self.state.generation + 1)
        self.previous, self.state = self.state, state
        if self.previous.limiter_path and self.previous.generation > 0:
            # Two generations back is no longer used by any worker.
            stale = self.runtime / f"ratelimit.{self.previous.generation - 1}.bin"
            stale.unlink(missing_ok=True)

    def rollback(self) -> None:
        """Go back to the state before the last :meth:`refresh`."""
        self.state = self.previous

    def load_config(self) -> None:
        """Copy our options into gunicorn's config."""
        for key, value in gunicorn_options(self.state.settings, self.state.repository).items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        """Load and warm up the models in this worker, then build the app."""
        from app.wsgi import closing_connections, create_app

        state = self.state
        metrics = Metrics()
        repository = state.repository
        repository.set_observer(metrics)
        try:
            repository.load()
        except RepositoryError as exc:
            # One line instead of a traceback; at start-up, exit status 3 makes the master
            # halt ("worker failed to boot") instead of respawning forever.
            log.error("worker_boot_failed", error=str(exc))
            raise SystemExit(WORKER_BOOT_ERROR) from None
        metrics.models_loaded.set(sum(1 for _ in repository.models()))
        limiter = RateLimiter(state.limiter_path) if state.limiter_path else None
        log.info("worker_ready", models=repository.names, generation=state.generation)
        return closing_connections(
            create_app(state.settings, repository, metrics, state.keys, limiter)
        )

    def run(self) -> None:
        """Listen, then run our arbiter until the master is told to stop.

        Raises:
            StartupError: an address cannot be listened on.
        """
        arbiter = ApplianceArbiter(self)
        # Sockets handed over by systemd (or by gunicorn's own re-exec) are gunicorn's to take.
        if not (systemd.listen_fds(unset_environment=False) or "GUNICORN_FD" in os.environ):
            arbiter.LISTENERS = open_listeners(self.cfg, arbiter.log)
        arbiter.run()


def open_listeners(cfg: Any, logger: Any) -> list[Any]:
    """Listen on every configured address at once, the way gunicorn would.

    gunicorn retries an address in use or unresolvable for five seconds, then exits 1 after
    several log lines (and a port beyond 65535 raised a traceback); an operator gets one
    line and exit status 2 instead.

    Raises:
        StartupError: naming the address that cannot be listened on and why.
    """
    listeners: list[Any] = []
    for address in cfg.address:
        try:
            listeners.append(gunicorn_sock._sock_type(address)(address, cfg, logger))
        except (OSError, OverflowError, ValueError) as exc:
            for listener in listeners:
                listener.close()
            where = f"unix:{address}" if isinstance(address, str) else f"{address[0]}:{address[1]}"
            reason = getattr(exc, "strerror", None) or str(exc)
            raise StartupError(f"cannot listen on {where}: {reason}") from None
    return listeners
