"""Word search for text-only black boxes: successive halving over words, screened in groups.

The per-slot policy gradient (:mod:`craft_sdk.tuner.discrete`) samples a planted strong word
in a few candidates of a run (it starts with half of each slot's mass on the template word
and the other half spread over hundreds of words), so it rarely finds the words that matter
within a few thousand queries. This search tests every word systematically instead, around
an *incumbent* context (the template at first), in rounds. A round:

1. **Screen** (rung 0). Shuffle the surviving words, cut them into groups of ``group``
   words and place each group's words in distinct random slots of the incumbent: one
   candidate tests ``group`` words at once (group testing), so a vocabulary of V words costs
   ⌈V / group⌉ queries.
2. **Halve** (rungs 1, 2, …). Keep the best ⌈n / η⌉ words by their mean relative score over
   the tests so far, and test each again in a fresh random group and slot: a word's score is
   an average over the partners and positions it was tried with, so a word that only rode on
   a good partner falls out. Repeat until at most ``finalists`` words remain.
3. **Place** (final rung). Every finalist in every slot of the incumbent, one word changed
   per candidate (``finalists × n_slots`` queries).
4. The best candidate of the round (any rung) becomes the next round's incumbent if it
   beats the current one.

Scores are *relative*: candidate 0 of every generation is the incumbent itself, and a
candidate's score is its fitness minus that reference's, so a fitness that drifts between
generations (``craft`` trains the refiner the fitness includes) does not bias the comparison
(one query in ``popsize``). :attr:`WordHalvingSearch.mean`, the point the tuner scores on its
check images and may deploy, is the best candidate seen so far, so an improvement found in
the screen is used at once.

Why not image subsets (the classic successive-halving resource)? The budget unit is a
*query*: one context scored on one image set, whatever the set's size, so scoring a
candidate on a subset saves provider requests but no budget. Every candidate is scored on
all search images (its relative score is then exact on them); the noise halving averages
out is the one from partner words and positions. Overfitting the search images is what the
robust protocol's check images guard against.

The interface is :class:`~craft_sdk.tuner.search.PromptSearch`'s (``ask``/``tell``/``mean``/
``generation``/``replay``, contexts as strings); the state is a pure function of (config,
seed, fitness history), so checkpoints replay it without queries. numpy only.

Defaults (ours):

==============  ==========================  ============================================
option          default                     meaning
==============  ==========================  ============================================
``popsize``     20 (the tuner passes 40)    candidates per generation (one is the incumbent)
``group``       2                           words screened per candidate
``eta``         3                           halving rate: keep 1/eta of the words per rung
``finalists``   (popsize − 1) // n_slots    words placed in every slot (at least 2)
==============  ==========================  ============================================
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, CraftError
from .discrete import REPLAY_MISMATCH, VOCABULARY, check_vocabulary

_TOL = 1e-9  # a relative score must beat the incumbent by more than this to count as better


@dataclass(frozen=True)
class WordSearchConfig:
    """Hyperparameters of :class:`WordHalvingSearch` (see the module docstring's table).

    Example:
        >>> WordSearchConfig(template="a photo of a").n_slots
        4
    """

    template: str = "a photo of a"
    popsize: int = 20
    vocabulary: tuple[str, ...] = VOCABULARY
    group: int = 2
    eta: int = 3
    finalists: int | None = None

    def __post_init__(self) -> None:
        if self.popsize < 2:
            raise ConfigError(f"popsize must be >= 2 (one candidate is the incumbent), got {self.popsize}")
        if self.group < 1 or self.eta < 2:
            raise ConfigError(f"group must be >= 1 and eta >= 2, got group={self.group}, eta={self.eta}")
        if self.finalists is not None and self.finalists < 1:
            raise ConfigError(f"finalists must be >= 1 or None, got {self.finalists}")
        vocab = tuple(self.vocabulary)
        check_vocabulary(vocab)
        missing = [w for w in self.template.split() if w not in vocab]
        if not self.template.split() or missing:
            raise ConfigError(f"template {self.template!r} must be words of the vocabulary (missing: {missing})")

    @property
    def n_slots(self) -> int:
        return len(self.template.split())

    @property
    def n_finalists(self) -> int:
        """Words the final rung places in every slot."""
        return self.finalists if self.finalists is not None else max(2, (self.popsize - 1) // self.n_slots)


class WordHalvingSearch:
    """Successive halving over words around an incumbent context, with ask/tell and a private RNG.

    Args:
        config: a :class:`WordSearchConfig`.
        seed: run seed.

    Example:
        >>> s = WordHalvingSearch(WordSearchConfig(popsize=8), seed=0)
        >>> for _ in range(40):
        ...     contexts = s.ask(); s.tell(contexts, [float("sketch" not in c.split()) for c in contexts])
        >>> "sketch" in s.mean.split(), s.generation
        (True, 40)
    """

    def __init__(self, config: WordSearchConfig | None = None, seed: int = 0) -> None:
        self.config = config or WordSearchConfig()
        self.vocabulary = tuple(self.config.vocabulary)
        self.popsize = self.config.popsize
        self.n_slots = self.config.n_slots
        self._rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0x57D])))
        index = {w: j for j, w in enumerate(self.vocabulary)}
        self._incumbent = np.asarray([index[w] for w in self.config.template.split()], np.int64)
        self._pending: tuple[np.ndarray, list[np.ndarray]] | None = None
        self._generation = 0
        self.rounds = 0  # completed rounds
        self.ask_digests: list[str] = []
        self._start_round()

    @classmethod
    def from_template(cls, template: str, popsize: int = 20, seed: int = 0, vocabulary: Sequence[str] = VOCABULARY, **options: int | None) -> WordHalvingSearch:
        """A search starting at ``template``, its words added to the vocabulary if missing.

        Example:
            >>> WordHalvingSearch.from_template("a satellite photo of a", popsize=8).mean
            'a satellite photo of a'
        """
        words = template.split()
        vocab = tuple(vocabulary) + tuple(dict.fromkeys(w for w in words if w not in vocabulary))
        return cls(WordSearchConfig(template=" ".join(words), popsize=popsize, vocabulary=vocab, **options), seed)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ state

    @property
    def generation(self) -> int:
        """Completed ask/tell generations."""
        return self._generation

    @property
    def incumbent(self) -> str:
        """The round's reference context (candidate 0 of every generation)."""
        return self.render(self._incumbent)

    @property
    def mean(self) -> str:
        """The deployable context: the best candidate seen (the incumbent unless one beat it)."""
        return self.render(self._best_ids)

    @property
    def survivors(self) -> tuple[str, ...]:
        """The words still in the current round, best first once a rung has scored them."""
        return tuple(self.vocabulary[int(j)] for j in self._arms)

    @property
    def sigma(self) -> float:
        """The search's spread, as the tuner's history records it: the surviving fraction of the vocabulary."""
        return len(self._arms) / len(self.vocabulary)

    def render(self, word_ids: Sequence[int] | np.ndarray) -> str:
        """The context string of one candidate (word indices [n_slots])."""
        return " ".join(self.vocabulary[int(j)] for j in word_ids)

    # ------------------------------------------------------------------ rounds and rungs

    def _start_round(self) -> None:
        self._arms = np.arange(len(self.vocabulary))
        self._sum = np.zeros(len(self.vocabulary))
        self._count = np.zeros(len(self.vocabulary), np.int64)
        self._best_ids, self._best_rel = self._incumbent.copy(), 0.0
        self._final = False
        self._start_rung()

    def _start_rung(self) -> None:
        self._final = len(self._arms) <= self.config.n_finalists
        self._queue = self._placements() if self._final else self._groups(self.config.group)
        self._required = len(self._queue)  # rung tests to tell before the next rung; extra passes fill a generation

    def _groups(self, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """One pass: every surviving word once, ``size`` words per candidate in distinct random slots."""
        size = min(size, self.n_slots)
        order = self._rng.permutation(self._arms)
        tests = []
        for start in range(0, len(order), size):
            words = order[start : start + size]
            slots = self._rng.permutation(self.n_slots)[: len(words)]
            ids = self._incumbent.copy()
            ids[slots] = words
            tests.append((ids, words))
        return tests

    def _placements(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """The final rung: every finalist in every slot where the incumbent has another word."""
        tests = []
        for word in self._arms:
            for slot in range(self.n_slots):
                if self._incumbent[slot] != word:
                    ids = self._incumbent.copy()
                    ids[slot] = word
                    tests.append((ids, np.asarray([word])))
        return tests

    def _next_test(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._queue:  # the rung's tests are all asked: fill the generation with another pass
            self._queue = self._groups(2 if self._final else self.config.group)  # final rung: pairs of finalists
        return self._queue.pop(0)

    def _advance(self) -> None:
        """The rung is scored: halve the words, or end the round after the final rung."""
        if self._final:
            self._incumbent = self._best_ids.copy()
            self.rounds += 1
            self._start_round()
            return
        mean = self._sum[self._arms] / np.maximum(self._count[self._arms], 1)
        keep = math.ceil(len(self._arms) / self.config.eta)
        self._arms = self._arms[np.argsort(mean, kind="stable")[:keep]]
        self._start_rung()

    # ------------------------------------------------------------------ ask/tell

    def ask(self) -> list[str]:
        """The next population: the incumbent, then ``popsize - 1`` tests."""
        tests = [self._next_test() for _ in range(self.popsize - 1)]
        ids = np.stack([self._incumbent] + [t[0] for t in tests])
        self._pending = (ids, [t[1] for t in tests])
        self.ask_digests.append(hashlib.sha256(ids.tobytes()).hexdigest()[:16])
        return [self.render(row) for row in ids]

    def tell(self, candidates: Sequence[str], fitness: Sequence[float] | np.ndarray) -> None:
        """Report the fitness (lower is better) of the last asked population; credit each tested word."""
        if self._pending is None or list(candidates) != [self.render(row) for row in self._pending[0]]:
            raise CraftError("tell() must follow ask() with the same candidates")
        f = np.asarray(fitness, dtype=np.float64)
        if f.shape != (self.popsize,) or not np.isfinite(f).all():
            raise CraftError(f"fitness must be {self.popsize} finite values, got shape {f.shape}")
        ids, credited = self._pending
        relative = f[1:] - f[0]
        for k, words in enumerate(credited):
            np.add.at(self._sum, words, relative[k])
            np.add.at(self._count, words, 1)
        k = int(np.argmin(relative))
        if relative[k] < self._best_rel - _TOL:
            self._best_ids, self._best_rel = ids[k + 1].copy(), float(relative[k])
        self._pending = None
        self._generation += 1
        self._required -= len(credited)
        if self._required <= 0:
            self._advance()

    def replay(self, fitness_history: np.ndarray, digests: list[str] | None = None) -> None:
        """Re-run recorded generations (fitness [G, popsize]) without querying anything."""
        from .search import replay

        replay(self, fitness_history, digests, REPLAY_MISMATCH)
