"""What every route of the server depends on, framework-free: :class:`ServerState` (one per app, one per
server process), the model as the server uses it (:class:`Model`), the state store off the event loop
(:class:`Meter`) and the request being answered (:data:`CURRENT_REQUEST`).

Route modules (:mod:`~craft_sdk.serve.api_v1`, :mod:`~craft_sdk.serve.zeroshot`,
:mod:`~craft_sdk.serve.openai_compat`) import this module and :mod:`~craft_sdk.serve.metered`; the app
(:mod:`~craft_sdk.serve.app`) imports them. Nothing here imports a route module or the app, so the
imports go one way.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .._lru import LRU
from ..client.base import BaseClient, PredictionClient, check_offsets
from ..errors import ConfigError, CraftError, StoreError
from ..wire import STORE_UNAVAILABLE
from . import checks
from .checks import Problem
from .config import ServerConfig
from .state import CachedResponse, FairScheduler, KeyedSets, KeyRing
from .store import Store

logger = logging.getLogger(__name__)
# the request being answered (set by every route): a model call whose client has left is not started
CURRENT_REQUEST: contextvars.ContextVar[Any] = contextvars.ContextVar("craft_current_request", default=None)


class Model:
    """The black box as the server uses it: features prepared per (key, image set), never shared across keys."""

    def __init__(self, client: PredictionClient) -> None:
        self.client = client
        self.direct = isinstance(client, BaseClient)  # prepare features ourselves: no cross-key cache in the client

    def prepare(self, images: list[Any]) -> Any:
        return self.client._prepare(images) if self.direct else self.client.upload(images)  # type: ignore[attr-defined]

    def predict(self, prepared: Any, n: int, names: list[str], template: str, offsets: np.ndarray | None) -> np.ndarray:
        """Scores [P, N, C] (P = 1 without offsets)."""
        if not self.direct:
            out = np.asarray(self.client.predict(prepared, names, template, offsets))
            return out[None] if offsets is None or offsets.ndim == 2 else out
        client: BaseClient = self.client  # type: ignore[assignment]
        batch = check_offsets(offsets, client.capabilities(template))
        return np.asarray(client._predict_images(prepared, names, template, batch))


class Meter:
    """The state store as the event loop uses it: each call in a worker thread of its own pool, bounded by
    ``timeout_s``; a store that is down, slow or lost its data gives a 503 ``store_unavailable`` Problem
    (with Retry-After) instead of blocking every other request.
    """

    def __init__(self, store: Store, timeout_s: float) -> None:
        self.store, self.timeout_s = store, timeout_s
        self._pool = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="craft-store")

    async def call(self, method: str, *args: Any, late: Callable[[Any], None] | None = None) -> Any:
        """``store.<method>(*args)``; ``late(result)`` runs if the call completes after its timeout (to undo it)."""
        fut = self._pool.submit(getattr(self.store, method), *args)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), self.timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            if late is not None:
                fut.add_done_callback(lambda f: None if f.cancelled() or f.exception() else late(f.result()))
            raise store_unavailable(f"the state store did not answer within {self.timeout_s:g} s") from None
        except ConfigError:
            raise
        except Exception as exc:  # StoreError, sqlite3.Error, redis.RedisError...: the meter cannot be trusted now
            logger.warning("state store %s failed: %s", method, checks.first_line(exc))
            raise store_unavailable(checks.first_line(exc) if isinstance(exc, StoreError) else "the state store is unavailable") from None

    async def begin(self, key: str, idem: str | None, request: str, n: int, owner: str) -> Any:
        """:meth:`Store.begin`; a charge recorded after the timeout (the client got a 503) is refunded."""

        def undo(begin: Any) -> None:
            if begin.status in ("charged", "takeover"):
                self.store.abort(key, idem, n, owner)

        return await self.call("begin", key, idem, request, n, owner, late=undo)

    async def refund(self, key: str, idem: str | None, n: int, owner: str) -> None:
        """:meth:`Store.abort` after a failed computation (only while ``owner`` holds the record); a store down now
        is logged (the original error wins)."""
        try:
            await self.call("abort", key, idem, n, owner, late=None)
        except Problem as p:
            logger.error("could not refund %d queries of key %r: %s", n, key, p.message)

    async def record(self, key: str, idem: str, resp: CachedResponse, n: int) -> None:
        """:meth:`Store.finish` with the answer kept for replays (``n``: its queries, charged again if another process
        refunded the record meanwhile); the answer is sent even if the store fails now. Runs before the answer is
        sent: a re-charge that would pass the key's budget is a 429 (nothing billed, the answer not delivered)."""
        try:
            recorded = await self.call("finish", key, idem, resp.digest, resp.to_bytes(), n)
        except Problem as p:
            logger.error("could not record the answer of key %r (Idempotency-Key %s): %s", key, idem, p.message)
            return
        if recorded is False:
            raise Problem(429, "budget_exceeded", f"this request's {n} queries would exceed the key's query budget (its charge "
                          "was refunded while it was computed; not delivered, not billed)", headers={"x-should-retry": "false"})

    async def usage_of_delivered(self, key: str) -> dict[str, Any]:
        """``key``'s usage for the headers of an answer already computed and charged; a store failing now gives
        empty meter headers, never a 503 (the answer is delivered: it was billed)."""
        try:
            return await self.call("usage", key)  # type: ignore[no-any-return]
        except Problem as p:
            logger.warning("could not read the meter of key %r for an answer's headers: %s", key, p.message)
            return {"used": "", "budget": None, "remaining": None, "uploads": ""}

    async def health(self) -> str | None:
        """None when the store can record a charge now, else why not (one line)."""
        try:
            await self.call("ping")
        except Problem as p:
            return p.message
        return None

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method.startswith("_") or not hasattr(self.store, method):
            raise AttributeError(method)
        return lambda *args: self.call(method, *args)


