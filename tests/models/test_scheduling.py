"""Admission gate and deadlines on a real, deliberately slow ONNX graph."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from app.models.errors import InferenceTimeout, Overloaded
from app.models.onnx import OnnxModel, RuntimeOptions
from app.models.scheduling import Gate
from tests import onnx_factory


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> OnnxModel:
    path = onnx_factory.save(onnx_factory.slow_loop(), tmp_path_factory.mktemp("slow"), "slow")
    model = OnnxModel("slow", 1, path, RuntimeOptions(max_concurrency=1, max_queue=1))
    model.load()
    return model


def feed(steps: int) -> dict[str, np.ndarray]:
    return {"x": np.ones((1, 1), np.float32), "n": np.array(steps, dtype=np.int64)}


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


def test_overrunning_inference_is_cancelled_and_the_model_recovers(slow: OnnxModel) -> None:
    start = time.monotonic()
    with pytest.raises(InferenceTimeout, match="overran"):
        slow.predict(feed(1_000_000), deadline=start + 0.2)
    elapsed = time.monotonic() - start
    assert elapsed < 1.5, elapsed  # cancelled, not run to completion (minutes)
    assert float(slow.predict(feed(2), deadline=time.monotonic() + 10)["y"]) != 0
    assert slow.gate.load == (0, 0)


def test_queued_request_past_deadline_is_not_run(slow: OnnxModel) -> None:
    recorder = onnx_factory.Recorder()
    slow.observer = recorder
    busy = threading.Thread(
        target=slow.predict, args=(feed(3000),), kwargs={"deadline": time.monotonic() + 30}
    )
    busy.start()
    time.sleep(0.05)
    with pytest.raises(InferenceTimeout, match="could not start"):
        slow.predict(feed(1), deadline=time.monotonic() + 0.05)
    with pytest.raises(Overloaded):  # one running, one queued... then a third is shed
        waiter = threading.Thread(target=lambda: _swallow(slow))
        waiter.start()
        time.sleep(0.05)
        slow.predict(feed(1), deadline=time.monotonic() + 30)
    busy.join(30)
    waiter.join(30)
    slow.observer = None
    # The busy run and the queued one; never the one that timed out.
    assert recorder.runs == [("slow", "1"), ("slow", "1")]


def _swallow(model: OnnxModel) -> None:
    model.predict(feed(1), deadline=time.monotonic() + 30)


# -- in a gevent worker: greenlets on one OS thread ---------------------------------------------
# gevent's monkey patching cannot be undone, so each scenario runs in a fresh interpreter.

GEVENT_PRELUDE = """
from gevent import monkey; monkey.patch_all()
import sys, time
import gevent, greenlet, numpy as np
from app.models.errors import InferenceTimeout, Overloaded
from app.models.onnx import OnnxModel, RuntimeOptions
from app.models.scheduling import Gate, cooperative

def feed(steps):
    return {"x": np.ones((1, 1), np.float32), "n": np.array(steps, dtype=np.int64)}

def load(**options):
    model = OnnxModel("slow", 1, __import__("pathlib").Path(sys.argv[1]), RuntimeOptions(**options))
    model.load()
    return model
"""


def run_patched(slow_path: str, script: str) -> str:
    """Run ``script`` after :data:`GEVENT_PRELUDE` in a gevent-patched interpreter.

    Returns:
        The words of the lines the script printed with a leading ``>``.
    """
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run(
        [sys.executable, "-c", GEVENT_PRELUDE + script, slow_path],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr
    # Only the script's own lines (log lines go to stdout too).
    return " ".join(line[2:] for line in result.stdout.splitlines() if line.startswith("> "))


@pytest.fixture(scope="module")
def slow_path(slow: OnnxModel) -> str:
    return str(slow.path)


def test_gevent_inline_run_is_cancelled_at_its_deadline(slow_path: str) -> None:
    # The run holds the only thread the greenlets have: only an OS thread can cancel it.
    out = run_patched(
        slow_path,
        """
model = load(max_concurrency=1, inline_run_us=10**9)
assert cooperative() and not model.offload
start = time.monotonic()
try:
    model.predict(feed(1_000_000), deadline=start + 0.2)
except InferenceTimeout as exc:
    print(">", "timeout", "overran" in str(exc), round(time.monotonic() - start, 2))
print(">", "after", float(model.predict(feed(2), deadline=time.monotonic() + 10)["y"]) != 0)
""",
    )
    lines = out.split()
    assert lines[:2] == ["timeout", "True"], out
    assert float(lines[2]) < 1.5, out
    assert lines[3:] == ["after", "True"], out


def test_gevent_slow_runs_move_to_a_helper_thread_and_the_gate_still_sheds(slow_path: str) -> None:
    # Warm-up (n = 0) is fast, so runs start inline; three slow runs in a row (not one) move
    # them to a helper thread, after which other greenlets keep running and the queue limit
    # sheds at once.
    out = run_patched(
        slow_path,
        """
model = load(max_concurrency=1, max_queue=1, inline_run_us=1000)
print(">", "inline_after_warmup", not model.offload)
model.predict(feed(200), deadline=time.monotonic() + 30)
print(">", "one_slow_run_is_not_enough", not model.offload)
model.predict(feed(1), deadline=time.monotonic() + 30)
for _ in range(3):
    model.predict(feed(200), deadline=time.monotonic() + 30)
print(">", "offloaded", model.offload)
ticks = []
def tick():
    while True:
        ticks.append(time.monotonic())
        gevent.sleep(0.005)
ticker = gevent.spawn(tick)
running = gevent.spawn(model.predict, feed(3000), deadline=time.monotonic() + 30)
gevent.sleep(0.05)
queued = gevent.spawn(model.predict, feed(1), deadline=time.monotonic() + 30)
gevent.sleep(0.01)
try:
    model.predict(feed(1), deadline=time.monotonic() + 30)
    print(">", "shed", False)
except Overloaded:
    print(">", "shed", True)
started = time.monotonic()
running.get(); queued.get()
print(">", "ticked_while_running", sum(1 for t in ticks if t < started) >= 5)
""",
    )
    assert out.split() == [
        "inline_after_warmup",
        "True",
        "one_slow_run_is_not_enough",
        "True",
        "offloaded",
        "True",
        "shed",
        "True",
        "ticked_while_running",
        "True",
    ], out


def test_gevent_gate_release_does_not_yield(slow_path: str) -> None:
    # A Condition over a plain Lock probes ownership with a failed acquire on notify(),
    # and gevent's Lock yields on that: every request then waited for all the others.
    out = run_patched(
        slow_path,
        """
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
""",
    )
    assert out.split() == ["switches", "0"], out


def test_watchdog_sleeps_when_idle_and_is_not_woken_per_run() -> None:
    from types import SimpleNamespace

    from app.models.scheduling import Watchdog

    dog = Watchdog()
    dog.IDLE_TICKS = 5  # asleep after 50 ms without runs
    options = SimpleNamespace(terminate=False)
    dog.done(dog.watch(time.monotonic() + 60, options))  # starts the thread
    time.sleep(0.3)
    assert dog._sleeping
    for _ in range(1000):  # a busy worker: runs come and go
        dog.done(dog.watch(time.monotonic() + 60, options))
    assert dog.wakes == 1  # only the first run after the nap woke it
    overrun = SimpleNamespace(terminate=False)
    dog.watch(time.monotonic() + 0.05, overrun)
    deadline = time.monotonic() + 2
    while not overrun.terminate and time.monotonic() < deadline:
        time.sleep(0.01)
    assert overrun.terminate  # and it still cancels on time
