"""Token buckets shared by every gunicorn worker of the appliance.

The buckets live in a small file mapped into each worker (one 16-byte slot per key: tokens,
last refill on the system-wide monotonic clock). Taking a token locks that slot's byte range
with ``fcntl`` for a few microseconds, so the limit holds for the whole appliance whichever
worker a request lands on, and a worker that dies mid-update releases its lock with it.
"""

from __future__ import annotations

import fcntl
import math
import mmap
import os
import struct
import time
from pathlib import Path

SLOT = struct.calcsize("<dd")
#: Slowest limited rate (requests per second): one request every 1000 s. Slower rates would
#: tell clients to come back in days; 0 means unlimited instead.
MIN_RATE = 0.001
#: Fastest rate and largest burst: far above what one appliance serves.
MAX_RATE = 1_000_000.0
MAX_BURST = 1_000_000
#: Longest Retry-After sent with a 429, in seconds (MIN_RATE needs at most 1000).
MAX_RETRY_AFTER = 3600


class LimitError(ValueError):
    """A rate or burst outside its range; the message is one line naming the value."""


def check_rate(rate: float, what: str = "rate") -> float:
    """A per-key rate as given by an operator: 0 (unlimited) or MIN_RATE..MAX_RATE.

    Args:
        rate: Requests per second.
        what: How the operator wrote it (``auth.rate``, ``--rate``), for the message.

    Raises:
        LimitError: not a finite number in range (NaN, infinities and negatives included).
    """
    if isinstance(rate, bool) or not isinstance(rate, int | float):
        raise LimitError(f"{what} = {rate!r} is invalid: must be a number")
    if not math.isfinite(rate) or not (rate == 0 or MIN_RATE <= rate <= MAX_RATE):
        raise LimitError(
            f"{what} = {rate!r} is invalid: must be 0 (unlimited) or between {MIN_RATE:g} "
            f"and {MAX_RATE:g} requests per second"
        )
    return float(rate)


def check_burst(burst: int, what: str = "burst") -> int:
    """A per-key bucket size as given by an operator: 1..MAX_BURST requests.

    Raises:
        LimitError: not an integer in range.
    """
    if isinstance(burst, bool) or not isinstance(burst, int) or not 1 <= burst <= MAX_BURST:
        raise LimitError(f"{what} = {burst!r} is invalid: must be an integer from 1 to {MAX_BURST}")
    return burst


def retry_after(wait: float) -> str:
    """The Retry-After header for a wait in seconds: whole seconds, 1..MAX_RETRY_AFTER."""
    return str(min(MAX_RETRY_AFTER, max(1, math.ceil(wait))))


def create_state(path: Path, slots: int) -> None:
    """Create (or reset) the state file for ``slots`` buckets; run by the master."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.truncate(max(1, slots) * SLOT)
    path.chmod(0o600)


class RateLimiter:
    """Token buckets in a shared file.

    Args:
        path: The state file made by :func:`create_state`.
    """

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDWR)
        self._size = os.fstat(self._fd).st_size
        self._map = mmap.mmap(self._fd, self._size)

    def take(self, slot: int, rate: float, burst: int) -> float:
        """Take one token from bucket ``slot``.

        Args:
            slot: Bucket index.
            rate: Tokens added per second.
            burst: Bucket capacity; a fresh bucket starts full.

        Returns:
            0 when the request may go on, else the seconds until a token is due.
        """
        offset = slot * SLOT
        if rate <= 0 or offset + SLOT > self._size:
            return 0.0
        fcntl.lockf(self._fd, fcntl.LOCK_EX, SLOT, offset)
        try:
            tokens, last = struct.unpack_from("<dd", self._map, offset)
            now = time.monotonic()
            tokens = burst if last == 0 else min(burst, tokens + (now - last) * rate)
            if tokens >= 1:
                tokens -= 1
                wait = 0.0
            else:
                wait = (1 - tokens) / rate
            struct.pack_into("<dd", self._map, offset, tokens, now)
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, SLOT, offset)
        return wait
