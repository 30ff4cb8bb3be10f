"""Token buckets shared through a file: the limit holds across processes."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from app.ratelimit import (
    MAX_BURST,
    MAX_RETRY_AFTER,
    MIN_RATE,
    LimitError,
    RateLimiter,
    check_burst,
    check_rate,
    create_state,
    retry_after,
)


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


@pytest.mark.parametrize("rate", [0, 0.001, 2.5, 100, 1_000_000])
def test_rates_in_range_are_taken(rate: float) -> None:
    assert check_rate(rate) == rate


@pytest.mark.parametrize(
    "rate", [-1, float("nan"), float("inf"), -float("inf"), 1e-320, 1e-300, 0.0009, 1e7, True, "5"]
)
def test_rates_out_of_range_are_refused_in_one_line(rate: object) -> None:
    with pytest.raises(LimitError) as info:
        check_rate(rate, "--rate")  # type: ignore[arg-type]
    assert str(info.value).startswith("--rate = ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("burst", [0, -5, 1_000_001, 2.0, True])
def test_bursts_out_of_range_are_refused(burst: object) -> None:
    with pytest.raises(LimitError, match="burst"):
        check_burst(burst)  # type: ignore[arg-type]
    assert check_burst(1) == 1
    assert check_burst(MAX_BURST) == MAX_BURST


def test_retry_after_is_whole_seconds_within_bounds(tmp_path: Path) -> None:
    assert retry_after(0.01) == "1"
    assert retry_after(2.2) == "3"
    assert retry_after(1e300) == str(MAX_RETRY_AFTER)
    path = tmp_path / "rl.bin"
    create_state(path, 1)
    limiter = RateLimiter(path)
    limiter.take(0, MIN_RATE, 1)
    # The slowest rate allowed asks for at most 1000 s, inside the bound.
    assert int(retry_after(limiter.take(0, MIN_RATE, 1))) == 1000
