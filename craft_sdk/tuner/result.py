"""What a tuning run reports while it runs (:class:`Progress`) and what it returns (:class:`TuneResult`).

:class:`TuneResult`'s records are typed (:class:`Metrics`, :class:`QueryReport`,
:class:`SelectionReport`, :class:`DataInfo`, the history's :class:`GenerationRecord`); each one's ``to_dict()`` is the JSON the adapter's
provenance, ``tune --json`` and checkpoints write. Reading them by string key
(``result.metrics["train_accuracy"]``) still works for one release, with a ``DeprecationWarning``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np

from ..client.base import Capabilities
from ..client.canary import CanaryRecord
from .config import TuneConfig

logger = logging.getLogger(__name__)


class DictAccess:
    """Deprecated read access by string key (``record["x"]``, ``.get``, ``in``, ``.items()``) to a
    record's :meth:`to_dict`, kept for one release for code written against the old dicts."""

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def _as_dict(self) -> dict[str, Any]:
        warnings.warn(
            f"reading {type(self).__name__} by string key is deprecated and will be removed in the next release; "
            "use its attributes (e.g. result.metrics.train_accuracy) or .to_dict()",
            DeprecationWarning, stacklevel=3,
        )
        return self.to_dict()

    def __getitem__(self, key: str) -> Any:
        return self._as_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self._as_dict().get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._as_dict()

    def __iter__(self) -> Iterator[str]:
        return iter(self._as_dict())

    def keys(self) -> Any:
        return self._as_dict().keys()

    def items(self) -> Any:
        return self._as_dict().items()

    def values(self) -> Any:
        return self._as_dict().values()


@dataclass(frozen=True)
class Metrics(DictAccess):
    """A run's accuracies and how it ended (fractions in [0, 1]; None: not measured).

    ``zero_shot_*``: the baseline on the search (train), validation (paper) or check
    (robust) images. ``train_accuracy`` / ``val_accuracy``: the deployed model's (``val_accuracy``:
    the best validation generation's, paper ``best-val``; the held-out estimate, robust).
    ``deployed``: the behaviour the robust protocol chose. ``stopped``: why the search ended
    before its plan; ``stopped_early``: the budget or the server refused a query.
    """

    zero_shot_train_accuracy: float | None = None
    zero_shot_val_accuracy: float | None = None
    zero_shot_check_accuracy: float | None = None
    stopped_early: str | None = None
    stopped: str | None = None
    train_accuracy: float | None = None
    val_accuracy: float | None = None
    deployed: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The measured values only; a robust run (``deployed`` set) always states ``val_accuracy``, None or not."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        if self.deployed is not None:
            out["val_accuracy"] = self.val_accuracy
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Metrics:
        """What :meth:`to_dict` wrote (a checkpoint's metrics)."""
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class GenerationRecord(DictAccess):
    """One row of a run's history: after the baseline (generation 0) and after each generation.

    ``queries_used``: the ledger then; ``train_loss``: the refiner's (None: nothing trained);
    ``best_fitness`` / ``mean_fitness`` / ``sigma``: the search's population, set when a population
    was scored; ``val_accuracy``: the validation (paper) or select-half check (robust) accuracy, when measured.
    """

    generation: int
    queries_used: int
    train_loss: float | None
    train_accuracy: float
    best_fitness: float | None = None
    mean_fitness: float | None = None
    sigma: float | None = None
    val_accuracy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"generation": self.generation, "queries_used": self.queries_used,
                               "train_loss": self.train_loss, "train_accuracy": self.train_accuracy}
        if self.best_fitness is not None:  # a searched generation
            out.update(best_fitness=self.best_fitness, mean_fitness=self.mean_fitness, sigma=self.sigma)
        if self.val_accuracy is not None:
            out["val_accuracy"] = self.val_accuracy
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationRecord:
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class DataInfo(DictAccess):
    """The data a run saw: fingerprints and sizes (robust protocol: the search/check split too).

    ``image_fingerprints``: every trained or selected-on image, which ``evaluate`` must never score.
    """

    train_fingerprint: str
    n_train: int
    shots: int | None
    val_fingerprint: str | None
    n_val: int
    image_fingerprints: list[str]
    n_search: int | None = None
    n_check: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("n_search", "n_check"):  # the paper protocol has no split
            if out[name] is None:
                del out[name]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataInfo:
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class QueryReport(DictAccess):
    """The query ledger at the end of a run (:meth:`~craft_sdk.client.ledger.QueryLedger.to_dict`).

    ``counts``: queries per category; ``usage`` / ``usage_by_category``: the provider's usage
    (:meth:`~craft_sdk.client.usage.ProviderUsage.to_dict`); ``cost``, ``price``, ``max_cost``: money,
    with a price table. ``extra``: keys a newer ledger reports, kept as they are.
    """

    budget: int | None
    used: int
    counts: dict[str, int]
    uploads: int = 0
    usage: dict[str, Any] = field(default_factory=dict)
    usage_by_category: dict[str, dict[str, Any]] = field(default_factory=dict)
    cost: float | None = None
    price: dict[str, Any] | None = None
    max_cost: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QueryReport:
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in known}, extra={k: v for k, v in data.items() if k not in known})


