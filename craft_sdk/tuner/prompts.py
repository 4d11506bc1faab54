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
text-only client gets a discrete space instead (contexts as words; see
:mod:`craft_sdk.tuner.discrete`), plugged in through the same methods.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..client.base import Capabilities
from ..errors import ConfigError
from .config import TuneConfig
from .projection import project, projection_matrix


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


def create_prompt_space(config: TuneConfig, caps: Capabilities) -> Any:
    """The prompt space a run searches: None when the mode searches no prompt; the template's words
    (:class:`~craft_sdk.tuner.discrete.DiscretePrompts`) for a text-only client."""
    if not config.uses_prompt:
        return None
    if not caps.soft_prompts:
        from .discrete import DiscretePrompts

        return DiscretePrompts(config, caps)
    return ContinuousPrompts(config, caps)
