"""Runners: admission, deadlines and where runs execute, on a real, deliberately slow graph."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from app.models.cache import CacheOptions
from app.models.errors import InferenceFailed, InferenceTimeout, InvalidInput, Overloaded
from app.models.onnx import OnnxModel, RuntimeOptions
from app.models.runner import Runner
from tests import onnx_factory
from tests.conftest import DEMO_MODELS, run_python, wait_until


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Runner:
    path = onnx_factory.save(onnx_factory.slow_loop(), tmp_path_factory.mktemp("slow"), "slow")
    model = OnnxModel("slow", 1, path, RuntimeOptions(max_concurrency=1, max_queue=1))
    model.load()
    return Runner(model)


def feed(steps: int) -> dict[str, np.ndarray]:
    return {"x": np.ones((1, 1), np.float32), "n": np.array(steps, dtype=np.int64)}


def test_predict_checks_the_feed_and_the_outputs() -> None:
    model = OnnxModel(
        "reg", 1, DEMO_MODELS / "regression" / "1" / "model.onnx", RuntimeOptions(warmup_runs=0)
    )
    model.load()
    runner = Runner(model)
    ok = np.zeros((2, 10), dtype=np.float32)
    assert list(runner.predict({"input": ok})) == ["variable"]
    assert runner.predict({"input": ok}, ["variable"])["variable"].shape == (2, 1)
    with pytest.raises(InvalidInput, match="no output"):
        runner.predict({"input": ok}, ["nope"])
    with pytest.raises(InvalidInput, match="missing"):
        runner.predict({})


def test_inference_observer_sees_every_run() -> None:
    recorder = onnx_factory.Recorder()
    model = OnnxModel(
        "reg",
        3,
        DEMO_MODELS / "regression" / "1" / "model.onnx",
        RuntimeOptions(warmup_runs=2),
        observer=recorder,
    )
    model.load()
    assert recorder.runs == []  # warm-up is not traffic
    Runner(model).predict({"input": np.zeros((1, 10), dtype=np.float32)})
    assert recorder.runs == [("reg", "3")]


def test_overrunning_inference_is_cancelled_and_the_model_recovers(slow: Runner) -> None:
    start = time.monotonic()
    with pytest.raises(InferenceTimeout, match="overran"):
        slow.predict(feed(1_000_000), deadline=start + 0.2)
    elapsed = time.monotonic() - start
    assert elapsed < 1.5, elapsed  # cancelled, not run to completion (minutes)
    assert float(slow.predict(feed(2), deadline=time.monotonic() + 10)["y"]) != 0
    assert slow.gate.load == (0, 0)


def test_queued_request_past_deadline_is_not_run(slow: Runner) -> None:
    recorder = onnx_factory.Recorder()
    slow.model.observer = recorder
    busy = threading.Thread(
        target=slow.predict, args=(feed(3000),), kwargs={"deadline": time.monotonic() + 30}
    )
    busy.start()
    wait_until(lambda: slow.gate.load == (1, 0), "the busy run to start")
    with pytest.raises(InferenceTimeout, match="could not start"):
        slow.predict(feed(1), deadline=time.monotonic() + 0.05)
    with pytest.raises(Overloaded):  # one running, one queued... then a third is shed
        waiter = threading.Thread(target=lambda: _swallow(slow))
        waiter.start()
        wait_until(lambda: slow.gate.load == (1, 1), "a request to queue")
        slow.predict(feed(1), deadline=time.monotonic() + 30)
    busy.join(30)
    waiter.join(30)
    slow.model.observer = None
    # The busy run and the queued one; never the one that timed out.
    assert recorder.runs == [("slow", "1"), ("slow", "1")]


def _swallow(model: Runner) -> None:
    model.predict(feed(1), deadline=time.monotonic() + 30)


# -- in a gevent worker: greenlets on one OS thread ---------------------------------------------
# gevent's monkey patching cannot be undone, so each scenario runs in a fresh interpreter.

GEVENT_PRELUDE = """
from gevent import monkey; monkey.patch_all()
import sys, time
import gevent, greenlet, numpy as np
from app.models.errors import InferenceTimeout, Overloaded
from app.models.onnx import OnnxModel, RuntimeOptions
from app.models.runner import CooperativeRunner

def feed(steps):
    return {"x": np.ones((1, 1), np.float32), "n": np.array(steps, dtype=np.int64)}

def load(**options):
    model = OnnxModel("slow", 1, __import__("pathlib").Path(sys.argv[1]), RuntimeOptions(**options))
    model.load()
    return CooperativeRunner(model)
"""


def run_patched(slow_path: str, script: str) -> str:
    """The ``>`` lines of ``script``, run after :data:`GEVENT_PRELUDE`, as one string."""
    return " ".join(run_python(GEVENT_PRELUDE + script, slow_path))


@pytest.fixture(scope="module")
def slow_path(slow: Runner) -> str:
    return str(slow.model.path)


def test_gevent_inline_run_is_cancelled_at_its_deadline(slow_path: str) -> None:
    # The run holds the only thread the greenlets have: only an OS thread can cancel it.
    out = run_patched(
        slow_path,
        """
model = load(max_concurrency=1, inline_run_us=10**9)
assert not model.offload
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


def test_a_cached_answer_skips_the_run_and_failures_are_never_kept(tmp_path: Path) -> None:
    path = onnx_factory.save(onnx_factory.gather_table(), tmp_path, "table")
    recorder = onnx_factory.Recorder()
    options = RuntimeOptions(warmup_runs=0, cache=CacheOptions(max_entries=8))
    model = OnnxModel("table", 1, path, options, observer=recorder)
    model.load()
    runner = Runner(model)
    row = {"idx": np.array([[3]], np.int64)}
    first = runner.predict(row)["y"]
    second = runner.predict(row)["y"]
    assert first.tolist() == second.tolist() == [[[12.0, 13.0, 14.0, 15.0]]]
    assert recorder.runs == [("table", "1")]  # the second came from the cache
    assert recorder.lookups == [False, True]
    assert runner.predict({"idx": np.array([[4]], np.int64)})["y"][0, 0, 0] == 16.0
    assert len(recorder.runs) == 2  # another input runs
    bad = {"idx": np.array([[11]], np.int64)}  # passes validation, fails in onnxruntime
    for _ in range(2):
        with pytest.raises(InferenceFailed):
            runner.predict(bad)
    assert runner.cache is not None and runner.cache.size[0] == 2
    assert recorder.lookups[-2:] == [False, False]


def test_without_a_cache_every_request_runs() -> None:
    recorder = onnx_factory.Recorder()
    model = OnnxModel(
        "reg", 1, DEMO_MODELS / "regression" / "1" / "model.onnx",
        RuntimeOptions(warmup_runs=0), observer=recorder,
    )  # fmt: skip
    model.load()
    runner = Runner(model)
    for _ in range(2):
        runner.predict({"input": np.zeros((1, 10), np.float32)})
    assert runner.cache is None
    assert len(recorder.runs) == 2 and recorder.lookups == []
