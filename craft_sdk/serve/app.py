"""The model owner's side: a prediction-only HTTP service around any :class:`PredictionClient`.

The wire format is documented in ``docs/wire-format.md`` (codec: :mod:`craft_sdk.wire`). The
service returns logits and nothing else (no features, embeddings or weights), authenticates bearer
keys in constant time, meters queries per key in the client-side ledger's unit (one candidate
prompt scored on one image set) in a :class:`~craft_sdk.serve.store.Store` that survives restarts
and is shared by every server process on it, keeps image features per key with a quota each,
grants the model round-robin between keys, and remembers each request under its idempotency key
so a retried request is neither computed nor billed twice.

Routes are registered by *route sets*: functions ``(router, state) -> None`` listed by
:func:`default_route_sets` (or passed as ``create_app(..., route_sets=...)``); the prediction API
is :mod:`craft_sdk.serve.api_v1`, and a second API shape is one more module with a ``register``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import logging
import threading
import uuid
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .._lru import LRU
from .._version import __version__
from ..client.base import BaseClient, PredictionClient, check_offsets
from ..errors import ConfigError, CraftError, StoreError, require
from ..wire import API
from . import checks
from .checks import Problem
from .config import ServerConfig, validate_keys
from .state import CachedResponse, FairScheduler, KeyedSets, KeyRing
from .store import MemoryStore, Store

logger = logging.getLogger(__name__)
# the request being answered (set by every route): a model call whose client has left is not started
CURRENT_REQUEST: contextvars.ContextVar[Any] = contextvars.ContextVar("craft_current_request", default=None)


def _import_fastapi() -> Any:
    return require("fastapi", "serve", "the prediction server")


class _Model:
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
            raise _unavailable(f"the state store did not answer within {self.timeout_s:g} s") from None
        except ConfigError:
            raise
        except Exception as exc:  # StoreError, sqlite3.Error, redis.RedisError...: the meter cannot be trusted now
            logger.warning("state store %s failed: %s", method, checks.first_line(exc))
            raise _unavailable(checks.first_line(exc) if isinstance(exc, StoreError) else "the state store is unavailable") from None

    async def begin(self, key: str, idem: str | None, request: str, n: int, owner: str) -> Any:
        """:meth:`Store.begin`; a charge recorded after the timeout (the client got a 503) is refunded."""

        def undo(begin: Any) -> None:
            if begin.status in ("charged", "takeover"):
                self.store.abort(key, idem, n)

        return await self.call("begin", key, idem, request, n, owner, late=undo)

    async def refund(self, key: str, idem: str | None, n: int) -> None:
        """:meth:`Store.abort` after a failed computation; a store down now is logged (the original error wins)."""
        try:
            await self.call("abort", key, idem, n, late=None)
        except Problem as p:
            logger.error("could not refund %d queries of key %r: %s", n, key, p.message)

    async def record(self, key: str, idem: str, resp: CachedResponse) -> None:
        """:meth:`Store.finish` with the answer kept for replays; the answer is sent even if the store fails now."""
        try:
            await self.call("finish", key, idem, resp.digest, resp.to_bytes())
        except Problem as p:
            logger.error("could not record the answer of key %r (Idempotency-Key %s): %s", key, idem, p.message)

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


def _unavailable(message: str) -> Problem:
    return Problem(503, "store_unavailable", f"{message}; retry later", headers={"Retry-After": "5"})


class ServerState:
    """Everything one app instance (one server process) holds; meters live in ``store``."""

    def __init__(self, client: PredictionClient, keys: dict[str, str], config: ServerConfig, store: Store) -> None:
        self.model = _Model(client)
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
        _start_beating(self)

    def close(self) -> None:
        """Stop renewing this process's lease (the app shut down)."""
        self.stopped.set()

    async def run(self, key: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a model call in a worker thread when ``key``'s turn comes (round-robin between keys); 429 when too many wait."""
        import anyio

        if self.pending >= self.config.max_pending:
            raise Problem(429, "rate_limited", "too many requests are waiting for the model; retry later", headers={"Retry-After": "1"})
        self.pending += 1
        try:
            async with self.scheduler.turn(key):
                request = CURRENT_REQUEST.get()
                if request is not None and await request.is_disconnected():  # nobody will read it: not computed
                    logger.info("client of %s %s left before its turn; not computed (its charge is refunded)", request.method, request.url.path)
                    raise Problem(499, "client_disconnected", "client disconnected before the model computed its request")
                return await anyio.to_thread.run_sync(fn, *args)  # a running computation cannot be interrupted
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


def _start_beating(state: ServerState) -> None:
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


RouteSet = Callable[[Any, ServerState], None]


def default_route_sets() -> list[RouteSet]:
    """The route sets a server has unless told otherwise; a new API shape adds its ``register`` here."""
    from . import api_v1, openai_compat, zeroshot

    return [api_v1.register, zeroshot.register, openai_compat.register]


def create_app(
    client: PredictionClient,
    api_keys: dict[str, str],
    config: ServerConfig | None = None,
    store: Store | None = None,
    route_sets: Sequence[RouteSet] | None = None,
) -> Any:
    """A FastAPI app serving ``client`` to the holders of ``api_keys``.

    Args:
        client: the black box (normally an :class:`~craft_sdk.client.openclip.OpenCLIPClient`).
        api_keys: key name → key (see :func:`~craft_sdk.serve.config.load_api_keys`).
        config: limits, per-key budget and cache bounds.
        store: where meters and idempotency records live (default: a :class:`MemoryStore`
            with ``config.budget_per_key``; see :func:`~craft_sdk.serve.store.open_store`).
        route_sets: functions ``(router, state)`` that add routes to the ``/v1`` router
            (default :func:`default_route_sets`).

    Example:
        >>> from craft_sdk.client.openclip import OpenCLIPClient           # doctest: +SKIP
        >>> app = create_app(OpenCLIPClient("demo"), {"alice": "x" * 32})    # doctest: +SKIP
        >>> # uvicorn.run(app, host="127.0.0.1", port=8765)
    """
    fastapi = _import_fastapi()
    config = config or ServerConfig()
    state = ServerState(client, validate_keys(api_keys), config, store or MemoryStore(config.budget_per_key, config.lease_s))
    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        if state.stopped.is_set():  # served again after a shutdown: renew the lease again
            state.stopped.clear()
            _start_beating(state)
        yield
        state.close()

    app = fastapi.FastAPI(
        lifespan=lifespan,
        title="craft-sdk prediction server",
        version=__version__,
        description="Prediction-only black box for CraFT; wire format: docs/wire-format.md.",
        docs_url=None,
        redoc_url=None,
        openapi_url=f"/{API}/openapi.json",
    )
    app.state.craft = state
    _install_error_handlers(app)
    router = fastapi.APIRouter(prefix=f"/{API}", route_class=_route_class())
    for add_routes in route_sets if route_sets is not None else default_route_sets():
        add_routes(router, state)
    app.include_router(router)
    return app


def error_response(status: int, code: str, message: str, field: str | None = None, headers: dict[str, str] | None = None) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"code": code, "message": message, "field": field}}, status, headers=headers)


