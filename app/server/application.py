"""The gunicorn application: settings, repository and keys validated in the master, models
loaded in each worker.

The master validates everything (settings, repository layout, keys) and keeps that as the
*serving state*; models are never loaded in the master. Each worker inherits the state,
creates its sessions and warms them up before it accepts a connection, so a worker that
answers is a ready worker.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import structlog
from gunicorn.app.base import BaseApplication

from app.keys import KeyFileError, KeyStore
from app.metrics import Metrics
from app.middleware import Authenticator
from app.models.errors import RepositoryError
from app.models.runner import Runner
from app.models.shadow import ShadowJob
from app.ratelimit import RateLimiter, create_state
from app.resources.common import CLOSE_CONNECTION, HIJACKED, SHADOW_JOBS
from app.server.arbiter import ApplianceArbiter, open_listeners
from app.server.compat import force_close, inherited_listeners
from app.server.options import gunicorn_options
from app.server.state import WORKER_BOOT_ERROR, ServingState, StartupError
from app.settings import Settings, SettingsError, load_settings

log = structlog.get_logger(__name__)


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
        #: How this process's worker class runs models (set by the post_fork hook).
        self.runner: type[Runner] = Runner
        #: This worker's gRPC server, when server.grpc_bind asks for one.
        self.grpc_server: Any = None
        #: This worker's metrics, written out at its exit (set by :meth:`load`).
        self.metrics: Metrics | None = None
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
        from app.wsgi import create_app

        state = self.state
        metrics = Metrics()
        repository = state.repository
        repository.set_observer(metrics)
        try:
            repository.load(self.runner)
        except RepositoryError as exc:
            # One line instead of a traceback; at start-up, exit status 3 makes the master
            # halt ("worker failed to boot") instead of respawning forever.
            log.error("worker_boot_failed", error=str(exc))
            raise SystemExit(WORKER_BOOT_ERROR) from None
        metrics.models_loaded.set(sum(1 for _ in repository.models()))
        for name in repository.names:
            entry = repository.entry(name)
            shares = entry.traffic_shares()
            for version, share in shares.items():
                metrics.traffic_share.labels(name, version).set(share)
            rollout = entry.rollout
            if rollout is not None:  # its traffic is the entry's
                candidate = str(rollout.candidate)
                metrics.rollout.labels(name, str(rollout.primary), candidate, rollout.status).set(
                    shares.get(candidate, 0.0)
                )
        metrics.worker_starts.inc()
        self.metrics = metrics
        limiter = RateLimiter(state.limiter_path) if state.limiter_path else None
        app = create_app(state.settings, repository, metrics, state.keys, limiter)
        if state.settings.server.grpc_bind:
            from app.server.grpc import start_server

            auth = state.settings.auth
            gate = Authenticator(state.keys, limiter, auth.rate, auth.burst)
            try:
                self.grpc_server = start_server(state.settings, repository, metrics, gate)
            except OSError as exc:
                log.error("worker_boot_failed", error=str(exc))
                raise SystemExit(WORKER_BOOT_ERROR) from None
        log.info("worker_ready", models=repository.names, generation=state.generation)
        return closing_connections(app)

    def run(self) -> None:
        """Listen, then run our arbiter until the master is told to stop.

        Raises:
            StartupError: an address cannot be listened on.
        """
        arbiter = ApplianceArbiter(self)
        # Sockets handed over by systemd (or by gunicorn's own re-exec) are gunicorn's to take.
        if not inherited_listeners():
            arbiter.LISTENERS = open_listeners(self.cfg, arbiter.log)
        arbiter.run()


def closing_connections(app: Callable[..., Any]) -> Callable[..., Any]:
    """The WSGI app, with gunicorn told to close a connection whose body was left unread.

    gunicorn reads the rest of an unread body before it parses the next request on a
    kept-alive connection, however large; a request refused for its body (too large, too
    slow, an unknown encoding) asks to close instead (``CLOSE_CONNECTION`` in its environ),
    and gunicorn then answers with ``Connection: close`` and reads no further. Falcon calls
    ``start_response`` before it returns, and gunicorn sends the headers only after.

    Shadow jobs a route left in ``SHADOW_JOBS`` are submitted only when gunicorn closes the
    answer's iterable, which it does once the answer has been written.

    A route that took the connection over (``HIJACKED``: a WebSocket, now ended) gets it
    closed with no HTTP answer written into it: gunicorn's workers close a connection
    quietly on StopIteration.
    """

    def serve(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        result = app(environ, start_response)
        if environ.get(HIJACKED):
            raise StopIteration("the connection was a WebSocket")
        if environ.get(CLOSE_CONNECTION):
            force_close(start_response)
        jobs = environ.get(SHADOW_JOBS)
        if jobs:
            return _AfterSend(result, jobs)
        return result

    return serve


class _AfterSend:
    """A WSGI answer that submits shadow jobs when the server closes it (after sending)."""

    def __init__(self, body: Iterable[bytes], jobs: list[ShadowJob]) -> None:
        self._body = body
        self._jobs = jobs

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            for job in self._jobs:
                job.submit()
