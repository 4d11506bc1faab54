"""The query ledger: every billable query counted, the budget a hard ceiling.

One query = one candidate prompt scored on one image set (the paper's unit). A
call is charged *before* it is sent; a call that would exceed the budget is
refused with :class:`~craft_sdk.errors.BudgetExceededError` and never sent.
Queries are counted per purpose (``search``: CMA-ES candidates, ``refine``: the
current prompt scored to train the refiner, ``validation``: model selection,
``eval``: test-set evaluation, ``predict``: deployment, ``canary``: the drift canary, recorded at
tune time and re-scored by ``craft-sdk check``; see :mod:`craft_sdk.canary`).

Next to queries, the ledger records what the provider billed, in its own units
(:class:`~craft_sdk.client.usage.ProviderUsage`: requests, images, input/output tokens),
per category (uploads under ``upload``), journaled like the charges so a resumed run keeps
them. With a :class:`~craft_sdk.client.pricing.PriceTable` they become money, and
``max_cost`` is a hard ceiling like the budget: before each call the client's estimate of
the call (``estimate_usage``) is priced and reserved, and a call whose estimate does not
fit beside what was spent and what calls in flight reserved is refused, never sent. After
the call its actual usage replaces the reservation. A call's retries are counted as sent
(what a provider bills at most), so a call that needed retries can cost more than its
estimate: the ceiling then refuses every later call.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BudgetExceededError, ClientError, ConfigError
from ..images import ImageLike
from ..wire import query_cost
from .base import DEFAULT_TEMPLATE, Capabilities, Images, ImageSetHandle, PredictionClient
from .pricing import PriceTable, cost_of
from .usage import ProviderUsage, estimate_call, estimate_upload, usage_of

logger = logging.getLogger(__name__)

CATEGORIES = ("search", "refine", "validation", "eval", "predict", "canary")
USAGE_CATEGORIES = (*CATEGORIES, "upload")  # provider usage is also counted for uploads (no query)


def repair_journal(path: Path) -> None:
    """End a torn last line of a query journal (a kill during an append) so later appends stay parseable.

    The torn charge itself is dropped when the journal is replayed: it was never sent,
    because a charge is fsynced before its query goes out.
    """
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())


class QueryLedger:
    """Counts queries per category against an optional hard budget.

    Args:
        budget: maximum total queries; None means unlimited (still counted).
        journal: optional JSON-lines file; each charge is appended and fsynced
            before the call is sent, so a crash never loses a billed query.
        price: optional :class:`PriceTable`: turns provider usage into money (``cost``).
        max_cost: optional hard ceiling on ``cost`` (needs ``price``), checked before each call.

    Example:
        >>> ledger = QueryLedger(budget=100)
        >>> ledger.charge(40, "search")
        >>> ledger.used, ledger.remaining
        (40, 60)
    """

    def __init__(
        self,
        budget: int | None = None,
        journal: str | Path | None = None,
        *,
        price: PriceTable | None = None,
        max_cost: float | None = None,
    ) -> None:
        if budget is not None and budget < 0:
            raise ConfigError(f"budget must be >= 0 or None, got {budget}")
        if max_cost is not None:
            if price is None:
                raise ConfigError("max_cost is money: give a price table too (CLI: --price input_per_1m=...,per_request=...)")
            if isinstance(max_cost, bool) or not isinstance(max_cost, (int, float)) or not max_cost >= 0 or max_cost == float("inf"):
                raise ConfigError(f"max_cost must be a finite number >= 0, got {max_cost!r}")
        self.budget = budget
        self.price = price
        self.max_cost = None if max_cost is None else float(max_cost)
        self.counts: dict[str, int] = {c: 0 for c in CATEGORIES}
        self.usage_by_category: dict[str, ProviderUsage] = {c: ProviderUsage() for c in USAGE_CATEGORIES}
        self.uploads = 0
        self._reserved = 0.0  # priced estimates of the calls in flight
        self._meters: dict[int, _Meter] = {}  # per client usage counter: what was already recorded
        self._journal = Path(journal) if journal is not None else None
        self._lock = threading.Lock()
        if self._journal is not None and self._journal.exists():
            repair_journal(self._journal)
            self._replay_journal()

    @property
    def used(self) -> int:
        """Total queries charged, all categories."""
        return sum(self.counts.values())

    @property
    def remaining(self) -> int | None:
        """Queries left under the budget (None when unlimited)."""
        return None if self.budget is None else self.budget - self.used

    def can_afford(self, n: int) -> bool:
        """Whether ``n`` more queries fit under the budget."""
        return self.budget is None or self.used + n <= self.budget

    @property
    def usage(self) -> ProviderUsage:
        """Provider usage recorded, all categories."""
        total = ProviderUsage()
        for u in self.usage_by_category.values():
            total = total.plus(u)
        return total

    @property
    def cost(self) -> float | None:
        """What the recorded usage cost at ``price`` (None without a price table)."""
        return cost_of(self.price, self.usage)

    def can_afford_usage(self, estimate: ProviderUsage) -> bool:
        """Whether a call estimated at ``estimate`` fits under ``max_cost`` now (always True without one)."""
        if self.max_cost is None or self.price is None:
            return True
        with self._lock:
            return self._fits(self.price.cost(estimate))

    def _fits(self, amount: float) -> bool:
        assert self.price is not None and self.max_cost is not None
        return self.price.cost(self.usage) + self._reserved + amount <= self.max_cost * (1 + 1e-12)

    def reserve(self, estimate: ProviderUsage, what: str) -> float:
        """Reserve the priced ``estimate`` of a call under ``max_cost`` (0 without one), or refuse the call."""
        if self.max_cost is None or self.price is None:
            return 0.0
        amount = self.price.cost(estimate)
        with self._lock:
            if not self._fits(amount):
                spent = self.price.cost(self.usage)
                raise BudgetExceededError(
                    f"cost ceiling reached: {spent:.6g} spent and {self._reserved:.6g} in flight of --max-cost "
                    f"{self.max_cost:.6g}; the next call ({what}) is estimated at {amount:.6g}; raise --max-cost to continue",
                    unbilled=True,
                )
            self._reserved += amount
        return amount

    def release(self, amount: float) -> None:
        """Give back a reservation (the call ended: its actual usage is recorded instead)."""
        with self._lock:
            self._reserved = max(self._reserved - amount, 0.0)

    def open_call(self, meter: ProviderUsage) -> None:
        """A call through a client counting into ``meter`` starts (see :meth:`close_call`)."""
        with self._lock:
            entry = self._meters.get(id(meter))
            if entry is None or entry.in_flight == 0:  # usage made outside this ledger since is not ours
                entry = self._meters[id(meter)] = _Meter(meter, meter.snapshot())
            entry.in_flight += 1

    def close_call(self, meter: ProviderUsage, category: str) -> ProviderUsage:
        """Record what ``meter`` counted since it was last recorded (exact for one call at a time; calls
        that overlap are each counted once, under the category of the call that ends first)."""
        with self._lock:
            entry = self._meters[id(meter)]
            now = meter.snapshot()
            delta, entry.seen = now.minus(entry.seen), now
            entry.in_flight -= 1
            self._record_usage(delta, category)
            return delta

    def _record_usage(self, delta: ProviderUsage, category: str) -> None:
        if delta.is_zero():
            return
        self.usage_by_category[category] = self.usage_by_category[category].plus(delta)
        if self._journal is not None:
            self._append({"usage": delta.to_dict(), "category": category})

    def charge(self, n: int, category: str) -> None:
        """Record ``n`` queries for ``category``, or refuse if they exceed the budget."""
        if category not in self.counts:
            raise ConfigError(f"unknown query category {category!r}; use one of {CATEGORIES}")
        with self._lock:
            if not self.can_afford(n):
                raise BudgetExceededError(
                    f"query budget exhausted: {self.used} of {self.budget} used, {n} more requested "
                    f"({category}); raise --budget to continue"
                )
            self.counts[category] += n
            if self._journal is not None:
                self._append({"n": n, "category": category})

    def refund(self, n: int, category: str) -> None:
        """Take back ``n`` queries of ``category`` that the black box certainly did not bill (journaled too)."""
        if category not in self.counts:
            raise ConfigError(f"unknown query category {category!r}; use one of {CATEGORIES}")
        with self._lock:
            n = min(n, self.counts[category])
            self.counts[category] -= n
            if self._journal is not None and n:
                self._append({"n": -n, "category": category})

    def _append(self, record: dict[str, Any]) -> None:
        assert self._journal is not None
        with open(self._journal, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _replay_journal(self) -> None:
        assert self._journal is not None
        for line in self._journal.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("ignoring a torn line at the end of ledger journal %s", self._journal)
                continue
            if "usage" in rec:
                cat = rec["category"]
                self.usage_by_category[cat] = self.usage_by_category[cat].plus(ProviderUsage.from_dict(rec["usage"]))
            else:
                self.counts[rec["category"]] += int(rec["n"])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: budget, used, per-category counts, uploads, provider usage (total and per
        category), and with a price table its cost, the prices and ``max_cost``."""
        return {
            "budget": self.budget,
            "used": self.used,
            "counts": dict(self.counts),
            "uploads": self.uploads,
            "usage": self.usage.to_dict(),
            "usage_by_category": {c: u.to_dict() for c, u in self.usage_by_category.items() if not u.is_zero()},
            "cost": self.cost,
            "price": None if self.price is None else self.price.to_dict(),
            "max_cost": self.max_cost,
        }


