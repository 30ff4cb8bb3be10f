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
