"""craft-sdk: adapt a black-box vision-language model to few-shot classification (CraFT, ICML 2024).

Data flows one way: client (the only door to the model) → tuner (prompt search +
refiner) → adapter (config + tensors on disk) → classifier (client + adapter).
``import craft_sdk`` never imports torch; training needs the ``[train]`` extra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._deprecation import install as _install_moved_paths
from ._version import __version__
from .adapter import Adapter, AdapterConfig
from .adapter.export import export_onnx
from .api import check_compatible, create_client, evaluate, load_data, tune, tune_run
from .client import (
    DEFAULT_TEMPLATE,
    BaseClient,
    CallableClient,
    Capabilities,
    ImageSetHandle,
    MeteredClient,
    PredictionClient,
    PriceTable,
    ProviderUsage,
    QueryLedger,
)
from .data import DataSplits, ImageDataset, load_dataset
from .deploy.canary import CanaryReport, check_canary
from .deploy.classifier import ClassifierConfig, CraftClassifier, Predictions
from .errors import (
    AdapterError,
    BudgetExceededError,
    ClientError,
    ConfigError,
    CraftError,
    DataError,
    DriftError,
    MissingDependencyError,
    NotFittedError,
)

if TYPE_CHECKING:  # at run time a lazy export (__getattr__ below)
    from .tuner.config import TuneConfig

_install_moved_paths()  # the old import paths of moved modules, for one release (CHANGELOG: Deprecated)


def __getattr__(name: str) -> object:
    """Lazy exports: ``craft_sdk.HTTPClient`` imports httpx only when first used, ``craft_sdk.TuneConfig`` the
    tuner package (so that the deploy path loads no training module)."""
    if name == "HTTPClient":
        from .client.http import HTTPClient

        return HTTPClient
    if name == "TuneConfig":
        from .tuner.config import TuneConfig

        return TuneConfig
    raise AttributeError(f"module 'craft_sdk' has no attribute {name!r}")


def load_adapter(
    directory: str, verify_projection: bool = True, *, revision: str | None = None, subfolder: str | None = None
) -> Adapter:
    """Load an adapter directory or Hub repo id ``"org/name"``; see :meth:`Adapter.from_pretrained`."""
    return Adapter.from_pretrained(directory, verify_projection=verify_projection, revision=revision, subfolder=subfolder)


__all__ = [
    "DEFAULT_TEMPLATE",
    "Adapter",
    "AdapterConfig",
    "AdapterError",
    "BaseClient",
    "BudgetExceededError",
    "CallableClient",
    "CanaryReport",
    "Capabilities",
    "ClassifierConfig",
    "ClientError",
    "ConfigError",
    "CraftClassifier",
    "CraftError",
    "DataError",
    "DataSplits",
    "DriftError",
    "HTTPClient",
    "ImageDataset",
    "ImageSetHandle",
    "MeteredClient",
    "MissingDependencyError",
    "NotFittedError",
    "PredictionClient",
    "Predictions",
    "PriceTable",
    "ProviderUsage",
    "QueryLedger",
    "TuneConfig",
    "__version__",
    "check_canary",
    "check_compatible",
    "create_client",
    "evaluate",
    "export_onnx",
    "load_adapter",
    "load_data",
    "load_dataset",
    "tune",
    "tune_run",
]
