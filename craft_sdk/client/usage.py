"""What a provider bills, in the provider's own units: requests, images sent, input and output tokens.

The ledger's unit (one prompt scored on one image set = one query) is the tuner's
unit; providers bill HTTP requests, images and tokens. Every client that talks to
a provider keeps a :class:`ProviderUsage` (``client.usage``) and adds to it as it
sends: one request per HTTP request sent (retries included: what a provider bills
at most), the images carried by those requests, and the tokens of the provider's
``usage`` field where it gives one (an estimate by the client's documented rule
where it does not). Clients that run in process report zeros.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

USAGE_FIELDS = ("requests", "images", "input_tokens", "output_tokens")


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

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready counts."""
        return {name: getattr(self, name) for name in USAGE_FIELDS}


def usage_of(client: Any) -> ProviderUsage:
    """The :class:`ProviderUsage` of a client (or of the client a wrapper holds); zeros for in-process clients."""
    seen = 0
    while client is not None and seen < 8:
        usage = getattr(client, "usage", None)
        if isinstance(usage, ProviderUsage):
            return usage
        client = getattr(client, "client", None)
        seen += 1
    return ProviderUsage()
