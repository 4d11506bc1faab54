"""Exception hierarchy: every error the SDK raises on purpose is a ``CraftError``.

Each subclass also inherits the built-in exception that fits, so callers may
catch either (``except ValueError`` keeps working for bad input).
"""

from __future__ import annotations

import importlib
from typing import Any


class CraftError(Exception):
    """Base class of all craft-sdk errors."""


class ConfigError(CraftError, ValueError):
    """A configuration value is invalid."""


class DataError(CraftError, ValueError):
    """A dataset is unusable (empty class, too few images, unreadable files...)."""


class AdapterError(CraftError, ValueError):
    """An adapter directory or file is missing, corrupt or inconsistent."""


class ClientError(CraftError, RuntimeError):
    """A black-box client failed or was used incorrectly.

    ``unbilled`` is True when the failed call certainly cost no query (the service refused it
    before computing, or it never reached the service), so a ledger that charged it refunds it.
    ``billed`` is the exact number of queries the service billed for a call it stopped part-way
    (a 413 ``compute_budget``: the chunks it computed); a ledger refunds the rest. None: unknown.
    """

    unbilled: bool = False
    billed: int | None = None

    def __init__(self, message: str = "", *, unbilled: bool = False, billed: int | None = None) -> None:
        super().__init__(message)
        self.unbilled = unbilled
        self.billed = billed


class ComputeBudgetError(ClientError):
    """The service stopped a request at its per-request compute budget (HTTP 413 ``compute_budget``); ``billed``
    counts the queries it computed. Split the population (``MeteredClient`` does, in halves)."""


class BudgetExceededError(ClientError):
    """A query would exceed the hard query budget; it was refused before being sent."""


class UnknownHandleError(ClientError):
    """An image-set handle is unknown or was evicted; upload the images again."""


class DriftError(CraftError, RuntimeError):
    """The black box no longer behaves as when the adapter was tuned (its drift canary moved); see ``craft-sdk check``."""


class NotFittedError(CraftError, ValueError, AttributeError):
    """An estimator was used before anything was learned (a ValueError and an AttributeError, as scikit-learn's)."""


class StoreError(CraftError, RuntimeError):
    """The server's state store is unavailable or lost its data; metered routes refuse (503) until it is back."""


class MissingDependencyError(ConfigError, AdapterError, ClientError, ImportError):
    """An optional dependency is not installed; the message names the ``pip install`` that fixes it.

    Raised only by :func:`require`. It is an ``ImportError``, and also each error a missing package
    raised before there was one rule (``ConfigError``, ``AdapterError``, ``ClientError``), so every
    caller's ``except`` keeps catching it. Being a ``ConfigError``, the CLI exits 2 for it.
    """


# Where a module's pip distribution has another name than the module.
_DISTRIBUTIONS = {"yaml": "pyyaml", "open_clip": "open_clip_torch"}


def require(module: str, extra: str | None, purpose: str, *, otherwise: str = "") -> Any:
    """Import the optional ``module`` (dotted names allowed), or raise :class:`MissingDependencyError`.

    The message reads ``"<purpose> needs <package>: pip install 'craft-sdk[<extra>]' (or pip install
    <package>)"``, then ``"; or <otherwise>"`` when given; ``extra=None`` names a base dependency (``pip install craft-sdk``). The one rule for a
    missing optional dependency: tests/test_errors.py checks every call names an extra of pyproject.toml
    that lists the package.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        missing = exc.name.split(".")[0] if exc.name and exc.name.split(".")[0] != top else top
        package = _DISTRIBUTIONS.get(missing, missing)
        target = f"'craft-sdk[{extra}]'" if extra else "craft-sdk"
        hint = f"; or {otherwise}" if otherwise else ""
        raise MissingDependencyError(f"{purpose} needs {package}: pip install {target} (or pip install {package}){hint}") from None
