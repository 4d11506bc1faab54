"""The state of one tuning run, as typed values (the loop is :mod:`craft_sdk.tuner.loop`).

* :class:`RunOptions`: what the caller asks of the run beside its config (checkpointing, progress).
* :class:`RunSetup`: what a run fixes before its first query (config, capabilities, image split,
  planned generations, data fingerprints); frozen.
* :class:`RunState`: what changes from one generation to the next. Only the loop assigns its
  fields; :mod:`~craft_sdk.tuner.finish`, :mod:`~craft_sdk.tuner.resume` and
  :mod:`~craft_sdk.tuner.ensemble` read it and return values.
* The best snapshot, a tagged union: :class:`NoSnapshot` (nothing yet), :class:`ValSnapshot`
  (paper protocol: the best validation generation), :class:`CheckSnapshot` (robust protocol: the
  generation the stopping rule keeps: the one it stops at) and :class:`EnsembleSnapshot` (``ensemble`` mode's pick).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from ..client.base import Capabilities
from ..data import ImageDataset
from . import selection
from .config import TuneConfig
from .ensemble import EnsemblePick
from .result import DataInfo, GenerationRecord, Metrics, Progress

if TYPE_CHECKING:
    from .plan import CertificationPlan
    from .protocols import PromptSpace
    from .refiner import RefinerTrainer
    from .stopping import EarlyStopping


@dataclass(frozen=True)
class RunOptions:
    """A run's options beside its :class:`~craft_sdk.tuner.config.TuneConfig` (see :class:`~craft_sdk.tuner.train.Tuner`)."""

    checkpoint_dir: Path | None = None
    checkpoint_every: int = 1
    resume: bool = False
    on_progress: Callable[[Progress], None] | None = None


# ------------------------------------------------------------------ best snapshot


@dataclass(frozen=True)
class NoSnapshot:
    """No generation held yet: any accuracy beats ``val``."""

    val: float = -1.0


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields, not records
class ValSnapshot:
    """Paper protocol, ``best-val``: the generation with the best validation accuracy, its prompt and refiner."""

    val: float
    generation: int
    z: Any  # the prompt point (None: no prompt space)
    refiner: dict[str, np.ndarray] | None


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields, not records
class CheckSnapshot:
    """Robust protocol: the generation the stopping rule keeps (the one it stops at), with the
    logits selection needs (scored images [N, C]; the candidates' [P, N_search, C] when the refiner trains on them)."""

    val: float
    generation: int
    z: Any
    logits: np.ndarray
    population: np.ndarray | None


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields, not records
class EnsembleSnapshot:
    """``ensemble`` mode: the picked contexts' log-probabilities on the scored images (generation 1)."""

    val: float
    generation: int
    logits: np.ndarray


Snapshot = Union[NoSnapshot, ValSnapshot, CheckSnapshot, EnsembleSnapshot]


def snapshot_generation(best: Snapshot) -> int:
    """The snapshot's generation (0 when nothing is held)."""
    return 0 if isinstance(best, NoSnapshot) else best.generation


# ------------------------------------------------------------------ images


class ImageSplit:
    """The run's image sets: ``search`` (what candidates are scored on) and ``scored`` (what the
    mean is scored on: the search images, then — robust protocol — the check images)."""

    def __init__(self, config: TuneConfig, train: ImageDataset, val: ImageDataset | None, holdout: bool = True) -> None:
        self.paper_val = val if not config.robust else None
        self.search, self.check = self._split(config, train, val, holdout)
        if self.check is not None and len(self.check):
            self.scored = ImageDataset(
                list(self.search.images) + list(self.check.images),
                np.concatenate([self.search.labels, self.check.labels]),
                train.class_names,
            )
        else:
            self.check = None
            self.scored = self.search
        self.n_search = len(self.search)
        self.y = self.search.labels
        self.y_check = self.check.labels if self.check is not None else np.zeros(0, np.int64)
        # positions into the check images that stop the search and certify: both every check image (selection.split_check)
        self.select, self.certify = selection.split_check(self.y_check, config.seed)
        if not holdout:  # no search: a given validation set only certifies
            self.select, self.certify = np.zeros(0, np.int64), np.arange(len(self.y_check))

    @staticmethod
    def _split(
        config: TuneConfig, train: ImageDataset, val: ImageDataset | None, holdout: bool
    ) -> tuple[ImageDataset, ImageDataset | None]:
        if not config.robust:
            return train, None
        if val is not None:
            return train, val
        if not holdout:  # nothing to certify a prompt with: every image trains (and cross-validates) the refiner
            return train, None
        fit_idx, check_idx = selection.split_holdout(train.labels, config.holdout, config.seed)
        return train.subset(fit_idx), train.subset(check_idx)


# ------------------------------------------------------------------ the run


@dataclass(frozen=True)
class RunSetup:
    """What a run fixes before its first query."""

    config: TuneConfig  # the effective config (the client's capabilities applied)
    requested: TuneConfig  # as the caller gave it (a checkpoint records this one)
    caps: Capabilities
    names: tuple[str, ...]
    kl_weights: tuple[float, float]  # (λ, β)
    plan: CertificationPlan
    images: ImageSplit
    bank: tuple[str, ...]  # ensemble mode: the candidate contexts, one query each
    data: DataInfo


@dataclass(frozen=True)
class Handles:
    """The client's handles of the uploaded image sets (``val``: the paper protocol's validation set)."""

    search: Any
    scored: Any
    val: Any = None


@dataclass(eq=False)
class RunState:
    """What one run carries from one generation to the next; only :mod:`craft_sdk.tuner.loop` assigns it."""

    setup: RunSetup
    n_gen: int  # planned generations
    prompts: PromptSpace | None  # None: the mode searches no prompt
    point: Any  # the search's mean (deployable); None without a prompt space
    refiner: RefinerTrainer | None
    stopping: EarlyStopping
    handles: Handles | None = None
    stopped: str | None = None  # why the search ended before its plan
    prompt_inert: bool = False  # the client ignored every offset: no prompt can be deployed
    history: list[GenerationRecord] = field(default_factory=list)
    fitness_rows: list[np.ndarray] = field(default_factory=list)
    metrics: Metrics = field(default_factory=Metrics)
    best: Snapshot = field(default_factory=NoSnapshot)
    zero_logits: np.ndarray | None = None  # zero-shot logits on the scored images
    last_logits: np.ndarray | None = None  # the current mean's logits on the scored images
    last_val_logits: np.ndarray | None = None  # paper protocol: the last validation logits
    population: np.ndarray | None = None  # the last generation's candidates' logits (robust, refiner_data="population")
    ensemble: EnsemblePick | None = None
    started: float = field(default_factory=time.perf_counter)

    @property
    def config(self) -> TuneConfig:
        return self.setup.config

    @property
    def images(self) -> ImageSplit:
        return self.setup.images

    def scores(self, logits: np.ndarray) -> np.ndarray:
        """The current model's scores: the refiner applied to ``logits`` (unchanged without one)."""
        return self.refiner.refine(logits) if self.refiner is not None else logits
