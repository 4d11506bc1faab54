"""The model owner's side: a prediction-only HTTP service around any :class:`PredictionClient`.

The wire format is documented in ``docs/wire-format.md`` and in
:mod:`craft_sdk.client.http`. The service returns logits and nothing else (no
features, embeddings or weights), authenticates bearer keys in constant time,
meters queries per key in the client-side ledger's unit (one candidate prompt
scored on one image set), keeps image features per handle in a bounded cache,
and remembers each response under its idempotency key so a retried request is
neither computed nor billed twice.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from PIL import Image

from .._version import __version__
from ..client.base import ImageSetHandle, PredictionClient
from ..client.http import (
    API,
    CHECKSUM_HEADER,
    IDEMPOTENCY_HEADER,
    SAFETENSORS,
    TensorEntry,
    WireError,
    encode,
    parse,
    read,
    sha256_hex,
)
from ..errors import ConfigError, CraftError
from ..images import images_fingerprint
from .config import ServerConfig, validate_keys
from .state import LRU, CachedResponse, KeyRing, Meter

logger = logging.getLogger(__name__)

_IDEM_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_IMAGE_RE = re.compile(r"^image\.(\d{6})$")
_EVICTED = "unknown or evicted image-set handle"


class Problem(Exception):
    """An HTTP error answered as JSON ``{"error": {"code", "message", "field"}}``."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.headers = headers or {}


def _import_fastapi() -> Any:
    try:
        import fastapi
    except ImportError:
        raise ConfigError("the prediction server needs fastapi and uvicorn: pip install 'craft-sdk[serve]'") from None
    return fastapi


