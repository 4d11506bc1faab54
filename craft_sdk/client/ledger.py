"""The query ledger: every billable query counted, the budget a hard ceiling.

One query = one candidate prompt scored on one image set (the paper's unit). A
call is charged *before* it is sent; a call that would exceed the budget is
refused with :class:`~craft_sdk.errors.BudgetExceededError` and never sent.
Queries are counted per purpose (``search``: CMA-ES candidates, ``refine``: the
current prompt scored to train the refiner, ``validation``: model selection,
``eval``: test-set evaluation, ``predict``: deployment, ``canary``: the drift canary, recorded at
tune time and re-scored by ``craft-sdk check``; see :mod:`craft_sdk.deploy.canary`).

Next to queries, the ledger records what the provider billed, in its own units
(:class:`~craft_sdk.client.usage.ProviderUsage`: requests, images, input/output tokens),
per category (uploads under ``upload``), journaled like the charges so a resumed run keeps
them. With a :class:`~craft_sdk.client.pricing.PriceTable` they become money, and
``max_cost`` is a hard ceiling like the budget, held per send attempt: before each call the
client's estimate of the call (``estimate_usage``) is priced and reserved, and a call whose
estimate does not fit beside what was spent and what calls in flight reserved is refused, never
sent. Then every HTTP attempt of the call, the first and each retry, reserves its upper bound
(:func:`~craft_sdk.client.usage.attempt_bound`: one request, its images, one token per byte of
its text, its ``max_tokens``) before it is sent, drawing first on the call's estimate; an attempt
that would pass the ceiling is refused (:class:`~craft_sdk.errors.BudgetExceededError`) and not
sent. When the call ends its actual usage is recorded and its reservations released in one step,
so spent + reserved never falls below what the provider can have billed, and the total never
passes the ceiling while the provider bills within the bounds.
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

from ..errors import BudgetExceededError, ClientError, ComputeBudgetError, ConfigError
from ..images import ImageLike
from ..wire import query_cost
from .base import DEFAULT_TEMPLATE, Capabilities, Images, ImageSetHandle, PredictionClient
from .pricing import PriceTable, cost_of
from .usage import Gate, ProviderUsage, estimate_call, estimate_upload, send_gate, usage_of

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

    def reserve(self, estimate: ProviderUsage, what: str) -> Reservation:
        """Reserve the priced ``estimate`` of a call under ``max_cost`` (nothing without one), or refuse the call.

        The returned :class:`Reservation` is the call's gate: each send attempt reserves its bound through
        it (:meth:`Reservation.attempt`); :meth:`close_call` (or :meth:`release`) ends it."""
        spend = Reservation(self, what)
        if self.max_cost is None or self.price is None:
            return spend
        amount = self.price.cost(estimate)
        with self._lock:
            if not self._fits(amount):
                raise self._refusal(f"the next call ({what}) is estimated at {amount:.6g}", unbilled=True)
            self._reserved += amount
            spend.held = spend.unclaimed = amount
        return spend

    def _refusal(self, why: str, *, unbilled: bool) -> BudgetExceededError:
        assert self.price is not None and self.max_cost is not None
        spent = self.price.cost(self.usage)
        return BudgetExceededError(
            f"cost ceiling reached: {spent:.6g} spent and {self._reserved:.6g} in flight of --max-cost "
            f"{self.max_cost:.6g}; {why}; raise --max-cost to continue",
            unbilled=unbilled,
        )

    def _attempt(self, spend: Reservation, bound: ProviderUsage) -> None:
        """Reserve one send attempt's ``bound`` for ``spend``'s call, from its estimate first, or refuse it."""
        if self.max_cost is None or self.price is None:
            return
        amount = self.price.cost(bound)
        with self._lock:
            claimed = min(amount, spend.unclaimed)
            extra = amount - claimed
            if extra > 0 and not self._fits(extra):
                raise self._refusal(f"a send attempt of {spend.what} could cost {amount:.6g}; it was not sent",
                                    unbilled=spend.attempts == 0)
            spend.unclaimed -= claimed
            spend.held += extra
            self._reserved += extra
            spend.attempts += 1

    def release(self, spend: Reservation) -> None:
        """Give back what a call reserved (it ended without usage to record)."""
        with self._lock:
            self._release(spend)

    def _release(self, spend: Reservation) -> None:
        self._reserved = max(self._reserved - spend.held, 0.0)
        spend.held = spend.unclaimed = 0.0

    def open_call(self, meter: ProviderUsage) -> None:
        """A call through a client counting into ``meter`` starts (see :meth:`close_call`)."""
        with self._lock:
            entry = self._meters.get(id(meter))
            if entry is None or entry.in_flight == 0:  # usage made outside this ledger since is not ours
                entry = self._meters[id(meter)] = _Meter(meter, meter.snapshot())
            entry.in_flight += 1

    def close_call(self, meter: ProviderUsage, category: str, spend: Reservation | None = None) -> ProviderUsage:
        """Record what ``meter`` counted since it was last recorded (exact for one call at a time; calls
        that overlap are each counted once, under the category of the call that ends first) and release
        ``spend`` in the same step, so the recorded and the reserved never both miss a unit."""
        with self._lock:
            entry = self._meters[id(meter)]
            now = meter.snapshot()
            delta, entry.seen = now.minus(entry.seen), now
            entry.in_flight -= 1
            try:
                self._record_usage(delta, category)  # counted in memory first; the journal append may fail
            finally:
                if spend is not None:  # released even then: a failed append must not hold the ceiling forever
                    self._release(spend)
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


class Reservation:
    """What one call holds under a ledger's ``max_cost``: ``held`` (money reserved), ``unclaimed`` (the part of
    its estimate no attempt drew on yet), ``attempts`` reserved; :attr:`gate` is None without a ceiling."""

    def __init__(self, ledger: QueryLedger, what: str) -> None:
        self.ledger, self.what = ledger, what
        self.held = self.unclaimed = 0.0
        self.attempts = 0

    @property
    def gate(self) -> Gate | None:
        """The gate each send attempt of the call passes (:func:`~craft_sdk.client.usage.before_send`)."""
        return self.attempt if self.ledger.max_cost is not None and self.ledger.price is not None else None

    def attempt(self, bound: ProviderUsage) -> None:
        """Reserve one send attempt bounded by ``bound``, or raise :class:`BudgetExceededError` (not sent)."""
        self.ledger._attempt(self, bound)


class _Meter:
    """A client's usage counter as a ledger watches it: the counts already recorded, calls in flight."""

    def __init__(self, meter: ProviderUsage, seen: ProviderUsage) -> None:
        self.meter = meter  # held so its id is not reused while watched
        self.seen = seen
        self.in_flight = 0


