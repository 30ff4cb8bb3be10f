"""Dynamic batching on real sessions: merged runs, exact rows per caller, isolation of errors."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from app.models import onnx as onnx_module
from app.models.batching import BatchingOptions
from app.models.errors import (
    InferenceFailed,
    InferenceTimeout,
    InvalidInput,
    Overloaded,
    RepositoryError,
)
from app.models.onnx import OnnxModel, RuntimeOptions
from app.models.runner import Runner
from tests import onnx_factory
from tests.conftest import DEMO_MODELS, wait_until

MLP = DEMO_MODELS / "mlp" / "1" / "model.onnx"
TABULAR = DEMO_MODELS / "tabular" / "2" / "model.onnx"


def batching_model(path: Path, recorder: Any = None, **batching: Any) -> Runner:
    options = BatchingOptions(**{"max_batch_size": 16, "max_queue_delay": 0.01, **batching})
    model = OnnxModel("m", 1, path, RuntimeOptions(warmup_runs=1, batching=options), recorder)
    model.load()
    return Runner(model)


def burst(
    model: Runner,
    feeds: list[dict[str, np.ndarray]],
    outputs: list[list[str] | None] | None = None,
) -> list[Any]:
    barrier = threading.Barrier(len(feeds))

    def one(i: int) -> Any:
        barrier.wait()
        try:
            return model.predict(
                feeds[i], outputs[i] if outputs else None, deadline=time.monotonic() + 30
            )
        except Exception as exc:  # collected for the assertions
            return exc

    with ThreadPoolExecutor(len(feeds)) as pool:
        return list(pool.map(one, range(len(feeds))))


def test_concurrent_requests_merge_and_each_gets_its_own_rows() -> None:
    recorder = onnx_factory.Recorder()
    model = batching_model(MLP, recorder)
    rng = np.random.default_rng(3)
    feeds = [{"input": rng.normal(0, 1, (1 + i % 3, 256)).astype(np.float32)} for i in range(24)]
    results = burst(model, feeds)
    reference = ort.InferenceSession(str(MLP))
    for feed, result in zip(feeds, results, strict=True):
        expected = reference.run(None, feed)[0]
        assert result["logits"].shape == expected.shape
        # A merged batch may take another GEMM kernel than one request alone, summing each
        # 1024-term dot product in another order: two float32 orders differ by about
        # sqrt(1024) * 2**-24 of the terms' size (~30 here), 2e-5; 1e-4 leaves room for that.
        np.testing.assert_allclose(result["logits"], expected, rtol=1e-4, atol=1e-4)
    rows = [r for _, r, _ in recorder.batches]
    assert sum(rows) == sum(f["input"].shape[0] for f in feeds)
    assert max(rows) > 3, rows  # requests were merged
    assert max(rows) <= 16
    assert sum(n for _, _, n in recorder.batches) == 24
    assert len(recorder.runs) == len(recorder.batches)  # one session run per batch


def test_different_outputs_are_never_merged() -> None:
    recorder = onnx_factory.Recorder()
    model = batching_model(TABULAR, recorder)
    real_run = model.run
    seen: list[tuple[tuple[str, ...], int]] = []

    def spy(names: list[str], inputs: Any, deadline: Any) -> Any:
        seen.append((tuple(names), next(iter(inputs.values())).shape[0]))
        return real_run(names, inputs, deadline)

    model.batcher._run = spy  # type: ignore[union-attr]
    x = np.ones((1, 30), np.float32)
    outputs: list[list[str] | None] = [["label"], ["probabilities"]] * 6
    results = burst(model, [{"input": x}] * 12, outputs)
    assert all(list(r) == o for r, o in zip(results, outputs, strict=True))
    assert {names for names, _ in seen} == {("label",), ("probabilities",)}
    assert sum(rows for _, rows in seen) == 12


def test_bad_input_fails_alone_before_enqueueing() -> None:
    model = batching_model(MLP)
    feeds = [{"input": np.ones((1, 256), np.float32)} for _ in range(7)]
    feeds.append({"input": np.ones((1, 255), np.float32)})
    results = burst(model, feeds)
    assert isinstance(results[-1], InvalidInput)
    assert all(isinstance(r, dict) for r in results[:-1])


def test_runtime_failure_in_a_merged_batch_is_retried_per_request(tmp_path: Path) -> None:
    path = onnx_factory.save(onnx_factory.gather_table(), tmp_path, "gather")
    recorder = onnx_factory.Recorder()
    model = batching_model(path, recorder, max_queue_delay=0.05)
    feeds = [{"idx": np.array([[i % 10]], dtype=np.int64)} for i in range(9)]
    feeds.insert(4, {"idx": np.array([[99]], dtype=np.int64)})
    results = burst(model, feeds)
    assert isinstance(results[4], InferenceFailed)
    for i, result in enumerate(results):
        if i != 4:
            idx = int(feeds[i]["idx"][0, 0])
            assert result["y"].tolist() == [[[4.0 * idx + k for k in range(4)]]]
    assert any(rows > 1 for _, rows, _ in recorder.batches)  # it was a merged batch first


def test_queue_full_sheds_and_late_requests_are_not_run(tmp_path: Path) -> None:
    path = onnx_factory.save(onnx_factory.slow_batched(), tmp_path, "slow")
    recorder = onnx_factory.Recorder()
    model = batching_model(path, recorder, max_batch_size=1, max_queue=2)
    x = {"x": np.ones((1, 256), np.float32)}
    results = burst(model, [x] * 8)
    assert sum(isinstance(r, Overloaded) for r in results) >= 4
    assert sum(isinstance(r, dict) for r in results) >= 2
    runs_before = len(recorder.runs)
    busy = threading.Thread(
        target=model.predict, args=(x,), kwargs={"deadline": time.monotonic() + 30}
    )
    busy.start()
    wait_until(lambda: model.batcher.state == (True, 0), "the busy request to run")  # type: ignore[union-attr]
    with pytest.raises(InferenceTimeout):
        model.predict(x, deadline=time.monotonic() + 0.03)
    busy.join(30)
    assert model.batcher.state == (False, 0)  # type: ignore[union-attr]
    assert len(recorder.runs) == runs_before + 1  # the late request never ran


def test_warm_up_covers_preferred_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    real = onnx_module.synthetic_input

    def spy(spec: Any, rows: int = 1) -> np.ndarray:
        sizes.append(rows)
        return real(spec, rows)

    monkeypatch.setattr(onnx_module, "synthetic_input", spy)
    batching_model(MLP, preferred_batch_sizes=(4, 8))
    assert set(sizes) == {1, 4, 8, 16}


def test_batching_needs_a_dynamic_batch_dimension(tmp_path: Path) -> None:
    path = onnx_factory.save(onnx_factory.fixed_shape(), tmp_path, "fixed")
    with pytest.raises(RepositoryError, match="dynamic first dimension"):
        batching_model(path)


def test_a_lone_request_runs_in_its_own_thread_and_the_lead_is_given_up() -> None:
    model = batching_model(MLP, max_queue_delay=0.0)
    batcher = model.batcher
    assert batcher is not None
    real_run = batcher._run
    threads: list[str] = []

    def spy(names: list[str], inputs: Any, deadline: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real_run(names, inputs, deadline)

    batcher._run = spy
    x = {"input": np.ones((1, 256), np.float32)}
    burst(model, [x] * 12)  # a burst passes the lead around...
    threads.clear()
    caller = threading.Thread(target=model.predict, args=(x,), name="lone-caller")
    caller.start()
    caller.join(10)
    assert threads == ["lone-caller"]  # ...and afterwards nobody holds it


def test_a_queued_request_past_its_deadline_leaves_the_queue_and_others_still_run(
    tmp_path: Path,
) -> None:
    path = onnx_factory.save(onnx_factory.slow_batched(), tmp_path, "slow")
    recorder = onnx_factory.Recorder()
    model = batching_model(path, recorder, max_batch_size=1, max_queue_delay=0.0)
    answers: list[Any] = []

    def feed() -> dict[str, np.ndarray]:  # arrays of their own, as real requests have
        return {"x": np.ones((1, 256), np.float32)}

    def patient() -> None:
        answers.append(model.predict(feed(), deadline=time.monotonic() + 30))

    threads = [threading.Thread(target=patient) for _ in range(2)]
    batcher = model.batcher
    assert batcher is not None
    threads[0].start()  # runs first, and slowly
    wait_until(lambda: batcher.state == (True, 0), "the first request to run")
    threads[1].start()  # queued in front of the impatient one
    wait_until(lambda: batcher.state == (True, 1), "the second request to queue")
    with pytest.raises(InferenceTimeout, match="deadline"):
        model.predict(feed(), deadline=time.monotonic() + 0.03)
    for thread in threads:
        thread.join(30)
    assert [list(a) for a in answers] == [["y"], ["y"]]
    assert len(recorder.runs) == 2  # the patient ones ran; the late one never did
