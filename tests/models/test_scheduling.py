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


def test_gate_never_runs_more_than_its_concurrency_and_loses_no_wake_up() -> None:
    # Threads race for two slots, holding each for a moment so that others queue: the
    # slots' count never goes over, every waiter is woken (none hangs), nothing is shed.
    gate = Gate(concurrency=2, max_queue=8)
    inside, most, done = [0], [0], []
    count = threading.Lock()

    def client() -> None:
        for _ in range(300):
            gate.acquire(time.monotonic() + 30, "m")
            with count:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.0001)
            with count:
                inside[0] -= 1
            gate.release()
        done.append(True)

    threads = [threading.Thread(target=client) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(done) == 6
    assert most[0] == 2
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


def test_gevent_gate_queues_greenlets_and_wakes_each() -> None:
    # Greenlets that yield while holding the one slot queue behind it and are all served.
    out = run_python(
        GEVENT_PRELUDE
        + """
gate = Gate(concurrency=1, max_queue=16)
inside, most = [0], [0]
def client():
    for _ in range(50):
        gate.acquire(None, "m")
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        gevent.sleep(0)
        inside[0] -= 1
        gate.release()
gevent.joinall([gevent.spawn(client) for _ in range(8)], timeout=30, raise_error=True)
print(">", "most", most[0], "load", *gate.load)
"""
    )
    assert out == ["most 1 load 0 0"], out


def test_watchdog_sleeps_when_idle_and_is_not_woken_per_run() -> None:
    from types import SimpleNamespace

    from app.models.scheduling import Watchdog

    dog = Watchdog()
    dog.HORIZON = 0.05  # asleep for good after two horizons without runs
    options = SimpleNamespace(terminate=False)
    dog.done(dog.watch(time.monotonic() + 60, options))  # starts the thread
    wait_until(lambda: dog.sleeping, "the idle watchdog to sleep", timeout=5)
    for _ in range(1000):  # a busy worker: runs come and go
        dog.done(dog.watch(time.monotonic() + 60, options))
    assert dog.wakes == 1  # only the first run after the nap woke it
    started = time.monotonic()
    overrun = SimpleNamespace(terminate=False)
    dog.watch(started + 0.2, overrun)  # before its next wake-up: it wakes for this one
    wait_until(lambda: overrun.terminate, "the overrun cancelled", timeout=5)
    # At its deadline, not at a tick or a horizon before it.
    assert time.monotonic() - started >= 0.2
    later = SimpleNamespace(terminate=False)
    dog.watch(time.monotonic() + 3 * dog.HORIZON, later)  # after a few horizons
    wait_until(lambda: later.terminate, "a deadline past the horizon", timeout=5)