@dataclass(frozen=True)
class SelectionReport(DictAccess):
    """The robust protocol's decision (:class:`~craft_sdk.tuner.selection.Decision` as a record).

    ``deployed``: the behaviour deployed; ``reason``: why; ``estimates``: per behaviour, its held-out
    accuracy and loss; ``refiner``: the chosen refiner's capacity and cross-validation (None: no
    refiner); ``calibration`` and ``plan``: the temperature fit and the certification plan.
    ``extra``: keys a newer selection reports, kept as they are.
    """

    deployed: str
    reason: str
    n_check: int
    estimates: dict[str, dict[str, float]]
    temperature: float
    refiner: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    plan: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _ORDER: ClassVar[tuple[str, ...]] = ("deployed", "reason", "n_check", "estimates", "temperature", "refiner")

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self._ORDER if k != "refiner" or self.refiner is not None}
        out.update({k: getattr(self, k) for k in ("calibration", "plan") if getattr(self, k) is not None})
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SelectionReport:
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in known}, extra={k: v for k, v in data.items() if k not in known})


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        logger.warning("%s: ignoring unknown keys %s", cls.__name__, unknown)
    return {k: v for k, v in data.items() if k in names}


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
    contexts: tuple[str, ...] | None = None  # the text the current model sends: a text search's words, an ensemble's contexts (None: the template)


@dataclass
class TuneResult:
    """Everything a tuning run learned, ready to become an adapter (numpy only).

    ``refiner_shape`` is (layers, hidden) of ``refiner`` when selection chose it (robust
    protocol), else None (the config's). ``selection`` is the robust decision record;
    ``temperature`` the calibration temperature (None: uncalibrated). ``text_prompt``
    is a deployed text prompt as the adapter records it (``kind`` ``discrete`` or ``ensemble``,
    see :mod:`craft_sdk.adapter`), None otherwise. ``canary`` is the drift canary taken under the
    deployed prompt (``config.canary`` probes; :mod:`craft_sdk.client.canary`), None without one.
    ``n_generations`` counts the generations actually run (early stopping ends runs before the plan);
    ``planned_generations`` is what the budget planned.
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
    history: list[GenerationRecord]
    queries: QueryReport
    metrics: Metrics
    data: DataInfo
    n_generations: int
    selected_generation: int
    wall_time_s: float = 0.0
    extras: dict[str, Any] = field(default_factory=dict)
    refiner_shape: tuple[int, int] | None = None
    selection: SelectionReport | None = None
    temperature: float | None = None
    text_prompt: dict[str, Any] | None = None
    canary: CanaryRecord | None = None
    planned_generations: int = 0