def store_unavailable(message: str) -> Problem:
    return Problem(503, STORE_UNAVAILABLE, f"{message}; retry later", headers={"Retry-After": "5"})


class ServerState:
    """Everything one app instance (one server process) holds; meters live in ``store``."""

    def __init__(self, client: PredictionClient, keys: dict[str, str], config: ServerConfig, store: Store) -> None:
        self.model = Model(client)
        self.keys = KeyRing(keys)
        self.config = config
        self.store = store
        self.meter = Meter(store, config.store_timeout_s)  # the store off the event loop, with a timeout
        self.owner = uuid.uuid4().hex  # this process, for the leases of its pending requests
        self.sets = KeyedSets(config.max_image_sets)
        self.answers: LRU[tuple[str, str], CachedResponse] = LRU(config.idempotency_entries, config.idempotency_bytes)
        self.caps: LRU[str, Any] = LRU(64)
        self.inflight: dict[tuple[str, str], asyncio.Event] = {}
        self.scheduler = FairScheduler()
        self.pending = 0
        self.secret = store.secret()
        self.stopped = threading.Event()
        store.beat(self.owner)
        start_beating(self)

    def close(self) -> None:
        """Stop renewing this process's lease (the app shut down)."""
        self.stopped.set()

    async def run(self, key: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a model call in a worker thread when ``key``'s turn comes (round-robin between keys); 429 when too many wait."""
        return (await self.run_chunks(key, lambda _: fn(*args), [None]))[0]

    async def run_chunks(self, key: str, fn: Callable[[Any], Any], chunks: Sequence[Any]) -> list[Any]:
        """``fn(chunk)`` for every chunk, each in a worker thread, all in one turn of ``key``. Before each chunk the
        request stops if its client left (499) or, after the first, if it has used ``max_request_s`` of model time
        (413 ``compute_budget``); the Problem's ``done`` counts the chunks computed (the caller bills their queries
        and refunds the rest; nothing delivered). A running chunk is never interrupted."""
        import anyio

        if self.pending >= self.config.max_pending:
            raise Problem(429, "rate_limited", "too many requests are waiting for the model; retry later", headers={"Retry-After": "1"})
        self.pending += 1
        try:
            async with self.scheduler.turn(key):
                request, started, out = CURRENT_REQUEST.get(), time.monotonic(), []
                for i, chunk in enumerate(chunks):
                    stop = None
                    if request is not None and await request.is_disconnected():  # nobody will read it: stop computing
                        logger.info("client of %s %s left; stopped after %d of %d chunks (those computed are billed)",
                                    request.method, request.url.path, i, len(chunks))
                        stop = Problem(499, "client_disconnected", "client disconnected before the model computed its request")
                    elif i and time.monotonic() - started > self.config.max_request_s:
                        stop = Problem(413, "compute_budget", f"the request needs more than {self.config.max_request_s} s of model "
                                       f"time (max_request_s; stopped after {i} of {len(chunks)} chunks, whose queries are billed "
                                       "(X-Craft-Queries)); split the population (HTTPClientConfig.max_batch)", "offsets")
                    if stop is not None:
                        stop.done = i
                        raise stop
                    out.append(await anyio.to_thread.run_sync(fn, chunk))
                return out
        finally:
            self.pending -= 1

    async def capabilities(self, key: str, template: str) -> Any:
        caps = self.caps.get(template)
        if caps is None:
            try:
                caps = await self.run(key, self.model.client.capabilities, template)
            except CraftError as exc:
                raise Problem(422, "invalid", checks.first_line(exc), "template") from None
            self.caps.put(template, caps)
        return caps


def start_beating(state: ServerState) -> None:
    """Renew the process's lease in the store while the state lives (a daemon thread)."""
    ref, store, owner, period = weakref.ref(state), state.store, state.owner, max(0.5, state.config.lease_s / 4)
    stopped = state.stopped

    def beat() -> None:
        while ref() is not None and not stopped.wait(period):
            try:
                store.beat(owner)
            except Exception as exc:  # a store hiccup must not kill the thread; the lease just ages
                logger.warning("could not renew this server's lease in the state store: %s", checks.first_line(exc))

    threading.Thread(target=beat, name="craft-lease", daemon=True).start()
