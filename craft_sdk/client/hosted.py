"""What the hosted-VLM clients (:mod:`~craft_sdk.client.chat`, :mod:`~craft_sdk.client.embed`) share.

The transport is the ``openai`` package (``pip install 'craft-sdk[openai]'``), which users already
point at every OpenAI-compatible endpoint, over an ``httpx`` client of ours whose request hook counts
every HTTP attempt (retries included) into the client's :class:`~craft_sdk.client.usage.ProviderUsage`.
Retries are ours (the openai client is built with ``max_retries=0``), by the openai package's own
rule: 408/409/429/5xx and dropped connections are retried ``max_retries`` times, ``x-should-retry``
is obeyed, ``Retry-After`` (and ``retry-after-ms``) is honoured up to 120 s, otherwise 0.5 s doubling
to 8 s with jitter; each of our requests carries one ``Idempotency-Key`` across its retries. Before
every attempt, the first and each retry, the attempt's upper bound passes the call's gate
(:func:`~craft_sdk.client.usage.before_send`): under a ``max_cost`` an attempt that could pass the
ceiling is refused and never sent. An attempt whose answer was lost after it was sent (the
connection dropped, a timeout) is recorded at its bound's tokens: the provider may have billed it. Model strings: ``chat+http(s)://HOST[:PORT]/v1?model=NAME``
and ``embed+http(s)://HOST[:PORT]/v1?model=NAME``: the part before ``?`` is the openai ``base_url``.

**Token rule** (what ``estimate_usage`` assumes and what ``craft-sdk serve`` bills in ``usage``):
a text costs ``ceil(len(text) / 4)`` tokens (the providers' "about 4 characters per token"), an image
:data:`IMAGE_TOKENS` = 85 (OpenAI's fixed cost of a low-detail image), an answer token 1.
"""

from __future__ import annotations

import concurrent.futures
import email.utils
import logging
import math
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import httpx

from ..errors import BudgetExceededError, ClientError, ConfigError, require
from ..wire import IDEMPOTENCY_HEADER
from .usage import ProviderUsage, before_send, submit

logger = logging.getLogger(__name__)

IMAGE_TOKENS = 85
MAX_RETRY_AFTER = 120.0  # the openai package's limit on a server-directed delay
T = TypeVar("T")
R = TypeVar("R")


def text_tokens(text: str) -> int:
    """Tokens of a text by the documented rule: ``ceil(len(text) / 4)``, at least 1."""
    return max(1, math.ceil(len(text) / 4))


def import_openai() -> Any:
    """The ``openai`` package, or a :class:`ConfigError` saying what to install."""
    return require("openai", "openai", "the chat and embedding clients")


@dataclass(frozen=True)
class HostedURL:
    """A parsed ``chat+``/``embed+`` model string: ``base_url`` (before ``?``), ``model`` and other query options."""

    base_url: str
    model: str
    options: dict[str, str]


def parse_model_url(url: str, allowed: Sequence[str]) -> HostedURL:
    """Split ``http(s)://HOST[:PORT]/v1?model=NAME[&opt=value...]``; ``allowed`` names the extra options.

    Example:
        >>> parse_model_url("http://127.0.0.1:8000/v1?model=demo&samples=8", ["samples"])
        HostedURL(base_url='http://127.0.0.1:8000/v1', model='demo', options={'samples': '8'})
    """
    base, _, query = url.partition("?")
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"the endpoint must be http(s)://HOST[:PORT]/v1?model=NAME, got {url!r}")
    params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    model = params.pop("model", "")
    if not model:
        raise ConfigError(f"name the model in the URL: {base}?model=NAME")
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} in {url!r}; valid: model, {', '.join(allowed)}")
    return HostedURL(base.rstrip("/"), model, params)


