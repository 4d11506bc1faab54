"""What a provider bills, in the provider's own units: requests, images sent, input and output tokens.

The ledger's unit (one prompt scored on one image set = one query) is the tuner's
unit; providers bill HTTP requests, images and tokens. Every client that talks to
a provider keeps a :class:`ProviderUsage` (``client.usage``) and adds to it as it
sends: one request per HTTP request sent (retries included: what a provider bills
at most), the images carried by those requests, and the tokens of the provider's
``usage`` field where it gives one (an estimate by the client's documented rule
where it does not). Clients that run in process report zeros.

**Every send attempt passes a gate first** (:func:`before_send`): a client calls it with the
attempt's upper bound (:func:`attempt_bound`) before each HTTP attempt, the first and each retry.
A :class:`~craft_sdk.client.ledger.QueryLedger` with a ``max_cost`` installs the gate for the
duration of a call (:func:`send_gate`) and refuses an attempt that would pass the ceiling, so
nothing is sent. The gate travels into the client's request threads with the call's context
(:func:`submit`).
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import inspect
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

USAGE_FIELDS = ("requests", "images", "input_tokens", "output_tokens")
TEMPLATE_TOKENS = 16  # tokens a chat template adds to a request at most (role markers, separators)
TEXT_TOKENS = 2  # tokens an embedding input adds at most (begin/end markers)


@dataclass
class ProviderUsage:
    """Counters of what was sent to a provider; thread-safe ``add``.

    Example:
        >>> u = ProviderUsage()
        >>> u.add(requests=2, images=2, input_tokens=300, output_tokens=2)
        >>> u.to_dict()
        {'requests': 2, 'images': 2, 'input_tokens': 300, 'output_tokens': 2}
    """

    requests: int = 0
    images: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, *, requests: int = 0, images: int = 0, input_tokens: int = 0, output_tokens: int = 0) -> None:
        """Add counts (each a non-negative int)."""
        with self._lock:
            self.requests += int(requests)
            self.images += int(images)
            self.input_tokens += int(input_tokens)
            self.output_tokens += int(output_tokens)

    def snapshot(self) -> ProviderUsage:
        """A copy of the current counts."""
        with self._lock:
            return ProviderUsage(self.requests, self.images, self.input_tokens, self.output_tokens)

    def minus(self, other: ProviderUsage) -> ProviderUsage:
        """The counts added since ``other`` (a :meth:`snapshot`)."""
        return ProviderUsage(
            self.requests - other.requests,
            self.images - other.images,
            self.input_tokens - other.input_tokens,
            self.output_tokens - other.output_tokens,
        )

    def plus(self, other: ProviderUsage) -> ProviderUsage:
        """The sum of two counts (a new object)."""
        return ProviderUsage(*(getattr(self, n) + getattr(other, n) for n in USAGE_FIELDS))

    def times(self, k: int) -> ProviderUsage:
        """The counts of ``k`` such calls (a new object)."""
        return ProviderUsage(*(getattr(self, n) * int(k) for n in USAGE_FIELDS))

    def is_zero(self) -> bool:
        """Whether nothing was counted."""
        return not any(getattr(self, n) for n in USAGE_FIELDS)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready counts."""
        return {name: getattr(self, name) for name in USAGE_FIELDS}

    @classmethod
    def from_dict(cls, data: Any) -> ProviderUsage:
        """Counts from :meth:`to_dict` output (missing fields 0; anything else but non-negative ints refused)."""
        if not isinstance(data, dict):
            raise ValueError("provider usage must be a JSON object of counts")
        values = [data.get(n, 0) for n in USAGE_FIELDS]
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in values):
            raise ValueError(f"provider usage counts must be non-negative integers, got {data!r:.120}")
        return cls(*values)


