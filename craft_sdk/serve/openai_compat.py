"""The hosted-VLM shapes, served over any model: ``POST /v1/chat/completions``, ``/v1/embeddings``, ``/v1/embed``.

* ``/chat/completions`` (OpenAI-compatible): one user message with text parts and exactly one
  ``image_url`` part (a ``data:`` URI: this server fetches nothing). The text is read as the
  multiple-choice question of :func:`~craft_sdk.client.chat.build_question` (the context from its
  first line, default ``"a photo of a"``; the options from the lines ``A. <name>`` ...). The served
  model scores the options under the context; the answer is an option letter: the most probable at
  ``temperature`` 0, else sampled from the probabilities sharpened by 1/temperature (seeded by
  ``seed``, or by the body's digest so a replay answers the same). ``n`` choices; with
  ``logprobs: true`` each carries the answer token's logprob and ``top_logprobs`` (at most 20, the
  model's class probabilities, untempered). ``max_tokens`` is accepted and ignored (an answer is one
  token).
* ``/embeddings`` (OpenAI-compatible, with vLLM's multimodal ``messages`` form): ``input`` (a text or
  list of texts) or ``messages`` (one ``image_url`` part: the image's embedding; text parts only: the
  text's). Unit-norm float vectors in ``data[i].embedding``.
* ``/embed`` (Cohere v2 embed): ``images`` (one data URI) or ``texts`` (up to 96), ``embedding_types``
  ``["float"]``; answers ``embeddings.float`` and ``meta.billed_units``.

Embeddings need a model whose image and text features the server can reach (an open_clip model,
also behind ``--text-only``); other models answer 422 on the embedding routes. **Usage tokens**:
the rule of :mod:`craft_sdk.client.hosted` (``ceil(chars / 4)`` per text, 85 per image, 1 per answer
choice). **Billing**: one query per request, whatever ``n`` or the number of texts, charged and
replayed like ``/v1/zero-shot`` (same keys, meters, idempotency and scheduling); a spent budget is
``429 budget_exceeded`` with ``x-should-retry: false`` (the openai client then stops retrying).
"""

from __future__ import annotations

import json
import time
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from PIL import Image

from ..client.chat import LETTERS, parse_question
from ..client.hosted import IMAGE_TOKENS, text_tokens
from ..errors import ClientError, CraftError
from ..images import image_digest
from ..scores import softmax
from ..wire import IDEMPOTENCY_HEADER, WireError, loads_json, query_cost
from . import checks
from .auth import authenticator
from .checks import Problem
from .deps import ServerState
from .metered import answer_once, check_idempotency_key, json_response, read_body
from .state import CachedResponse, metered_response

MAX_TEXTS = 96  # per embedding request (Cohere's limit)
_COUNTS: weakref.WeakKeyDictionary[ServerState, Counter[str]] = weakref.WeakKeyDictionary()


def image_embedding_counts(state: ServerState) -> Counter[str]:
    """How many times this server embedded each image (by content digest): the server's own count."""
    return _COUNTS.setdefault(state, Counter())


@dataclass
class _Job:
    """One validated request, not yet billed."""

    kind: str  # "chat" | "embeddings" | "embed"
    model: str
    image: Image.Image | None = None
    texts: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    context: str = ""
    output: str = "logits"
    n: int = 1
    logprobs: bool = False
    top: int = 0
    temperature: float = 1.0
    seed: int | None = None
    prompt_tokens: int = 0

    @property
    def queries(self) -> int:
        """The billing rule of every route (:func:`~craft_sdk.wire.query_cost`): a request scores (or embeds) under
        no offsets, so it is 1 query, whatever ``n`` or the number of texts (README, "Billing")."""
        return query_cost(None)


def register(router: APIRouter, state: ServerState) -> None:
    """Add ``POST /chat/completions``, ``/embeddings`` and ``/embed`` to ``router`` (mounted at ``/v1``)."""

    authenticate = authenticator(state)

    for path, kind in (("/chat/completions", "chat"), ("/embeddings", "embeddings"), ("/embed", "embed")):
        router.add_api_route(path, _route(state, kind, authenticate), methods=["POST"], summary=f"{kind} (JSON); billed 1 query")


def _route(state: ServerState, kind: str, authenticate: Any) -> Any:
    async def handle(request: Request, key: str = Depends(authenticate)) -> Any:
        body = await read_body(request, state.config)
        idem = request.headers.get(IDEMPOTENCY_HEADER)
        check_idempotency_key(idem)

        def refusal(used: Any, budget: Any, job: _Job) -> str:
            return f"the query budget of this API key is spent ({used} of {budget} used); ask the model owner for more"

        return await answer_once(
            state, key, None if idem is None else f"{kind}\0{idem}", body, job=lambda: _job(state, key, kind, body),
            queries=lambda job: job.queries, compute=lambda job, digest: _compute(state, key, job, digest), respond=json_response,
            refusal=refusal,
        )

    return handle


