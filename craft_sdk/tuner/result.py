"""What a tuning run reports while it runs (:class:`Progress`) and what it returns (:class:`TuneResult`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..client.base import Capabilities
from .canary import CanaryRecord
from .config import TuneConfig


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
    deployed prompt (``config.canary`` probes; :mod:`craft_sdk.tuner.canary`), None without one.
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
    text_prompt: dict[str, Any] | None = None
    canary: CanaryRecord | None = None
    planned_generations: int = 0
