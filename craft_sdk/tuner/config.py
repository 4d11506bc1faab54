"""Tuning configuration: every hyperparameter of CraFT, validated on construction.

Defaults follow the paper (ICML 2024, section 4.1) unless noted:

==========================  ===========  ==============================================
field                       default      source
==========================  ===========  ==============================================
intrinsic_dim (D)           512          paper
popsize                     40           paper
budget                      8000         paper (official code: 2000/4000/8000 by shots)
sigma0                      1.0          official code (1 or 0.02, per dataset)
prompt_scale                see below    ours: model-relative projection scale
bound                       None         official code (5 or none)
refiner_hidden              512          paper (code: 256)
refiner_layers              3            paper ("3-layer MLP"; code: 2)
residual                    True         paper
lr                          1e-3         paper (AdamW)
weight_decay                0.01         AdamW default
batch_size                  256          paper
lam, beta                   0.1 / C      paper
protocol                    robust       ours (``paper``: the paper's exact protocol)
holdout                     0.25         ours: check images per class, robust protocol
patience                    20           ours: generations without held-out gain
stop_trend                  0.01         ours: stalled-fitness shortcut / proven-search extension
cv_folds                    5            ours: refiner selection folds
z_noise                     1.645        ours: one-sided 5 % certification level
refiner_data                mean         ours (``population``: measured, see BENCHMARKS)
ensemble_k                  4            ours: templates an ``ensemble`` keeps
template_bank               clip-imagenet  CLIP's ImageNet contexts (``ensemble`` mode)
vocabulary                  default      ours: words of a text-only client's search
word_lr                     2.0          ours (BDPL's step is task-specific)
canary                      0            ours: probe images of the drift canary (0: none)
word_search                 halving      ours: measured, BENCHMARKS "Word search"
==========================  ===========  ==============================================

Two protocols. ``paper`` is the paper's (and official code's) loop exactly: the
refiner trains every generation for ``refiner_epochs`` on the CMA-ES mean's
logits, and the last generation (or the best validation one) is deployed as is.
``robust`` (the default) searches the prompt on the training images minus a small
held-out *check* part that rides along, at no extra query, in the one call per
generation that scores the mean; it stops when the check estimate has not improved
for ``patience`` generations (or half that when the search fitness stalls; a search
whose generation then already beats zero-shot on the check images goes on while its
fitness still falls beyond its noise), then
picks the deployed behaviour — zero-shot, prompt only, prompt + refiner or refiner
only — the generation it stops at, certified against zero-shot on all the check images
(``z_noise``; :func:`~craft_sdk.tuner.plan.certification_plan` decides first whether
a search could be certified at all), chooses the refiner's capacity and training length by
k-fold cross-validation on logits already paid for, and fits a calibration
temperature (see :mod:`craft_sdk.tuner.selection`).

The projection A ~ N(0, std²) maps z ∈ R^D to a context offset [n_ctx, d]. Its
scale decides whether prompt search helps at all, and the right value depends
on the model's embedding scale, so by default ``std = prompt_scale · ctx_rms /
sqrt(D)``: a CMA-ES step of size sigma moves every offset element by about
``sigma · prompt_scale · ctx_rms``, where ``ctx_rms`` is the RMS of the
template's context-token embeddings reported by the client. Set
``projection_std`` to fix the paper-style absolute value instead.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..client.base import DEFAULT_TEMPLATE
from ..client.contexts import MAX_CONTEXT_CHARS, MAX_ENSEMBLE, context_problem  # noqa: F401 - the context rules, re-exported
from ..errors import ConfigError

MODES = ("zero-shot", "pg", "pr", "pg+pr", "craft", "ensemble")
SELECTIONS = ("last", "best-val")
PROTOCOLS = ("robust", "paper")
REFINER_DATA = ("mean", "population")
WORD_SEARCHES = ("halving", "pg")


@dataclass(frozen=True)
class TuneConfig:
    """Hyperparameters of one tuning run.

    Args:
        mode: ``zero-shot``, ``pg`` (prompt generation only, = BBT), ``pr`` (refiner only),
            ``pg+pr`` (alternated, no consistency losses), ``craft`` (collaborative, default) or
            ``ensemble`` (a template ensemble: ``ensemble_k`` contexts of ``template_bank`` picked by
            greedy forward selection, their log-probabilities averaged; no search, no refiner).
        budget: hard ceiling on queries for the whole run (search + refiner + validation).
        seed: seed of the projection, CMA-ES, refiner init and mini-batch order.
        template: context template whose tokens the prompt offset modifies.
        intrinsic_dim: dimension D of the search space z.
        popsize: CMA-ES population size (candidates scored per generation).
        sigma0: initial CMA-ES step size in z units.
        prompt_scale: offset scale relative to the context-embedding RMS (see module doc).
        projection_std: absolute std of A; overrides ``prompt_scale`` when set.
        bound: box bound on each z coordinate (None: unbounded).
        refiner_hidden: hidden width of the refiner MLP.
        refiner_layers: linear layers in the refiner (1 = linear map, 3 = paper's MLP); the robust protocol
            chooses between a linear map and this depth by cross-validation.
        residual: refined = logits + g(logits) when True, g(logits) when False.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        batch_size: refiner mini-batch size.
        refiner_epochs: refiner epochs per generation (``pr`` mode: per planned generation).
        lam: weight of KL(refined ‖ raw) in the CMA-ES fitness; None = 0.1 / C.
        beta: weight of KL(raw ‖ refined) in the refiner loss; None = 0.1 / C.
        val_every: generations between validation queries (when validation data is given).
        selection: ``best-val`` keeps the generation with the best validation accuracy
            (needs validation data), ``last`` keeps the final state.
        max_generations: optional cap on generations (the budget caps them anyway).
        protocol: ``robust`` (default: held-out selection, early stopping, calibration,
            never worse than zero-shot beyond noise) or ``paper`` (the paper's exact loop).
        holdout: robust protocol: fraction of each class's training images held out of
            the prompt search as check images (ignored when validation data is given).
        patience: robust protocol: stop after this many generations without a held-out
            improvement (None: spend the whole budget).
        stop_trend: robust protocol: stop after ``patience // 2`` generations without a held-out
            improvement when the mean search fitness also fell by less than this fraction over the
            last ``patience // 2`` generations; when the patience runs out at a generation that beats
            zero-shot on the check images, search on while the fitness still falls by at least this
            fraction, beyond its noise, over the last ``patience`` generations (0: plain patience, no
            extension; :mod:`craft_sdk.tuner.stopping`).
        cv_folds: robust protocol: folds of the refiner's cross-validation.
        z_noise: robust protocol: a behaviour replaces zero-shot only when certified at level
            1 - Phi(z_noise) (exact sign test on the check images, Holm-corrected); a temperature
            only when its cross-fitted log-loss gain exceeds this many standard errors.
        refiner_data: robust protocol: train the refiner on the mean's logits (``mean``) or
            also on every candidate's logits of the generation (``population``).
        ensemble_k: ``ensemble`` mode: contexts to keep by greedy selection (each costs one query per
            image set at prediction time); 0 keeps the whole bank (a fixed ensemble).
        template_bank: ``ensemble`` mode: the candidate contexts: ``clip-imagenet`` (CLIP's 41
            ImageNet contexts), ``clip-selected`` (the 6 CLIP selected) or a UTF-8 file with one
            context per line.
        vocabulary: text-only clients: the words the context search may use: ``default`` (CLIP's
            template words and ~200 common words) or a UTF-8 file with one word per line (the
            template's own words are always added).
        canary: probe images of the drift canary recorded at the end of the run (0: none; 16 is a good
            choice): costs 2 queries (2 per context for an ensemble), reserved from the budget; see craft-sdk check.
        word_lr: text-only clients: the ``pg`` word search's step on its per-slot word logits.
        word_search: text-only clients: how the context's words are searched: ``halving`` (successive
            halving over words screened in groups around the best context so far; the default) or ``pg``
            (BDPL's per-slot policy gradient, the earlier default).
    """

    mode: str = "craft"
    budget: int = 8000
    seed: int = 0
    template: str = DEFAULT_TEMPLATE
    intrinsic_dim: int = 512
    popsize: int = 40
    sigma0: float = 1.0
    prompt_scale: float = 1.0
    projection_std: float | None = None
    bound: float | None = None
    refiner_hidden: int = 512
    refiner_layers: int = 3
    residual: bool = True
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 256
    refiner_epochs: int = 1
    lam: float | None = None
    beta: float | None = None
    val_every: int = 10
    selection: str = "best-val"
    max_generations: int | None = None
    protocol: str = "robust"
    holdout: float = 0.25
    patience: int | None = 20
    stop_trend: float = 0.01
    cv_folds: int = 5
    z_noise: float = 1.645
    refiner_data: str = "mean"
    ensemble_k: int = 4
    template_bank: str = "clip-imagenet"
    vocabulary: str = "default"
    word_lr: float = 2.0
    canary: int = 0
    word_search: str = "halving"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.selection not in SELECTIONS:
            raise ConfigError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        positive_ints = ("budget", "intrinsic_dim", "popsize", "refiner_hidden", "refiner_layers", "batch_size", "val_every")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.popsize < 2:
            raise ConfigError(f"popsize must be >= 2 for CMA-ES, got {self.popsize}")
        if self.refiner_epochs < 0:
            raise ConfigError(f"refiner_epochs must be >= 0, got {self.refiner_epochs}")
        if not isinstance(self.vocabulary, str) or not self.vocabulary.strip():
            raise ConfigError("vocabulary must be 'default' or a file with one word per line")
        for name in ("sigma0", "prompt_scale", "lr", "word_lr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive finite number, got {value!r}")
        for name in ("projection_std", "bound", "lam", "beta"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= (0 if name in ("lam", "beta") else 1e-12)):
                raise ConfigError(f"{name} must be None or a {'non-negative' if name in ('lam', 'beta') else 'positive'} number, got {value!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_generations is not None and self.max_generations < 0:
            raise ConfigError(f"max_generations must be >= 0 or None, got {self.max_generations}")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.word_search not in WORD_SEARCHES:
            raise ConfigError(f"word_search must be one of {WORD_SEARCHES}, got {self.word_search!r}")
        if self.refiner_data not in REFINER_DATA:
            raise ConfigError(f"refiner_data must be one of {REFINER_DATA}, got {self.refiner_data!r}")
        if not (isinstance(self.holdout, (int, float)) and 0 <= self.holdout < 1):
            raise ConfigError(f"holdout must be in [0, 1), got {self.holdout!r}")
        if self.patience is not None and (not isinstance(self.patience, int) or isinstance(self.patience, bool) or self.patience < 1):
            raise ConfigError(f"patience must be a positive integer or None, got {self.patience!r}")
        if not (isinstance(self.stop_trend, (int, float)) and 0 <= self.stop_trend < 1):
            raise ConfigError(f"stop_trend must be in [0, 1) (0: plain patience), got {self.stop_trend!r}")
        if not isinstance(self.cv_folds, int) or isinstance(self.cv_folds, bool) or self.cv_folds < 2:
            raise ConfigError(f"cv_folds must be an integer >= 2, got {self.cv_folds!r}")
        if not (isinstance(self.z_noise, (int, float)) and math.isfinite(self.z_noise) and self.z_noise >= 0):
            raise ConfigError(f"z_noise must be a non-negative number, got {self.z_noise!r}")
        if not isinstance(self.ensemble_k, int) or isinstance(self.ensemble_k, bool) or self.ensemble_k < 0:
            raise ConfigError(f"ensemble_k must be a non-negative integer (0: the whole bank), got {self.ensemble_k!r}")
        if not isinstance(self.template_bank, str) or not self.template_bank.strip():
            raise ConfigError("template_bank must be 'clip-imagenet', 'clip-selected' or a file with one context per line")
        if context_problem(self.template):
            raise ConfigError(f"template {context_problem(self.template)}; it is the text before the class name, e.g. 'a photo of a'")
        if not isinstance(self.canary, int) or isinstance(self.canary, bool) or not 0 <= self.canary <= 256:
            raise ConfigError(f"canary must be an integer from 0 (no canary) to 256 probe images, got {self.canary!r}")
        if self.ensemble_k > MAX_ENSEMBLE:
            raise ConfigError(f"ensemble_k must be at most {MAX_ENSEMBLE} (each context is one query per prediction), got {self.ensemble_k}")

    @property
    def uses_prompt(self) -> bool:
        """Whether this mode searches a prompt offset."""
        return self.mode in ("pg", "pg+pr", "craft")

    @property
    def uses_refiner(self) -> bool:
        """Whether this mode trains a refiner."""
        return self.mode in ("pr", "pg+pr", "craft")

    @property
    def robust(self) -> bool:
        """Whether this run uses the robust protocol."""
        return self.protocol == "robust"

    def kl_weights(self, n_classes: int) -> tuple[float, float]:
        """(λ, β) for ``n_classes``: 0 outside ``craft``; paper default 0.1 / C."""
        if self.mode != "craft":
            return 0.0, 0.0
        default = 0.1 / n_classes
        return (default if self.lam is None else self.lam, default if self.beta is None else self.beta)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TuneConfig:
        """Build from a dict; unknown keys raise (a typo must not pass silently)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown tuning option(s) {unknown}; valid: {sorted(known)}")
        return cls(**data)
