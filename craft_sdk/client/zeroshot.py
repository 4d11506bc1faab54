"""A client for hosted zero-shot image classification endpoints: text only, one HTTP request per image.

Most hosted vision-language models accept no context offsets: an endpoint takes
one image, candidate labels and a hypothesis template, and answers a probability
per label. The JSON shape (the Hugging Face Inference API's, also served by
``craft-sdk serve`` under ``POST /v1/zero-shot/<name>``; see ``docs/wire-format.md``)::

    request:  {"inputs": "<base64 PNG>",
               "parameters": {"candidate_labels": ["cat", "dog"],
                              "hypothesis_template": "a photo of a {}."}}
    answer:   [{"label": "dog", "score": 0.93}, {"label": "cat", "score": 0.07}]

:class:`ZeroShotAPIClient` implements the :class:`~craft_sdk.client.base.PredictionClient`
protocol over it: a context template ``T`` becomes the hypothesis template
``"T {}."``, the same text :class:`~craft_sdk.client.openclip.OpenCLIPClient`
builds (``"{template} {class name}."``), so a text-only client and a local client
agree on a template. A prediction over N images sends N requests, at most
``max_concurrency`` at once, each retried with backoff on timeouts, dropped
connections, 429 and 5xx (with one ``Idempotency-Key`` across its retries; servers
that honour it, like ``craft-sdk serve``, never compute or bill a retry twice),
and reassembles the scores in class order. The ledger's unit is unchanged (one
prompt scored on one image set = one query); what providers bill is counted on the
client in the provider's units: :attr:`ZeroShotAPIClient.usage`
(:class:`~craft_sdk.client.usage.ProviderUsage`): one request and one image per HTTP request
sent, retries included. The endpoint reports no tokens, so none are counted (such endpoints
bill per request); :meth:`ZeroShotAPIClient.estimate_usage` is the same rule before sending.
"""

from __future__ import annotations

import base64
import concurrent.futures
import functools
import io
import json
import math
import threading
import uuid
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
from PIL import Image

from ..errors import ClientError, ConfigError
from ..wire import IDEMPOTENCY_HEADER, WireError, loads_json
from .base import DEFAULT_TEMPLATE, BaseClient, Capabilities, PredictionClient
from .http import HTTPClient, HTTPClientConfig, client_config
from .usage import ProviderUsage, before_send, submit

PLACEHOLDER = "{}"
SUM_TOLERANCE = 0.01  # answered probabilities must sum to 1 within this (scores rounded to a few decimals)
MAX_NUMBER_CHARS = 64  # a score written with more characters is refused


def hypothesis_template(template: str) -> str:
    """The API's hypothesis template for a context template: ``"a photo of a"`` → ``"a photo of a {}."``.

    Raises:
        ClientError: the template is empty or contains braces (they would be read as placeholders).
    """
    if not template.strip() or "{" in template or "}" in template:
        raise ClientError(f"template {template!r} must be non-empty text without braces")
    return f"{template} {PLACEHOLDER}."


def split_hypothesis(hypothesis: str) -> tuple[str, str]:
    """(context template, label suffix) of a hypothesis template ``"<context> {}<suffix>."``.

    The inverse of :func:`hypothesis_template` (suffix ``""``); a template such as
    ``"a photo of a {}, a type of pet."`` maps to the context ``"a photo of a"`` and
    the suffix ``", a type of pet"`` appended to every label, which gives the same text.

    Raises:
        ClientError: the template has no single ``{}`` after a non-empty context, or does not end with ``.``.
    """
    head, sep, tail = hypothesis.partition(PLACEHOLDER)
    ok = sep and head.endswith(" ") and head.strip() and tail.endswith(".") and "{" not in head + tail and "}" not in head + tail
    if not ok:
        raise ClientError(
            f"hypothesis template {hypothesis!r} is not of the form '<context> {{}}<suffix>.' "
            "(one {} after a non-empty context, ending with a period)"
        )
    return head.rstrip(" "), tail[:-1]