def usage_of(client: Any) -> ProviderUsage:
    """The :class:`ProviderUsage` of a client (or of the client a wrapper holds); zeros for in-process clients.

    A client keeps it as ``usage`` (or ``provider_usage`` where ``usage`` already names something
    else, as :class:`~craft_sdk.client.http.HTTPClient`'s server-side ``usage()``)."""
    seen = 0
    while client is not None and seen < 8:
        for name in ("usage", "provider_usage"):
            usage = getattr(client, name, None)
            if isinstance(usage, ProviderUsage):
                return usage
        client = getattr(client, "client", None)
        seen += 1
    return ProviderUsage()


def _estimator(client: Any, name: str) -> Any:
    seen = 0
    while client is not None and seen < 8:
        method = getattr(client, name, None)
        if callable(method):
            return method
        client = getattr(client, "client", None)
        seen += 1
    return None


def estimate_call(
    client: Any, n_images: int, class_names: Sequence[str], template: str, n_prompts: int = 1, *, uploaded: bool = True,
    seen: bool = False,
) -> ProviderUsage:
    """The client's pre-send estimate of one ``predict`` call (its ``estimate_usage``); zeros for a
    client without one (in-process clients, which bill nothing). ``uploaded``: the call is on an
    uploaded image set, passed on as ``images_cached`` to an ``estimate_usage`` that takes it (a client
    that pays for images at upload, as the embedding client, or at predict, as a ``craft-sdk serve`` URL
    given raw images). ``seen``: the call's context was scored before, passed on as ``texts_cached``
    (the embedding client embeds a text once)."""
    method = _estimator(client, "estimate_usage")
    if method is None:
        return ProviderUsage()
    params = inspect.signature(method).parameters
    extra: dict[str, bool] = {}
    if "images_cached" in params:
        extra["images_cached"] = uploaded
    if "texts_cached" in params:
        extra["texts_cached"] = seen
    return method(n_images, list(class_names), template, n_prompts, **extra)


def estimate_upload(client: Any, n_images: int, *, seen: int = 0) -> ProviderUsage:
    """The client's pre-send estimate of uploading ``n_images`` (its ``estimate_upload``); zeros without one
    (most shapes upload nothing: the images travel with each prediction). ``seen`` of them were in an
    earlier upload, passed on to an ``estimate_upload`` that takes it (a client that caches images by content)."""
    method = _estimator(client, "estimate_upload")
    if method is None:
        return ProviderUsage()
    if seen and "seen" in inspect.signature(method).parameters:
        return method(n_images, seen=seen)
    return method(n_images)

Gate = Callable[["ProviderUsage"], None]
_GATE: contextvars.ContextVar[Gate | None] = contextvars.ContextVar("craft_send_gate", default=None)


def attempt_bound(*, texts: Sequence[str] = (), images: int = 0, image_tokens: int = 0, output_tokens: int = 0,
                  overhead: int = 0) -> ProviderUsage:
    """An upper bound on what one HTTP attempt can bill: one request, its ``images``, one input token per
    UTF-8 byte of its ``texts`` (no tokenizer makes more tokens than bytes) plus ``overhead`` and
    ``image_tokens`` per image, and ``output_tokens`` (``max_tokens x n``, which the provider cannot pass)."""
    text = sum(len(t.encode("utf-8")) for t in texts)
    return ProviderUsage(1, int(images), text + int(overhead) + int(images) * int(image_tokens), int(output_tokens))


def before_send(bound: ProviderUsage) -> None:
    """Pass the gate of the current call (if any) before one send attempt bounded by ``bound``.

    Raises:
        BudgetExceededError: the attempt would pass ``max_cost``; it must not be sent.
    """
    gate = _GATE.get()
    if gate is not None:
        gate(bound)


@contextmanager
def send_gate(gate: Gate | None) -> Iterator[None]:
    """Install ``gate`` for the send attempts made inside the block (and in threads started with :func:`submit`)."""
    token = _GATE.set(gate)
    try:
        yield
    finally:
        _GATE.reset(token)


def submit(pool: concurrent.futures.Executor, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
    """``pool.submit(fn, *args)`` run in a copy of the caller's context, so the call's gate goes with it."""
    return pool.submit(contextvars.copy_context().run, fn, *args)
