"""The one statement of what a run costs: per generation, before generation 1, and the plan."""

from __future__ import annotations

import logging

from ..client.base import Capabilities
from .config import TuneConfig

logger = logging.getLogger(__name__)


def generation_cost(config: TuneConfig, g: int, n_generations: int, has_val: bool) -> int:
    """Queries generation ``g`` of ``n_generations`` costs: P candidates + the mean, plus one
    validation query on every ``val_every``-th and the last generation (paper protocol with
    validation data; the robust protocol's check images ride along in the mean's call)."""
    validates = has_val and not config.robust and (g % config.val_every == 0 or g == n_generations)
    return config.popsize + 1 + int(validates)


def baseline_cost(config: TuneConfig, has_val: bool) -> int:
    """Queries before generation 1: the zero-shot scoring (plus the validation set's, paper protocol)."""
    return 1 + int(has_val and not config.robust)


def canary_reserve(config: TuneConfig, n_contexts: int = 1) -> int:
    """Queries a run keeps back for its drift canary (0 without one): :func:`~craft_sdk.tuner.canary.canary_cost`."""
    from .canary import canary_cost

    return canary_cost(n_contexts) if config.canary else 0


def plan_generations(config: TuneConfig, has_val: bool) -> int:
    """The most generations whose total cost (:func:`baseline_cost` + :func:`generation_cost` of
    each) fits the budget less the canary's reserve. ``pr`` (paper protocol) plans refiner rounds of
    P + 1 queries' worth, the official code's schedule; the robust ``pr`` needs no generation."""
    budget = config.budget - canary_reserve(config)
    if config.mode == "ensemble":
        return 0  # no generation: the bank is scored once (craft_sdk.tuner.ensemble)
    if not config.uses_prompt:
        return 0 if config.robust else max((budget - baseline_cost(config, has_val)) // (config.popsize + 1), 0)
    cap = config.max_generations if config.max_generations is not None else config.budget
    n, total = 0, baseline_cost(config, has_val)
    while n < cap:
        # a plan of n + 1 generations: generation n + 1 is the last one, generation n no longer is
        step = generation_cost(config, n + 1, n + 1, has_val)
        if n >= 1:
            step += generation_cost(config, n, n + 1, has_val) - generation_cost(config, n, n, has_val)
        if total + step > budget:
            break
        total, n = total + step, n + 1
    return n


def effective_config(config: TuneConfig, caps: Capabilities) -> TuneConfig:
    """The config a client can run: every mode runs on every client (a text-only client's prompt
    space is the template's words instead of offsets: :func:`~craft_sdk.tuner.prompts.create_prompt_space`)."""
    if config.uses_prompt and not caps.soft_prompts:
        logger.info("model %s is text-only: mode %r searches the template's words", caps.model_id, config.mode)
    return config
