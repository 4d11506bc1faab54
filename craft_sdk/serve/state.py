"""Server-side state, free of any web framework: keys, bounded caches, fair scheduling between keys."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from .._lru import LRU
from ..wire import CHECKSUM_HEADER, sha256_hex


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


def metered_response(digest: str, body: bytes, queries: int, usage: dict[str, Any], model_ms: float) -> CachedResponse:
    """A metered answer with the headers every metered route sends: checksum, the queries billed, the key's
    meter after it (``usage``: the store's ``usage(key)``) and the model's time."""
    remaining = usage["remaining"]
    headers = {
        CHECKSUM_HEADER: sha256_hex(body),
        "X-Craft-Queries": str(queries),
        "X-Craft-Queries-Used": str(usage["used"]),
        "X-Craft-Queries-Remaining": "" if remaining is None else str(remaining),
        "Server-Timing": f"model;dur={model_ms:.1f}",  # lets a client tell network overhead from model time
    }
    return CachedResponse(digest, body, headers)


@dataclass
class CachedResponse:
    """A prediction response remembered under its idempotency key (in memory, and in the state store for replays)."""

    digest: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """``<8-byte length><JSON {digest, headers}><body>``: what the state store keeps."""
        meta = json.dumps({"digest": self.digest, "headers": self.headers}).encode()
        return len(meta).to_bytes(8, "little") + meta + self.body

    @classmethod
    def from_bytes(cls, data: bytes) -> CachedResponse:
        n = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + n])
        return cls(str(meta["digest"]), bytes(data[8 + n :]), {str(k): str(v) for k, v in meta["headers"].items()})


class FairScheduler:
    """One model computation at a time, granted round-robin between API keys.

    Waiting requests queue per key; when the model frees up, the next key in turn gets it, so a key
    sending many (or large) requests delays another key by at most one request at a time. Use from
    one event loop.

    Example:
        >>> sched = FairScheduler()
        >>> # async with sched.turn("alice"): compute()
    """

    def __init__(self) -> None:
        self._busy = False
        self._last: str | None = None  # the key served last goes behind every other waiting key
        self._queues: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._queues.values())

    async def acquire(self, key: str) -> None:
        if not self._busy and not self._queues:
            self._busy, self._last = True, key
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(key, deque()).append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # granted as we were cancelled: pass the turn on
            else:
                q = self._queues.get(key)
                if q is not None and fut in q:
                    q.remove(fut)
                    if not q:
                        del self._queues[key]
            raise

    def release(self) -> None:
        if self._last in self._queues and len(self._queues) > 1:
            self._queues.move_to_end(self._last)
        while self._queues:
            key, q = next(iter(self._queues.items()))
            fut = q.popleft()
            if q:
                self._queues.move_to_end(key)  # this key's next request waits for every other key's turn
            else:
                del self._queues[key]
            if not fut.done():
                fut.set_result(None)
                self._last = key
                return
        self._busy = False

    def turn(self, key: str) -> _Turn:
        return _Turn(self, key)


class _Turn:
    def __init__(self, sched: FairScheduler, key: str) -> None:
        self.sched, self.key = sched, key

    async def __aenter__(self) -> None:
        await self.sched.acquire(self.key)

    async def __aexit__(self, *exc: object) -> None:
        self.sched.release()


class KeyedSets:
    """Uploaded image sets (their prepared features), kept per API key with a quota each.

    One key's uploads evict only that key's least recently used sets; sets are never shared or
    deduplicated across keys, so neither eviction nor upload timing reveals another key's data.

    Args:
        per_key: image sets kept per key.
    """

    def __init__(self, per_key: int) -> None:
        self.per_key = per_key
        self._sets: dict[str, LRU[str, tuple[Any, int]]] = {}
        self._lock = threading.Lock()

    def _lru(self, key: str) -> LRU[str, tuple[Any, int]]:
        with self._lock:
            return self._sets.setdefault(key, LRU(self.per_key))

    def get(self, key: str, handle: str) -> tuple[Any, int] | None:
        return self._lru(key).get(handle)

    def put(self, key: str, handle: str, prepared: Any, n_images: int) -> None:
        self._lru(key).put(handle, (prepared, n_images))

    def pop(self, key: str, handle: str) -> None:
        self._lru(key).pop(handle)

    def count(self, key: str) -> int:
        return len(self._lru(key))
