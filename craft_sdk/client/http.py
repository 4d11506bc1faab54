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
import hashlib
import json
import logging
import os
import random
import socket
import struct
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, TypeVar

import httpx
import numpy as np
from PIL import Image

from .._version import __version__
from ..errors import BudgetExceededError, ClientError, ConfigError
from ..images import ImageLike, images_fingerprint, to_pil_list
from .base import (
    DEFAULT_TEMPLATE,
    Capabilities,
    Images,
    ImageSetHandle,
    check_class_names,
    check_offsets,
    check_output,
)

logger = logging.getLogger(__name__)

API = "v1"
SAFETENSORS = "application/x-safetensors"
CHECKSUM_HEADER = "X-Craft-Body-SHA256"
IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_HEADER_BYTES = 16 << 20
RETRY_STATUSES = (429, 500, 502, 503, 504)
T = TypeVar("T")

# safetensors dtype codes understood on the wire
DTYPES: dict[str, np.dtype] = {
    "U8": np.dtype("uint8"),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
}


# ------------------------------------------------------------------ wire codec


class WireError(ValueError):
    """A body does not follow the wire format (the server answers 422; the client retries)."""

    def __init__(self, message: str, field: str = "body") -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors body, located but not yet read."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def encode(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors body (contiguous little-endian tensors + string metadata)."""
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata)