def encode_image(image: Image.Image) -> str:
    """Base64 of a lossless PNG of ``image`` (what ``inputs`` carries)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class ZeroShotAPIClient(BaseClient):
    """A text-only black box behind a hosted zero-shot image classification endpoint.

    Args:
        url: the endpoint, e.g. ``"http://127.0.0.1:8765/v1/zero-shot/demo"`` (requests are POSTed to it).
        api_key: bearer key; defaults to the ``CRAFT_API_KEY`` environment variable.
        model_id: identifier stored in adapters (default ``"zeroshot-api:<url>"``).
        config: retries, timeouts, ``max_concurrency`` (requests in flight, default 8) and
            ``cache_size`` (encoded image sets kept) as an :class:`~craft_sdk.client.http.HTTPClientConfig`;
            keyword ``overrides`` replace its fields.
        transport: optional httpx transport (tests).

    ``predict`` returns probabilities [N, C] and raises :class:`~craft_sdk.errors.ClientError` for
    offsets (text only) or a request that failed after its retries (the first such failure stops
    the prediction's other requests), :class:`~craft_sdk.errors.BudgetExceededError` when the
    provider reports the key's budget spent (never retried).

    Example:
        >>> client = ZeroShotAPIClient("http://127.0.0.1:8765/v1/zero-shot/demo", api_key="...")  # doctest: +SKIP
        >>> probs = client.predict(images, ["cat", "dog"], "a photo of a")                    # doctest: +SKIP
        >>> probs.shape, client.provider_requests                                              # doctest: +SKIP
        ((2, 2), 2)
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        model_id: str | None = None,
        config: HTTPClientConfig | None = None,
        transport: httpx.BaseTransport | None = None,
        **overrides: Any,
    ) -> None:
        wire_config = client_config(config, overrides, "ZeroShotAPIClient", HTTPClientConfig(max_concurrency=8))
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"url must be an http(s) endpoint such as http://host:port/path, got {url!r}")
        self.url = url
        # the HTTP client owns transport, retries, backoff and error mapping; this class owns the shape
        self._wire = HTTPClient(f"{parts.scheme}://{parts.netloc}", api_key, config=wire_config, transport=transport)
        self.config = self._wire.config
        super().__init__(self.config.cache_size)  # the handle cache holds each image set's encoded images
        self._caps = Capabilities(model_id or f"zeroshot-api:{url}", output="probs")
        self.usage = ProviderUsage()  # what the provider bills: requests and images sent, retries included
        self._answered = 0
        self._pool = concurrent.futures.ThreadPoolExecutor(self.config.max_concurrency, thread_name_prefix="zeroshot")

    # ------------------------------------------------------------------ counters

    @property
    def provider_requests(self) -> int:
        """HTTP requests sent to the endpoint, retries included: what a provider bills at most (``usage.requests``)."""
        return self.usage.requests

    @property
    def provider_answers(self) -> int:
        """Requests answered with valid scores (one per image per prediction)."""
        return self._answered

    def estimate_usage(self, n_images: int, class_names: list[str], template: str, n_prompts: int = 1) -> ProviderUsage:
        """What one ``predict`` call sends, before it is sent: one request carrying one image per image and prompt
        (no tokens: the endpoint reports none)."""
        n = int(n_images) * int(n_prompts)
        return ProviderUsage(requests=n, images=n)

    def estimate_upload(self, n_images: int) -> ProviderUsage:
        """An upload sends nothing (the images travel with each prediction)."""
        return ProviderUsage()

    # ------------------------------------------------------------------ protocol

    def capabilities(self, template: str = DEFAULT_TEMPLATE) -> Capabilities:
        """Text only, probabilities; no request is made."""
        hypothesis_template(template)
        return self._caps

    def _prepare(self, images: list[Image.Image]) -> list[str]:
        """Each image encoded once (the API has no uploads: ``upload`` sends nothing and costs nothing)."""
        return [encode_image(im) for im in images]

    def _predict_images(self, prepared: list[str], class_names: list[str], template: str, offsets: np.ndarray | None) -> np.ndarray:
        """Probabilities [1, N, C] in class order: N requests, ``max_concurrency`` at a time.

        ``offsets`` is None here: :meth:`BaseClient.predict` refused any against these text-only
        capabilities (and marked that refusal unbilled, as every input error).
        """
        hypothesis = hypothesis_template(template)
        batch = _Batch()
        futures = [submit(self._pool, self._classify, b64, class_names, hypothesis, batch) for b64 in prepared]
        try:
            rows = [f.result() for f in futures]
        except BaseException as exc:
            batch.failed.set()
            for f in futures:
                f.cancel()
            concurrent.futures.wait(futures)  # nothing of this prediction stays in flight after it raises
            if not isinstance(exc, Exception):
                raise
            causes = [e for f in futures if not f.cancelled() and (e := f.exception()) is not None and not isinstance(e, _Cancelled)]
            cause = causes[0] if causes else exc  # the first real cause, not a cancellation
            if isinstance(cause, ClientError):
                cause.unbilled = not batch.maybe_billed  # any request answered (or maybe computed): the query stays charged
            raise cause from None
        return np.stack(rows)[None]

    def _classify(self, b64: str, names: list[str], hypothesis: str, batch: _Batch) -> np.ndarray:
        """Scores [C] of one image; one idempotency key across the retries of this request."""
        payload = {"inputs": b64, "parameters": {"candidate_labels": names, "hypothesis_template": hypothesis}}
        body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json", IDEMPOTENCY_HEADER: uuid.uuid4().hex}
        post = functools.partial(_post, self._wire._http, self.url, body, headers, _answer_limit(names))
        reached = False  # an attempt got past connecting: the server may have computed it

        def send() -> httpx.Response:
            nonlocal reached
            if batch.failed.is_set():
                raise _Cancelled("cancelled: another request of this prediction failed")
            before_send(ProviderUsage(requests=1, images=1))  # under a max_cost: refused here, never sent
            self.usage.add(requests=1, images=1)
            try:
                resp = post()
            except (httpx.ConnectError, httpx.ConnectTimeout):
                raise
            except BaseException:
                reached = True
                raise
            reached = True
            return resp

        try:
            scores = self._wire._call("POST zero-shot", send, functools.partial(_scores, names=names))
        except BaseException as exc:
            batch.failed.set()
            if reached and (isinstance(exc, _Cancelled) or not getattr(exc, "unbilled", False)):
                batch.maybe_billed = True  # conservative: a ledger may over-count such a query, never under-count it
            raise
        batch.maybe_billed = True
        with self._lock:
            self._answered += 1
        return scores

    # ------------------------------------------------------------------ plumbing

    def close(self) -> None:
        """Stop the request threads and close the connection pool."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._wire.close()

    def __enter__(self) -> ZeroShotAPIClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Batch:
    """The requests of one prediction: a failure stops the rest; whether any may have been billed."""

    def __init__(self) -> None:
        self.failed = threading.Event()
        self.maybe_billed = False


class _Cancelled(ClientError):
    """A request not sent because another request of the same prediction failed."""


def _answer_limit(names: list[str]) -> int:
    """The most bytes a valid answer for ``names`` takes (every label JSON-escaped, a long score), plus slack."""
    return (1 << 16) + 8 * sum(len(n) + 40 for n in names)


def _post(http: httpx.Client, url: str, body: bytes, headers: dict[str, str], limit: int) -> httpx.Response:
    """POST ``body``, reading at most ``limit`` bytes of the (decoded) answer: a longer answer is a
    :class:`ClientError`, a longer error page is cut (its status decides the retry)."""
    with http.stream("POST", url, content=body, headers=headers) as resp:
        data, size = [], 0
        for chunk in resp.iter_bytes():
            size += len(chunk)
            if size > limit and resp.status_code >= 400:  # an error page: its start is enough to classify it
                break
            if size > limit:
                raise ClientError(f"the endpoint answered more than {limit} bytes, more than any answer for these labels; "
                                  "is it a zero-shot endpoint?")
            data.append(chunk)
    kept = [(k, v) for k, v in resp.headers.multi_items() if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")]
    return httpx.Response(resp.status_code, headers=kept, content=b"".join(data), request=resp.request)


def _scores(resp: httpx.Response, names: list[str]) -> np.ndarray:
    """Scores [C] in ``names`` order from ``[{"label", "score"}, ...]`` (any order): exactly one finite
    probability in [0, 1] per label, summing to 1 (within ``SUM_TOLERANCE``); anything else is a one-line
    :class:`ClientError` (not retried: the endpoint would answer the same again)."""
    try:
        items = loads_json(resp.content, "the endpoint's answer", max_depth=3, max_number_chars=MAX_NUMBER_CHARS)
    except WireError as exc:
        if "not valid JSON" in str(exc):
            raise  # maybe truncated on the way: retried
        raise ClientError(f"{exc}; is it a zero-shot endpoint?") from None

    def bad(why: str) -> ClientError:
        return ClientError(f"the endpoint's answer {why}; is it a zero-shot endpoint?")

    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise bad("is not a JSON list of {label, score} objects")
    index = {name: c for c, name in enumerate(names)}
    out = np.full(len(names), np.nan)
    for item in items:
        label, score = item.get("label"), item.get("score")
        if not isinstance(label, str) or label not in index:
            raise bad(f"has an unexpected label {_short(label)}")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score) or not 0 <= score <= 1:
            raise bad(f"has a score {_short(score)} for {_short(label)} that is not a number in [0, 1]")
        if not np.isnan(out[index[label]]):
            raise bad(f"scores the label {_short(label)} twice")
        out[index[label]] = score
    if np.isnan(out).any():
        missing = [n for n, s in zip(names, out) if np.isnan(s)]
        raise bad(f"has no score for label(s) {[_short(m, 40) for m in missing[:3]]}")
    if abs(float(out.sum()) - 1) > SUM_TOLERANCE:
        raise bad(f"has scores summing to {float(out.sum()):.4g}, not 1 (independent per-label scores are not probabilities)")
    return out


def _short(value: Any, limit: int = 60) -> str:
    return " ".join(repr(value)[:limit].split())


class TextOnlyClient(BaseClient):
    """A text-only view of any client: capabilities without ``n_ctx``/``ctx_dim``, offsets refused.

    What ``craft-sdk serve --text-only`` serves, and a way to test text-only tuning on a local model.
    Image features are prepared by the wrapped client when it is a :class:`BaseClient`.

    Args:
        client: the wrapped client.
        cache_size: uploaded image sets kept.

    Example:
        >>> TextOnlyClient(create_client("demo")).capabilities().soft_prompts  # doctest: +SKIP
        False
    """

    def __init__(self, client: PredictionClient, cache_size: int = 8) -> None:
        super().__init__(cache_size)
        self.client = client

    def capabilities(self, template: str = DEFAULT_TEMPLATE) -> Capabilities:
        caps = self.client.capabilities(template)
        return Capabilities(caps.model_id, output=caps.output, logit_scale=caps.logit_scale)

    def _prepare(self, images: list[Image.Image]) -> Any:
        return self.client._prepare(images) if isinstance(self.client, BaseClient) else images

    def _predict_images(self, prepared: Any, class_names: list[str], template: str, offsets: np.ndarray | None) -> np.ndarray:
        # offsets is None: BaseClient.predict refused any against these text-only capabilities
        if isinstance(self.client, BaseClient):
            return self.client._predict_images(prepared, class_names, template, None)
        return np.asarray(self.client.predict(prepared, class_names, template))[None]
