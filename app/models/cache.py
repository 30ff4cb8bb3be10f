"""A bounded LRU cache of answers for one model version, per worker (opt-in in model.toml).

The key is the exact request: the output names asked for and every input's name, dtype,
shape and bytes. A cache belongs to one version's runner, so a version switch or a reload
(new workers, new runners) can never answer from another version's results. Only successful
runs are stored.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Key = tuple[tuple[str, ...], tuple[tuple[str, str, tuple[int, ...], bytes], ...]]


@dataclass(frozen=True, slots=True)
class CacheOptions:
    """``[cache]`` in ``model.toml``.

    Attributes:
        max_entries: Most answers kept per worker.
        max_bytes: Most bytes kept per worker, keys (the inputs) and answers together.
    """

    max_entries: int = 1024
    max_bytes: int = 64 * 1024 * 1024


class ResponseCache:
    """Answers by exact request, least recently used first out.

    Args:
        options: The bounds.
    """

    def __init__(self, options: CacheOptions) -> None:
        self.options = options
        self._entries: OrderedDict[Key, tuple[list[np.ndarray], int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # gthread workers share a runner between threads

    @property
    def size(self) -> tuple[int, int]:
        """Entries and bytes held now."""
        return len(self._entries), self._bytes

    @staticmethod
    def key(names: Sequence[str], inputs: Mapping[str, np.ndarray]) -> Key | None:
        """The request's key, or None when an input is not plain numbers (object arrays
        hold references, not values, so their bytes say nothing)."""
        parts = []
        for name in sorted(inputs):
            array = inputs[name]
            if array.dtype.hasobject:
                return None
            parts.append((name, array.dtype.str, array.shape, array.tobytes()))
        return tuple(names), tuple(parts)

    def get(self, key: Key) -> list[np.ndarray] | None:
        """Copies of the stored answer (the caller may change them), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
        return [value.copy() for value in entry[0]]

    def put(self, key: Key, values: Sequence[np.ndarray]) -> None:
        """Store an answer, evicting the least recently used ones beyond the bounds; an
        answer larger than the whole budget is not stored."""
        stored = [np.array(value, copy=True) for value in values]
        size = sum(v.nbytes for v in stored) + sum(len(part[3]) for part in key[1])
        if size > self.options.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._entries[key] = (stored, size)
            self._bytes += size
            while len(self._entries) > self.options.max_entries or (
                self._bytes > self.options.max_bytes
            ):
                _, (_, freed) = self._entries.popitem(last=False)
                self._bytes -= freed