def parse(body: bytes) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Locate the tensors and metadata of a safetensors body without reading any tensor.

    Raises:
        WireError: the body is not a well-formed safetensors buffer.
    """
    if len(body) < 8:
        raise WireError("body is not safetensors: shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", body[:8])
    if n > min(MAX_HEADER_BYTES, len(body) - 8):
        raise WireError("body is not safetensors: header length exceeds the body")
    try:
        header = json.loads(body[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WireError("body is not safetensors: header is not JSON") from None
    if not isinstance(header, dict):
        raise WireError("body is not safetensors: header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise WireError("safetensors metadata must map strings to strings")
    data_len = len(body) - 8 - n
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        entries[name] = _entry(name, info, data_len, 8 + n)
    return entries, meta


def _entry(name: str, info: Any, data_len: int, base: int) -> TensorEntry:
    try:
        dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    except (TypeError, KeyError, ValueError):
        raise WireError(f"tensor {name!r} has a malformed header entry", name) from None
    if not all(isinstance(d, int) and d >= 0 for d in shape) or not isinstance(begin, int) or not isinstance(end, int):
        raise WireError(f"tensor {name!r} has a malformed shape or offsets", name)
    if not 0 <= begin <= end <= data_len:
        raise WireError(f"tensor {name!r} lies outside the body (truncated?)", name)
    size = DTYPES[dtype].itemsize if dtype in DTYPES else 0
    if size and end - begin != int(np.prod(shape, dtype=np.int64)) * size:
        raise WireError(f"tensor {name!r} byte length does not match its shape", name)
    return TensorEntry(dtype, shape, base + begin, base + end)


def read(body: bytes, entry: TensorEntry, name: str) -> np.ndarray:
    """The tensor ``entry`` of ``body`` as a read-only numpy array (no copy)."""
    if entry.dtype not in DTYPES:
        raise WireError(f"tensor {name!r} has unsupported dtype {entry.dtype}", name)
    return np.frombuffer(body, DTYPES[entry.dtype], offset=entry.start, count=(entry.end - entry.start) // DTYPES[entry.dtype].itemsize).reshape(entry.shape)


def encode_images(images: Sequence[Image.Image]) -> bytes:
    """RGB pixels as a safetensors body: ``images`` [N, H, W, 3] if all sizes agree, else ``image.{i:06d}``."""
    arrays = [np.asarray(im.convert("RGB") if im.mode != "RGB" else im, dtype=np.uint8) for im in images]
    if len({a.shape for a in arrays}) == 1:
        return encode({"images": np.stack(arrays)})
    return encode({f"image.{i:06d}": a for i, a in enumerate(arrays)})


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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
    """A transient fault: wait and try again."""

    def __init__(self, cause: str, retry_after: float | None = None) -> None:
        super().__init__(cause)
        self.retry_after = retry_after


class _HandleGone(Exception):
    """The server no longer holds the image set (evicted or restarted)."""


class HTTPClient:
    """A prediction-only black box behind a ``craft-sdk serve`` endpoint.

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
        known = {f.name for f in fields(HTTPClientConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown HTTPClient option(s) {unknown}; valid: {sorted(known)}")
        self.config = replace(config or HTTPClientConfig(), **overrides)
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"url must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        key = api_key if api_key is not None else os.environ.get("CRAFT_API_KEY")
        if not key:
            raise ConfigError("HTTPClient needs an API key: pass api_key=... (CLI: --api-key-file) or set CRAFT_API_KEY")
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
        self._caps: dict[str, Capabilities] = {}
        self._limits: dict[str, Any] | None = None
        self._sets: OrderedDict[str, tuple[list[Image.Image], str | None]] = OrderedDict()
        self._lock = threading.Lock()
        self._jitter = random.Random()

    # ------------------------------------------------------------------ plumbing

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> HTTPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, what: str, send: Callable[[], httpx.Response], parse_ok: Callable[[httpx.Response], T]) -> T:
        """Send with retries; ``parse_ok`` turns a 2xx response into the result (WireError = corrupt body)."""
        c = self.config
        cause = "no attempt made"
        for attempt in range(c.max_retries + 1):
            retry_after = None
            try:
                return parse_ok(self._checked(send()))
            except _Retry as exc:
                cause, retry_after = str(exc), exc.retry_after
            except WireError as exc:
                cause = f"corrupt response body ({exc})"
            except (httpx.UnsupportedProtocol, httpx.LocalProtocolError) as exc:  # our request is wrong: retrying won't help
                raise ClientError(f"{what} at {self.url} cannot be sent: {exc.__class__.__name__}: {str(exc)[:160]}") from None
            except httpx.TimeoutException as exc:
                cause = f"timed out ({exc.__class__.__name__})"
            except httpx.TransportError as exc:
                cause = f"connection failed ({exc.__class__.__name__}: {str(exc)[:120]})"
            if attempt == c.max_retries:
                break
            delay = self._delay(attempt, retry_after)
            logger.warning("%s failed (%s); retry %d of %d in %.2fs", what, cause, attempt + 1, c.max_retries, delay)
            time.sleep(delay)
        raise ClientError(
            f"{what} at {self.url} failed after {c.max_retries + 1} attempts: {cause}; "
            "check that the server is up (a tune with --checkpoint-dir can be resumed)"
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
                raise _Retry(f"response body does not match its {CHECKSUM_HEADER} (truncated?)")
            return resp
        err = _error_body(resp)
        code, message = err.get("code", ""), str(err.get("message", resp.reason_phrase))[:300]
        if resp.status_code == 429 and code == "budget_exceeded":
            raise BudgetExceededError(f"the server refused the query: {message}")
        if resp.status_code in RETRY_STATUSES:
            raise _Retry(f"HTTP {resp.status_code} {code or resp.reason_phrase}", _retry_after(resp))
        if resp.status_code == 404 and code == "unknown_handle":
            raise _HandleGone(message)
        if resp.status_code == 401:
            raise ClientError(f"{self.url} rejected the API key (401); check --api-key-file / CRAFT_API_KEY")
        field = f" (field {err['field']})" if err.get("field") else ""
        raise ClientError(f"{self.url} refused the request with HTTP {resp.status_code}{field}: {message}")

    # ------------------------------------------------------------------ protocol

    def capabilities(self, template: str = DEFAULT_TEMPLATE) -> Capabilities:
        """What the served model can do for ``template`` (fetched once per template)."""
        if template not in self._caps:
            data = self._call(
                "GET /capabilities",
                lambda: self._http.get("/capabilities", params={"template": template}),
                lambda r: _json(r),
            )
            if not isinstance(data, dict):
                raise ClientError(f"{self.url} sent capabilities that are not a JSON object; is it a craft-sdk server?")
            known = {f.name for f in fields(Capabilities)}
            try:
                caps = Capabilities(**{k: v for k, v in data.items() if k in known})
            except (TypeError, ConfigError) as exc:
                raise ClientError(f"{self.url} sent unusable capabilities: {exc}") from None
            self._caps[template] = caps
        return self._caps[template]

    def limits(self) -> dict[str, Any]:
        """The server's size limits (fetched once)."""
        if self._limits is None:
            data = self._call("GET /limits", lambda: self._http.get("/limits"), _json)
            self._limits = data if isinstance(data, dict) else {}
        return self._limits

    def upload(self, images: Sequence[ImageLike]) -> ImageSetHandle:
        """Send ``images`` once; the server caches their features. Not billed."""
        pil = to_pil_list(images)
        fp = images_fingerprint(pil)
        with self._lock:
            known = self._sets.get(fp)
            if known is not None and known[1] is not None:
                self._sets.move_to_end(fp)
                return ImageSetHandle(fp, len(pil))
        server_id = self._send_images(pil)
        with self._lock:
            self._sets[fp] = (pil, server_id)
            while len(self._sets) > self.config.cache_size:
                self._sets.popitem(last=False)
        return ImageSetHandle(fp, len(pil))

    def _send_images(self, pil: list[Image.Image]) -> str:
        limits = self.limits()
        if limits.get("max_images") and len(pil) > limits["max_images"]:
            raise ClientError(f"{len(pil)} images exceed the server's limit of {limits['max_images']} per set; split them")
        body = encode_images(pil)
        if limits.get("max_body_bytes") and len(body) > limits["max_body_bytes"]:
            raise ClientError(
                f"the image set is {len(body)} bytes, over the server's {limits['max_body_bytes']}-byte limit; "
                "upload fewer or smaller images"
            )
        data = self._call(
            "POST /image-sets",
            lambda: self._http.post("/image-sets", content=body, headers={"Content-Type": SAFETENSORS}),
            _json,
        )
        handle = data.get("handle") if isinstance(data, dict) else None
        if not isinstance(handle, str) or data.get("n_images") != len(pil):
            raise ClientError(f"{self.url} answered an upload with an unexpected body; is it a craft-sdk server?")
        return handle

    def _server_handle(self, images: Images) -> tuple[str, int]:
        """(fingerprint, n) of an image set the client can re-upload."""
        if isinstance(images, ImageSetHandle):
            with self._lock:
                if images.id not in self._sets:
                    raise ClientError(f"unknown or evicted image-set handle {images.id[:12]}; upload the images again")
                self._sets.move_to_end(images.id)
            return images.id, images.n_images
        handle = self.upload(images)
        return handle.id, handle.n_images

    def predict(
        self,
        images: Images,
        class_names: Sequence[str],
        template: str = DEFAULT_TEMPLATE,
        offsets: np.ndarray | None = None,
    ) -> np.ndarray:
        """Logits [N, C] (no or [n_ctx, d] offsets) or [P, N, C] (offsets [P, n_ctx, d]), float32."""
        names = check_class_names(class_names)
        caps = self.capabilities(template)
        batch = check_offsets(offsets, caps)
        fp, n = self._server_handle(images)
        single = offsets is None or np.ndim(offsets) == 2
        step = self.config.max_batch
        cap = self.limits().get("max_population")
        per_request = 0 if batch is None else min(step or batch.shape[0], batch.shape[0])
        if cap and per_request > cap:
            raise ClientError(
                f"{per_request} candidate offsets per request exceed the server's max_population of {cap}; "
                f"pass max_batch={cap} (chunked results may differ in the last bits)"
            )
        if batch is None or step is None or batch.shape[0] <= step:
            chunks: list[np.ndarray | None] = [batch]
        else:
            chunks = [batch[i : i + step] for i in range(0, batch.shape[0], step)]
        if len(chunks) == 1:
            outs = [self._predict_chunk(fp, names, template, chunks[0])]
        else:
            with concurrent.futures.ThreadPoolExecutor(self.config.max_concurrency) as pool:
                outs = list(pool.map(lambda ch: self._predict_chunk(fp, names, template, ch), chunks))
        p = 1 if batch is None else batch.shape[0]
        out = check_output(np.concatenate(outs), p, n, len(names), caps.model_id)
        return out[0] if single else out

    def _predict_chunk(self, fp: str, names: list[str], template: str, offsets: np.ndarray | None) -> np.ndarray:
        """Scores [P, N, C] for one request; one idempotency key across its retries and re-uploads."""
        tensors = {} if offsets is None else {"offsets": np.ascontiguousarray(offsets, dtype=np.float32)}
        for _ in range(3):
            idem = uuid.uuid4().hex  # one key for all retries of this request; a new one after a 404
            with self._lock:
                entry = self._sets.get(fp)
            if entry is None:
                raise ClientError("the image set was evicted from the client cache; upload the images again")
            pil, server_id = entry
            if server_id is None:
                server_id = self._send_images(pil)
                with self._lock:
                    self._sets[fp] = (pil, server_id)
            request = {"handle": server_id, "class_names": names, "template": template, "logits_dtype": self.config.logits_dtype}
            body = encode(tensors, {"request": json.dumps(request)})
            headers = {"Content-Type": SAFETENSORS, IDEMPOTENCY_HEADER: idem}
            try:
                logits = self._call("POST /predict", functools.partial(self._http.post, "/predict", content=body, headers=headers), _logits)
            except _HandleGone:
                logger.info("server no longer holds image set %s; uploading it again", fp[:12])
                with self._lock:
                    if fp in self._sets:
                        self._sets[fp] = (pil, None)
                continue
            return logits if logits.ndim == 3 else logits[None]
        raise ClientError(f"{self.url} keeps forgetting uploaded image sets; raise the server's cache size")

    # --------------------------------------------------------------------- extras

    def usage(self) -> dict[str, Any]:
        """Queries used and left for this key, as the server counts them."""
        return self._call("GET /usage", lambda: self._http.get("/usage"), _json)

    def health(self) -> dict[str, Any]:
        """The server's health document (no key needed)."""
        return self._call("GET /health", lambda: self._http.get("/health"), _json)


def _json(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise WireError("expected a JSON body") from None


def _logits(resp: httpx.Response) -> np.ndarray:
    body = resp.content
    entries, _ = parse(body)
    entry = entries.get("logits")
    if entry is None or entry.dtype not in ("F32", "F16") or len(entries) != 1:
        raise WireError("expected a single float32/float16 tensor 'logits'")
    return read(body, entry, "logits").astype(np.float32)


def _error_body(resp: httpx.Response) -> dict[str, Any]:
    try:
        err = resp.json().get("error", {})
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return {}
    return err if isinstance(err, dict) else {}


def _retry_after(resp: httpx.Response) -> float | None:
    try:
        return max(0.0, float(resp.headers["Retry-After"]))
    except (KeyError, ValueError):
        return None
