"""The prediction API, version 1 (``docs/wire-format.md``): health, limits, usage, capabilities,
image-set uploads and metered, idempotent predictions. Imported when an app is created (needs fastapi).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from .._version import __version__
from ..client.base import DEFAULT_TEMPLATE
from ..errors import CraftError, UnknownHandleError
from ..images import images_fingerprint
from ..wire import API, IDEMPOTENCY_HEADER, SAFETENSORS, encode, query_cost, sha256_hex
from . import checks
from .app import ServerState
from .auth import authenticator
from .checks import Problem
from .config import ServerConfig
from .state import CachedResponse, metered_response

logger = logging.getLogger(__name__)

_IDEM_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")
_GONE = "unknown or evicted image-set handle; upload the images again"
J = TypeVar("J")


@dataclass
class _Job:
    """One validated prediction request, not yet billed."""

    names: list[str]
    template: str
    dtype: str
    offsets: np.ndarray | None
    prepared: Any
    n_images: int
    handle: str

    @property
    def queries(self) -> int:
        return query_cost(self.offsets)


def register(router: APIRouter, state: ServerState) -> None:
    """Add the prediction API of ``docs/wire-format.md`` to ``router`` (mounted at ``/v1``)."""
    authenticate = authenticator(state)

    safetensors_body = {"requestBody": {"required": True, "content": {SAFETENSORS: {"schema": {"type": "string", "format": "binary"}}}}}

    @router.get("/health", summary="Liveness and the state store's health (no key); 503 while the store is unavailable")
    async def health() -> Any:
        problem = await state.meter.health()  # bounded by store_timeout_s: never hangs on a locked or stopped store
        if problem is not None:
            return JSONResponse({"status": "unavailable", "api": API, "version": __version__, "store": problem}, 503,
                                headers={"Retry-After": "5"})
        return {"status": "ok", "api": API, "version": __version__, "store": "ok"}

    @router.get("/limits", summary="Size limits a client must respect")
    async def limits(key: str = Depends(authenticate)) -> dict[str, int]:
        return state.config.limits()

    @router.get("/usage", summary="Queries used and left for the calling key")
    async def usage(key: str = Depends(authenticate)) -> dict[str, Any]:
        return await state.meter.usage(key)

    @router.get("/capabilities", summary="What the model does for a context template")
    async def capabilities(template: str = DEFAULT_TEMPLATE, key: str = Depends(authenticate)) -> dict[str, Any]:
        checks.check_template(template, state.config)
        caps = await state.capabilities(key, template)
        shown = {k: getattr(caps, k) for k in ("model_id", "n_ctx", "ctx_dim", "output", "ctx_rms", "logit_scale")}
        bounds = ("max_abs_offset", "max_population", "max_prompts")  # what one request may ask of the model
        return {**shown, **{k: getattr(state.config, k) for k in bounds}}

    @router.post("/image-sets", status_code=201, summary="Upload an image set (safetensors uint8 pixels); not billed",
                 openapi_extra=safetensors_body)
    async def upload(request: Request, key: str = Depends(authenticate)) -> Any:
        body = await _read_body(request, state.config)
        images = checks.decode_images(body, state.config)
        handle = hmac.new(state.secret, f"{key}\0{images_fingerprint(images)}".encode(), hashlib.sha256).hexdigest()[:32]
        if state.sets.get(key, handle) is None:  # a key's own sets only: nothing is shared or deduplicated across keys
            try:
                prepared = await state.run(key, state.model.prepare, images)
            except CraftError as exc:
                raise Problem(422, "invalid", checks.first_line(exc), "images") from None
            state.sets.put(key, handle, prepared, len(images))
        await state.meter.count_upload(key)
        return JSONResponse({"handle": handle, "n_images": len(images)}, 201)

    @router.post("/predict", summary="Logits of a population of prompts (safetensors in and out); billed P queries",
                 response_class=Response, openapi_extra=safetensors_body)
    async def predict(request: Request, key: str = Depends(authenticate)) -> Any:
        body = await _read_body(request, state.config)
        idem = request.headers.get(IDEMPOTENCY_HEADER)
        check_idempotency_key(idem)
        return await _answer(state, key, idem, body)


# ------------------------------------------------------------------ prediction


async def _answer(state: ServerState, key: str, idem: str | None, body: bytes) -> Any:
    """Answer a prediction once per idempotency key: replays are never billed, duplicates in flight wait."""

    def refusal(used: Any, budget: Any, job: _Job) -> str:
        return (f"the query budget of this API key is spent ({used} of {budget} used, {job.queries} more requested); "
                "ask the model owner for more")

    return await answer_once(
        state, key, idem, body, job=lambda: _job(state, key, body), queries=lambda job: job.queries,
        compute=lambda job, digest: _compute(state, key, job, digest), respond=_respond, refusal=refusal,
    )


async def answer_once(
    state: ServerState,
    key: str,
    idem: str | None,
    body: bytes,
    *,
    job: Callable[[], Awaitable[J]],
    queries: Callable[[J], int],
    compute: Callable[[J, str], Awaitable[CachedResponse]],
    respond: Callable[[CachedResponse, bool], Any],
    refusal: Callable[[Any, Any, J], str],
) -> Any:
    """The idempotent, metered answer of every billed route: validate (``job``), charge ``queries`` in the
    store, ``compute``, remember the answer under ``(key, idem)``; a replay is answered from memory (or the
    store) and never billed twice, a duplicate in flight waits for the first, a failure refunds the charge.
    ``refusal(used, budget, job)`` is the 429 message when the key's budget is spent.
    """
    digest = sha256_hex(body)
    slot = (key, idem or "")
    while idem is not None:
        cached = state.answers.get(slot)
        if cached is not None:
            if cached.digest != digest:
                raise Problem(422, "idempotency_key_reused", "this Idempotency-Key was used for a different request", IDEMPOTENCY_HEADER)
            return respond(cached, True)
        event = state.inflight.get(slot)
        if event is None:
            break
        await event.wait()
    event = asyncio.Event()
    if idem is not None:
        state.inflight[slot] = event
    try:
        todo = await job()
        cost = queries(todo)
        begin = await state.meter.begin(key, idem, digest, cost, state.owner)
        if begin.status == "replay" and begin.answer is not None:  # kept in the store for its TTL: not computed again
            stored = CachedResponse.from_bytes(begin.answer)
            state.answers.put(slot, stored, len(stored.body))
            return respond(stored, True)
        if begin.status == "mismatch":
            raise Problem(422, "idempotency_key_reused", "this Idempotency-Key was used for a different request", IDEMPOTENCY_HEADER)
        if begin.status == "pending":
            raise Problem(503, "in_progress", "this request is being computed by another server process; retry", headers={"Retry-After": "1"})
        if begin.status == "refused":
            u = await state.meter.usage(key)
            raise Problem(429, "budget_exceeded", refusal(u["used"], u["budget"], todo), headers={"x-should-retry": "false"})
        billed = begin.status in ("charged", "takeover")  # takeover: charged by a process that died computing it
        try:
            resp = await compute(todo, digest)
        except BaseException:
            if billed:
                await state.meter.refund(key, idem, cost)
            raise
        if idem is not None:
            if begin.status == "replay" and begin.digest != resp.digest:
                logger.warning("a recomputed replay differs from the answer first sent (digest %s, now %s)", begin.digest, resp.digest)
            if billed:
                await state.meter.record(key, idem, resp)
            state.answers.put(slot, resp, len(resp.body))
        return respond(resp, begin.status == "replay")
    finally:
        if idem is not None:
            state.inflight.pop(slot, None)
        event.set()


def check_idempotency_key(idem: str | None) -> None:
    """Refuse an ``Idempotency-Key`` header that is not 1-128 characters of [A-Za-z0-9._:-] (422)."""
    if idem is not None and not (1 <= len(idem) <= 128 and set(idem) <= _IDEM_CHARS):
        raise Problem(422, "invalid", "Idempotency-Key must be 1-128 characters of [A-Za-z0-9._:-]", IDEMPOTENCY_HEADER)


async def _job(state: ServerState, key: str, body: bytes) -> _Job:
    """Validate a prediction request against the limits and this key's image sets (nothing billed)."""
    cfg = state.config
    entries, meta = checks.parse_body(body)
    req = checks.request_json(meta)
    names = checks.check_names(req.get("class_names"), cfg)
    template = req.get("template", DEFAULT_TEMPLATE)
    checks.check_template(template, cfg)
    dtype = req.get("logits_dtype", "float32")
    if dtype not in ("float32", "float16"):
        raise Problem(422, "invalid", "logits_dtype must be 'float32' or 'float16'", "logits_dtype")
    extra = sorted(set(entries) - {"offsets"})
    if extra:
        raise Problem(422, "invalid", f"unexpected tensor(s) {[e[:40] for e in extra[:3]]}; a prediction carries only 'offsets'", "offsets")
    caps = await state.capabilities(key, template)
    offsets = None if "offsets" not in entries else checks.check_offsets(body, entries["offsets"], caps, cfg)
    handle = req.get("handle")
    handle = handle if isinstance(handle, str) else ""
    found = state.sets.get(key, handle)
    if found is None:
        raise Problem(404, "unknown_handle", _GONE, "handle")
    job = _Job(names, template, dtype, offsets, found[0], found[1], handle)
    p, c = job.queries, len(names)
    answer = p * job.n_images * c * (2 if dtype == "float16" else 4)
    if answer > cfg.max_answer_bytes:
        raise Problem(413, "too_large", f"the answer would be {answer} bytes, over the limit of {cfg.max_answer_bytes}; "
                      "split the population or use fewer images or classes", "offsets")
    if p * c > cfg.max_prompts:
        raise Problem(413, "too_large", f"{p} candidates x {c} classes = {p * c} prompts exceed the limit of {cfg.max_prompts} per request; "
                      "split the population", "offsets")
    return job


