"""The two interfaces the tuner's loop is written against, declared (they used to be prose).

* :class:`AskTellSearch`: an optimiser over prompt points with the cmaes/pycma manners
  (``ask``/``tell``, read-only ``mean``/``generation``/``sigma``, and ``replay`` so a
  checkpoint stores fitness rows, never a pickled optimiser). Implemented by
  :class:`~craft_sdk.tuner.search.PromptSearch` (CMA-ES over z),
  :class:`~craft_sdk.tuner.discrete.DiscretePromptSearch` and
  :class:`~craft_sdk.tuner.wordsearch.WordHalvingSearch` (contexts as strings).
* :class:`PromptSpace`: what a point means and how it is scored through a client.
  Implemented by :class:`~craft_sdk.tuner.prompts.ContinuousPrompts` and
  :class:`~craft_sdk.tuner.prompts.DiscretePrompts`.

A point is whatever the space searches (a float64 vector z, or a context string); the loop
never looks inside one.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class AskTellSearch(Protocol):
    """An ask/tell optimiser whose state is a pure function of (config, seed, fitness history)."""

    ask_digests: list[str]  # one digest per asked population: a replay checks it asks the same

    @property
    def generation(self) -> int:
        """Completed ask/tell generations."""
        ...

    @property
    def mean(self) -> Any:
        """The deployable point (CMA-ES's mean; the most probable words)."""
        ...

    @property
    def sigma(self) -> float:
        """The search's spread, as the run's history records it."""
        ...

    def ask(self) -> Any:
        """The next population (P points)."""
        ...

    def tell(self, candidates: Any, fitness: np.ndarray) -> None:
        """Report the fitness [P] (lower is better) of the last asked population."""
        ...

    def replay(self, fitness_history: np.ndarray, digests: list[str] | None = None) -> None:
        """Re-run recorded generations (fitness [G, P]) without querying anything."""
        ...


@runtime_checkable
class PromptSpace(Protocol):
    """A searchable prompt space: its search, its zero point, and how a point is scored and stored."""

    kind: str  # "continuous" or "discrete"
    search: AskTellSearch

    def zero(self) -> Any:
        """The point that means "no learned prompt" (zero-shot)."""
        ...

    def offsets(self, point: Any) -> np.ndarray | None:
        """The context offsets a caller can send to observe ``point`` (None: a text space has none)."""
        ...

    def score(self, client: Any, handle: Any, names: list[str], points: Any, category: str) -> np.ndarray:
        """Black-box scores [P, N, C] for a population (one query per point), [N, C] for one point."""
        ...

    def encode(self, point: Any) -> np.ndarray:
        """``point`` as a tensor, for checkpoints."""
        ...

    def decode(self, tensor: np.ndarray) -> Any:
        """The point :meth:`encode` wrote."""
        ...

    def copy(self, point: Any) -> Any:
        """A copy of ``point`` that later search steps cannot change."""
        ...

    def result(self, point: Any) -> dict[str, Any]:
        """The :class:`~craft_sdk.tuner.result.TuneResult` fields describing ``point`` (None: no prompt deployed)."""
        ...