class Transport:
    """The openai client with attempt counting, one idempotency key per request, bounded concurrency.

    Args:
        base_url: the openai ``base_url`` (e.g. ``http://127.0.0.1:8765/v1``).
        api_key: bearer key; default ``CRAFT_API_KEY``, else ``"EMPTY"`` (what keyless vLLM servers accept).
        usage: where requests and images are counted (one per HTTP attempt).
        max_retries, timeout: the openai client's.
        max_concurrency: requests in flight at once.
    """

    def __init__(self, base_url: str, api_key: str | None, usage: ProviderUsage, *, max_retries: int,
                 timeout: float, max_concurrency: int) -> None:
        openai = import_openai()
        self.errors = openai
        self.usage = usage
        self.max_retries = max_retries
        self._local = threading.local()
        self._jitter = random.Random()
        key = api_key or os.environ.get("CRAFT_API_KEY") or "EMPTY"
        limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
        self._http = httpx.Client(timeout=timeout, limits=limits, event_hooks={"request": [self._on_send]})
        self.openai = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=timeout,
                                    http_client=self._http)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_concurrency, thread_name_prefix="hosted")

    def _on_send(self, request: httpx.Request) -> None:
        self.usage.add(requests=1, images=getattr(self._local, "images", 0))

    def call(self, what: str, bound: ProviderUsage, fn: Callable[[dict[str, str]], T]) -> T:
        """``fn(headers)`` (one openai call, no retries inside) sent up to ``1 + max_retries`` times; each
        attempt first passes the gate with ``bound`` (requests 1, its images, at most its tokens); errors mapped."""
        headers = {IDEMPOTENCY_HEADER: uuid.uuid4().hex}
        for attempt in range(self.max_retries + 1):
            before_send(bound)  # may refuse: then nothing of this attempt is sent
            self._local.images = bound.images
            try:
                return fn(headers)
            except self.errors.APIStatusError as exc:
                if attempt == self.max_retries or not _should_retry(exc.response):
                    raise _status_error(what, exc) from None
                delay = self._delay(attempt, exc.response)
            except self.errors.APIConnectionError as exc:  # timeouts included
                if not isinstance(exc.__cause__, (httpx.ConnectError, httpx.ConnectTimeout)):
                    self.usage.add(input_tokens=bound.input_tokens, output_tokens=bound.output_tokens)  # maybe billed
                if attempt == self.max_retries:
                    raise ClientError(f"{what}: the endpoint could not be reached after its retries ({exc.__class__.__name__})") from None
                delay = self._delay(attempt, None)
            finally:
                self._local.images = 0
            logger.info("%s: retry %d of %d in %.2fs", what, attempt + 1, self.max_retries, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        """The openai package's rule: the server's Retry-After when 0 < it <= 120 s, else 0.5 s x 2^attempt up to 8 s, less 0-25 %."""
        after = None if response is None else _retry_after(response.headers)
        if after is not None and 0 < after <= MAX_RETRY_AFTER:
            return after
        return min(0.5 * 2.0**attempt, 8.0) * (1 - 0.25 * self._jitter.random())

    def post(self, what: str, path: str, body: dict[str, Any], bound: ProviderUsage) -> Any:
        """POST a JSON ``body`` to ``base_url + path``; the decoded JSON answer."""
        return self.call(what, bound, lambda h: self.openai.post(path, cast_to=object, body=body, options={"headers": h}))

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``fn`` over ``items``, ``max_concurrency`` at a time; the first failure cancels the rest and is raised."""
        futures = [submit(self._pool, fn, item) for item in items]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            concurrent.futures.wait(futures)
            raise

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._http.close()


def _retry_after(headers: httpx.Headers) -> float | None:
    """Seconds from ``retry-after-ms``, or ``retry-after`` (seconds or an HTTP date); None when absent or unreadable."""
    try:
        if "retry-after-ms" in headers:
            return float(headers["retry-after-ms"]) / 1000
        raw = headers.get("retry-after")
        if raw is None:
            return None
        try:
            return float(raw)
        except ValueError:
            when = email.utils.parsedate_to_datetime(raw)
            return when.timestamp() - time.time()
    except (TypeError, ValueError, OverflowError):
        return None


def _should_retry(response: httpx.Response) -> bool:
    """The openai package's rule: not past a 120 s Retry-After; ``x-should-retry`` obeyed; 408, 409, 429 and 5xx retried."""
    after = _retry_after(response.headers)
    if after is not None and math.isfinite(after) and after > MAX_RETRY_AFTER:
        return False
    flag = response.headers.get("x-should-retry")
    if flag in ("true", "false"):
        return flag == "true"
    return response.status_code in (408, 409, 429) or response.status_code >= 500


def _status_error(what: str, exc: Any) -> ClientError:
    body = exc.body if isinstance(getattr(exc, "body", None), dict) else {}
    err = body.get("error", body) if isinstance(body, dict) else {}
    err = err if isinstance(err, dict) else {"message": str(err)}
    code, message = str(err.get("code") or ""), str(err.get("message") or exc.message)[:300]
    if exc.status_code == 429 and code == "budget_exceeded":
        return BudgetExceededError(f"{what}: {message}")
    return ClientError(f"{what}: the endpoint answered {exc.status_code} ({code or 'error'}): {message}")


def usage_tokens(answer: Any) -> tuple[int, int] | None:
    """(input, output) tokens of an OpenAI-style ``usage`` object, or None when the answer has none."""
    usage = answer.get("usage") if isinstance(answer, dict) else None
    if not isinstance(usage, dict) or not isinstance(usage.get("prompt_tokens"), int):
        return None
    out = usage.get("completion_tokens")
    return usage["prompt_tokens"], out if isinstance(out, int) else 0