class _Meter:
    """A client's usage counter as a ledger watches it: the counts already recorded, calls in flight."""

    def __init__(self, meter: ProviderUsage, seen: ProviderUsage) -> None:
        self.meter = meter  # held so its id is not reused while watched
        self.seen = seen
        self.in_flight = 0


class MeteredClient:
    """A client wrapped by a ledger: every ``predict`` is charged before it is sent.

    Args:
        client: any :class:`PredictionClient`.
        ledger: the ledger to charge.
    """

    def __init__(self, client: PredictionClient, ledger: QueryLedger) -> None:
        self.client = client
        self.ledger = ledger

    def capabilities(self, template: str = DEFAULT_TEMPLATE) -> Capabilities:
        return self.client.capabilities(template)

    def upload(self, images: Sequence[ImageLike]) -> ImageSetHandle:
        """Upload through the client; its provider usage (if any) is recorded under ``upload``."""
        reserved = self.ledger.reserve(estimate_upload(self.client, len(images)), "upload")
        meter = usage_of(self.client)
        self.ledger.open_call(meter)
        try:
            handle = self.client.upload(images)
        finally:
            self.ledger.close_call(meter, "upload")
            self.ledger.release(reserved)
        self.ledger.uploads += 1
        return handle

    def predict(
        self,
        images: Images,
        class_names: Sequence[str],
        template: str = DEFAULT_TEMPLATE,
        offsets: np.ndarray | None = None,
        *,
        category: str = "predict",
    ) -> np.ndarray:
        """Charge the ledger (one query per candidate offset), then call the client.

        A call that fails with a :class:`~craft_sdk.errors.ClientError` marked ``unbilled`` (refused by the
        service before computing, or never delivered) is refunded, so the ledger equals the service's bill.
        With a ``max_cost``, the call's priced estimate (the client's ``estimate_usage``) is reserved
        first and the call refused when it does not fit; the usage the client counted is recorded after.
        """
        n = query_cost(offsets)
        n_images = images.n_images if isinstance(images, ImageSetHandle) else len(images)
        uploaded = isinstance(images, ImageSetHandle)
        estimate = estimate_call(self.client, n_images, class_names, template, n, uploaded=uploaded) if self.ledger.max_cost is not None else ProviderUsage()
        reserved = self.ledger.reserve(estimate, f"{category}, {n} quer{'y' if n == 1 else 'ies'} on {n_images} images")
        try:
            self.ledger.charge(n, category)
        except BaseException:
            self.ledger.release(reserved)
            raise
        meter = usage_of(self.client)
        self.ledger.open_call(meter)
        try:
            return self.client.predict(images, class_names, template, offsets)
        except ClientError as exc:
            if exc.unbilled:
                self.ledger.refund(n, category)
            raise
        finally:
            self.ledger.close_call(meter, category)
            self.ledger.release(reserved)
