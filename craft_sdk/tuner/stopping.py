"""Early stopping: a patience window on the held-out estimate, shortened when the search is inert.

The score of generation g is (select-half accuracy, −select-half log-loss) of the current
model, compared lexicographically: accuracy on a few dozen images moves in coarse steps, so
log-loss breaks ties. A generation *improves* when it beats the best so far. The run stops

* after ``patience`` generations without an improvement (the ceiling), or
* after ``patience // 2`` generations without one when the search's own objective has
  stalled too: over the last ``patience // 2`` generations, the mean CMA-ES fitness of the
  second half is less than ``min_trend`` (relative) below that of the first half. Neither the
  held-out estimate nor the training objective is moving: nothing is happening.

The rest of the budget stays unspent.

Which generation is deployed: by default (``keep="last"``) the one the run stops at, not the best
one. The held-out images then choose only *when* the search stops, and the generation it stops at
is by construction not a new best on them, so they can certify it on their whole without the
winner's curse of deploying the best of many looks (:mod:`craft_sdk.tuner.selection`).
``keep="best"`` deploys the best generation (its held-out score is then biased upward: certify it
on other images).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MIN_TREND = 0.01  # relative fitness improvement per half-window below which the search counts as stalled


@dataclass
class EarlyStopping:
    """Patience-window stopping rule with an inert-search shortcut.

    Args:
        patience: generations without improvement before stopping (None: never stop).
        min_delta: log-loss improvement that counts when accuracy ties.
        min_trend: relative fitness improvement over a half-window that still counts as progress
            (0 disables the shortcut: plain patience).
        keep: ``"last"`` (:meth:`update` keeps every generation as the deployment candidate, so the
            run deploys the one it stops at) or ``"best"`` (only a new best).

    Example:
        >>> s = EarlyStopping(patience=2, keep="best")
        >>> [s.update(g, acc, 1.0) for g, acc in enumerate([0.5, 0.6, 0.6, 0.6])]
        [True, True, False, False]
        >>> s.should_stop(3)
        True
        >>> EarlyStopping(patience=2, keep="last").update(0, 0.5, 1.0), s.update(4, 0.5, 1.0)
        (True, False)
    """

    patience: int | None
    min_delta: float = 1e-3
    min_trend: float = MIN_TREND
    keep: str = "last"
    best_generation: int = -1
    best_accuracy: float = float("-inf")
    best_loss: float = float("inf")
    why: str = ""

    def __post_init__(self) -> None:
        if self.keep not in ("last", "best"):
            raise ValueError(f"EarlyStopping.keep must be 'last' or 'best', got {self.keep!r}")

    def update(self, generation: int, accuracy: float, loss: float) -> bool:
        """Record generation ``generation``'s held-out score. Returns True when the run should keep this
        generation as its deployment candidate: with ``keep="last"`` every generation (the one it stops
        at is deployed), with ``keep="best"`` only a new best."""
        better = accuracy > self.best_accuracy + 1e-12 or (
            abs(accuracy - self.best_accuracy) <= 1e-12 and loss < self.best_loss - self.min_delta
        )
        if better:
            self.best_generation, self.best_accuracy, self.best_loss = generation, accuracy, loss
        return better or self.keep == "last"

    def stalled(self, fitness: list[float]) -> bool:
        """Whether the mean fitness per generation (lower is better) stopped falling over the last
        ``patience // 2`` generations: the average of their second half is less than ``min_trend``
        (relative) below that of their first half."""
        w = (self.patience or 0) // 2
        h = w // 2
        if h < 1 or self.min_trend <= 0 or len(fitness) < w:
            return False
        before, last = sum(fitness[-w:-h] if w - h else []) / (w - h), sum(fitness[-h:]) / h
        return before - last < self.min_trend * abs(before)

    def should_stop(self, generation: int, fitness: list[float] | None = None) -> bool:
        """Whether to stop after ``generation`` given the mean fitness of every generation so far."""
        if self.patience is None:
            return False
        waited = generation - self.best_generation
        if waited >= self.patience:
            self.why = f"no held-out improvement for {self.patience} generations"
            return True
        if fitness is not None and waited >= self.patience // 2 and self.stalled(fitness):
            self.why = (f"no held-out improvement for {waited} generations and the search fitness fell by "
                        f"less than {100 * self.min_trend:g} % over the last {self.patience // 2}")
            return True
        return False

    def reason(self) -> str:
        why = self.why or f"no held-out improvement for {self.patience} generations"
        return f"stopped: {why} (best at generation {self.best_generation})"

    def state(self) -> dict[str, Any]:
        """JSON-safe: the unset (infinite) scores of a run without check images are None."""
        finite = lambda x: x if math.isfinite(x) else None  # noqa: E731
        return {"best_generation": self.best_generation, "best_accuracy": finite(self.best_accuracy), "best_loss": finite(self.best_loss)}

    def load(self, state: dict[str, Any]) -> None:
        self.best_generation = int(state["best_generation"])
        acc, loss = state["best_accuracy"], state["best_loss"]
        self.best_accuracy = float("-inf") if acc is None else float(acc)
        self.best_loss = float("inf") if loss is None else float(loss)
