"""The one composition of a tuning run: client → tuner → adapter.

:func:`tune_run` is the only place in craft-sdk that runs a :class:`~craft_sdk.tuner.train.Tuner` and turns
its result into an :class:`~craft_sdk.adapter.Adapter` (``tests/test_architecture.py`` checks it). The facade
(:func:`craft_sdk.tune`, :func:`craft_sdk.api.tune_run`), the CLI's ``tune``, the demo runner and
:meth:`CraftClassifier.fit <craft_sdk.CraftClassifier.fit>` all call it. It sits between the adapter and
deployment layers, so that the classifier (deployment) can tune without reaching up into the facade;
the ``[train]`` extra (torch, cma) is imported only when a run starts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .adapter import Adapter
from .client.base import PredictionClient
from .client.ledger import QueryLedger
from .client.pricing import PriceTable
from .data import ImageDataset

if TYPE_CHECKING:
    from .tuner.config import TuneConfig
    from .tuner.result import TuneResult


def merged_config(config: TuneConfig | None, overrides: dict[str, Any]) -> TuneConfig:
    """``config`` (default: the defaults) with the fields in ``overrides`` replaced; unknown names raise ConfigError."""
    if config is not None and not overrides:
        return config
    from .tuner.config import TuneConfig  # lazily: importing craft_sdk (or its deploy path) loads no training module

    return TuneConfig.from_dict({**(config or TuneConfig()).to_dict(), **overrides})


@dataclass(frozen=True)
class TuneRun:
    """What a tuning run made: the ``adapter``, and the full ``result`` (metrics, queries, selection, history)."""

    adapter: Adapter
    result: TuneResult


def tune_run(
    client: PredictionClient,
    train: ImageDataset,
    val: ImageDataset | None = None,
    config: TuneConfig | None = None,
    *,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 1,
    resume: bool = False,
    on_progress: Callable[..., None] | None = None,
    progress: bool | Callable[..., None] | None = None,
    ledger: QueryLedger | None = None,
    price: PriceTable | None = None,
    max_cost: float | None = None,
    **overrides: Any,
) -> TuneRun:
    """Tune an adapter for ``train`` through ``client``; return it with the run's full result.

    Args:
        client: the black box.
        train: the few-shot training set.
        val: optional validation set for model selection.
        config: a :class:`TuneConfig` (default: the defaults); keyword ``overrides`` replace its fields.
        checkpoint_dir: write a resumable checkpoint (and the query journal) here.
        checkpoint_every: generations between checkpoints.
        resume: continue the run in ``checkpoint_dir``.
        on_progress: called with every :class:`~craft_sdk.tuner.result.Progress`.
        progress: ``True``: a progress bar on stderr; ``False``: none; ``None``: a bar when stderr is a
            terminal; a callable: called with every ``Progress`` too (the CLI passes its own bar).
        ledger: charge the queries to this ledger (default: a new one with the config's budget).
        price: a :class:`~craft_sdk.client.pricing.PriceTable`: the adapter records what the tune cost.
        max_cost: a hard ceiling on that cost (needs ``price``; ignored when ``ledger`` is given: set it there).

    Example:
        >>> run = tune_run(create_client("demo"), splits.train, mode="craft", budget=2000)  # doctest: +SKIP
        >>> run.adapter.save_pretrained("my-adapter")                                     # doctest: +SKIP
    """
    from .data import require_classes
    from .tuner.progress import progress_display
    from .tuner.train import Tuner

    config = merged_config(config, overrides)
    require_classes(train, "the training set")
    with progress_display(progress, config.budget, on_progress) as callback:
        tuner = Tuner(config, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, resume=resume,
                      on_progress=callback, price=price, max_cost=max_cost)
        result = tuner.fit(client, train, val, ledger=ledger)
    return TuneRun(Adapter.from_result(result), result)  # the result records every trained/selected-on image's digest
