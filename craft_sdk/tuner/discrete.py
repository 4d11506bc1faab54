"""Discrete prompt search for text-only black boxes: a categorical distribution per context slot.

When a client accepts no context offsets (``Capabilities.soft_prompts`` is False)
the prompt is searched in *text*: a context of ``n_slots`` words, each drawn from
its own categorical distribution over a vocabulary, updated by a variance-reduced
policy gradient as in black-box discrete prompt learning (BDPL; Diao et al.,
TMLR 2023). Per generation:

1. draw P contexts; slot i of candidate k is word ``j_ki ~ p_i = softmax(θ_i)``;
2. score each (fitness L_k, lower is better: the tuner's CE + λ KL, one query each);
3. θ_i ← θ_i − lr · 1/(P−1) · Σ_k a_k (onehot(j_ki) − p_i), with the advantage
   a_k = (L_k − mean L) / (std L + ε): the population mean is the baseline that
   reduces the variance (BDPL eq. 6); the division by the std (ours) makes ``lr``
   independent of the loss scale.

The deployable prompt (:attr:`DiscretePromptSearch.mean`) is the most probable
word of every slot. The interface is :class:`~craft_sdk.tuner.search.PromptSearch`'s
(``ask``/``tell``/``mean``/``generation``/``replay``), with contexts as strings:
the state is a pure function of (config, seed, fitness history), so a checkpoint
stores the fitness rows and :meth:`~DiscretePromptSearch.replay` rebuilds the
state without queries (no pickle). numpy only.

Defaults (all ours; BDPL's lr and vocabulary are task-specific):

=================  ===============  ==============================================
option             default          meaning
=================  ===============  ==============================================
``n_slots``        4                words in the context ("a photo of a" has 4)
``popsize``        20               candidates per generation
``lr``             2.0              step on the slot logits θ (per unit advantage)
``seed_template``  ``a photo of a`` initial mode; None = uniform distributions
``seed_mass``      0.5              initial probability of the seed word per slot
``vocabulary``     ``VOCABULARY``   the template bank's words + common words
=================  ===============  ==============================================
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._fileio import read_lines
from ..errors import ConfigError, CraftError
from .templates import CLIP_IMAGENET_CONTEXTS

_COMMON = """
a an the this that one two many some my your our its of in on at with from by for and or to as near over under
photo photograph picture image snapshot shot scan render rendering drawing sketch painting illustration cartoon
doodle diagram figure icon symbol sign logo print poster graphic art artwork tattoo graffiti sculpture statue model
toy plushie origami embroidered embroidery plastic clay wooden metal paper glass stone pixel pixelated jpeg low high
resolution quality blurry blurred sharp clear noisy grainy dark bright dim light black white gray grey colour color
colorful monochrome red green blue yellow small large tiny big huge little tall short wide narrow long round square
clean dirty old new young ancient modern cool nice good bad weird strange odd rare common typical real fake natural
close-up closeup zoomed cropped centered distant aerial satellite overhead top side front view scene landscape
texture pattern surface background object thing item example instance kind type sort class category sample specimen
handwritten written digit number letter character numeral text word shape form outline silhouette line curve stroke
ink pencil pen chalk marker crayon charcoal watercolor oil digital scanned printed hand drawn simple complex detailed
rough smooth soft hard see seen looking visible hidden famous beautiful ugly cute happy sad
outdoor indoor field forest river lake sea water land crop road city town house building street sky ground
animal bird dog cat car plane ship vehicle plant flower tree food person people face
itap rendition video game
"""


def _default_vocabulary() -> tuple[str, ...]:
    words: dict[str, None] = {}
    for context in CLIP_IMAGENET_CONTEXTS:
        words.update(dict.fromkeys(context.split()))
    words.update(dict.fromkeys(_COMMON.split()))
    return tuple(words)


VOCABULARY: tuple[str, ...] = _default_vocabulary()
REPLAY_MISMATCH = "the checkpoint was written with another vocabulary, configuration or numpy build; resume with the ones that wrote it"


def load_vocabulary(name: str) -> tuple[str, ...]:
    """:data:`VOCABULARY` for ``"default"``, else the words of a UTF-8 file, one per line (blank lines skipped).

    Raises:
        ConfigError: the file is missing or unreadable, or a line is not one word.

    Example:
        >>> load_vocabulary("default") == VOCABULARY
        True
    """
    if name == "default":
        return VOCABULARY
    words = read_lines(name, "vocabulary")
    bad = [w for w in words if " " in w or "{" in w or "}" in w]
    if bad:
        raise ConfigError(f"vocabulary {name}: {bad[0]!r} is not one word; write one word per line, without braces")
    if len(set(words)) < 2:
        raise ConfigError(f"vocabulary {name} must hold at least two distinct words, got {len(set(words))}")
    return tuple(dict.fromkeys(words))


def check_vocabulary(vocab: tuple[str, ...]) -> None:
    """Raise :class:`ConfigError` unless ``vocab`` is at least two distinct single words without braces."""
    if len(vocab) < 2 or len(set(vocab)) != len(vocab):
        raise ConfigError("vocabulary must hold at least two distinct words")
    bad = [w for w in vocab if not w or w != w.strip() or " " in w or "{" in w or "}" in w]
    if bad:
        raise ConfigError(f"vocabulary entries must be single words without spaces or braces, got {bad[:3]}")


@dataclass(frozen=True)
class DiscreteSearchConfig:
    """Hyperparameters of :class:`DiscretePromptSearch` (see the module docstring's table).

    Example:
        >>> DiscreteSearchConfig(seed_template=None, n_slots=3).n_slots
        3
    """

    n_slots: int = 4
    popsize: int = 20
    lr: float = 2.0
    seed_template: str | None = "a photo of a"
    seed_mass: float = 0.5
    vocabulary: tuple[str, ...] = VOCABULARY

    def __post_init__(self) -> None:
        if self.n_slots < 1:
            raise ConfigError(f"n_slots must be >= 1, got {self.n_slots}")
        if self.popsize < 2:
            raise ConfigError(f"popsize must be >= 2 (the baseline needs two candidates), got {self.popsize}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0 < self.seed_mass < 1:
            raise ConfigError(f"seed_mass must be in (0, 1), got {self.seed_mass}")
        vocab = tuple(self.vocabulary)
        check_vocabulary(vocab)
        if self.seed_template is not None:
            seed_words = self.seed_template.split()
            if len(seed_words) != self.n_slots:
                raise ConfigError(f"seed_template {self.seed_template!r} has {len(seed_words)} words, not n_slots={self.n_slots}")
            missing = [w for w in seed_words if w not in vocab]
            if missing:
                raise ConfigError(f"seed_template words {missing} are not in the vocabulary")


class DiscretePromptSearch:
    """BDPL-style search over context words with ask/tell, a private RNG and read-only state.

    Args:
        config: a :class:`DiscreteSearchConfig`.
        seed: run seed.

    Example:
        >>> s = DiscretePromptSearch(DiscreteSearchConfig(popsize=4), seed=0)
        >>> contexts = s.ask(); s.tell(contexts, [float("sketch" not in c) for c in contexts])
        >>> s.generation, len(s.mean.split())
        (1, 4)
    """

    def __init__(self, config: DiscreteSearchConfig | None = None, seed: int = 0) -> None:
        self.config = config or DiscreteSearchConfig()
        self.vocabulary = tuple(self.config.vocabulary)
        self.popsize = self.config.popsize
        self.n_slots = self.config.n_slots
        self._rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0xD15C])))
        self._word_index = {w: j for j, w in enumerate(self.vocabulary)}
        self._logits = self._initial_logits()
        self._pending: np.ndarray | None = None
        self._generation = 0
        self.ask_digests: list[str] = []

    @classmethod
    def from_template(cls, template: str, popsize: int = 20, seed: int = 0, **options: Any) -> DiscretePromptSearch:
        """A search seeded at ``template``: one slot per word, its words added to the vocabulary if missing.

        Args:
            template: the starting context, e.g. the tuner's ``"a photo of a"``.
            popsize: candidates per generation.
            seed: run seed.
            **options: other :class:`DiscreteSearchConfig` fields (``lr``, ``seed_mass``, ``vocabulary``).

        Example:
            >>> DiscretePromptSearch.from_template("a satellite photo of a", popsize=8).mean
            'a satellite photo of a'
        """
        words = template.split()
        vocabulary = tuple(options.pop("vocabulary", VOCABULARY))
        vocabulary += tuple(dict.fromkeys(w for w in words if w not in vocabulary))
        config = DiscreteSearchConfig(n_slots=len(words), popsize=popsize, seed_template=" ".join(words), vocabulary=vocabulary, **options)
        return cls(config, seed)

    def _initial_logits(self) -> np.ndarray:
        """θ [n_slots, V]: uniform, or the seed word at ``seed_mass`` and the rest uniform."""
        c, v = self.config, len(self.vocabulary)
        logits = np.zeros((self.n_slots, v))
        if c.seed_template is not None:
            # p_seed = m and p_other = (1 - m) / (V - 1)  ⇔  θ_seed − θ_other = log(m (V − 1) / (1 − m))
            boost = np.log(c.seed_mass * (v - 1) / (1 - c.seed_mass))
            for i, word in enumerate(c.seed_template.split()):
                logits[i, self._word_index[word]] = boost
        return logits

    # ------------------------------------------------------------------ state

    @property
    def generation(self) -> int:
        """Completed ask/tell generations."""
        return self._generation

    @property
    def probabilities(self) -> np.ndarray:
        """p_i = softmax(θ_i), float64 [n_slots, V] (a copy)."""
        z = self._logits - self._logits.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)

    @property
    def mean(self) -> str:
        """The deployable context: the most probable word of every slot (ties: first in the vocabulary)."""
        return self.render(self._logits.argmax(1))

    @property
    def entropy(self) -> float:
        """Mean per-slot entropy in nats (log V at uniform; 0 when every slot has converged)."""
        p = self.probabilities
        return float(-(p * np.log(np.clip(p, 1e-300, None))).sum(1).mean())

    @property
    def sigma(self) -> float:
        """The search's spread, as the tuner's history records it: :attr:`entropy`."""
        return self.entropy

    def render(self, word_ids: Sequence[int] | np.ndarray) -> str:
        """The context string of one candidate (word indices [n_slots])."""
        return " ".join(self.vocabulary[int(j)] for j in word_ids)

    # ------------------------------------------------------------------ ask/tell

    def ask(self) -> list[str]:
        """The next population: ``popsize`` context strings."""
        p = self.probabilities
        cdf = np.cumsum(p, axis=1)
        u = self._rng.random((self.popsize, self.n_slots))
        ids = np.empty((self.popsize, self.n_slots), dtype=np.int64)
        for i in range(self.n_slots):  # inverse-CDF sampling: one uniform per (candidate, slot), stable across numpy versions
            ids[:, i] = np.minimum(np.searchsorted(cdf[i], u[:, i] * cdf[i, -1], side="right"), len(self.vocabulary) - 1)
        self._pending = ids
        self.ask_digests.append(hashlib.sha256(ids.tobytes()).hexdigest()[:16])
        return [self.render(row) for row in ids]

    def tell(self, candidates: Sequence[str], fitness: Sequence[float] | np.ndarray) -> None:
        """Report the fitness (lower is better) of the last asked population and take one gradient step."""
        if self._pending is None or list(candidates) != [self.render(row) for row in self._pending]:
            raise CraftError("tell() must follow ask() with the same candidates")
        f = np.asarray(fitness, dtype=np.float64)
        if f.shape != (self.popsize,) or not np.isfinite(f).all():
            raise CraftError(f"fitness must be {self.popsize} finite values, got shape {f.shape}")
        advantage = (f - f.mean()) / (f.std() + 1e-12)  # the variance-reducing baseline, scale-free
        p = self.probabilities
        grad = np.zeros_like(self._logits)
        for i in range(self.n_slots):
            counts = np.bincount(self._pending[:, i], weights=advantage, minlength=len(self.vocabulary))
            grad[i] = (counts - advantage.sum() * p[i]) / (self.popsize - 1)  # Σ_k a_k (onehot(j_ki) − p_i)
        self._logits -= self.config.lr * grad
        self._pending = None
        self._generation += 1

    def replay(self, fitness_history: np.ndarray, digests: list[str] | None = None) -> None:
        """Re-run recorded generations (fitness [G, popsize]) without querying anything."""
        from .search import replay

        replay(self, fitness_history, digests, REPLAY_MISMATCH)
