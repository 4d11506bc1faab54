"""Prices: what a provider's units (:class:`~craft_sdk.client.usage.ProviderUsage`) cost in money.

A :class:`PriceTable` holds the four rates providers publish (per million input tokens,
per million output tokens, per image, per request), in whatever currency the user
states them in; ``cost(usage)`` is their dot product with the counts. On the command
line: ``--price input_per_1m=3,output_per_1m=15,per_image=0.001,per_request=0``
(fields left out are 0).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..errors import ConfigError
from .usage import ProviderUsage


@dataclass(frozen=True)
class PriceTable:
    """What one unit of each provider count costs.

    Args:
        input_per_1m: price of one million input tokens.
        output_per_1m: price of one million output tokens.
        per_image: price of one image sent.
        per_request: price of one request sent.

    Example:
        >>> price = PriceTable.parse("input_per_1m=2,per_request=0.001")
        >>> round(price.cost(ProviderUsage(requests=10, input_tokens=500_000)), 6)
        1.01
    """

    input_per_1m: float = 0.0
    output_per_1m: float = 0.0
    per_image: float = 0.0
    per_request: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"price {f.name} must be a finite number >= 0, got {value!r}")

    def cost(self, usage: ProviderUsage) -> float:
        """The money ``usage`` costs at these prices."""
        return (
            usage.input_tokens * self.input_per_1m / 1e6
            + usage.output_tokens * self.output_per_1m / 1e6
            + usage.images * self.per_image
            + usage.requests * self.per_request
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> PriceTable:
        """From :meth:`to_dict` output; unknown keys are refused."""
        if not isinstance(data, dict):
            raise ConfigError("a price table must be a JSON object of rates")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown price field(s) {unknown}; valid: {sorted(known)}")
        return cls(**data)

    @classmethod
    def parse(cls, text: str) -> PriceTable:
        """``"input_per_1m=3,output_per_1m=15,per_image=0.001,per_request=0"`` (fields left out are 0)."""
        known = [f.name for f in fields(cls)]
        values: dict[str, float] = {}
        for part in (p.strip() for p in str(text).split(",")):
            name, sep, raw = part.partition("=")
            name = name.strip()
            if not sep or name not in known:
                raise ConfigError(f"--price takes NAME=VALUE pairs separated by commas (NAME one of {', '.join(known)}), got {part!r}")
            if name in values:
                raise ConfigError(f"--price names {name} twice; give each rate once")
            try:
                values[name] = float(raw)
            except ValueError:
                raise ConfigError(f"--price {name} must be a number, got {raw.strip()!r}") from None
        return cls(**values)


def cost_of(price: PriceTable | None, usage: ProviderUsage) -> float | None:
    """``price.cost(usage)`` rounded to 1e-9, or None without a price table."""
    return None if price is None else round(price.cost(usage), 9)


def usage_summary(usage: ProviderUsage, n_predictions: int, price: PriceTable | None) -> dict[str, Any]:
    """``provider_usage``, its ``cost`` (None without a price) and both per 1,000 predictions (``per_1000_images``:
    one prediction is one image; None without predictions).

    Example:
        >>> usage_summary(ProviderUsage(requests=4, images=4), 4, PriceTable(per_request=0.01))["per_1000_images"]["cost"]
        10.0
    """
    cost = cost_of(price, usage)
    scale = 1000.0 / n_predictions if n_predictions else 0.0
    per: dict[str, Any] = {k: round(v * scale, 3) for k, v in usage.to_dict().items()}
    per["cost"] = None if cost is None else round(cost * scale, 9)
    return {"provider_usage": usage.to_dict(), "cost": cost, "per_1000_images": per if n_predictions else None}