MAX_SPLITS = 4  # a population stopped at the service's compute budget is halved at most this often (1/16)

class MeteredClient:
    """A client wrapped by a ledger: every ``predict`` is charged before it is sent.

    Args:
        client: any :class:`PredictionClient`.
        ledger: the ledger to charge.
    """

    max_splits: int = MAX_SPLITS

    def __init__(self, client: PredictionClient, ledger: QueryLedger) -> None:
        self.client = client
        self.ledger = ledger

    def capabilities(self, template: str = DEFAULT_TEMPLATE) -> Capabilities:
        return self.client.capabilities(template)

    def upload(self, images: Sequence[ImageLike]) -> ImageSetHandle:
        """Upload through the client; its provider usage (if any) is recorded under ``upload``."""
        spend = self.ledger.reserve(estimate_upload(self.client, len(images)), "upload")
        meter = usage_of(self.client)
        self.ledger.open_call(meter)
        try:
            with send_gate(spend.gate):
                handle = self.client.upload(images)
        finally:
            self.ledger.close_call(meter, "upload", spend)
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
        A population the service stopped at its compute budget (:class:`~craft_sdk.errors.ComputeBudgetError`)
        keeps the queries it computed charged and is sent again in halves (at most ``max_splits`` times, 0: never),
        each half charged, so checked against the budget, before it is sent.
        """
        return self._predict_split(images, class_names, template, offsets, category, self.max_splits)

    def _predict_split(self, images: Images, class_names: Sequence[str], template: str, offsets: np.ndarray | None,
                       category: str, splits: int) -> np.ndarray:
        try:
            return self._predict_once(images, class_names, template, offsets, category)
        except ComputeBudgetError:
            if offsets is None or offsets.ndim != 3 or offsets.shape[0] < 2 or splits <= 0:
                raise
            half = offsets.shape[0] // 2
            logger.warning("the service stopped %d candidates at its compute budget; sending them again in halves", offsets.shape[0])
            parts = [self._predict_split(images, class_names, template, o, category, splits - 1) for o in (offsets[:half], offsets[half:])]
            return np.concatenate(parts)

    def _predict_once(self, images: Images, class_names: Sequence[str], template: str, offsets: np.ndarray | None,
                      category: str) -> np.ndarray:
        n = query_cost(offsets)
        n_images = images.n_images if isinstance(images, ImageSetHandle) else len(images)
        uploaded = isinstance(images, ImageSetHandle)
        estimate = estimate_call(self.client, n_images, class_names, template, n, uploaded=uploaded) if self.ledger.max_cost is not None else ProviderUsage()
        spend = self.ledger.reserve(estimate, f"{category}, {n} quer{'y' if n == 1 else 'ies'} on {n_images} images")
        try:
            self.ledger.charge(n, category)
        except BaseException:
            self.ledger.release(spend)
            raise
        meter = usage_of(self.client)
        self.ledger.open_call(meter)
        try:
            with send_gate(spend.gate):
                return self.client.predict(images, class_names, template, offsets)
        except ClientError as exc:
            if exc.unbilled:
                self.ledger.refund(n, category)
            elif exc.billed is not None and 0 <= exc.billed < n:  # stopped part-way: only its computed queries billed
                self.ledger.refund(n - exc.billed, category)
            raise
        finally:
            self.ledger.close_call(meter, category, spend)