# ------------------------------------------------------------------ validation


async def _job(state: ServerState, key: str, kind: str, body: bytes) -> _Job:
    try:
        req = loads_json(body, "the body", "body")
    except WireError as exc:
        raise Problem(422, "invalid", str(exc), "body") from None
    if not isinstance(req, dict):
        raise Problem(422, "invalid", "the body must be a JSON object", "body")
    model = str(req.get("model") or "")
    if kind == "chat":
        return await _chat_job(state, key, req, model)
    if kind == "embed":
        return _cohere_job(state, req, model)
    if "messages" in req:
        texts, images = _parts(req.get("messages"))
        if len(images) > 1 or not (texts or images):
            raise Problem(422, "invalid", "messages must hold one image_url part, or text parts only", "messages")
        if images:
            return _Job("embeddings", model, image=_image(images[0], state), prompt_tokens=IMAGE_TOKENS)
        texts = [" ".join(texts)]
    else:
        raw = req.get("input")
        texts = [raw] if isinstance(raw, str) else raw
    return _Job("embeddings", model, texts=_texts(texts, "input"), prompt_tokens=sum(map(text_tokens, texts)))


async def _chat_job(state: ServerState, key: str, req: dict[str, Any], model: str) -> _Job:
    cfg = state.config
    texts, images = _parts(req.get("messages"))
    if len(images) != 1:
        raise Problem(422, "invalid", f"a chat classification carries exactly one image_url part, got {len(images)}", "messages")
    try:
        context, options = parse_question("\n".join(texts))
    except ClientError as exc:
        raise Problem(422, "invalid", checks.first_line(exc), "messages") from None
    checks.check_template(context, cfg)
    names = checks.check_names(options, cfg)
    n, top = _int(req.get("n", 1), "n", 1, 128), _int(req.get("top_logprobs") or 0, "top_logprobs", 0, 20)
    temperature = req.get("temperature", 1.0)
    if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise Problem(422, "invalid", "temperature must be a number in [0, 2]", "temperature")
    seed = req.get("seed")
    seed = _int(seed, "seed", 0, 2**63 - 1) if seed is not None else None
    caps = await state.capabilities(key, context)
    return _Job("chat", model, image=_image(images[0], state), names=names, context=context, output=caps.output, n=n,
                logprobs=bool(req.get("logprobs")), top=top, temperature=float(temperature), seed=seed,
                prompt_tokens=sum(map(text_tokens, texts)) + IMAGE_TOKENS)


def _cohere_job(state: ServerState, req: dict[str, Any], model: str) -> _Job:
    types = req.get("embedding_types", ["float"])
    if not isinstance(types, list) or "float" not in types:
        raise Problem(422, "invalid", "this server answers embedding_types ['float'] only", "embedding_types")
    images, texts = req.get("images"), req.get("texts")
    if (images is None) == (texts is None):
        raise Problem(422, "invalid", "give either images (one data URI) or texts", "images")
    if images is not None:
        if not isinstance(images, list) or len(images) != 1 or not isinstance(images[0], str):
            raise Problem(422, "invalid", "images must be a list of one data URI", "images")
        return _Job("embed", model, image=_image(images[0], state), prompt_tokens=IMAGE_TOKENS)
    texts = _texts(texts, "texts")
    return _Job("embed", model, texts=texts, prompt_tokens=sum(map(text_tokens, texts)))


