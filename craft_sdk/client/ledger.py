"""The query ledger: every billable query counted, the budget a hard ceiling.

One query = one candidate prompt scored on one image set (the paper's unit). A
call is charged *before* it is sent; a call that would exceed the budget is
refused with :class:`~craft_sdk.errors.BudgetExceededError` and never sent.
Queries are counted per purpose (``search``: CMA-ES candidates, ``refine``: the
current prompt scored to train the refiner, ``validation``: model selection,
``eval``: test-set evaluation, ``predict``: deployment, ``canary``: the drift canary, recorded at
tune time and re-scored by ``craft-sdk check``; see :mod:`craft_sdk.canary`).
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
from .base import DEFAULT_TEMPLATE, Capabilities, Images, ImageSetHandle, PredictionClient

logger = logging.getLogger(__name__)

CATEGORIES = ("search", "refine", "validation", "eval", "predict", "canary")


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

    Example:
        >>> ledger = QueryLedger(budget=100)
        >>> ledger.charge(40, "search")
        >>> ledger.used, ledger.remaining
        (40, 60)
    """

    def __init__(self, budget: int | None = None, journal: str | Path | None = None) -> None:
        if budget is not None and budget < 0:
            raise ConfigError(f"budget must be >= 0 or None, got {budget}")
        self.budget = budget
        self.counts: dict[str, int] = {c: 0 for c in CATEGORIES}
        self.uploads = 0
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
            self.counts[rec["category"]] += int(rec["n"])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: budget, used, per-category counts, uploads."""
        return {"budget": self.budget, "used": self.used, "counts": dict(self.counts), "uploads": self.uploads}


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
        handle = self.client.upload(images)
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
        """
        n = 1 if offsets is None or np.ndim(offsets) == 2 else int(np.shape(offsets)[0])
        self.ledger.charge(n, category)
        try:
            return self.client.predict(images, class_names, template, offsets)
        except ClientError as exc:
            if exc.unbilled:
                self.ledger.refund(n, category)
            raise
