"""Prompt generation (PG): CMA-ES (pycma) over the intrinsic vector z.

pycma draws its samples from numpy's global RNG. ``PromptSearch`` gives it a
private RNG state that is swapped in for every call and swapped out after, so
neither the caller's code nor other searches can perturb the run, and the run
cannot perturb them.

The search is reproducible from (seed, fitness history): :meth:`PromptSearch.replay`
rebuilds the exact optimiser state by re-asking and re-telling the recorded
fitness values, which is how a checkpoint is resumed without pickling pycma.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..errors import CraftError


def _cma_seed(seed: int) -> int:
    # pycma treats seed 0 as "seed from the clock"; derive a non-zero 31-bit seed.
    return int(np.random.SeedSequence([seed, 0xC3A]).generate_state(1)[0] % (2**31 - 2)) + 1


class PromptSearch:
    """CMA-ES in R^D with ask/tell, an isolated RNG and read-only state.

    Args:
        dim: intrinsic dimension D.
        popsize: candidates per generation.
        sigma0: initial step size.
        seed: run seed.
        bound: optional box bound on each coordinate.

    Example:
        >>> s = PromptSearch(dim=8, popsize=6, sigma0=0.5, seed=0)
        >>> z = s.ask(); s.tell(z, (z ** 2).sum(1)); s.generation
        1
    """

    def __init__(self, dim: int, popsize: int, sigma0: float, seed: int, bound: float | None = None) -> None:
        import cma

        opts: dict[str, Any] = {
            "seed": _cma_seed(seed),
            "popsize": popsize,
            "verbose": -9,
            "verb_log": 0,
            "verb_disp": 0,
            "bounds": [-bound, bound] if bound is not None else [None, None],
            "maxiter": np.inf,
            "maxfevals": np.inf,
            "tolfun": 0,
            "tolfunhist": 0,
            "tolflatfitness": np.inf,
            "tolx": 0,
            "tolstagnation": np.inf,
        }
        outer = np.random.get_state()
        try:
            self._es = cma.CMAEvolutionStrategy(np.zeros(dim), sigma0, opts)
            self._state = np.random.get_state()
        finally:
            np.random.set_state(outer)
        self.popsize = popsize
        self.dim = dim
        self._pending: np.ndarray | None = None
        self.ask_digests: list[str] = []

    @contextlib.contextmanager
    def _rng(self) -> Iterator[None]:
        outer = np.random.get_state()
        np.random.set_state(self._state)
        try:
            yield
        finally:
            self._state = np.random.get_state()
            np.random.set_state(outer)

    @property
    def generation(self) -> int:
        """Completed ask/tell generations."""
        return int(self._es.countiter)

    @property
    def mean(self) -> np.ndarray:
        """The distribution mean (in the bounded space when bounds are set): the deployed z."""
        return np.asarray(self._es.result.xfavorite, dtype=np.float64).copy()

    @property
    def sigma(self) -> float:
        """Current overall step size."""
        return float(self._es.sigma)

    def ask(self) -> np.ndarray:
        """The next population, float64 [popsize, D]."""
        with self._rng():
            z = np.asarray(self._es.ask(), dtype=np.float64)
        self._pending = z
        self.ask_digests.append(hashlib.sha256(z.tobytes()).hexdigest()[:16])
        return z

    def tell(self, z: np.ndarray, fitness: np.ndarray) -> None:
        """Report the fitness (lower is better) of the last asked population."""
        if self._pending is None or z.shape != self._pending.shape:
            raise CraftError("tell() must follow ask() with the same population")
        f = np.asarray(fitness, dtype=np.float64)
        if f.shape != (z.shape[0],) or not np.isfinite(f).all():
            raise CraftError(f"fitness must be {z.shape[0]} finite values, got shape {f.shape}")
        with self._rng():
            self._es.tell(list(z), f.tolist())
        self._pending = None

    def replay(self, fitness_history: np.ndarray, digests: list[str] | None = None) -> None:
        """Re-run recorded generations (fitness [G, popsize]) without querying anything."""
        replay(self, fitness_history, digests, "this numpy/cma build samples differently; resume with the versions that wrote the checkpoint")


def replay(search: Any, fitness_history: np.ndarray, digests: list[str] | None, why: str) -> None:
    """Rebuild an ask/tell search's state by re-asking and re-telling recorded fitness rows.

    Each re-asked population's digest must equal the recorded one (``digests``), else the run
    that wrote the checkpoint sampled differently and :class:`CraftError` says ``why``.
    """
    for g, row in enumerate(np.asarray(fitness_history, dtype=np.float64)):
        candidates = search.ask()
        if digests is not None and g < len(digests) and digests[g] != search.ask_digests[-1]:
            raise CraftError(f"checkpoint replay diverged at generation {g + 1}: {why}")
        search.tell(candidates, row)
