"""Token buckets shared through a file: the limit holds across processes."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

from app.ratelimit import RateLimiter, create_state


def test_burst_then_refill(tmp_path: Path) -> None:
    path = tmp_path / "rl.bin"
    create_state(path, 2)
    limiter = RateLimiter(path)
    assert [limiter.take(0, 10.0, 3) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.take(0, 10.0, 3)
    assert 0 < wait <= 0.1
    assert limiter.take(1, 10.0, 3) == 0.0  # other buckets are independent
    time.sleep(0.12)
    assert limiter.take(0, 10.0, 3) == 0.0
    assert limiter.take(0, 0.0, 1) == 0.0  # rate 0: unlimited
    assert limiter.take(99, 1.0, 1) == 0.0  # out of range slot: no limit, no crash


def _hammer(path: str, seconds: float, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    limiter = RateLimiter(Path(path))
    allowed = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if limiter.take(0, 50.0, 5) == 0:
            allowed += 1
    out.put(allowed)


def test_limit_holds_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "rl.bin"
    create_state(path, 1)
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue = ctx.Queue()  # type: ignore[type-arg]
    procs = [ctx.Process(target=_hammer, args=(str(path), 1.0, out)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    total = sum(out.get(timeout=5) for _ in procs)
    # 50/s for about one second plus a burst of 5, whatever the number of processes.
    assert 40 <= total <= 70, total
