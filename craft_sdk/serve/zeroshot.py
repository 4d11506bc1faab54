"""The hosted zero-shot classification shape, served over any model: ``POST /v1/zero-shot/<name>``.

One request scores one image (base64 in ``inputs``) against candidate labels
under a hypothesis template ``"<context> {}<suffix>."`` and answers
``[{"label", "score"}, ...]``: probabilities, highest first (the shape of
:class:`~craft_sdk.client.zeroshot.ZeroShotAPIClient`; ``docs/wire-format.md``).
The ``<name>`` part of the path is free (e.g. the model's name) and ignored.

Same keys, store (meters and idempotency records), limits and model scheduling as
``/v1/predict`` (:mod:`craft_sdk.serve.api_v1`). **Billing**: one request = one
query (one prompt scored on a one-image set, the ledger's unit), charged after
validation and before computing, refunded if the computation fails; a request
over the key's budget is ``429 budget_exceeded``. A client-side query over N
images is therefore N requests and N server queries. A request carrying an
``Idempotency-Key`` that was answered before is replayed without computing or
billing again. Imported when an app is created (needs fastapi).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from PIL import Image

from ..client.base import DEFAULT_TEMPLATE
from ..client.zeroshot import split_hypothesis
from ..errors import ClientError, CraftError
from ..scores import softmax
from ..wire import IDEMPOTENCY_HEADER, WireError, loads_json, query_cost
from . import checks
from .auth import authenticator
from .checks import Problem
from .deps import ServerState
from .metered import answer_once, check_idempotency_key, json_response, read_body
from .state import CachedResponse, metered_response

PATH = "/zero-shot/{name:path}"
DEFAULT_HYPOTHESIS = f"{DEFAULT_TEMPLATE} {{}}."
_SLOT = "zero-shot\0"  # idempotency slots apart from /v1/predict's (a NUL is never in a client's key)


@dataclass
class _Job:
    """One validated zero-shot request, not yet billed."""

    image: Image.Image
    labels: list[str]
    names: list[str]  # label + the hypothesis template's suffix: what the model scores
    context: str
    output: str

    @property
    def queries(self) -> int:
        """The billing rule of every route (:func:`~craft_sdk.wire.query_cost`): one prompt, no offsets = 1 query."""
        return query_cost(None)


def register(router: APIRouter, state: ServerState) -> None:
    """Add ``POST /zero-shot/<name>`` to ``router`` (mounted at ``/v1``)."""

    authenticate = authenticator(state)

    @router.post(PATH, summary="Zero-shot classification of one base64 image (JSON in and out); billed 1 query",
                 response_class=Response)
    async def zero_shot(name: str, request: Request, key: str = Depends(authenticate)) -> Any:
        body = await read_body(request, state.config, state.config.zero_shot_body_bytes)  # sized to a valid request
        idem = request.headers.get(IDEMPOTENCY_HEADER)
        check_idempotency_key(idem)
        return await _answer(state, key, None if idem is None else _SLOT + idem, body)


async def _answer(state: ServerState, key: str, idem: str | None, body: bytes) -> Any:
    """Answer once per idempotency key (api_v1's store protocol): replays are never billed, duplicates wait."""

    def refusal(used: Any, budget: Any, job: _Job) -> str:
        return f"the query budget of this API key is spent ({used} of {budget} used); ask the model owner for more"

    return await answer_once(
        state, key, idem, body, job=lambda: _job(state, key, body), queries=lambda job: job.queries,
        compute=lambda job, digest: _compute(state, key, job, digest), respond=json_response, refusal=refusal,
    )


async def _job(state: ServerState, key: str, body: bytes) -> _Job:
    """Validate a request against the limits (nothing billed)."""
    cfg = state.config
    try:
        req = loads_json(body, "the body", "body")
    except WireError as exc:
        raise Problem(422, "invalid", str(exc), "body") from None
    params = req.get("parameters", {}) if isinstance(req, dict) else None
    if not isinstance(params, dict):
        raise Problem(422, "invalid", "the body must be a JSON object {inputs, parameters: {candidate_labels, ...}}", "body")
    labels = checks.check_names(params.get("candidate_labels"), cfg)
    hypothesis = params.get("hypothesis_template", DEFAULT_HYPOTHESIS)
    checks.check_template(hypothesis, cfg)
    try:
        context, suffix = split_hypothesis(hypothesis)
    except ClientError as exc:
        raise Problem(422, "invalid", checks.first_line(exc), "hypothesis_template") from None
    names = checks.check_names([label + suffix for label in labels], cfg)
    image = checks.decode_image_b64(req.get("inputs"), cfg.max_image_side)
    caps = await state.capabilities(key, context)
    return _Job(image, labels, names, context, caps.output)


async def _compute(state: ServerState, key: str, job: _Job, digest: str) -> CachedResponse:
    """Run the model on one image (the caller has billed it) and encode the answer."""

    def work() -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        prepared = state.model.prepare([job.image])
        out = state.model.predict(prepared, 1, job.names, job.context, None)
        return checks.check_logits(out, (1, 1, len(job.names)))[0, 0], 1000 * (time.perf_counter() - t0)

    try:
        scores, model_ms = await state.run(key, work)
    except CraftError as exc:
        raise Problem(422, "rejected", checks.first_line(exc)) from None
    probs = softmax(scores) if job.output == "logits" else scores / scores.sum()
    order = np.argsort(-probs, kind="stable")
    payload = json.dumps([{"label": job.labels[c], "score": float(probs[c])} for c in order]).encode()
    return metered_response(digest, payload, job.queries, await state.meter.usage_of_delivered(key), model_ms)