def _install_error_handlers(app: Any) -> None:
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(Problem)
    async def _problem(request: Any, p: Problem) -> Any:
        return error_response(p.status, p.code, p.message, p.field, p.headers)

    @app.exception_handler(HTTPException)
    async def _httperror_response(request: Any, exc: HTTPException) -> Any:
        return error_response(exc.status_code, "not_found" if exc.status_code == 404 else "http_error", str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Any, exc: RequestValidationError) -> Any:
        return error_response(422, "invalid", "malformed request parameters", "request")


def _route_class() -> Any:
    """Routes whose unexpected errors become a logged 500 with the usual body (nothing leaked, nothing re-raised)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.routing import APIRoute
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    class CraftRoute(APIRoute):
        def get_route_handler(self) -> Callable[..., Any]:
            handler = super().get_route_handler()

            async def guarded(request: Any) -> Any:
                CURRENT_REQUEST.set(request)
                try:
                    return await handler(request)
                except (Problem, HTTPException, RequestValidationError):
                    raise
                except ClientDisconnect:  # the client gave up before its body arrived: nothing computed, nothing billed
                    logger.info("client disconnected during %s %s", request.method, request.url.path)
                    return error_response(400, "client_disconnected", "client disconnected")
                except Exception:
                    logger.exception("internal error on %s %s", request.method, request.url.path)
                    return error_response(500, "internal", "internal server error")

            return guarded

    return CraftRoute


