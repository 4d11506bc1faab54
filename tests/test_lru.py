"""The package's one LRU map, and the caches built on it (client image sets, server idempotency)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from craft_sdk._lru import LRU
from craft_sdk.client import CallableClient, Capabilities
from craft_sdk.errors import UnknownHandleError


def test_evicts_the_least_recently_used() -> None:
    cache: LRU[str, int] = LRU(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now the most recently used
    cache.put("c", 3)
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.get("b") is None and len(cache) == 2


def test_contains_is_not_a_use() -> None:
    cache: LRU[str, int] = LRU(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert "a" in cache
    cache.put("c", 3)  # a was not refreshed by the membership test: it goes
    assert "a" not in cache and cache.get("b") == 2


def test_put_replaces_and_pop_forgets() -> None:
    cache: LRU[str, int] = LRU(3, max_size=10)
    cache.put("a", 1, 4)
    cache.put("a", 2, 6)
    assert cache.get("a") == 2 and cache.size == 6 and len(cache) == 1
    cache.pop("a")
    cache.pop("missing")
    assert len(cache) == 0 and cache.size == 0 and "a" not in cache


def test_size_bound_evicts_oldest_and_refuses_oversized() -> None:
    cache: LRU[str, bytes] = LRU(10, max_size=100)
    cache.put("big", b"x" * 101, 101)
    assert len(cache) == 0 and cache.size == 0
    for i in range(5):
        cache.put(str(i), b"x" * 40, 40)
    assert [k for k in map(str, range(5)) if k in cache] == ["3", "4"] and cache.size == 80


def test_concurrent_puts_keep_the_bounds() -> None:
    cache: LRU[int, int] = LRU(50, max_size=500)

    def work(offset: int) -> None:
        for i in range(300):
            cache.put(offset * 1000 + i, i, 7)
            cache.get(offset * 1000 + i // 2)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cache) <= 50 and cache.size == 7 * len(cache)


def test_client_handles_follow_the_lru() -> None:
    prepared: list[int] = []

    def fn(images, names, template, offsets):  # noqa: ANN001, ANN202
        prepared.append(len(images))
        return np.zeros((len(images), len(names)), np.float32)

    client = CallableClient(fn, Capabilities("m"), cache_size=2)
    imgs = [np.full((4, 4, 3), v, np.uint8) for v in range(3)]
    h0, h1 = client.upload([imgs[0]]), client.upload([imgs[1]])
    assert client.upload([imgs[0]]) == h0  # already kept: refreshed, not evicted next
    client.upload([imgs[2]])
    assert client.predict(h0, ["a", "b"]).shape == (1, 2)
    with pytest.raises(UnknownHandleError, match="evicted"):
        client.predict(h1, ["a", "b"])
