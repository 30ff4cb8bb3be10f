"""Admission and deadlines for session runs inside one worker.

:class:`Gate` bounds how many runs of a model execute at once and how many wait; a full queue
sheds load at once and a waiter whose deadline passes leaves without running.
:class:`Watchdog` cancels runs that outlive their deadline through onnxruntime's
``RunOptions.terminate`` flag, so the thread and the session stay usable.
"""

from __future__ import annotations

import _thread
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from app.models.errors import InferenceTimeout, Overloaded

T = TypeVar("T")


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
        # The counts are kept under an OS lock, held for a few instructions and never
        # across a wait, so a free slot costs no more than that lock. Under gevent's
        # patching the Condition's RLock is written in Python: only queued requests pay it.
        self._counts = _os_thread_api()[1]()
        # An RLock knows its owner: with a plain Lock, notify() probes ownership with a
        # failed acquire, and gevent's Lock yields to other greenlets on that.
        self._cond = threading.Condition(threading.RLock())

    def acquire(self, deadline: float | None, label: str) -> None:
        """Take a slot, waiting until ``deadline`` (monotonic seconds) at most.

        Raises:
            Overloaded: the queue is full.
            InferenceTimeout: the deadline passed while waiting; nothing was run.
        """
        if self._take():
            return
        with self._cond:
            with self._counts:
                if self._running >= self.concurrency and self._waiting >= self.max_queue:
                    raise Overloaded(
                        f"model {label} has {self._waiting} requests queued; retry later"
                    )
                self._waiting += 1
            # The Condition is held from here until wait() lets go of it, and release()
            # takes it before notify(): a slot freed meanwhile is seen or notified, never lost.
            try:
                while not self._take():
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise InferenceTimeout(
                            f"model {label} could not start before the request's deadline"
                        )
                    self._cond.wait(remaining)
            finally:
                with self._counts:
                    self._waiting -= 1

    def _take(self) -> bool:
        """Take a free slot, if there is one."""
        with self._counts:
            if self._running < self.concurrency:
                self._running += 1
                return True
        return False

    def release(self) -> None:
        """Give the slot back and wake one waiter, if any."""
        with self._counts:
            self._running -= 1
            waiting = self._waiting
        if waiting:
            with self._cond:
                self._cond.notify()

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) right now."""
        return self._running, self._waiting


def cooperative() -> bool:
    """True in a gevent worker: request handlers are greenlets sharing one OS thread."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("threading"))


def _os_thread_api() -> tuple[Callable[..., Any], Callable[[], Any]]:
    """``start_new_thread`` and ``allocate_lock`` of the OS, even where gevent patched them."""
    if cooperative():
        monkey = sys.modules["gevent.monkey"]
        start, allocate = monkey.get_original("_thread", ["start_new_thread", "allocate_lock"])
        return start, allocate
    return _thread.start_new_thread, _thread.allocate_lock


def run_in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` in a helper OS thread and wait for it, letting other greenlets run.

    Only for gevent workers: there a long session run on the worker's own thread would stop
    it from reading requests, shedding load and answering health checks meanwhile.
    """
    import gevent

    result: T = gevent.get_hub().threadpool.apply(fn, args)
    return result


class Watchdog:
    """One OS thread per worker that sets ``terminate`` on runs past their deadline.

    It uses the OS's own thread and lock even in a gevent worker: the runs it cancels hold
    the worker's only thread, so a greenlet could never interrupt them. It sleeps until the
    earliest deadline it watches, or ``HORIZON`` seconds at most while runs come and go, and
    for good once a whole horizon passed with nothing to watch. A run is woken for only when
    its deadline comes before the thread's next wake-up: under load with the usual
    timeouts of seconds, runs come and go without waking it, and it takes the worker's GIL
    about once a second instead of at every tick.
    """

    HORIZON = 1.0

    def __init__(self) -> None:
        self._active: dict[int, tuple[float, Any]] = {}
        self._next = 0
        self._after_fork()
        # Threads do not survive fork: each worker starts its own on first use.
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        _, allocate = _os_thread_api()
        self._started = False
        self.wakes = 0  # times watch() had to wake the thread before its time
        self._lock = allocate()
        # Held except when watch() wakes the thread early; never released twice, because
        # only an armed thread (waiting on it) is woken, and waking disarms it.
        self._wake = allocate()
        self._wake.acquire()
        self._armed = False
        self._wake_at = math.inf
        self._watched = False  # a run was watched since the thread last woke
        self._active.clear()

    @property
    def sleeping(self) -> bool:
        """Asleep until the next run is watched."""
        return self._armed and self._wake_at == math.inf

    def _start(self) -> None:
        self._started = True
        start, _ = _os_thread_api()
        start(self._loop, ())

    def watch(self, deadline: float, run_options: Any) -> int:
        """Cancel ``run_options``' run at ``deadline``; returns a token for :meth:`done`."""
        with self._lock:
            if not self._started:
                self._start()
            self._next += 1
            token = self._next
            self._active[token] = (deadline, run_options)
            self._watched = True
            if self._armed and deadline < self._wake_at:
                self._armed = False
                self.wakes += 1
                self._wake.release()
        return token

    def done(self, token: int) -> None:
        """The run finished (or failed); stop watching it."""
        with self._lock:
            self._active.pop(token, None)

    def _loop(self) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                wake_at = now + self.HORIZON
                for token, (deadline, options) in list(self._active.items()):
                    if now >= deadline:
                        options.terminate = True
                        del self._active[token]
                    else:
                        wake_at = min(wake_at, deadline)
                if not self._active and not self._watched:
                    wake_at = math.inf
                self._watched = False
                self._wake_at = wake_at
                self._armed = True
            self._wake.acquire(timeout=-1 if wake_at == math.inf else max(0.0, wake_at - now))


WATCHDOG = Watchdog()
