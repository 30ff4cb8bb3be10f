"""The response cache: exact keys, least-recently-used eviction within both bounds, copies."""

from __future__ import annotations

import numpy as np
import pytest

from app.models.cache import CacheOptions, ResponseCache

pytestmark = pytest.mark.unit


def _key(
    cache: ResponseCache, value: object, dtype: str = "float32", shape: tuple[int, ...] = (1, 2)
) -> object:
    return cache.key(["y"], {"x": np.full(shape, value, dtype)})


def test_the_key_is_the_exact_request() -> None:
    cache = ResponseCache(CacheOptions())
    base = _key(cache, 1.0)
    assert base == _key(cache, 1.0)
    assert base != _key(cache, 1.0, "float64")  # same values, another dtype
    assert base != _key(cache, 1.0, shape=(2, 1))  # same bytes, another shape
    assert base != _key(cache, np.nextafter(np.float32(1), np.float32(2)))  # one ulp apart
    x = {"x": np.ones((1, 2), np.float32)}
    assert cache.key(["y"], x) != cache.key(["y", "z"], x)  # other outputs asked for
    assert cache.key(["y"], {"x": np.array([["a"]], object)}) is None  # references, not values


def test_answers_come_back_as_copies() -> None:
    cache = ResponseCache(CacheOptions())
    key = _key(cache, 1.0)
    answer = np.arange(3.0)
    cache.put(key, [answer])
    answer[0] = 99  # the caller's array changes after it was stored
    first = cache.get(key)
    assert first is not None and first[0].tolist() == [0.0, 1.0, 2.0]
    first[0][1] = 99  # and a reader changes what it got
    again = cache.get(key)
    assert again is not None and again[0].tolist() == [0.0, 1.0, 2.0]


def test_the_least_recently_used_goes_first_within_the_entry_bound() -> None:
    cache = ResponseCache(CacheOptions(max_entries=2))
    a, b, c = (_key(cache, v) for v in (1.0, 2.0, 3.0))
    cache.put(a, [np.zeros(1)])
    cache.put(b, [np.zeros(1)])
    assert cache.get(a) is not None  # a is now more recent than b
    cache.put(c, [np.zeros(1)])
    assert cache.get(b) is None
    assert cache.get(a) is not None and cache.get(c) is not None
    assert cache.size[0] == 2


def test_the_byte_bound_counts_inputs_and_answers() -> None:
    key_bytes = 2 * 4  # the (1, 2) float32 input
    entry = key_bytes + 100 * 8
    cache = ResponseCache(CacheOptions(max_bytes=2 * entry))
    keys = [_key(cache, float(v)) for v in range(3)]
    for key in keys:
        cache.put(key, [np.zeros(100)])
    assert cache.size == (2, 2 * entry)
    assert cache.get(keys[0]) is None
    cache.put(_key(cache, 9.0), [np.zeros(1000)])  # larger than the whole budget: not kept
    assert cache.size == (2, 2 * entry)
    assert cache.get(_key(cache, 9.0)) is None
