"""Prompt spaces: what the tuner's loop searches, and how a point of it is scored.

The loop (:mod:`craft_sdk.tuner.loop`) only needs, from a prompt space,

* ``search``: an ask/tell optimiser (``ask()``, ``tell(candidates, fitness)``, ``mean``,
  ``generation``, ``replay(fitness_rows, digests)``, ``ask_digests``, ``sigma``);
* ``zero()``: the point that means "no learned prompt" (zero-shot);
* ``score(client, handle, names, points, category)``: black-box scores [P, N, C] for a
  population, one query per point (``score_one`` for a single point: [N, C]);
* ``encode(point)`` / ``decode(array)``: a point as a tensor, for checkpoints;
* ``result(point)``: the :class:`~craft_sdk.tuner.result.TuneResult` fields describing it;
* ``offsets(point)``: the context offsets a caller can send to observe the point (or None).

:class:`ContinuousPrompts` is the paper's space: p = p0 + A z with CMA-ES over z. A
text-only client gets a discrete space instead (contexts as words: :class:`DiscretePrompts`; see
:mod:`craft_sdk.tuner.discrete`), plugged in through the same methods.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..client.base import Capabilities
from ..client.contexts import MAX_CONTEXT_CHARS
from ..errors import ConfigError
from ..projection import project, projection_matrix
from .config import TuneConfig


class ContinuousPrompts:
    """Context offsets A z in a seeded random subspace, searched by CMA-ES (paper section 3.1).

    Args:
        config: the run's configuration (intrinsic_dim, popsize, sigma0, seed, bound, scales).
        caps: the client's capabilities (n_ctx, ctx_dim, ctx_rms).
    """

    kind = "continuous"

    def __init__(self, config: TuneConfig, caps: Capabilities) -> None:
        from .search import PromptSearch

        if caps.n_ctx is None or caps.ctx_dim is None:
            raise ConfigError(f"model {caps.model_id} reports soft prompts but no n_ctx/ctx_dim")
        if config.projection_std is not None:
            std = config.projection_std
        elif caps.ctx_rms is not None and caps.ctx_rms > 0:
            std = config.prompt_scale * caps.ctx_rms / math.sqrt(config.intrinsic_dim)
        else:
            raise ConfigError(f"model {caps.model_id} does not report ctx_rms; set projection_std explicitly")
        self.config = config
        self.n_ctx, self.ctx_dim = caps.n_ctx, caps.ctx_dim
        self.std = std
        self.projection = projection_matrix(config.seed, caps.n_ctx * caps.ctx_dim, config.intrinsic_dim, std)
        self.search = PromptSearch(config.intrinsic_dim, config.popsize, config.sigma0, config.seed, config.bound)

    def zero(self) -> np.ndarray:
        return np.zeros(self.config.intrinsic_dim)

    def offsets(self, z: np.ndarray | None) -> np.ndarray | None:
        """The context offset [n_ctx, d] (or [P, n_ctx, d]) for z."""
        return None if z is None else project(self.projection, z, self.n_ctx, self.ctx_dim)

    def score(self, client: Any, handle: Any, names: list[str], points: Any, category: str) -> np.ndarray:
        """Scores [P, N, C] (or [N, C] for one z) in one batched call of P queries."""
        return client.predict(handle, names, self.config.template, self.offsets(points), category=category)

    def score_one(self, client: Any, handle: Any, names: list[str], point: Any, category: str) -> np.ndarray:
        return self.score(client, handle, names, point, category)

    def encode(self, z: np.ndarray) -> np.ndarray:
        return np.asarray(z, np.float64)

    def decode(self, tensor: np.ndarray) -> np.ndarray:
        return np.asarray(tensor, np.float64)

    def copy(self, z: np.ndarray) -> np.ndarray:
        return np.array(z, copy=True)

    def result(self, z: np.ndarray | None) -> dict[str, Any]:
        if z is None:
            return {"z": None, "offset": None, "projection_std": self.std}
        z = np.asarray(z, np.float64)
        return {"z": z, "offset": self.offsets(z), "projection_std": self.std}


class DiscretePrompts:
    """The prompt space of a text-only client: contexts of words, searched by successive halving over words
    (:class:`~craft_sdk.tuner.wordsearch.WordHalvingSearch`, ``word_search="halving"``, the default) or by
    :class:`~craft_sdk.tuner.discrete.DiscretePromptSearch` (``word_search="pg"``).

    The tuner's loop (:mod:`craft_sdk.tuner.loop`) uses it exactly as the continuous space
    (:class:`ContinuousPrompts`): a point is a context string, the zero
    point is the configured template (zero-shot), a population of P contexts costs P queries
    (one call each), the same fitness (CE + λ KL) drives ``tell``, and checkpoints store the
    fitness rows (replayed on resume) and points as word indices. The deployed point becomes the
    adapter's ``template``; there is no offset.

    Args:
        config: the run's configuration (template, popsize, seed).
        caps: the client's capabilities (text only).
    """

    kind = "discrete"

    def __init__(self, config: Any, caps: Any) -> None:
        self.config = config
        from .discrete import DiscretePromptSearch, load_vocabulary
        from .wordsearch import WordHalvingSearch

        vocabulary = load_vocabulary(config.vocabulary)
        self.search: Any
        if config.word_search == "halving":

            self.search = WordHalvingSearch.from_template(config.template, popsize=config.popsize, seed=config.seed, vocabulary=vocabulary)
        else:
            self.search = DiscretePromptSearch.from_template(config.template, popsize=config.popsize, seed=config.seed, vocabulary=vocabulary, lr=config.word_lr)
        longest = max(len(w) for w in self.search.vocabulary)
        if self.search.n_slots * (longest + 1) > MAX_CONTEXT_CHARS:
            raise ConfigError(
                f"{self.search.n_slots} words of up to {longest} characters can exceed the {MAX_CONTEXT_CHARS}-character "
                "context an adapter stores; use a shorter template or shorter words"
            )
        self._index = {w: j for j, w in enumerate(self.search.vocabulary)}

    def zero(self) -> str:
        return " ".join(self.config.template.split())

    def offsets(self, point: Any) -> None:
        return None

    def score(self, client: Any, handle: Any, names: list[str], points: Any, category: str) -> np.ndarray:
        """Scores [P, N, C] for a list of contexts (P calls, one query each), [N, C] for one context."""
        if isinstance(points, str):
            return np.asarray(client.predict(handle, names, points, None, category=category))
        return np.stack([np.asarray(client.predict(handle, names, t, None, category=category)) for t in points])

    def score_one(self, client: Any, handle: Any, names: list[str], point: str, category: str) -> np.ndarray:
        return self.score(client, handle, names, point, category)

    def encode(self, point: str) -> np.ndarray:
        """Word indices int64 [n_slots] (every word of a point is in the vocabulary)."""
        return np.asarray([self._index[w] for w in point.split()], np.int64)

    def decode(self, tensor: np.ndarray) -> str:
        return self.search.render(np.asarray(tensor, np.int64))

    def copy(self, point: str) -> str:
        return point

    def result(self, point: str | None) -> dict[str, Any]:
        """No offset; ``template``: the context to deploy (the configured one when no prompt is deployed);
        ``text_prompt``: what the adapter's discrete prompt spec records (None when no prompt is deployed)."""
        out: dict[str, Any] = {"z": None, "offset": None, "projection_std": None, "template": self.zero() if point is None else point}
        if point is not None:
            out["text_prompt"] = {"kind": "discrete", "text": point, "initial": self.zero(), "n_slots": self.search.n_slots, "vocabulary_size": len(self.search.vocabulary)}
        return out


def create_prompt_space(config: TuneConfig, caps: Capabilities) -> Any:
    """The prompt space a run searches: None when the mode searches no prompt; the template's words
    (:class:`~craft_sdk.tuner.discrete.DiscretePrompts`) for a text-only client."""
    if not config.uses_prompt:
        return None
    if not caps.soft_prompts:
        return DiscretePrompts(config, caps)
    return ContinuousPrompts(config, caps)
