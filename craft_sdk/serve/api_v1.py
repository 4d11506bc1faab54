"""The prediction API, version 1 (``docs/wire-format.md``): health, limits, usage, capabilities,
image-set uploads and metered, idempotent predictions. Imported when an app is created (needs fastapi).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from .._version import __version__
from ..client.base import DEFAULT_TEMPLATE
from ..errors import CraftError, UnknownHandleError
from ..images import images_fingerprint
from ..wire import API, IDEMPOTENCY_HEADER, SAFETENSORS, encode, query_cost
from . import checks
from .auth import authenticator
from .checks import Problem
from .deps import ServerState
from .metered import answer_once, check_idempotency_key, read_body
from .state import CachedResponse, metered_response

logger = logging.getLogger(__name__)

_GONE = "unknown or evicted image-set handle; upload the images again"


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
        bounds = ("max_abs_offset", "max_population", "max_prompts", "max_request_s")  # what one request may ask of the model
        return {**shown, **{k: getattr(state.config, k) for k in bounds}}

    @router.post("/image-sets", status_code=201, summary="Upload an image set (safetensors uint8 pixels); not billed",
                 openapi_extra=safetensors_body)
    async def upload(request: Request, key: str = Depends(authenticate)) -> Any:
        body = await read_body(request, state.config)
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
        body = await read_body(request, state.config)
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
    """Run the model on ``job`` (the caller has billed it) in chunks of whole candidates, then encode the answer."""
    t0 = time.perf_counter()
    try:
        chunks = _chunks(job.offsets, len(job.names), state.config.chunk_prompts)
        parts = await state.run_chunks(key, lambda offsets: state.model.predict(job.prepared, job.n_images, job.names, job.template, offsets),
                                       chunks)
    except Problem as stop:  # stopped part-way: the whole candidates computed are billed, the rest refunded
        stop.billed = sum(1 if c is None or c.ndim == 2 else c.shape[0] for c in chunks[: stop.done])
        stop.headers["X-Craft-Queries"] = str(stop.billed)
        raise
    except UnknownHandleError:  # the black box itself forgot the set (a client without feature access)
        state.sets.pop(key, job.handle)
        raise Problem(404, "unknown_handle", _GONE, "handle") from None
    except CraftError as exc:
        raise Problem(422, "rejected", checks.first_line(exc)) from None
    model_ms = 1000 * (time.perf_counter() - t0)

    def encoded() -> bytes:
        out = parts[0] if len(parts) == 1 else np.concatenate([np.asarray(p) for p in parts])
        logits = checks.check_logits(out, (job.queries, job.n_images, len(job.names)))
        if job.offsets is None or job.offsets.ndim == 2:
            logits = logits[0]
        return encode({"logits": logits.astype(np.float16 if job.dtype == "float16" else np.float32)}, {"queries": str(job.queries)})

    import anyio

    payload = await anyio.to_thread.run_sync(encoded)
    return metered_response(digest, payload, job.queries, await state.meter.usage_of_delivered(key), model_ms)


def _chunks(offsets: np.ndarray | None, n_classes: int, chunk_prompts: int) -> list[np.ndarray | None]:
    """A population [P, n_ctx, d] in chunks of whole candidates, about ``chunk_prompts`` prompts each (no offsets, or
    one context's: one chunk)."""
    if offsets is None or offsets.ndim == 2:
        return [offsets]
    step = max(1, chunk_prompts // max(n_classes, 1))
    return [offsets[i : i + step] for i in range(0, offsets.shape[0], step)]


def _respond(resp: CachedResponse, replayed: bool = False) -> Any:
    headers = dict(resp.headers)
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return Response(resp.body, 200, headers=headers, media_type=SAFETENSORS)
