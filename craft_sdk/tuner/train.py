"""Collaborative training (paper section 3.3): alternate one CMA-ES generation and refiner updates.

Per generation g (queries in brackets; :func:`generation_cost` is the one statement of it):

1. CMA-ES asks P candidates z_k; their offsets A z_k are scored on the search images in
   one batched call [P, category ``search``]; fitness = CE(f_k, y) + λ KL(softmax(f_k +
   g(f_k)) ‖ softmax(f_k)) with the refiner g frozen; tell.
2. The new CMA-ES mean is scored [1, ``refine``]; the refiner trains on those logits
   for ``refiner_epochs`` with CE + β KL(raw ‖ refined).
3. ``paper`` protocol only: every ``val_every`` generations (and the last), the mean is
   scored on the validation set [1, ``validation``] for model selection.

``robust`` protocol (the default; :mod:`craft_sdk.tuner.selection`): the search images
are the training set minus a held-out *check* part (or the whole training set when a
validation set is given, which is then the check part); the check images ride along in
step 2's call, so the held-out estimate costs no query. The run stops when that estimate
has not improved for ``patience`` generations (:mod:`craft_sdk.tuner.stopping`), then
the deployed behaviour, the refiner's capacity and the calibration temperature are
chosen from logits already paid for.

The deployed prompt is the CMA-ES *mean* (``xfavorite``), not the best single
candidate: the best of 40 noisy candidates on a few-shot training set is the one
most flattered by sampling noise, while the mean averages the best half of the
population; it is also exactly the prompt the refiner was trained on.
Before generation 1 the zero offset is scored once [1, ``refine``]: the zero-shot
baseline. Generations are planned so the whole run fits the budget.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..client.base import Capabilities, PredictionClient
from ..client.ledger import QueryLedger
from ..data import ImageDataset
from ..errors import ConfigError
from .checkpoint import LEDGER_FILE
from .config import TuneConfig

logger = logging.getLogger(__name__)


@dataclass
class Progress:
    """One progress event: after the baseline (generation 0) and after each generation.

    ``offset`` (the current CMA-ES mean's prompt offset, None without a prompt) and
    ``refine`` (the current refiner as a function of logits) let a caller *observe*
    the model mid-run, e.g. score a held-out set for an accuracy-vs-queries curve;
    both are valid only during the callback, and nothing a callback does feeds back
    into training. ``val_accuracy`` is the validation (paper) or check (robust) accuracy.
    """

    generation: int
    n_generations: int
    queries_used: int
    budget: int
    train_loss: float
    train_accuracy: float
    val_accuracy: float | None = None
    offset: np.ndarray | None = None
    refine: Callable[[np.ndarray], np.ndarray] | None = None


@dataclass
class TuneResult:
    """Everything a tuning run learned, ready to become an adapter (numpy only).

    ``refiner_shape`` is (layers, hidden) of ``refiner`` when selection chose it (robust
    protocol), else None (the config's). ``selection`` is the robust decision record;
    ``temperature`` the calibration temperature (None: uncalibrated).
    """

    config: TuneConfig
    requested_mode: str
    capabilities: Capabilities
    class_names: tuple[str, ...]
    z: np.ndarray | None
    offset: np.ndarray | None
    projection_std: float | None
    refiner: dict[str, np.ndarray] | None
    kl_weights: tuple[float, float]
    history: list[dict[str, Any]]
    queries: dict[str, Any]
    metrics: dict[str, Any]
    data: dict[str, Any]
    n_generations: int
    selected_generation: int
    wall_time_s: float = 0.0
    extras: dict[str, Any] = field(default_factory=dict)
    refiner_shape: tuple[int, int] | None = None
    selection: dict[str, Any] | None = None
    temperature: float | None = None


def generation_cost(config: TuneConfig, g: int, n_generations: int, has_val: bool) -> int:
    """Queries generation ``g`` of ``n_generations`` costs: P candidates + the mean, plus one
    validation query on every ``val_every``-th and the last generation (paper protocol with
    validation data; the robust protocol's check images ride along in the mean's call)."""
    validates = has_val and not config.robust and (g % config.val_every == 0 or g == n_generations)
    return config.popsize + 1 + int(validates)


def baseline_cost(config: TuneConfig, has_val: bool) -> int:
    """Queries before generation 1: the zero-shot scoring (plus the validation set's, paper protocol)."""
    return 1 + int(has_val and not config.robust)


def plan_generations(config: TuneConfig, has_val: bool) -> int:
    """The most generations whose total cost (:func:`baseline_cost` + :func:`generation_cost` of
    each) fits the budget. ``pr`` (paper protocol) plans refiner rounds of P + 1 queries' worth,
    the official code's schedule; the robust ``pr`` needs no generation."""
    if not config.uses_prompt:
        return 0 if config.robust else max((config.budget - baseline_cost(config, has_val)) // (config.popsize + 1), 0)
    cap = config.max_generations if config.max_generations is not None else config.budget
    n, total = 0, baseline_cost(config, has_val)
    while n < cap:
        # a plan of n + 1 generations: generation n + 1 is the last one, generation n no longer is
        step = generation_cost(config, n + 1, n + 1, has_val)
        if n >= 1:
            step += generation_cost(config, n, n + 1, has_val) - generation_cost(config, n, n, has_val)
        if total + step > config.budget:
            break
        total, n = total + step, n + 1
    return n


def effective_config(config: TuneConfig, caps: Capabilities) -> TuneConfig:
    """The config a client can run: a text-only client cannot search soft prompts."""
    if config.uses_prompt and not caps.soft_prompts:
        if config.mode == "pg":
            raise ConfigError(f"model {caps.model_id} is text-only: mode 'pg' needs soft prompts; use --mode pr")
        logger.warning("model %s is text-only: mode %r falls back to 'pr' (refiner only)", caps.model_id, config.mode)
        return replace(config, mode="pr")
    return config


class Tuner:
    """Fits CraFT (or one of its ablations) through a prediction-only client.

    Args:
        config: hyperparameters (:class:`TuneConfig`).
        checkpoint_dir: write a checkpoint there every ``checkpoint_every`` generations.
        checkpoint_every: generations between checkpoints.
        resume: continue the run found in ``checkpoint_dir``.
        on_progress: called with a :class:`Progress` after every generation.

    Example:
        >>> result = Tuner(TuneConfig(mode="craft", budget=2000)).fit(client, splits.train)  # doctest: +SKIP
    """

    def __init__(
        self,
        config: TuneConfig,
        *,
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int = 1,
        resume: bool = False,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> None:
        if checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        if resume and checkpoint_dir is None:
            raise ConfigError("resume needs a checkpoint_dir")
        self.config = config
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every = checkpoint_every
        self.resume = resume
        self.on_progress = on_progress

    def fit(
        self,
        client: PredictionClient,
        train: ImageDataset,
        val: ImageDataset | None = None,
        ledger: QueryLedger | None = None,
    ) -> TuneResult:
        """Tune on ``train`` (model selection on ``val`` if given); never touches test data."""
        if val is not None and val.class_names != train.class_names:
            raise ConfigError("validation and training sets must have the same class list")
        if len(train) == 0:
            raise ConfigError("the training set is empty")
        if self.checkpoint_dir is not None:
            self._check_checkpoint_dir()
            if ledger is None:
                self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
                ledger = QueryLedger(self.config.budget, journal=self.checkpoint_dir / LEDGER_FILE)
        ledger = ledger if ledger is not None else QueryLedger(self.config.budget)
        from .loop import Run

        return Run(self, client, ledger, train, val).execute()

    def _check_checkpoint_dir(self) -> None:
        assert self.checkpoint_dir is not None
        if (self.checkpoint_dir / LEDGER_FILE).exists() and not self.resume:
            raise ConfigError(
                f"{self.checkpoint_dir} already holds a run; pass --resume to continue it or choose another --checkpoint-dir"
            )
