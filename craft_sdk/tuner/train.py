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
from pathlib import Path

from ..client.base import PredictionClient
from ..client.ledger import QueryLedger
from ..client.pricing import PriceTable
from ..data import ImageDataset
from ..errors import ConfigError, DataError
from .checkpoint import LEDGER_FILE
from .config import TuneConfig
from .loop import run_tuning
from .result import Progress, TuneResult
from .state import RunOptions

__all__ = ["Progress", "TuneResult", "Tuner"]

logger = logging.getLogger(__name__)


class Tuner:
    """Fits CraFT (or one of its ablations) through a prediction-only client.

    Args:
        config: hyperparameters (:class:`TuneConfig`).
        checkpoint_dir: write a checkpoint there every ``checkpoint_every`` generations.
        checkpoint_every: generations between checkpoints.
        resume: continue the run found in ``checkpoint_dir``.
        on_progress: called with a :class:`Progress` after every generation.
        price: optional :class:`~craft_sdk.client.pricing.PriceTable` (provider usage as money).
        max_cost: optional hard ceiling on that money (needs ``price``), checked before each call.

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
        price: PriceTable | None = None,
        max_cost: float | None = None,
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
        self.price = price
        self.max_cost = max_cost
        QueryLedger(price=price, max_cost=max_cost)  # validate them now, not at fit

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
        if len(set(train.labels.tolist())) < 2:
            raise DataError("the training set has a single class; a classifier needs at least two classes")
        if self.checkpoint_dir is not None:
            self._check_checkpoint_dir()
            if ledger is None:
                self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
                ledger = QueryLedger(self.config.budget, journal=self.checkpoint_dir / LEDGER_FILE, price=self.price, max_cost=self.max_cost)
        ledger = ledger if ledger is not None else QueryLedger(self.config.budget, price=self.price, max_cost=self.max_cost)
        options = RunOptions(self.checkpoint_dir, self.checkpoint_every, self.resume, self.on_progress)
        return run_tuning(self.config, options, client, ledger, train, val)

    def _check_checkpoint_dir(self) -> None:
        assert self.checkpoint_dir is not None
        if (self.checkpoint_dir / LEDGER_FILE).exists() and not self.resume:
            raise ConfigError(
                f"{self.checkpoint_dir} already holds a run; pass --resume to continue it or choose another --checkpoint-dir"
            )
