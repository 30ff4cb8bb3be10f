"""Token buckets shared by every gunicorn worker of the appliance.

The buckets live in a small file mapped into each worker (one 16-byte slot per key: tokens,
last refill on the system-wide monotonic clock). Taking a token locks that slot's byte range
with ``fcntl`` for a few microseconds, so the limit holds for the whole appliance whichever
worker a request lands on, and a worker that dies mid-update releases its lock with it.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import time
from pathlib import Path

SLOT = struct.calcsize("<dd")


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
