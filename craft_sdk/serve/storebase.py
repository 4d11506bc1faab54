"""The state-store contract every backend implements (:class:`Store`, :class:`Begin`) and the rules they
share (budget range, top-up, the usage report). The backends (:mod:`~craft_sdk.serve.store`,
:mod:`~craft_sdk.serve.redis_store`) import this module; it imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

IDEMPOTENCY_TTL_S = 24 * 3600
MAX_BUDGET = 10**15  # queries; integers below 2**53 stay exact everywhere (Redis' Lua numbers are doubles)
NO_METERS = ("{where} holds no meters (a new store, or one whose data was lost), and no budget was given; pass "
             "--budget-per-key N, or --no-budget to serve without limits")
LOST = ("the state store lost its data (a FLUSHALL, an eviction or a restart without persistence); metered routes refuse "
        "until the operator restores it or restarts the server with --budget-per-key")


@dataclass(frozen=True)
class Begin:
    """The outcome of :meth:`Store.begin`.

    ``status``: ``charged`` (compute; the charge is recorded), ``takeover`` (compute, already charged by a
    dead owner), ``replay`` (done before: ``digest`` of the answer and, where the store kept it, the
    ``answer`` itself), ``pending`` (a live owner is computing it), ``mismatch`` (the idempotency key was
    used for another request) or ``refused`` (over budget).
    """

    status: str
    digest: str | None = None
    answer: bytes | None = None


class Store:
    """The interface every backend implements (all methods are thread-safe and atomic).

    A store that cannot answer, or that lost its records (settings gone), raises
    :class:`~craft_sdk.errors.StoreError`: the server then refuses metered routes (503), never
    serving them unlimited.
    """

    lease_s: float = 10.0

    def begin(self, key: str, idem: str | None, request: str, n: int, owner: str) -> Begin:
        raise NotImplementedError

    def finish(self, key: str, idem: str, digest: str, answer: bytes | None = None, n: int = 0) -> bool:
        """Mark the pending record ``idem`` done; ``answer`` (the encoded response) is kept for replays for its TTL.

        A record already done (another process finished first) is left as it is. A record that is gone (another
        process took it over while this one was stalled, failed and refunded it) is re-created whole and its ``n``
        queries charged again, since this answer is being delivered; with ``n`` 0 nothing is written (never a
        partial record). That charge is budget-checked like :meth:`begin`'s: False when it would pass the key's
        budget (nothing written; the caller must not deliver the answer), else True.
        """
        raise NotImplementedError

    def abort(self, key: str, idem: str | None, n: int, owner: str | None = None) -> None:
        """Refund ``n`` queries of ``key`` and forget the pending record ``idem`` — only while ``owner`` still holds
        it pending (a process whose record was taken over refunds nothing; None: unconditionally)."""
        raise NotImplementedError

    def count_upload(self, key: str) -> None:
        raise NotImplementedError

    def usage(self, key: str) -> dict[str, Any]:
        """``{"used", "budget", "remaining", "uploads"}`` (budget and remaining None when unlimited)."""
        raise NotImplementedError

    def beat(self, owner: str) -> None:
        """Renew ``owner``'s lease (a live server process computing pending records)."""
        raise NotImplementedError

    def ping(self) -> None:
        """Return when the store can record a charge now; raise :class:`StoreError` (or the backend's error) if not."""

    def secret(self) -> bytes:
        """A random secret shared by every process on this store (image-set handles are derived from it)."""
        raise NotImplementedError

    def keys(self) -> list[str]:
        """Names of every key with a meter."""
        raise NotImplementedError

    def top_up(self, key: str, n: int) -> None:
        """Raise ``key``'s budget by ``n`` queries (from the default budget when it has none of its own)."""
        raise NotImplementedError

    def set_budget(self, key: str, budget: int | None) -> None:
        """Give ``key`` a budget of its own (None: back to the server's default)."""
        raise NotImplementedError

    def reset(self, key: str) -> None:
        """Set ``key``'s used queries to 0."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def report_usage(used: int, uploads: int, budget: int | None) -> dict[str, Any]:
    """What :meth:`Store.usage` returns."""
    return {"used": used, "budget": budget, "remaining": None if budget is None else max(0, budget - used), "uploads": uploads}


def is_int(x: Any) -> bool:
    """An int, not a bool."""
    return isinstance(x, int) and not isinstance(x, bool)


def check_budget(budget: int | None) -> None:
    """Refuse a budget that is not None or an integer from 0 to :data:`MAX_BUDGET` (one-line ConfigError)."""
    if budget is not None and (not is_int(budget) or not 0 <= budget <= MAX_BUDGET):
        raise ConfigError(f"a budget must be an integer from 0 to {MAX_BUDGET} or None, got {budget!r}")


def check_top_up(key: str, budget: int | None, n: Any) -> int:
    """The budget after topping ``key``'s ``budget`` up by ``n``, or a one-line ConfigError (nothing written)."""
    if not is_int(n) or not 1 <= n <= MAX_BUDGET:
        raise ConfigError(f"a top-up must be an integer from 1 to {MAX_BUDGET} queries, got {n!r}")
    if budget is None:
        raise ConfigError(f"key {key!r} has no budget to top up (unlimited); give it one with: craft-sdk serve-keys set-budget {key} N")
    if budget + n > MAX_BUDGET:
        raise ConfigError(f"topping up key {key!r} by {n} would give a budget of {budget + n}, over the limit of {MAX_BUDGET}")
    return budget + n


def new_store_budget(where: str, default_budget: int | None, budget_required: bool, unlimited: bool) -> None:
    """Refuse, before anything is written, to start a store that holds no meters without a budget when one is
    required (``craft-sdk serve`` fails closed: a flushed Redis or a deleted file must not mean "unlimited")."""
    if unlimited and default_budget is not None:
        raise ConfigError(f"give either a budget ({default_budget}) or no budget (unlimited), not both")
    if budget_required and default_budget is None and not unlimited:
        raise ConfigError(NO_METERS.format(where=where))


def stored_int(value: Any, key: str | None, what: str = "budget") -> int:
    """A meter value read back from a store as an int: a legacy integral float (``150.0``, written by an older
    craft-sdk) is that int; anything else (fractional, out of range, not a number) is a one-line StoreError
    naming ``key`` (None: the default budget) and the fix."""
    from ..errors import StoreError

    if is_int(value) and 0 <= value <= MAX_BUDGET:
        return int(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if number.is_integer() and 0 <= number <= MAX_BUDGET:
        return int(number)
    if key is None:
        raise StoreError(f"the default budget in the state is {str(value)[:40]!r}, not an integer from 0 to {MAX_BUDGET}; "
                         "restart the server with --budget-per-key N")
    fix = f"craft-sdk serve-keys set-budget {key} N" if what == "budget" else f"craft-sdk serve-keys reset {key}"
    raise StoreError(f"the {what} of key {key!r} in the state is {str(value)[:40]!r}, not an integer from 0 to {MAX_BUDGET}; fix it with {fix}")
