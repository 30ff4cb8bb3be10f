"""Admission and deadlines for session runs inside one worker.

:class:`Gate` bounds how many runs of a model execute at once and how many wait; a full queue
sheds load at once and a waiter whose deadline passes leaves without running.
:class:`Watchdog` cancels runs that outlive their deadline through onnxruntime's
``RunOptions.terminate`` flag, so the thread and the session stay usable.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from app.models.errors import InferenceTimeout, Overloaded


class Gate:
    """At most ``concurrency`` runs at once, at most ``max_queue`` waiting.

    Args:
        concurrency: Runs allowed at the same time.
        max_queue: Requests allowed to wait for a slot; beyond it callers are shed.
    """

    def __init__(self, concurrency: int, max_queue: int) -> None:
        self.concurrency = concurrency
        self.max_queue = max_queue
        self._running = 0
        self._waiting = 0
        self._cond = threading.Condition(threading.Lock())

    def acquire(self, deadline: float | None, label: str) -> None:
        """Take a slot, waiting until ``deadline`` (monotonic seconds) at most.

        Raises:
            Overloaded: the queue is full.
            InferenceTimeout: the deadline passed while waiting; nothing was run.
        """
        with self._cond:
            if self._running < self.concurrency:
                self._running += 1
                return
            if self._waiting >= self.max_queue:
                raise Overloaded(f"model {label} has {self._waiting} requests queued; retry later")
            self._waiting += 1
            try:
                while self._running >= self.concurrency:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise InferenceTimeout(
                            f"model {label} could not start before the request's deadline"
                        )
                    self._cond.wait(remaining)
                self._running += 1
            finally:
                self._waiting -= 1

    def release(self) -> None:
        """Give the slot back and wake one waiter."""
        with self._cond:
            self._running -= 1
            self._cond.notify()

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) right now."""
        return self._running, self._waiting


class Watchdog:
    """One thread per worker that sets ``terminate`` on runs past their deadline."""

    TICK = 0.01

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: dict[int, tuple[float, Any]] = {}
        self._wake = threading.Event()
        self._started = False
        self._next = 0
        # Threads do not survive fork: each worker starts its own on first use.
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        self._started = False
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._active.clear()

    def _ensure_thread(self) -> None:
        if not self._started:
            self._started = True
            threading.Thread(target=self._loop, name="inference-watchdog", daemon=True).start()

    def watch(self, deadline: float, run_options: Any) -> int:
        """Cancel ``run_options``' run at ``deadline``; returns a token for :meth:`done`."""
        with self._lock:
            self._ensure_thread()
            self._next += 1
            token = self._next
            self._active[token] = (deadline, run_options)
        self._wake.set()
        return token

    def done(self, token: int) -> None:
        """The run finished (or failed); stop watching it."""
        with self._lock:
            self._active.pop(token, None)

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            with self._lock:
                now = time.monotonic()
                for token, (deadline, options) in list(self._active.items()):
                    if now >= deadline:
                        options.terminate = True
                        del self._active[token]
                if not self._active:
                    self._wake.clear()
            time.sleep(self.TICK)


WATCHDOG = Watchdog()