async def _compute(state: ServerState, key: str, job: _Job, digest: str) -> CachedResponse:
    """Run the model on ``job`` (the caller has billed it) and encode the answer."""

    def work() -> tuple[bytes, float]:
        t0 = time.perf_counter()
        out = state.model.predict(job.prepared, job.n_images, job.names, job.template, job.offsets)
        model_ms = 1000 * (time.perf_counter() - t0)
        logits = checks.check_logits(out, (job.queries, job.n_images, len(job.names)))
        if job.offsets is None or job.offsets.ndim == 2:
            logits = logits[0]
        payload = encode({"logits": logits.astype(np.float16 if job.dtype == "float16" else np.float32)}, {"queries": str(job.queries)})
        return payload, model_ms

    try:
        payload, model_ms = await state.run(key, work)
    except UnknownHandleError:  # the black box itself forgot the set (a client without feature access)
        state.sets.pop(key, job.handle)
        raise Problem(404, "unknown_handle", _GONE, "handle") from None
    except CraftError as exc:
        raise Problem(422, "rejected", checks.first_line(exc)) from None
    return metered_response(digest, payload, job.queries, await state.meter.usage(key), model_ms)


def _respond(resp: CachedResponse, replayed: bool = False) -> Any:
    headers = dict(resp.headers)
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return Response(resp.body, 200, headers=headers, media_type=SAFETENSORS)


async def _read_body(request: Any, cfg: ServerConfig, limit: int | None = None) -> bytes:
    """The request body, at most ``limit`` bytes (default ``max_body_bytes``; 413 beyond, refused from its
    Content-Length or as soon as more arrives), received within ``body_timeout_s`` (408 beyond)."""
    import anyio

    limit = cfg.max_body_bytes if limit is None else limit
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or len(declared) > 20 or int(declared) > limit):
        raise Problem(413, "too_large", f"request body exceeds {limit} bytes", "body")
    chunks, size = [], 0
    try:
        with anyio.fail_after(cfg.body_timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise Problem(413, "too_large", f"request body exceeds {limit} bytes", "body")
                chunks.append(chunk)
    except TimeoutError:
        raise Problem(408, "timeout", f"the request body did not arrive within {cfg.body_timeout_s} s", "body",
                      headers={"Connection": "close"}) from None
    return b"".join(chunks)
