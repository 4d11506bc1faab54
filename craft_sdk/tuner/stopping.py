"""Early stopping: a patience window on the held-out estimate, shortened when the search is inert.

The score of generation g is (select-half accuracy, −select-half log-loss) of the current
model, compared lexicographically: accuracy on a few dozen images moves in coarse steps, so
log-loss breaks ties. A generation *improves* when it beats the best so far. The run stops

* after ``patience`` generations without an improvement (the ceiling), or
* after ``patience // 2`` generations without one when the search's own objective has
  stalled too: over the last ``patience // 2`` generations, the mean CMA-ES fitness of the
  second half is less than ``min_trend`` (relative) below that of the first half. Neither the
  held-out estimate nor the training objective is moving: nothing is happening.

The rest of the budget stays unspent, with one exception: a search that has *proven* itself. When
either condition above first fires at a generation whose held-out predictions already beat zero-shot
in the exact sign test at the run's level (the caller passes ``proven``), the search keeps going for
as long as its own fitness still falls beyond its noise (least-squares slope over the last
``patience`` generations more than ``T_CRIT`` standard errors below zero, and a fall of at least
``min_trend`` over that window), and stops at the first generation where it no longer does. The
held-out estimate of a few dozen images often plateaus while the search still improves (digits,
16 shots: flat on 40 check images from generation 12, while the full budget gains 8 points on the
test split); a training-fitness trend alone cannot tell learning from memorising (random labels also
lower it), so it only extends a search the held-out images have already certified once. The proof is
read once, when the extension starts; after that the stopping time depends on the training fitness
only, so the certificate at the generation the run stops at stays on images that chose nothing.

Which generation is deployed: by default (``keep="last"``) the one the run stops at, not the best
one. The held-out images then choose only *when* the search stops, and the generation it stops at
is by construction not a new best on them, so they can certify it on their whole without the
winner's curse of deploying the best of many looks (:mod:`craft_sdk.tuner.selection`).
``keep="best"`` deploys the best generation (its held-out score is then biased upward: certify it
on other images).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

MIN_TREND = 0.01  # relative fitness improvement per half-window below which the search counts as stalled
T_CRIT = 2.0  # standard errors by which a proven search's fitness slope must be below zero to keep it going


@dataclass
class EarlyStopping:
    """Patience-window stopping rule with an inert-search shortcut.

    Args:
        patience: generations without improvement before stopping (None: never stop).
        min_delta: log-loss improvement that counts when accuracy ties.
        min_trend: relative fitness improvement over a half-window that still counts as progress
            (0 disables the shortcut and the proven-search extension: plain patience).
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
    extended_at: int = -1  # the generation a proven search's extension started (-1: none)

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

    def falling(self, fitness: list[float]) -> bool:
        """Whether the mean fitness per generation still falls beyond its noise: over the last ``patience``
        generations (at least 5), the least-squares slope is below zero by more than ``T_CRIT`` standard
        errors, and the fall it implies over the window is at least ``min_trend`` (relative) of the
        window's mean fitness."""
        w = min(self.patience or 0, len(fitness))
        if w < 5 or self.min_trend <= 0:
            return False
        y = fitness[-w:]
        mx, my = (w - 1) / 2, sum(y) / w
        sxx = sum((x - mx) ** 2 for x in range(w))
        slope = sum((x - mx) * (v - my) for x, v in enumerate(y)) / sxx
        resid = sum((v - my - slope * (x - mx)) ** 2 for x, v in enumerate(y)) / (w - 2)
        se = math.sqrt(resid / sxx) if resid > 0 else 0.0
        significant = slope < 0 and (se == 0.0 or slope / se < -T_CRIT)
        return significant and -slope * (w - 1) >= self.min_trend * abs(my)

    def should_stop(self, generation: int, fitness: list[float] | None = None, proven: bool = False) -> bool:
        """Whether to stop after ``generation`` given the mean fitness of every generation so far;
        ``proven``: this generation's held-out predictions beat zero-shot at the run's level (read only
        when the patience runs out and no extension has started yet)."""
        if self.patience is None:
            return False
        waited = generation - self.best_generation
        stop = False
        if waited >= self.patience:
            self.why = f"no held-out improvement for {self.patience} generations"
            stop = True
        elif fitness is not None and waited >= self.patience // 2 and self.stalled(fitness):
            self.why = (f"no held-out improvement for {waited} generations and the search fitness fell by "
                        f"less than {100 * self.min_trend:g} % over the last {self.patience // 2}")
            stop = True
        if not stop or fitness is None or self.min_trend <= 0:
            return stop
        falling = self.falling(fitness)
        if self.extended_at < 0:
            if not (proven and falling):
                return True
            self.extended_at = generation
            logger.info("generation %d: the check images certify a gain and the search fitness still falls: "
                        "searching on while it falls beyond its noise", generation)
        if falling:
            return False
        self.why = (f"no held-out improvement for {waited} generations; searched on from generation {self.extended_at} "
                    f"(a certified gain) until the search fitness stopped falling beyond its noise")
        return True

    def reason(self) -> str:
        why = self.why or f"no held-out improvement for {self.patience} generations"
        return f"stopped: {why} (best at generation {self.best_generation})"

    def state(self) -> dict[str, Any]:
        """JSON-safe: the unset (infinite) scores of a run without check images are None."""
        finite = lambda x: x if math.isfinite(x) else None  # noqa: E731
        return {"best_generation": self.best_generation, "best_accuracy": finite(self.best_accuracy),
                "best_loss": finite(self.best_loss), "extended_at": self.extended_at}

    def load(self, state: dict[str, Any]) -> None:
        self.best_generation = int(state["best_generation"])
        acc, loss = state["best_accuracy"], state["best_loss"]
        self.best_accuracy = float("-inf") if acc is None else float(acc)
        self.best_loss = float("inf") if loss is None else float(loss)
        self.extended_at = int(state.get("extended_at", -1))  # checkpoints before the extension: none started
