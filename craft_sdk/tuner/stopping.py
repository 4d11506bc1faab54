"""Early stopping on the held-out estimate: stop when a patience window brings nothing new.

The score of generation g is (check accuracy, −check log-loss) of the current model,
compared lexicographically: accuracy on a few dozen images moves in coarse steps, so
log-loss breaks ties. A generation *improves* when it beats the best so far; after
``patience`` generations without an improvement the run stops and the rest of the
budget stays unspent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class EarlyStopping:
    """Patience-window stopping rule.

    Args:
        patience: generations without improvement before stopping (None: never stop).
        min_delta: log-loss improvement that counts when accuracy ties.

    Example:
        >>> s = EarlyStopping(patience=2)
        >>> [s.update(g, acc, 1.0) for g, acc in enumerate([0.5, 0.6, 0.6, 0.6])]
        [True, True, False, False]
        >>> s.should_stop(3)
        True
    """

    patience: int | None
    min_delta: float = 1e-3
    best_generation: int = -1
    best_accuracy: float = float("-inf")
    best_loss: float = float("inf")

    def update(self, generation: int, accuracy: float, loss: float) -> bool:
        """Record generation ``generation``'s held-out score; True when it is the new best."""
        better = accuracy > self.best_accuracy + 1e-12 or (
            abs(accuracy - self.best_accuracy) <= 1e-12 and loss < self.best_loss - self.min_delta
        )
        if better:
            self.best_generation, self.best_accuracy, self.best_loss = generation, accuracy, loss
        return better

    def should_stop(self, generation: int) -> bool:
        """Whether ``patience`` generations have passed since the best one."""
        return self.patience is not None and generation - self.best_generation >= self.patience

    def reason(self) -> str:
        return f"stopped: no held-out improvement for {self.patience} generations (best at generation {self.best_generation})"

    def state(self) -> dict[str, Any]:
        return {"best_generation": self.best_generation, "best_accuracy": self.best_accuracy, "best_loss": self.best_loss}

    def load(self, state: dict[str, Any]) -> None:
        self.best_generation = int(state["best_generation"])
        self.best_accuracy = float(state["best_accuracy"])
        self.best_loss = float(state["best_loss"])
