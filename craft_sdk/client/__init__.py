"""Clients: the only door to the black-box model."""

from __future__ import annotations

from .base import DEFAULT_TEMPLATE, BaseClient, CallableClient, Capabilities, ImageSetHandle, PredictionClient
from .ledger import CATEGORIES, MeteredClient, QueryLedger
from .pricing import PriceTable
from .usage import ProviderUsage
from .zeroshot import TextOnlyClient, ZeroShotAPIClient

__all__ = [
    "CATEGORIES",
    "DEFAULT_TEMPLATE",
    "BaseClient",
    "CallableClient",
    "Capabilities",
    "ImageSetHandle",
    "MeteredClient",
    "PredictionClient",
    "PriceTable",
    "ProviderUsage",
    "QueryLedger",
    "TextOnlyClient",
    "ZeroShotAPIClient",
]
