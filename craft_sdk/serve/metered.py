"""What every metered route shares: reading a body within its limits, the idempotency-key rule, and
:func:`answer_once`, the one protocol by which a request is validated, charged in the state store,
computed, remembered and replayed (never billed twice, refunded when not delivered).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ..wire import IDEMPOTENCY_HEADER, sha256_hex
from .checks import Problem
from .config import ServerConfig
from .deps import ServerState
from .state import CachedResponse

logger = logging.getLogger(__name__)

_IDEM_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")
J = TypeVar("J")


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
        except BaseException as exc:
            if billed:  # a request stopped part-way keeps the queries it computed billed (Problem.billed)
                await state.meter.refund(key, idem, cost - min(cost, getattr(exc, "billed", 0)), state.owner)
            raise
        if idem is not None:
            if begin.status == "replay" and begin.digest != resp.digest:
                logger.warning("a recomputed replay differs from the answer first sent (digest %s, now %s)", begin.digest, resp.digest)
            if billed:
                await state.meter.record(key, idem, resp, cost)
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


async def read_body(request: Any, cfg: ServerConfig, limit: int | None = None) -> bytes:
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


def json_response(resp: CachedResponse, replayed: bool = False) -> Any:
    """A remembered JSON answer as a response (``Idempotent-Replayed: true`` on a replay)."""
    from fastapi import Response

    headers = dict(resp.headers)
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return Response(resp.body, 200, headers=headers, media_type="application/json")