class _State:
    """Everything one app instance holds."""

    def __init__(self, client: PredictionClient, keys: dict[str, str], config: ServerConfig) -> None:
        self.client = client
        self.keys = KeyRing(keys)
        self.config = config
        self.meter = Meter(config.budget_per_key)
        self.handles: LRU[tuple[str, str], ImageSetHandle] = LRU(config.max_image_sets)
        self.responses: LRU[tuple[str, str], CachedResponse] = LRU(config.idempotency_entries, config.idempotency_bytes)
        self.caps: LRU[str, Any] = LRU(64)
        self.inflight: dict[tuple[str, str], asyncio.Event] = {}
        self.model_lock = threading.Lock()  # one model computation at a time
        self.pending = 0
        self.secret = secrets.token_bytes(32)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a model call in a worker thread, one at a time; 429 when too many wait."""
        import anyio

        if self.pending >= self.config.max_pending:
            raise Problem(429, "rate_limited", "too many requests are waiting for the model; retry later", headers={"Retry-After": "1"})
        self.pending += 1

        def locked() -> Any:
            with self.model_lock:
                return fn(*args)

        try:
            return await anyio.to_thread.run_sync(locked)
        finally:
            self.pending -= 1

    async def capabilities(self, template: str) -> Any:
        caps = self.caps.get(template)
        if caps is None:
            try:
                caps = await self.run(self.client.capabilities, template)
            except CraftError as exc:
                raise Problem(422, "invalid", _first_line(exc), "template") from None
            self.caps.put(template, caps)
        return caps


def create_app(client: PredictionClient, api_keys: dict[str, str], config: ServerConfig | None = None) -> Any:
    """A FastAPI app serving ``client`` to the holders of ``api_keys``.

    Args:
        client: the black box (normally an :class:`~craft_sdk.client.openclip.OpenCLIPClient`).
        api_keys: key name → key (see :func:`~craft_sdk.serve.config.load_api_keys`).
        config: limits, per-key budget and cache bounds.

    Example:
        >>> from craft_sdk.client.openclip import OpenCLIPClient           # doctest: +SKIP
        >>> app = create_app(OpenCLIPClient("demo"), {"alice": "x" * 32})    # doctest: +SKIP
        >>> # uvicorn.run(app, host="127.0.0.1", port=8765)
    """
    fastapi = _import_fastapi()
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    state = _State(client, validate_keys(api_keys), config or ServerConfig())
    app = fastapi.FastAPI(title="craft-sdk prediction server", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.craft = state

    @app.exception_handler(HTTPException)
    async def _http_error(request: Any, exc: HTTPException) -> Any:
        return JSONResponse({"error": {"code": "not_found" if exc.status_code == 404 else "http_error", "message": str(exc.detail), "field": None}}, exc.status_code)

    def endpoint(method: str, path: str) -> Callable[[Callable[..., Awaitable[Any]]], Any]:
        def register(fn: Callable[..., Awaitable[Any]]) -> Any:
            app.add_route(f"/{API}{path}", _guard(fn), methods=[method])
            return fn

        return register

    def _guard(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(fn)
        async def wrapper(request: Any) -> Any:
            try:
                out = await fn(request)
                return out if not isinstance(out, dict) else JSONResponse(out)
            except Problem as p:
                return JSONResponse({"error": {"code": p.code, "message": p.message, "field": p.field}}, p.status, headers=p.headers)
            except ClientDisconnect:  # the client gave up before its body arrived: nothing computed, nothing billed
                logger.info("client disconnected during %s %s", request.method, request.url.path)
                return JSONResponse({"error": {"code": "client_disconnected", "message": "client disconnected", "field": None}}, 400)
            except Exception:  # the service's error boundary: log here, leak nothing
                logger.exception("internal error on %s %s", request.method, request.url.path)
                return JSONResponse({"error": {"code": "internal", "message": "internal server error", "field": None}}, 500)

        return wrapper

    @endpoint("GET", "/health")
    async def health(request: Any) -> Any:
        return {"status": "ok", "api": API, "version": __version__}

    @endpoint("GET", "/limits")
    async def limits(request: Any) -> Any:
        _auth(state, request)
        return state.config.limits()

    @endpoint("GET", "/usage")
    async def usage(request: Any) -> Any:
        return state.meter.report(_auth(state, request))

    @endpoint("GET", "/capabilities")
    async def capabilities(request: Any) -> Any:
        _auth(state, request)
        template = request.query_params.get("template", "a photo of a")
        _check_template(template, state.config)
        caps = await state.capabilities(template)
        fields = ("model_id", "n_ctx", "ctx_dim", "output", "ctx_rms", "logit_scale")
        return {k: getattr(caps, k) for k in fields}

    @endpoint("POST", "/image-sets")
    async def upload(request: Any) -> Any:
        key = _auth(state, request)
        body = await _read_body(request, state.config.max_body_bytes)
        images = _decode_images(body, state.config)
        fp = images_fingerprint(images)
        handle = hmac.new(state.secret, f"{key}\0{fp}".encode(), hashlib.sha256).hexdigest()[:32]
        try:
            inner = await state.run(state.client.upload, images)
        except CraftError as exc:
            raise Problem(422, "invalid", _first_line(exc), "images") from None
        state.handles.put((key, handle), inner)
        state.meter.count_upload(key)
        return JSONResponse({"handle": handle, "n_images": len(images)}, 201)

    @endpoint("POST", "/predict")
    async def predict(request: Any) -> Any:
        key = _auth(state, request)
        body = await _read_body(request, state.config.max_body_bytes)
        idem = request.headers.get(IDEMPOTENCY_HEADER)
        if idem is None:
            return _respond(await _predict(state, key, body))
        if not _IDEM_RE.match(idem):
            raise Problem(422, "invalid", "Idempotency-Key must be 1-128 characters of [A-Za-z0-9._:-]", "Idempotency-Key")
        return await _idempotent(state, (key, idem), body)

    from .zeroshot import PATH, zeroshot_route  # the hosted zero-shot shape (imports this module's helpers)

    endpoint("POST", PATH)(zeroshot_route(state))
    return app


async def _idempotent(state: _State, slot: tuple[str, str], body: bytes) -> Any:
    """Answer a keyed prediction once: replays come from the cache, duplicates in flight wait."""
    digest = sha256_hex(body)
    while True:
        cached = state.responses.get(slot)
        if cached is not None:
            if cached.digest != digest:
                raise Problem(422, "idempotency_key_reused", "this Idempotency-Key was used for a different request", "Idempotency-Key")
            return _respond(cached, replayed=True)
        event = state.inflight.get(slot)
        if event is None:
            break
        await event.wait()
    event = asyncio.Event()
    state.inflight[slot] = event
    try:
        resp = await _predict(state, slot[0], body)
        resp.digest = digest
        state.responses.put(slot, resp, len(resp.body))
        return _respond(resp)
    finally:
        state.inflight.pop(slot, None)
        event.set()


def _respond(resp: CachedResponse, replayed: bool = False) -> Any:
    from fastapi.responses import Response

    headers = dict(resp.headers)
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return Response(resp.body, 200, headers=headers, media_type=SAFETENSORS)


async def _predict(state: _State, key: str, body: bytes) -> CachedResponse:
    """Validate, charge, compute and encode one prediction."""
    cfg = state.config
    entries, meta = _parse(body)
    req = _request_json(meta)
    names = _check_names(req.get("class_names"), cfg)
    template = req.get("template", "a photo of a")
    _check_template(template, cfg)
    dtype = req.get("logits_dtype", "float32")
    if dtype not in ("float32", "float16"):
        raise Problem(422, "invalid", "logits_dtype must be 'float32' or 'float16'", "logits_dtype")
    extra = sorted(set(entries) - {"offsets"})
    if extra:
        raise Problem(422, "invalid", f"unexpected tensor(s) {extra[:3]}; a prediction carries only 'offsets'", "offsets")
    caps = await state.capabilities(template)
    offsets = None if "offsets" not in entries else _check_offsets(body, entries["offsets"], caps, cfg)
    handle = req.get("handle")
    handle = handle if isinstance(handle, str) else ""
    inner = state.handles.get((key, handle))
    if inner is None:
        raise Problem(404, "unknown_handle", "unknown or evicted image-set handle; upload the images again", "handle")
    n = 1 if offsets is None or offsets.ndim == 2 else int(offsets.shape[0])
    if not state.meter.charge(key, n):
        u = state.meter.report(key)
        raise Problem(429, "budget_exceeded", f"the query budget of this API key is spent ({u['used']} of {u['budget']} used, {n} more requested); ask the model owner for more")
    try:
        t0 = time.perf_counter()
        out = await state.run(state.client.predict, inner, names, template, offsets)
        model_ms = 1000 * (time.perf_counter() - t0)
        logits = _check_logits(out, offsets, inner.n_images, len(names))
    except Problem:
        state.meter.refund(key, n)
        raise
    except CraftError as exc:
        state.meter.refund(key, n)
        if _EVICTED in str(exc):
            state.handles.pop((key, handle))
            raise Problem(404, "unknown_handle", "unknown or evicted image-set handle; upload the images again", "handle") from None
        raise Problem(422, "rejected", _first_line(exc)) from None
    except BaseException:
        state.meter.refund(key, n)
        raise
    u = state.meter.report(key)
    payload = encode({"logits": logits.astype(np.float16 if dtype == "float16" else np.float32)}, {"queries": str(n)})
    headers = {
        CHECKSUM_HEADER: sha256_hex(payload),
        "X-Craft-Queries": str(n),
        "X-Craft-Queries-Used": str(u["used"]),
        "X-Craft-Queries-Remaining": "" if u["remaining"] is None else str(u["remaining"]),
        "Server-Timing": f"model;dur={model_ms:.1f}",  # lets a client tell network overhead from model time
    }
    return CachedResponse("", payload, headers)


# ----------------------------------------------------------------- validation


def _auth(state: _State, request: Any) -> str:
    key = state.keys.identify(request.headers.get("authorization"))
    if key is None:
        raise Problem(401, "unauthorized", "missing or invalid API key", headers={"WWW-Authenticate": "Bearer"})
    return key


async def _read_body(request: Any, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise Problem(413, "too_large", f"request body exceeds {limit} bytes", "body")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Problem(413, "too_large", f"request body exceeds {limit} bytes", "body")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(body: bytes) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    try:
        return parse(body)
    except WireError as exc:
        raise Problem(422, "invalid", str(exc), exc.field) from None


def _array(body: bytes, entry: TensorEntry, name: str, field: str) -> np.ndarray:
    try:
        return read(body, entry, name)
    except WireError as exc:
        raise Problem(422, "invalid", str(exc), field) from None


def _decode_images(body: bytes, cfg: ServerConfig) -> list[Image.Image]:
    entries, _ = _parse(body)
    parts: list[TensorEntry]
    if set(entries) == {"images"}:
        e = entries["images"]
        if len(e.shape) != 4:
            raise Problem(422, "invalid", "tensor 'images' must be uint8 [N, H, W, 3]", "images")
        parts = [e]
        n = e.shape[0]
    else:
        idx = sorted(int(m.group(1)) for m in map(_IMAGE_RE.match, entries) if m)
        if not entries or len(idx) != len(entries) or idx != list(range(len(idx))):
            raise Problem(422, "invalid", "an image set is one tensor 'images' [N, H, W, 3] or tensors image.000000... [H, W, 3]", "images")
        parts = [entries[f"image.{i:06d}"] for i in idx]
        n = len(parts)
    if n < 1 or n > cfg.max_images:
        raise Problem(413 if n else 422, "too_large" if n else "invalid", f"an image set holds 1 to {cfg.max_images} images, got {n}", "images")
    for e in parts:
        shape = e.shape[1:] if len(e.shape) == 4 else e.shape
        if e.dtype != "U8" or len(shape) != 3 or shape[2] != 3:
            raise Problem(422, "invalid", "images must be uint8 RGB [H, W, 3]", "images")
        if not (1 <= shape[0] <= cfg.max_image_side and 1 <= shape[1] <= cfg.max_image_side):
            raise Problem(413, "too_large", f"image size {shape[1]}x{shape[0]} exceeds {cfg.max_image_side} pixels per side", "images")
    out: list[Image.Image] = []
    for e in parts:
        arr = _array(body, e, "images", "images")
        for a in arr if arr.ndim == 4 else [arr]:
            out.append(Image.fromarray(np.ascontiguousarray(a), "RGB"))
    return out


def _request_json(meta: dict[str, str]) -> dict[str, Any]:
    try:
        req = json.loads(meta["request"])
    except (KeyError, json.JSONDecodeError):
        raise Problem(422, "invalid", "metadata 'request' must be a JSON object", "request") from None
    if not isinstance(req, dict):
        raise Problem(422, "invalid", "metadata 'request' must be a JSON object", "request")
    return req


def _check_names(names: Any, cfg: ServerConfig) -> list[str]:
    if not isinstance(names, list) or not names:
        raise Problem(422, "invalid", "class_names must be a non-empty list of strings", "class_names")
    if len(names) > cfg.max_classes:
        raise Problem(413, "too_large", f"{len(names)} classes exceed the limit of {cfg.max_classes}", "class_names")
    if any(not isinstance(n, str) or not n.strip() or len(n) > cfg.max_class_name_chars for n in names):
        raise Problem(422, "invalid", f"every class name must be a non-empty string of at most {cfg.max_class_name_chars} characters", "class_names")
    if len(set(names)) != len(names):
        raise Problem(422, "invalid", "class_names has duplicates", "class_names")
    return names


def _check_template(template: Any, cfg: ServerConfig) -> None:
    if not isinstance(template, str) or not template.strip() or len(template) > cfg.max_template_chars:
        raise Problem(422, "invalid", f"template must be a non-empty string of at most {cfg.max_template_chars} characters", "template")


def _check_offsets(body: bytes, e: TensorEntry, caps: Any, cfg: ServerConfig) -> np.ndarray:
    if not caps.soft_prompts:
        raise Problem(422, "invalid", "this model is text-only: it accepts no offsets", "offsets")
    if e.dtype != "F32":
        raise Problem(422, "invalid", f"offsets must be float32, got {e.dtype}", "offsets")
    want = (caps.n_ctx, caps.ctx_dim)
    if len(e.shape) not in (2, 3) or tuple(e.shape[-2:]) != want or (len(e.shape) == 3 and e.shape[0] < 1):
        raise Problem(422, "invalid", f"offsets must have shape [{want[0]}, {want[1]}] or [P, {want[0]}, {want[1]}], got {list(e.shape)}", "offsets")
    if len(e.shape) == 3 and e.shape[0] > cfg.max_population:
        raise Problem(413, "too_large", f"{e.shape[0]} candidate offsets exceed the limit of {cfg.max_population} per request", "offsets")
    arr = _array(body, e, "offsets", "offsets")
    if not np.isfinite(arr).all():
        raise Problem(422, "invalid", "offsets contain NaN or inf", "offsets")
    return np.array(arr)  # a writable copy for the model


def _check_logits(out: Any, offsets: np.ndarray | None, n: int, c: int) -> np.ndarray:
    arr = np.asarray(out, dtype=np.float32)
    want = (n, c) if offsets is None or offsets.ndim == 2 else (offsets.shape[0], n, c)
    if arr.shape != want or not np.isfinite(arr).all():
        logger.error("the model returned shape %s (expected %s) or non-finite scores", arr.shape, want)
        raise Problem(500, "internal", "the model returned an invalid result")
    return arr


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [exc.__class__.__name__])[0][:300]
