"""The master's loop: gunicorn's arbiter, with a reload that never drops below ready capacity,
and listeners opened before it starts.

A reload (``SIGHUP``, ``systemctl reload``, ``onnx-appliance reload``) re-reads the settings,
the repository and the keys in the master; if they are valid it starts new workers, waits
until every one of them is ready, and only then stops the old ones gracefully. Anything
invalid, or new workers that fail to load, leaves the old workers serving the old state.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import TYPE_CHECKING, Any

import structlog
from gunicorn.arbiter import Arbiter

from app.server.compat import listener
from app.server.state import StartupError

if TYPE_CHECKING:
    from app.server.application import ApplianceApplication

log = structlog.get_logger(__name__)


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
            listeners.append(listener(address, cfg, logger))
        except (OSError, OverflowError, ValueError) as exc:
            for opened in listeners:
                opened.close()
            where = f"unix:{address}" if isinstance(address, str) else f"{address[0]}:{address[1]}"
            reason = getattr(exc, "strerror", None) or str(exc)
            raise StartupError(f"cannot listen on {where}: {reason}") from None
    return listeners