def _parts(messages: Any) -> tuple[list[str], list[str]]:
    """(text parts, image URLs) of a chat ``messages`` list."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise Problem(422, "invalid", "messages must be a non-empty list of {role, content}", "messages")
    texts: list[str] = []
    images: list[str] = []
    for m in messages:
        content = m.get("content")
        for part in [{"type": "text", "text": content}] if isinstance(content, str) else content or []:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url" and isinstance(part.get("image_url"), dict) and isinstance(part["image_url"].get("url"), str):
                images.append(part["image_url"]["url"])
            else:
                raise Problem(422, "invalid", "message parts must be {type: text, text} or {type: image_url, image_url: {url}}", "messages")
    return texts, images


def _image(uri: str, state: ServerState) -> Image.Image:
    if not uri.startswith("data:"):
        raise Problem(422, "invalid", "images must be data: URIs (data:image/png;base64,...); this server fetches nothing", "image_url")
    return checks.decode_image_b64(uri, state.config.max_image_side)


def _texts(texts: Any, name: str) -> list[str]:
    if not isinstance(texts, list) or not 1 <= len(texts) <= MAX_TEXTS or not all(isinstance(t, str) and t.strip() for t in texts):
        raise Problem(422, "invalid", f"{name} must be 1 to {MAX_TEXTS} non-empty texts", name)
    if any(len(t) > 1000 for t in texts):
        raise Problem(413, "too_large", f"a text in {name} exceeds 1000 characters", name)
    return texts


def _int(value: Any, name: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise Problem(422, "invalid", f"{name} must be an integer in [{low}, {high}]", name)
    return value


# ------------------------------------------------------------------ computation


async def _compute(state: ServerState, key: str, job: _Job, digest: str) -> CachedResponse:
    t0 = time.perf_counter()
    try:
        if job.kind == "chat":
            scores = await state.run(key, _scores, state, job)
            payload = _chat_answer(job, scores, digest)
        else:
            vectors = await state.run(key, _embed, state, job)
            payload = (_openai_embeddings if job.kind == "embeddings" else _cohere_embeddings)(job, vectors, digest)
    except CraftError as exc:
        raise Problem(422, "rejected", checks.first_line(exc)) from None
    body = json.dumps(payload).encode()
    return metered_response(digest, body, job.queries, await state.meter.usage_of_delivered(key), 1000 * (time.perf_counter() - t0))


def _scores(state: ServerState, job: _Job) -> np.ndarray:
    prepared = state.model.prepare([job.image])
    out = state.model.predict(prepared, 1, job.names, job.context, None)
    return checks.check_logits(out, (1, 1, len(job.names)))[0, 0]


def _chat_answer(job: _Job, scores: np.ndarray, digest: str) -> dict[str, Any]:
    probs = softmax(scores) if job.output == "logits" else scores / scores.sum()
    logp = np.log(np.maximum(probs, 1e-300))
    rng = np.random.default_rng(job.seed if job.seed is not None else int(digest[:16], 16))
    sharp = probs ** (1.0 / job.temperature) if job.temperature > 0 else probs
    sharp = sharp / sharp.sum()

    def token(c: int) -> dict[str, Any]:
        return {"token": LETTERS[c], "logprob": float(logp[c]), "bytes": list(LETTERS[c].encode())}

    choices = []
    for i in range(job.n):
        c = int(np.argmax(probs)) if job.temperature == 0 else int(rng.choice(len(probs), p=sharp))
        logprobs = None
        if job.logprobs:
            top = [token(int(j)) for j in np.argsort(-logp, kind="stable")[: job.top]]
            logprobs = {"content": [{**token(c), "top_logprobs": top}], "refusal": None}
        choices.append({"index": i, "message": {"role": "assistant", "content": LETTERS[c], "refusal": None},
                        "logprobs": logprobs, "finish_reason": "stop"})
    usage = {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.n, "total_tokens": job.prompt_tokens + job.n}
    return {"id": f"chatcmpl-{digest[:24]}", "object": "chat.completion", "created": int(time.time()), "model": job.model,
            "choices": choices, "usage": usage}


def _embed(state: ServerState, job: _Job) -> np.ndarray:
    """Unit-norm embeddings [k, E] of the job's image or texts, from the served open_clip model."""
    oc = _open_clip_of(state.model.client)
    torch = oc._torch
    if job.image is not None:
        image_embedding_counts(state)[image_digest(job.image)] += 1
        return oc._prepare([job.image]).cpu().numpy().astype(np.float32)
    with torch.inference_mode():
        feats = oc.model.encode_text(oc.tokenizer(job.texts).to(oc.device))
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy().astype(np.float32)


def _open_clip_of(client: Any) -> Any:
    for _ in range(8):
        if client is None:
            break
        if all(hasattr(client, a) for a in ("tokenizer", "model", "_prepare", "_torch")):
            return client
        client = getattr(client, "client", None)
    raise ClientError("the served model gives no embeddings (only open_clip models do); use /v1/chat/completions")


def _openai_embeddings(job: _Job, vectors: np.ndarray, digest: str) -> dict[str, Any]:
    data = [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": job.model,
            "usage": {"prompt_tokens": job.prompt_tokens, "total_tokens": job.prompt_tokens}}


def _cohere_embeddings(job: _Job, vectors: np.ndarray, digest: str) -> dict[str, Any]:
    images = [] if job.image is None else [{"width": job.image.width, "height": job.image.height, "format": "png", "bit_depth": 24}]
    units = {"image_tokens": job.prompt_tokens} if job.image is not None else {"input_tokens": job.prompt_tokens}
    return {"id": digest[:36], "embeddings": {"float": vectors.tolist()}, "texts": job.texts, "images": images,
            "meta": {"api_version": {"version": "2"}, "billed_units": units}, "response_type": "embeddings_by_type"}
