"""Server-side state, free of any web framework: keys, per-key metering, handle and response caches."""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class KeyRing:
    """Bearer-token authentication with a constant-time comparison against every key.

    Args:
        keys: name → key.
    """

    def __init__(self, keys: dict[str, str]) -> None:
        self._digests = [(name, hashlib.sha256(key.encode()).digest()) for name, key in keys.items()]

    def identify(self, authorization: str | None) -> str | None:
        """The key name for an ``Authorization: Bearer <key>`` header, or None."""
        token = ""
        if authorization and authorization[:7].lower() == "bearer ":
            token = authorization[7:].strip()
        digest = hashlib.sha256(token.encode("utf-8", "replace")).digest()
        found = None
        for name, expected in self._digests:  # no early exit: the time does not depend on which key matched
            if hmac.compare_digest(digest, expected):
                found = name
        return found


@dataclass
class KeyUsage:
    """Queries and uploads of one key."""

    used: int = 0
    uploads: int = 0


class Meter:
    """Per-key query counts against an optional per-key budget (a hard ceiling, checked before computing).

    Args:
        budget: queries per key; None = unlimited.
    """

    def __init__(self, budget: int | None) -> None:
        self.budget = budget
        self._usage: dict[str, KeyUsage] = {}
        self._lock = threading.Lock()

    def charge(self, key: str, n: int) -> bool:
        """Record ``n`` queries for ``key``; False (nothing recorded) if they exceed its budget."""
        with self._lock:
            u = self._usage.setdefault(key, KeyUsage())
            if self.budget is not None and u.used + n > self.budget:
                return False
            u.used += n
            return True

    def refund(self, key: str, n: int) -> None:
        """Take back ``n`` queries that were charged but never computed."""
        with self._lock:
            u = self._usage.setdefault(key, KeyUsage())
            u.used = max(0, u.used - n)

    def count_upload(self, key: str) -> None:
        with self._lock:
            self._usage.setdefault(key, KeyUsage()).uploads += 1

    def report(self, key: str) -> dict[str, Any]:
        """``used``, ``budget``, ``remaining`` (None when unlimited), ``uploads``."""
        with self._lock:
            u = self._usage.get(key, KeyUsage())
            remaining = None if self.budget is None else self.budget - u.used
            return {"used": u.used, "budget": self.budget, "remaining": remaining, "uploads": u.uploads}


class LRU(Generic[K, V]):
    """A thread-safe least-recently-used map bounded by entries and (optionally) total size."""

    def __init__(self, max_entries: int, max_size: int | None = None) -> None:
        self.max_entries = max_entries
        self.max_size = max_size
        self._data: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return None
            self._data.move_to_end(key)
            return item[0]

    def put(self, key: K, value: V, size: int = 0) -> None:
        with self._lock:
            if key in self._data:
                self._size -= self._data.pop(key)[1]
            self._data[key] = (value, size)
            self._size += size
            while len(self._data) > self.max_entries or (
                self.max_size is not None and self._size > self.max_size and len(self._data) > 1
            ):
                self._size -= self._data.popitem(last=False)[1][1]

    def pop(self, key: K) -> None:
        with self._lock:
            item = self._data.pop(key, None)
            if item is not None:
                self._size -= item[1]

    def __len__(self) -> int:
        return len(self._data)


@dataclass
class CachedResponse:
    """A prediction response remembered under its idempotency key."""

    digest: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
