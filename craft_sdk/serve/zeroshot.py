"""The hosted zero-shot classification shape, served over any model: ``POST /v1/zero-shot/<name>``.

One request scores one image (base64 in ``inputs``) against candidate labels
under a hypothesis template ``"<context> {}<suffix>."`` and answers
``[{"label", "score"}, ...]``: probabilities, highest first (the shape of
:class:`~craft_sdk.client.zeroshot.ZeroShotAPIClient`; ``docs/wire-format.md``).
The ``<name>`` part of the path is free (e.g. the model's name) and ignored.

Same keys, meter, limits and idempotency cache as ``/v1/predict``. **Billing**:
one request = one query (one prompt scored on a one-image set, the ledger's unit),
charged after validation and before computing, refunded if the computation
fails; a request over the key's budget is ``429 budget_exceeded``. A client-side
query over N images is therefore N requests and N server queries. A request
carrying an ``Idempotency-Key`` that was answered before is replayed without
computing or billing again.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import time
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from PIL import Image

from ..client.http import CHECKSUM_HEADER, IDEMPOTENCY_HEADER, sha256_hex
from ..client.zeroshot import split_hypothesis
from ..errors import ClientError, CraftError
from ..scores import softmax
from .app import _IDEM_RE, Problem, _auth, _check_names, _check_template, _first_line, _read_body, _State
from .state import CachedResponse

PATH = "/zero-shot/{name:path}"
DEFAULT_HYPOTHESIS = "a photo of a {}."
_SLOT = "zero-shot\0"  # idempotency slots apart from /v1/predict's (a NUL is never in a client's key)


def zeroshot_route(state: _State) -> Callable[[Any], Awaitable[Any]]:
    """The ``POST /v1/zero-shot/<name>`` handler for an app's state (registered by ``create_app``)."""

    async def zero_shot(request: Any) -> Any:
        key = _auth(state, request)
        body = await _read_body(request, state.config.max_body_bytes)
        idem = request.headers.get(IDEMPOTENCY_HEADER)
        if idem is None:
            return _respond(await _classify(state, key, body))
        if not _IDEM_RE.match(idem):
            raise Problem(422, "invalid", "Idempotency-Key must be 1-128 characters of [A-Za-z0-9._:-]", "Idempotency-Key")
        return await _idempotent(state, (key, _SLOT + idem), body)

    return zero_shot


async def _idempotent(state: _State, slot: tuple[str, str], body: bytes) -> Any:
    """Answer a keyed request once: replays come from the cache, duplicates in flight wait."""
    import asyncio

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
        resp = await _classify(state, slot[0], body)
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
    return Response(resp.body, 200, headers=headers, media_type="application/json")


async def _classify(state: _State, key: str, body: bytes) -> CachedResponse:
    """Validate, charge one query, compute and encode one image's scores."""
    cfg = state.config
    image, labels, hypothesis = _parse_request(body, state)
    try:
        context, suffix = split_hypothesis(hypothesis)
    except ClientError as exc:
        raise Problem(422, "invalid", _first_line(exc), "hypothesis_template") from None
    caps = await state.capabilities(context)
    names = [label + suffix for label in labels]
    _check_names(names, cfg)
    if not state.meter.charge(key, 1):
        u = state.meter.report(key)
        raise Problem(429, "budget_exceeded", f"the query budget of this API key is spent ({u['used']} of {u['budget']} used); ask the model owner for more")
    try:
        t0 = time.perf_counter()
        out = await state.run(state.client.predict, [image], names, context, None)
        model_ms = 1000 * (time.perf_counter() - t0)
        scores = np.asarray(out, dtype=np.float32).reshape(-1)
        if scores.shape != (len(names),) or not np.isfinite(scores).all():
            raise Problem(500, "internal", "the model returned an invalid result")
    except CraftError as exc:
        state.meter.refund(key, 1)
        raise Problem(422, "rejected", _first_line(exc)) from None
    except BaseException:
        state.meter.refund(key, 1)
        raise
    probs = softmax(scores) if caps.output == "logits" else scores / scores.sum()
    order = np.argsort(-probs, kind="stable")
    payload = json.dumps([{"label": labels[c], "score": float(probs[c])} for c in order]).encode()
    u = state.meter.report(key)
    headers = {
        CHECKSUM_HEADER: sha256_hex(payload),
        "X-Craft-Queries": "1",
        "X-Craft-Queries-Used": str(u["used"]),
        "X-Craft-Queries-Remaining": "" if u["remaining"] is None else str(u["remaining"]),
        "Server-Timing": f"model;dur={model_ms:.1f}",
    }
    return CachedResponse("", payload, headers)


def _parse_request(body: bytes, state: _State) -> tuple[Image.Image, list[str], str]:
    try:
        req = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):  # hostile JSON: bad text, huge numbers, deep nesting
        raise Problem(422, "invalid", "the body must be a JSON object {inputs, parameters}", "body") from None
    params = req.get("parameters", {}) if isinstance(req, dict) else None
    if not isinstance(params, dict):
        raise Problem(422, "invalid", "the body must be a JSON object {inputs, parameters: {candidate_labels, ...}}", "body")
    labels = _check_names(params.get("candidate_labels"), state.config)
    hypothesis = params.get("hypothesis_template", DEFAULT_HYPOTHESIS)
    _check_template(hypothesis, state.config)
    return _decode_image(req.get("inputs"), state.config.max_image_side), labels, hypothesis


def _decode_image(inputs: Any, max_side: int) -> Image.Image:
    if not isinstance(inputs, str):
        raise Problem(422, "invalid", "inputs must be a base64-encoded image", "inputs")
    if inputs.startswith("data:"):
        inputs = inputs.partition(",")[2]
    try:
        raw = base64.b64decode(inputs, validate=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(raw))
            if max(im.size) > max_side:
                raise Problem(413, "too_large", f"image size {im.size[0]}x{im.size[1]} exceeds {max_side} pixels per side", "inputs")
            im.load()
            return im.convert("RGB")
    except Problem:
        raise
    except (binascii.Error, ValueError, OSError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise Problem(422, "invalid", "inputs is not a base64-encoded image PIL can read", "inputs") from None
