"""The model owner's side: a prediction-only HTTP service around any :class:`PredictionClient`.

The wire format is documented in ``docs/wire-format.md`` (codec: :mod:`craft_sdk.wire`). The
service returns logits and nothing else (no features, embeddings or weights), authenticates bearer
keys in constant time, meters queries per key in the client-side ledger's unit (one candidate
prompt scored on one image set) in a :class:`~craft_sdk.serve.store.Store` that survives restarts
and is shared by every server process on it, keeps image features per key with a quota each,
grants the model round-robin between keys, and remembers each request under its idempotency key
so a retried request is neither computed nor billed twice.

The state every route depends on is :class:`~craft_sdk.serve.deps.ServerState`.
Routes are registered by *route sets*: functions ``(router, state) -> None`` listed by
:func:`default_route_sets` (or passed as ``create_app(..., route_sets=...)``); the prediction API
is :mod:`craft_sdk.serve.api_v1`, and a second API shape is one more module with a ``register``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

from .._version import __version__
from ..client.base import PredictionClient
from ..errors import require
from ..wire import API
from .checks import Problem
from .config import ServerConfig, validate_keys
from .deps import CURRENT_REQUEST, ServerState, start_beating
from .store import MemoryStore, Store

logger = logging.getLogger(__name__)


def _import_fastapi() -> Any:
    return require("fastapi", "serve", "the prediction server")


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
            start_beating(state)
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


