"""Admission gate and the deadline watchdog."""

from __future__ import annotations

import threading
import time

import pytest

from app.models.errors import InferenceTimeout, Overloaded
from app.models.scheduling import Gate
from tests.conftest import run_python, wait_until


def test_gate_sheds_when_the_queue_is_full() -> None:
    gate = Gate(concurrency=1, max_queue=1)
    gate.acquire(None, "m")
    waiter = threading.Thread(target=lambda: (gate.acquire(None, "m"), gate.release()))
    waiter.start()
    deadline = time.monotonic() + 5
    while gate.load != (1, 1) and time.monotonic() < deadline:
        time.sleep(0.001)
    start = time.monotonic()
    with pytest.raises(Overloaded):
        gate.acquire(None, "m")
    assert time.monotonic() - start < 0.05  # shed at once, no waiting
    gate.release()
    waiter.join(5)
    assert gate.load == (0, 0)


def test_gate_waiter_leaves_at_its_deadline() -> None:
    gate = Gate(concurrency=1, max_queue=4)
    gate.acquire(None, "m")
    start = time.monotonic()
    with pytest.raises(InferenceTimeout, match="could not start"):
        gate.acquire(start + 0.1, "m")
    assert 0.09 < time.monotonic() - start < 1.0
    gate.release()
    assert gate.load == (0, 0)


# gevent's monkey patching cannot be undone, so this runs in a fresh interpreter.
GEVENT_PRELUDE = """
from gevent import monkey; monkey.patch_all()
import gevent, greenlet
from app.models.scheduling import Gate
from tests.conftest import run_python, wait_until
"""


def test_gevent_gate_release_does_not_yield() -> None:
    # A Condition over a plain Lock probes ownership with a failed acquire on notify(),
    # and gevent's Lock yields on that: every request then waited for all the others.
    out = run_python(
        GEVENT_PRELUDE
        + """
switches = []
gate = Gate(concurrency=1, max_queue=4)
other = gevent.spawn(lambda: None)  # runnable: a yield would switch to it
greenlet.settrace(lambda event, args: switches.append(event))
for _ in range(100):
    gate.acquire(None, "m")
    gate.release()
greenlet.settrace(None)
print(">", "switches", len(switches))
other.join()
"""
    )
    assert out == ["switches 0"], out


def test_watchdog_sleeps_when_idle_and_is_not_woken_per_run() -> None:
    from types import SimpleNamespace

    from app.models.scheduling import Watchdog

    dog = Watchdog()
    dog.IDLE_TICKS = 5  # asleep after 50 ms without runs
    options = SimpleNamespace(terminate=False)
    dog.done(dog.watch(time.monotonic() + 60, options))  # starts the thread
    wait_until(lambda: dog._sleeping, "the idle watchdog to sleep", timeout=5)
    for _ in range(1000):  # a busy worker: runs come and go
        dog.done(dog.watch(time.monotonic() + 60, options))
    assert dog.wakes == 1  # only the first run after the nap woke it
    overrun = SimpleNamespace(terminate=False)
    dog.watch(time.monotonic() + 0.05, overrun)
    deadline = time.monotonic() + 2
    while not overrun.terminate and time.monotonic() < deadline:
        time.sleep(0.01)
    assert overrun.terminate  # and it still cancels on time
