"""A client for a remote, prediction-only black box served by ``craft-sdk serve``.

The model sits behind an HTTP boundary and returns logits, nothing else. This
module is the user's side: :class:`HTTPClient` implements the
:class:`~craft_sdk.client.base.PredictionClient` protocol over the wire format
documented in ``docs/wire-format.md`` (summary below), and survives the faults a
real service has: timeouts, dropped connections, 429 and 5xx answers, truncated
bodies, evicted image sets and restarts. It needs httpx, numpy and safetensors
only (no torch), so it ships in the base install.

Wire format (version 1), all paths under ``/v1``:

* ``GET /health`` (no auth) → JSON ``{"status": "ok", "api": "v1"}``.
* ``GET /capabilities?template=T`` → JSON ``{model_id, n_ctx, ctx_dim, output,
  ctx_rms, logit_scale}``.
* ``POST /image-sets`` with a safetensors body holding uint8 RGB pixels, either
  one tensor ``images`` [N, H, W, 3] or tensors ``image.000000`` ... [H, W, 3]
  → 201 JSON ``{"handle": str, "n_images": N}``. Not billed.
* ``POST /predict`` with a safetensors body: optional tensor ``offsets`` float32
  [n_ctx, d] or [P, n_ctx, d]; metadata ``request`` = JSON ``{"handle",
  "class_names", "template", "logits_dtype": "float32" | "float16"}``. Header
  ``Idempotency-Key`` (recommended): a retried request with the same key is
  neither computed nor billed twice. → safetensors body with tensor ``logits``
  [N, C] (no or 2-D offsets) or [P, N, C]; header ``X-Craft-Body-SHA256``.
  Billed P queries (1 without offsets), the unit of the client-side ledger.
* ``GET /usage`` → JSON ``{"used", "budget", "remaining", "uploads"}``.
* ``GET /limits`` → JSON of the server's size limits (``max_body_bytes``, ``max_images``...).

Binary bodies use content type ``application/x-safetensors``; every request
but health carries ``Authorization: Bearer <key>``. Errors are JSON
``{"error": {"code", "message", "field"}}`` with 401 (bad or missing key),
404 (``unknown_handle``: upload again), 413 (a size limit), 422 (invalid
field), 429 (``budget_exceeded``: final; ``rate_limited``: retry) or 5xx.

Determinism: a population is sent as one request by default, so the server
computes exactly what an in-process client computes (splitting a population
into chunks can change float results in the last bits, and with them the
CMA-ES trajectory). Logits travel as float32 unless float16 is asked for.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import logging
import math
import os
import random
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any, TypeVar

import httpx
import numpy as np
from PIL import Image

from .._version import __version__
from ..errors import BudgetExceededError, ClientError, ComputeBudgetError, ConfigError
from ..wire import (
    API,
    CHECKSUM_HEADER,
    IDEMPOTENCY_HEADER,
    MODEL_FAULT,
    SAFETENSORS,
    STORE_UNAVAILABLE,
    WireError,
    encode,
    encode_images,
    loads_json,
    parse,
    read,
    sha256_hex,
)
from .base import DEFAULT_TEMPLATE, BaseClient, Capabilities, Images, ImageSetHandle
from .schemes import parse_model
from .usage import ProviderUsage, before_send, submit

logger = logging.getLogger(__name__)

RETRY_STATUSES = (429, 500, 502, 503, 504)
T = TypeVar("T")

# Sane bounds on what a server may advertise: beyond them the answer is refused, not allocated.
MAX_N_CTX = 256
MAX_CTX_DIM = 8192
MAX_CTX_ELEMENTS = 1 << 18  # n_ctx x ctx_dim: the tuner's projection is [intrinsic_dim, n_ctx x ctx_dim]
MAX_MODEL_ID_CHARS = 256
LIMIT_FIELDS = ("max_body_bytes", "max_images", "max_image_side", "max_classes", "max_class_name_chars",
                "max_template_chars", "max_population", "max_answer_bytes", "max_prompts", "max_abs_offset")


# ---------------------------------------------------------------------- client


@dataclass(frozen=True)
class HTTPClientConfig:
    """Timeouts, retries and batching of an :class:`HTTPClient`.

    Args:
        timeout: seconds to wait for a response (a prediction on a big model is slow).
        connect_timeout: seconds to wait for a connection.
        max_retries: retries after the first attempt, on connection errors, timeouts,
            429 (except a spent budget), 5xx and corrupt bodies.
        backoff: first retry delay in seconds; doubles every retry (with jitter).
        max_backoff: cap on one delay (also caps a server's Retry-After).
        max_batch: send at most this many candidate offsets per request; None (default)
            sends a population as one request, bitwise identical to an in-process client.
        max_concurrency: requests in flight at once when a population is split.
        logits_dtype: ``"float32"`` (exact) or ``"float16"`` (half the bytes).
        cache_size: image sets remembered for transparent re-upload.
    """

    timeout: float = 300.0
    connect_timeout: float = 10.0
    max_retries: int = 6
    backoff: float = 0.5
    max_backoff: float = 30.0
    max_batch: int | None = None
    max_concurrency: int = 4
    logits_dtype: str = "float32"
    cache_size: int = 16

    def __post_init__(self) -> None:
        for name in ("timeout", "connect_timeout", "max_backoff"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {getattr(self, name)!r}")
        if self.backoff < 0:
            raise ConfigError(f"backoff must be >= 0 seconds, got {self.backoff!r}")
        if self.max_retries < 0:
            raise ConfigError(f"max_retries must be >= 0, got {self.max_retries!r}")
        if self.max_batch is not None and self.max_batch < 1:
            raise ConfigError(f"max_batch must be None or >= 1, got {self.max_batch!r}")
        if self.max_concurrency < 1 or self.cache_size < 1:
            raise ConfigError("max_concurrency and cache_size must be >= 1")
        if self.logits_dtype not in ("float32", "float16"):
            raise ConfigError(f"logits_dtype must be 'float32' or 'float16', got {self.logits_dtype!r}")


class _Retry(Exception):
    """A transient fault: wait and try again (``maybe_billed``: the server may have computed it)."""

    def __init__(self, cause: str, retry_after: float | None = None, maybe_billed: bool = False) -> None:
        super().__init__(cause)
        self.retry_after = retry_after
        self.maybe_billed = maybe_billed


class _HandleGone(Exception):
    """The server no longer holds the image set (evicted or restarted)."""


def client_config(
    config: HTTPClientConfig | None, overrides: dict[str, Any], who: str, default: HTTPClientConfig | None = None
) -> HTTPClientConfig:
    """``config`` (or ``default``) with keyword ``overrides``; an unknown option is refused naming ``who``."""
    known = {f.name for f in fields(HTTPClientConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown {who} option(s) {unknown}; valid: {sorted(known)}")
    return replace(config or default or HTTPClientConfig(), **overrides)


class _RemoteSet:
    """What the client caches per image set: the images (to upload again) and the server's current handle."""

    def __init__(self, images: list[Image.Image], server_id: str | None) -> None:
        self.images = images
        self.server_id = server_id


class HTTPClient(BaseClient):
    """A prediction-only black box behind a ``craft-sdk serve`` endpoint.

    A :class:`~craft_sdk.client.base.BaseClient`: its handle cache (``cache_size`` image sets) and
    input checks are the base class's; what it prepares per image set is an upload to the server.

    Args:
        url: base URL of the server, e.g. ``"http://127.0.0.1:8765"``.
        api_key: bearer key; defaults to the ``CRAFT_API_KEY`` environment variable.
        config: an :class:`HTTPClientConfig`; keyword ``overrides`` replace its fields.
        transport: optional httpx transport (tests).

    Example:
        >>> client = HTTPClient("http://127.0.0.1:8765", api_key="...")   # doctest: +SKIP
        >>> handle = client.upload(images)                                 # doctest: +SKIP
        >>> logits = client.predict(handle, ["cat", "dog"])                # doctest: +SKIP
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        config: HTTPClientConfig | None = None,
        transport: httpx.BaseTransport | None = None,
        **overrides: Any,
    ) -> None:
        self.config = client_config(config, overrides, "HTTPClient")
        if parse_model(url).kind != "server":
            raise ConfigError(f"url must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        key = api_key if api_key is not None else os.environ.get("CRAFT_API_KEY")
        if not key:
            raise ConfigError("HTTPClient needs an API key: pass api_key=... (CLI: --api-key-file) or set CRAFT_API_KEY")
        if any(ch.isspace() or not ch.isprintable() for ch in key):  # the message never shows the key
            raise ConfigError(
                "the API key holds whitespace, a line break or control characters; a key file must hold exactly one key "
                "on one line (check --api-key-file / CRAFT_API_KEY)"
            )
        c = self.config
        if transport is None:  # no Nagle delay between the header and body writes of a request
            transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        self._http = httpx.Client(
            base_url=f"{self.url}/{API}",
            headers={"Authorization": f"Bearer {key}", "User-Agent": f"craft-sdk/{__version__}"},
            timeout=httpx.Timeout(c.timeout, connect=c.connect_timeout),
            transport=transport,
            limits=httpx.Limits(max_connections=max(c.max_concurrency, 1) + 1),
        )
        super().__init__(c.cache_size)
        self._caps: dict[str, Capabilities] = {}
        self._limits: dict[str, Any] | None = None
        self._jitter = random.Random()
        # what the server bills, in provider units: uploads (1 request + its images) and predictions
        # (1 request each), retries included; ``usage()`` is the server's own query meter
        self.provider_usage = ProviderUsage()

    def estimate_usage(self, n_images: int, class_names: list[str], template: str, n_prompts: int = 1, *,
                       images_cached: bool = True) -> ProviderUsage:
        """One ``predict`` call, before it is sent: one request per ``max_batch`` candidates (a whole population
        by default; server limits known so far also split it); on raw images (``images_cached=False``) also
        their upload first, one request carrying ``n_images`` images."""
        step = self.config.max_batch or n_prompts
        if self._limits is not None and self._limits.get("max_population"):
            step = min(step, self._limits["max_population"])
        predict = ProviderUsage(requests=-(-int(n_prompts) // max(step, 1)))
        return predict if images_cached else predict.plus(self.estimate_upload(n_images))

    def estimate_upload(self, n_images: int) -> ProviderUsage:
        """Uploading an image set: one request carrying ``n_images`` images."""
        return ProviderUsage(requests=1, images=int(n_images))

    # ------------------------------------------------------------------ plumbing

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> HTTPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, what: str, send: Callable[[], httpx.Response], parse_ok: Callable[[httpx.Response], T]) -> T:
        """Send with retries; ``parse_ok`` turns a 2xx response into the result (WireError = corrupt body).

        The final :class:`ClientError` is marked ``unbilled`` when no attempt can have been computed
        (every one was refused before computing or never connected), so a ledger may refund it.
        """
        c = self.config
        cause, maybe_billed = "no attempt made", False
        for attempt in range(c.max_retries + 1):
            retry_after = None
            try:
                return parse_ok(self._checked(send()))
            except _Retry as exc:
                cause, retry_after = str(exc), exc.retry_after
                maybe_billed = maybe_billed or exc.maybe_billed
            except WireError as exc:
                cause, maybe_billed = f"corrupt response body ({exc})", True
            except (httpx.UnsupportedProtocol, httpx.LocalProtocolError) as exc:  # our request is wrong: retrying won't help
                raise ClientError(  # not str(exc): it may quote a header, and headers carry the key
                    f"{what} at {self.url} cannot be sent ({exc.__class__.__name__}); check the URL and the API key's characters",
                    unbilled=not maybe_billed,
                ) from None
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # never reached the server
                cause = f"connection failed ({exc.__class__.__name__}: {_one_line(str(exc), 120)})"
            except httpx.TimeoutException as exc:
                cause, maybe_billed = f"timed out ({exc.__class__.__name__})", True
            except httpx.TransportError as exc:
                cause, maybe_billed = f"connection failed ({exc.__class__.__name__}: {_one_line(str(exc), 120)})", True
            if attempt == c.max_retries:
                break
            delay = self._delay(attempt, retry_after)
            logger.warning("%s failed (%s); retry %d of %d in %.2fs", what, cause, attempt + 1, c.max_retries, delay)
            time.sleep(delay)
        raise ClientError(
            f"{what} at {self.url} failed after {c.max_retries + 1} attempts: {cause}; "
            "check that the server is up (a tune with --checkpoint-dir can be resumed)",
            unbilled=not maybe_billed,
        )

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        cap = min(self.config.max_backoff, self.config.backoff * 2**attempt)
        delay = cap / 2 + self._jitter.uniform(0, cap / 2)  # "equal jitter"
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.config.max_backoff))
        return delay

    def _checked(self, resp: httpx.Response) -> httpx.Response:
        if resp.status_code < 400:
            digest = resp.headers.get(CHECKSUM_HEADER)
            if digest is not None and digest != sha256_hex(resp.content):
                raise _Retry(f"response body does not match its {CHECKSUM_HEADER} (truncated?)", maybe_billed=True)
            return resp
        err = _error_body(resp)
        code, message = err["code"], err["message"] or _one_line(resp.reason_phrase, 80)
        if resp.status_code == 429 and code == "budget_exceeded":
            raise BudgetExceededError(f"the server refused the query: {message}", unbilled=True)
        if resp.status_code >= 500 and code == MODEL_FAULT:  # the same request fails the same way: not retried
            raise ClientError(f"{self.url} could not score this request (HTTP {resp.status_code} {code}): {message}", unbilled=True)
        if resp.status_code in RETRY_STATUSES:
            # a 5xx may follow a computation; not in_progress, nor store_unavailable (refused before computing: the
            # server refunds a charge its store recorded late, and delivers any answer it computed)
            billed = resp.status_code >= 500 and code not in ("in_progress", STORE_UNAVAILABLE)
            raise _Retry(f"HTTP {resp.status_code} {code or _one_line(resp.reason_phrase, 40)}", _retry_after(resp), billed)
        if resp.status_code == 404 and code == "unknown_handle":
            raise _HandleGone(message)
        if resp.status_code == 413 and code == "compute_budget":  # stopped part-way: its computed queries are billed
            billed = resp.headers.get("X-Craft-Queries", "")
            n = int(billed) if billed.isdigit() and len(billed) < 16 else None
            raise ComputeBudgetError(f"{self.url} stopped the request at its compute budget (HTTP 413 compute_budget; {billed or '?'} "
                              f"queries billed): {message}", unbilled=n == 0, billed=n)
        if resp.status_code == 401:
            raise ClientError(f"{self.url} rejected the API key (401); check --api-key-file / CRAFT_API_KEY", unbilled=True)
        field = f" (field {err['field']})" if err["field"] else ""
        raise ClientError(f"{self.url} refused the request with HTTP {resp.status_code}{field}: {message}", unbilled=True)

    # ------------------------------------------------------------------ protocol

    def capabilities(self, template: str = DEFAULT_TEMPLATE) -> Capabilities:
        """What the served model can do for ``template`` (fetched once per template; validated against sane bounds)."""
        if template not in self._caps:
            data = self._call(
                "GET /capabilities",
                lambda: self._http.get("/capabilities", params={"template": template}),
                lambda r: _json(r),
            )
            self._caps[template] = _capabilities(data, self.url)
        return self._caps[template]

    def limits(self) -> dict[str, int]:
        """The server's size limits (fetched once; fields that are not positive integers are ignored)."""
        if self._limits is None:
            data = self._call("GET /limits", lambda: self._http.get("/limits"), _json)
            data = data if isinstance(data, dict) else {}
            self._limits = {k: v for k, v in data.items() if k in LIMIT_FIELDS and _is_int(v) and v >= 1}
        return self._limits

    def _prepare(self, images: list[Image.Image]) -> _RemoteSet:
        """Upload ``images`` once (not billed); the base class caches the result under their fingerprint."""
        return _RemoteSet(images, self._send_images(images))

    def _resolve(self, images: Images) -> tuple[Any, int]:
        if not isinstance(images, ImageSetHandle):  # raw images: upload through the cache, not once per call
            images = self.upload(images)
        return super()._resolve(images)

    def _send_images(self, pil: list[Image.Image]) -> str:
        limits = self.limits()
        if limits.get("max_images") and len(pil) > limits["max_images"]:
            raise ClientError(f"{len(pil)} images exceed the server's limit of {limits['max_images']} per set; split them", unbilled=True)
        body = encode_images(pil)
        if limits.get("max_body_bytes") and len(body) > limits["max_body_bytes"]:
            raise ClientError(
                f"the image set is {len(body)} bytes, over the server's {limits['max_body_bytes']}-byte limit; "
                "upload fewer or smaller images",
                unbilled=True,
            )
        post = functools.partial(self._http.post, "/image-sets", content=body, headers={"Content-Type": SAFETENSORS})
        data = self._call("POST /image-sets", functools.partial(_counted, self.provider_usage, post, len(pil)), _json)
        handle = data.get("handle") if isinstance(data, dict) else None
        if not isinstance(handle, str) or not 1 <= len(handle) <= 128 or data.get("n_images") != len(pil):
            raise ClientError(f"{self.url} answered an upload with an unexpected body; is it a craft-sdk server?")
        return handle

    def _step(self, p: int, n: int, c: int) -> int:
        """Candidates per request: the whole population unless ``max_batch`` or a server limit needs a split."""
        limits = self.limits()
        itemsize = 2 if self.config.logits_dtype == "float16" else 4
        caps = [p, self.config.max_batch or p, limits.get("max_population", p)]
        if "max_answer_bytes" in limits:
            caps.append(limits["max_answer_bytes"] // (n * c * itemsize))
        if "max_prompts" in limits:
            caps.append(limits["max_prompts"] // c)
        step = min(caps)
        if step < 1:
            raise ClientError(
                f"one candidate's answer ({n} images x {c} classes) exceeds the server's max_answer_bytes/max_prompts "
                f"({limits.get('max_answer_bytes')}/{limits.get('max_prompts')}); use fewer images per set or fewer classes",
                unbilled=True,
            )
        if step < p and step != self.config.max_batch:
            logger.info("splitting %d candidates into requests of %d to fit the server's limits (results may differ in the last bits)", p, step)
        return step

    def _predict_images(self, prepared: _RemoteSet, class_names: list[str], template: str, offsets: np.ndarray | None) -> np.ndarray:
        """Scores [P, N, C]: one request per population unless ``max_batch`` or the server's published limits
        (``max_population``, ``max_answer_bytes``, ``max_prompts``) need it split."""
        p = 1 if offsets is None else offsets.shape[0]
        step = self._step(p, len(prepared.images), len(class_names))
        if offsets is None or p <= step:
            return self._predict_chunk(prepared, class_names, template, offsets)
        chunks = [offsets[i : i + step] for i in range(0, p, step)]
        with concurrent.futures.ThreadPoolExecutor(self.config.max_concurrency) as pool:
            futures = [submit(pool, self._predict_chunk, prepared, class_names, template, ch) for ch in chunks]
            try:
                outs = [f.result() for f in futures]
            except ClientError as exc:
                for f in futures:  # nothing more of a failed prediction is sent
                    f.cancel()
                concurrent.futures.wait(futures)
                exc.billed = _billed(futures, chunks)
                if exc.billed != 0 and any(f.done() and not f.cancelled() and f.exception() is None for f in futures):
                    exc.unbilled = False  # another request of this prediction was answered: billed, not refundable
                raise
        try:
            return np.concatenate(outs)
        except ValueError as exc:
            raise ClientError(f"{self.url} answered logits that do not fit together: {_one_line(str(exc), 160)}") from None

    def _predict_chunk(self, remote: _RemoteSet, names: list[str], template: str, offsets: np.ndarray | None) -> np.ndarray:
        """Scores [P, N, C] for one request; one idempotency key across its retries, a new one after a re-upload."""
        tensors = {} if offsets is None else {"offsets": np.ascontiguousarray(offsets, dtype=np.float32)}
        for _ in range(3):
            idem = uuid.uuid4().hex  # one key for all retries of this request; a new one after a 404
            with self._lock:
                server_id = remote.server_id
            if server_id is None:
                server_id = self._send_images(remote.images)
                with self._lock:
                    remote.server_id = server_id
            request = {"handle": server_id, "class_names": names, "template": template, "logits_dtype": self.config.logits_dtype}
            body = encode(tensors, {"request": json.dumps(request)})
            headers = {"Content-Type": SAFETENSORS, IDEMPOTENCY_HEADER: idem}
            post = functools.partial(self._http.post, "/predict", content=body, headers=headers)
            try:
                logits = self._call("POST /predict", functools.partial(_counted, self.provider_usage, post), _logits)
            except _HandleGone:
                logger.info("server no longer holds an image set of %d images; uploading it again", len(remote.images))
                with self._lock:
                    if remote.server_id == server_id:
                        remote.server_id = None
                continue
            return logits if logits.ndim == 3 else logits[None]
        raise ClientError(f"{self.url} keeps forgetting uploaded image sets; raise the server's cache size", unbilled=True)

    # --------------------------------------------------------------------- extras

    def usage(self) -> dict[str, Any]:
        """Queries used and left for this key, as the server counts them."""
        data = self._call("GET /usage", lambda: self._http.get("/usage"), _json)
        if not isinstance(data, dict):
            raise ClientError(f"{self.url} answered /usage with an unexpected body; is it a craft-sdk server?")
        return data

    def health(self) -> dict[str, Any]:
        """The server's health document (no key needed)."""
        data = self._call("GET /health", lambda: self._http.get("/health"), _json)
        if not isinstance(data, dict):
            raise ClientError(f"{self.url} answered /health with an unexpected body; is it a craft-sdk server?")
        return data


def _counted(usage: ProviderUsage, send: Callable[[], httpx.Response], images: int = 0) -> httpx.Response:
    """Pass the call's gate, count one request (carrying ``images`` images), then send it."""
    before_send(ProviderUsage(requests=1, images=images))  # under a max_cost: refused here, never sent
    usage.add(requests=1, images=images)
    return send()


def _billed(futures: list[concurrent.futures.Future[Any]], chunks: list[np.ndarray]) -> int | None:
    """The queries billed for a split prediction that failed: answered requests whole, requests stopped part-way
    as the server counted them, refused ones nothing; None when any request's bill is unknown."""
    total = 0
    for f, chunk in zip(futures, chunks):
        exc = None if f.cancelled() else f.exception()
        if f.cancelled() or (isinstance(exc, ClientError) and exc.unbilled):
            continue
        if exc is None:
            total += len(chunk)
        elif isinstance(exc, ClientError) and exc.billed is not None:
            total += exc.billed
        else:
            return None
    return total


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _one_line(text: Any, limit: int = 300) -> str:
    return " ".join(str(text).split())[:limit]


def _capabilities(data: Any, url: str) -> Capabilities:
    """Server-sent capabilities, refused unless every field has a sane type and bound."""

    def bad(why: str) -> ClientError:
        return ClientError(f"{url} sent unusable capabilities ({why}); is it a craft-sdk server?")

    if not isinstance(data, dict):
        raise bad("not a JSON object")
    model_id = data.get("model_id")
    if not isinstance(model_id, str) or not 1 <= len(model_id) <= MAX_MODEL_ID_CHARS:
        raise bad(f"model_id must be a string of 1 to {MAX_MODEL_ID_CHARS} characters")
    for name, bound in (("n_ctx", MAX_N_CTX), ("ctx_dim", MAX_CTX_DIM)):
        v = data.get(name)
        if v is not None and not (_is_int(v) and 1 <= v <= bound):
            raise bad(f"{name} must be null or an integer from 1 to {bound}")
    if _is_int(data.get("n_ctx")) and _is_int(data.get("ctx_dim")) and data["n_ctx"] * data["ctx_dim"] > MAX_CTX_ELEMENTS:
        raise bad(f"n_ctx x ctx_dim must be at most {MAX_CTX_ELEMENTS}")
    for name in ("ctx_rms", "logit_scale"):
        v = data.get(name)
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 < v <= 1e6):
            raise bad(f"{name} must be null or a finite number in (0, 1e6]")
    if data.get("output", "logits") not in ("logits", "probs"):
        raise bad("output must be 'logits' or 'probs'")
    known = {f.name for f in fields(Capabilities)}
    try:
        return Capabilities(**{k: v for k, v in data.items() if k in known})
    except (TypeError, ConfigError) as exc:
        raise bad(_one_line(str(exc), 160)) from None


def _json(resp: httpx.Response) -> Any:
    return loads_json(resp.content, "response body")


def _logits(resp: httpx.Response) -> np.ndarray:
    body = resp.content
    entries, _ = parse(body)
    entry = entries.get("logits")
    if entry is None or entry.dtype not in ("F32", "F16") or len(entries) != 1 or len(entry.shape) not in (2, 3):
        raise WireError("expected a single float32/float16 tensor 'logits' [N, C] or [P, N, C]")
    return read(body, entry, "logits").astype(np.float32)


def _error_body(resp: httpx.Response) -> dict[str, str]:
    """``code``, ``message``, ``field`` of an error answer, each a short one-line string ('' when absent or malformed)."""
    try:
        err = loads_json(resp.content, "error body", max_depth=4)
        err = err.get("error", {}) if isinstance(err, dict) else {}
    except WireError:
        err = {}
    err = err if isinstance(err, dict) else {}
    return {k: _one_line(err[k], 40 if k == "code" else 300) if isinstance(err.get(k), str) else "" for k in ("code", "message", "field")}


def _retry_after(resp: httpx.Response) -> float | None:
    try:
        value = float(resp.headers["Retry-After"][:32])
    except (KeyError, ValueError):
        return None
    return value if math.isfinite(value) and value >= 0 else None
