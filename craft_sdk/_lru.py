"""The one least-recently-used map of the package: client image sets, prompt tokens, server caches."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class LRU(Generic[K, V]):
    """A thread-safe least-recently-used map bounded by entries and (optionally) total size.

    Args:
        max_entries: entries kept; the least recently used is evicted beyond it.
        max_size: bound on the total ``size`` of the entries kept (None: no bound). An entry
            larger than the whole bound is never kept.

    Example:
        >>> cache: LRU[str, int] = LRU(2)
        >>> cache.put("a", 1); cache.put("b", 2); _ = cache.get("a"); cache.put("c", 3)
        >>> sorted(k for k in ("a", "b", "c") if k in cache)
        ['a', 'c']
    """

    def __init__(self, max_entries: int, max_size: int | None = None) -> None:
        self.max_entries = max_entries
        self.max_size = max_size
        self._data: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        """The value under ``key`` (now the most recently used), or None."""
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return None
            self._data.move_to_end(key)
            return item[0]

    def put(self, key: K, value: V, size: int = 0) -> None:
        """Keep ``value`` under ``key`` as the most recently used, evicting beyond the bounds."""
        with self._lock:
            if key in self._data:
                self._size -= self._data.pop(key)[1]
            if self.max_size is not None and size > self.max_size:
                return  # never kept: one entry may not exceed the whole bound
            self._data[key] = (value, size)
            self._size += size
            while len(self._data) > self.max_entries or (self.max_size is not None and self._size > self.max_size):
                self._size -= self._data.popitem(last=False)[1][1]

    def pop(self, key: K) -> None:
        """Forget ``key`` if kept."""
        with self._lock:
            item = self._data.pop(key, None)
            if item is not None:
                self._size -= item[1]

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is kept; does not count as a use."""
        with self._lock:
            return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    @property
    def size(self) -> int:
        """Total size of the entries kept."""
        return self._size
