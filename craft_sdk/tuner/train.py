"""Collaborative training (paper section 3.3): alternate one CMA-ES generation and refiner updates.

Per generation g (queries in brackets):

1. CMA-ES asks P candidates z_k; their offsets A z_k are scored on the training
   set in one batched call [P, category ``search``]; fitness = CE(f_k, y) +
   λ KL(softmax(f_k + g(f_k)) ‖ softmax(f_k)) with the refiner g frozen; tell.
2. The new CMA-ES mean is scored on the training set [1, ``refine``]; the refiner
   trains on those logits for ``refiner_epochs`` with CE + β KL(raw ‖ refined).
3. Every ``val_every`` generations (and the last), the mean is scored on the
   validation set [1, ``validation``] for model selection.

The deployed prompt is the CMA-ES *mean* (``xfavorite``), not the best single
candidate: the best of 40 noisy candidates on a few-shot training set is the one
most flattered by sampling noise, while the mean averages the best half of the
population; it is also exactly the prompt the refiner was trained on.
Before generation 1 the zero offset is scored once [1, ``refine``]: the zero-shot
baseline. Generations are planned so the whole run fits the budget.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..client.base import Capabilities, PredictionClient
from ..client.ledger import MeteredClient, QueryLedger
from ..data import ImageDataset
from ..errors import BudgetExceededError, ConfigError, CraftError
from . import mlp
from .checkpoint import LEDGER_FILE, has_checkpoint, load_checkpoint, save_checkpoint
from .config import TuneConfig
from .projection import GENERATOR, project, projection_matrix

logger = logging.getLogger(__name__)


@dataclass
class Progress:
    """One progress event: after the baseline (generation 0) and after each generation.

    ``offset`` (the current CMA-ES mean's prompt offset, None without a prompt) and
    ``refine`` (the current refiner as a function of logits) let a caller *observe*
    the model mid-run, e.g. score a held-out set for an accuracy-vs-queries curve;
    both are valid only during the callback, and nothing a callback does feeds back
    into training.
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
    """Everything a tuning run learned, ready to become an adapter (numpy only)."""

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


def plan_generations(config: TuneConfig, has_val: bool) -> int:
    """Generations that fit the budget after the baseline queries."""
    used = 1 + int(has_val)
    if not config.uses_prompt:
        n = (config.budget - used) // (config.popsize + 1)
    else:
        n = 0
        while True:
            cost = config.popsize + 1 + int(has_val and ((n + 1) % config.val_every == 0))
            if used + cost > config.budget:
                break
            used += cost
            n += 1
    if config.max_generations is not None:
        n = min(n, config.max_generations)
    return max(n, 0)


def _accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    return float((scores.argmax(-1) == labels).mean()) if len(labels) else float("nan")


def _as_log_scores(x: np.ndarray, output: str) -> np.ndarray:
    return np.log(np.clip(x, 1e-12, None)).astype(np.float32) if output == "probs" else x


def _effective_config(config: TuneConfig, caps: Capabilities) -> TuneConfig:
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
            journal = self.checkpoint_dir / LEDGER_FILE
            if ledger is None:
                self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
                ledger = QueryLedger(self.config.budget, journal=journal)
        ledger = ledger if ledger is not None else QueryLedger(self.config.budget)
        run = _Run(self, client, ledger, train, val)
        return run.execute()

    def _check_checkpoint_dir(self) -> None:
        assert self.checkpoint_dir is not None
        exists = (self.checkpoint_dir / LEDGER_FILE).exists()
        if exists and not self.resume:
            raise ConfigError(
                f"{self.checkpoint_dir} already holds a run; pass --resume to continue it or choose another --checkpoint-dir"
            )


class _Run:
    """State of one tuning run (split out of :class:`Tuner` to keep each step small)."""

    def __init__(
        self, tuner: Tuner, client: PredictionClient, ledger: QueryLedger, train: ImageDataset, val: ImageDataset | None
    ) -> None:
        self.t0 = time.perf_counter()
        self.tuner = tuner
        self.requested = tuner.config
        self.caps = client.capabilities(tuner.config.template)
        self.config = _effective_config(tuner.config, self.caps)
        self.ledger = ledger
        self.client = MeteredClient(client, ledger)
        self.train, self.val = train, val
        self.names = list(train.class_names)
        self.y = train.labels
        self.lam, self.beta = self.config.kl_weights(len(self.names))
        self.n_gen = plan_generations(self.config, val is not None)
        self.history: list[dict[str, Any]] = []
        self.fitness_rows: list[np.ndarray] = []
        self.best: dict[str, Any] = {"val": -1.0}
        self.metrics: dict[str, Any] = {}
        self._setup_prompt()
        self._setup_refiner()

    # ---------------------------------------------------------------- setup

    def _setup_prompt(self) -> None:
        c = self.config
        self.search = None
        self.a = None
        self.std = None
        if not c.uses_prompt:
            return
        from .search import PromptSearch

        assert self.caps.n_ctx is not None and self.caps.ctx_dim is not None
        if c.projection_std is not None:
            self.std = c.projection_std
        elif self.caps.ctx_rms is not None and self.caps.ctx_rms > 0:
            self.std = c.prompt_scale * self.caps.ctx_rms / math.sqrt(c.intrinsic_dim)
        else:
            raise ConfigError(f"model {self.caps.model_id} does not report ctx_rms; set projection_std explicitly")
        self.a = projection_matrix(c.seed, self.caps.n_ctx * self.caps.ctx_dim, c.intrinsic_dim, self.std)
        self.search = PromptSearch(c.intrinsic_dim, c.popsize, c.sigma0, c.seed, c.bound)
        self.z = np.zeros(c.intrinsic_dim)

    def _setup_refiner(self) -> None:
        c = self.config
        self.refiner = None
        if not c.uses_refiner:
            return
        from .refiner import RefinerTrainer

        weights = mlp.init_weights(len(self.names), c.refiner_hidden, c.refiner_layers, c.residual, c.seed)
        self.refiner = RefinerTrainer(weights, c.residual, c.lr, c.weight_decay, c.batch_size, c.seed + 1)

    def _offsets(self, z: np.ndarray) -> np.ndarray | None:
        if self.a is None:
            return None
        assert self.caps.n_ctx is not None and self.caps.ctx_dim is not None
        return project(self.a, z, self.caps.n_ctx, self.caps.ctx_dim)

    def _query(self, handle: Any, z: np.ndarray | None, category: str) -> np.ndarray:
        offsets = None if z is None else self._offsets(z)
        out = self.client.predict(handle, self.names, self.config.template, offsets, category=category)
        return _as_log_scores(out, self.caps.output)

    def _scores(self, logits: np.ndarray) -> np.ndarray:
        return self.refiner.refine(logits) if self.refiner is not None else logits

    # ----------------------------------------------------------------- loop

    def execute(self) -> TuneResult:
        self.train_handle = self.client.upload(self.train.images)
        self.val_handle = self.client.upload(self.val.images) if self.val is not None else None
        start = self._restore() if self._resumable() else self._baseline()
        try:
            if self.config.uses_prompt:
                for g in range(start + 1, self.n_gen + 1):
                    self._check_affordable(g)
                    self._generation(g)
            elif self.refiner is not None and start == 0:
                self._train_fixed_prompt()
        except BudgetExceededError as exc:
            logger.warning("stopping early: %s", exc)
            self.metrics["stopped_early"] = str(exc)
        return self._result()

    def _resumable(self) -> bool:
        directory = self.tuner.checkpoint_dir
        if not self.tuner.resume or directory is None:
            return False
        if has_checkpoint(directory):
            return True
        logger.info("no checkpoint in %s yet: starting the run (%d queries already billed)", directory, self.ledger.used)
        return False

    def _check_affordable(self, g: int) -> None:
        """Refuse a generation the ledger cannot pay in full (e.g. after a resume redid lost work)."""
        has_val = self.val_handle is not None and (g % self.config.val_every == 0 or g == self.n_gen)
        cost = self.config.popsize + 1 + int(has_val)
        if not self.ledger.can_afford(cost):
            raise BudgetExceededError(
                f"query budget exhausted: {self.ledger.used} of {self.ledger.budget} used, generation {g} "
                f"of {self.n_gen} needs {cost}; raise --budget to continue"
            )

    def _baseline(self) -> int:
        z0 = None if self.a is None else np.zeros(self.config.intrinsic_dim)
        f0 = self._query(self.train_handle, z0, "refine")
        self.f_last = f0
        self.metrics["zero_shot_train_accuracy"] = _accuracy(f0, self.y)
        val_acc = None
        if self.val_handle is not None:
            self.fv = self._query(self.val_handle, z0, "validation")
            val_acc = _accuracy(self.fv, self.val.labels)  # type: ignore[union-attr]
            self.metrics["zero_shot_val_accuracy"] = val_acc
            self._consider(0, val_acc)
        self._record(0, float("nan"), self.metrics["zero_shot_train_accuracy"], val_acc, None)
        self._checkpoint(0)
        return 0

    def _generation(self, g: int) -> None:
        assert self.search is not None
        z = self.search.ask()
        f = self._query(self.train_handle, z, "search")
        from .refiner import fitness

        fit = fitness(f, self.y, self.refiner.model if self.refiner is not None else None, self.lam)
        self.search.tell(z, fit)
        self.fitness_rows.append(fit)
        self.z = self.search.mean
        fm = self._query(self.train_handle, self.z, "refine")
        loss = self._fit_refiner(fm, self.config.refiner_epochs)
        acc = _accuracy(self._scores(fm), self.y)
        val_acc = None
        if self.val_handle is not None and (g % self.config.val_every == 0 or g == self.n_gen):
            fv = self._query(self.val_handle, self.z, "validation")
            val_acc = _accuracy(self._scores(fv), self.val.labels)  # type: ignore[union-attr]
            self._consider(g, val_acc)
        self._record(g, loss, acc, val_acc, fit)
        if g % self.tuner.checkpoint_every == 0 or g == self.n_gen:
            self._checkpoint(g)

    def _train_fixed_prompt(self) -> None:
        """``pr`` mode: the prompt never changes, so one scoring of the train (and val) set suffices."""
        epochs = self.config.refiner_epochs
        for g in range(1, self.n_gen + 1):
            loss = self._fit_refiner(self.f_last, epochs)
            acc = _accuracy(self._scores(self.f_last), self.y)
            val_acc = None
            if self.val is not None and (g % self.config.val_every == 0 or g == self.n_gen):
                val_acc = _accuracy(self._scores(self.fv), self.val.labels)
                self._consider(g, val_acc)
            self._record(g, loss, acc, val_acc, None)

    def _fit_refiner(self, logits: np.ndarray, epochs: int) -> float:
        self.f_last = logits
        if self.refiner is None:
            from .refiner import fitness

            return float(fitness(logits[None], self.y, None, 0.0)[0])
        return self.refiner.train(logits, self.y, self.beta, epochs)

    def _consider(self, g: int, val_acc: float) -> None:
        if val_acc > self.best["val"]:
            self.best = {
                "val": val_acc,
                "generation": g,
                "z": None if self.a is None else np.array(self.z, copy=True),
                "refiner": None if self.refiner is None else self.refiner.model.numpy_weights(),
            }

    def _record(self, g: int, loss: float, acc: float, val_acc: float | None, fit: np.ndarray | None) -> None:
        rec: dict[str, Any] = {
            "generation": g,
            "queries_used": self.ledger.used,
            "train_loss": None if math.isnan(loss) else round(loss, 6),
            "train_accuracy": round(acc, 6),
        }
        if fit is not None:
            rec["best_fitness"] = round(float(fit.min()), 6)
            rec["mean_fitness"] = round(float(fit.mean()), 6)
            rec["sigma"] = round(self.search.sigma, 6) if self.search is not None else None
        if val_acc is not None:
            rec["val_accuracy"] = round(val_acc, 6)
        self.history.append(rec)
        if self.tuner.on_progress is not None:
            budget = self.ledger.budget if self.ledger.budget is not None else self.config.budget
            offset = None if self.a is None else self._offsets(self.z)
            self.tuner.on_progress(
                Progress(g, self.n_gen, self.ledger.used, budget, loss, acc, val_acc, offset, self._scores)
            )

    # ------------------------------------------------------------ checkpoint

    def _checkpoint(self, g: int) -> None:
        directory = self.tuner.checkpoint_dir
        if directory is None:
            return
        tensors: dict[str, np.ndarray] = {}
        if self.fitness_rows:
            tensors["search.fitness"] = np.stack(self.fitness_rows)
        if self.refiner is not None:
            tensors.update({f"state.{k}": v for k, v in self.refiner.state_tensors().items()})
        tensors["last.logits"] = self.f_last
        if self.val is not None and hasattr(self, "fv"):
            tensors["last.val_logits"] = self.fv
        best = {k: v for k, v in self.best.items() if k in ("val", "generation")}
        if self.best.get("z") is not None:
            tensors["best.z"] = self.best["z"]
        for k, v in (self.best.get("refiner") or {}).items():
            tensors[f"best.{k}"] = v
        state = {
            "generation": g,
            "n_generations": self.n_gen,
            "config": self.requested.to_dict(),
            "model_id": self.caps.model_id,
            "data": self._data_info(),
            "history": self.history,
            "metrics": self.metrics,
            "best": best,
            "ask_digests": self.search.ask_digests if self.search is not None else [],
            "refiner": self.refiner.state_json() if self.refiner is not None else None,
        }
        save_checkpoint(directory, tensors, state)

    def _restore(self) -> int:
        assert self.tuner.checkpoint_dir is not None
        tensors, state = load_checkpoint(self.tuner.checkpoint_dir)
        self._check_same_run(state)
        self.n_gen = int(state["n_generations"])
        self.history, self.metrics = state["history"], state["metrics"]
        if "search.fitness" in tensors and self.search is not None:
            self.search.replay(tensors["search.fitness"], state["ask_digests"])
            self.fitness_rows = list(tensors["search.fitness"])
            self.z = self.search.mean
        if self.refiner is not None:
            self.refiner.load_state({k[6:]: v for k, v in tensors.items() if k.startswith("state.")}, state["refiner"])
        self.f_last = tensors["last.logits"]
        if "last.val_logits" in tensors:
            self.fv = tensors["last.val_logits"]
        self.best = dict(state["best"])
        if "generation" in self.best:
            self.best["z"] = tensors.get("best.z")
            ref = {k[5:]: v for k, v in tensors.items() if k.startswith("best.refiner.")}
            self.best["refiner"] = ref or None
        logger.info("resumed at generation %d of %d (%d queries already used)", state["generation"], self.n_gen, self.ledger.used)
        return int(state["generation"])

    def _check_same_run(self, state: dict[str, Any]) -> None:
        if state["config"] != self.requested.to_dict():
            raise CraftError("the checkpoint was written with a different configuration; resume with the same options")
        if state["model_id"] != self.caps.model_id:
            raise CraftError(f"the checkpoint is for model {state['model_id']}, not {self.caps.model_id}")
        if state["data"]["train_fingerprint"] != self._data_info()["train_fingerprint"]:
            raise CraftError("the checkpoint was written for different training data; resume with the same data and seed")

    # ---------------------------------------------------------------- result

    def _data_info(self) -> dict[str, Any]:
        if not hasattr(self, "_data"):
            counts = self.train.class_counts()
            self._data = {
                "train_fingerprint": self.train.fingerprint(),
                "n_train": len(self.train),
                "shots": int(counts.min()) if counts.min() == counts.max() else None,
                "val_fingerprint": self.val.fingerprint() if self.val is not None else None,
                "n_val": len(self.val) if self.val is not None else 0,
            }
        return self._data

    def _result(self) -> TuneResult:
        use_best = self.config.selection == "best-val" and "generation" in self.best
        z = self.best["z"] if use_best else (self.z if self.a is not None else None)
        refiner = self.best["refiner"] if use_best else (self.refiner.model.numpy_weights() if self.refiner else None)
        selected = self.best["generation"] if use_best else (self.history[-1]["generation"] if self.history else 0)
        last = self.history[-1] if self.history else {}
        self.metrics["train_accuracy"] = next(
            (h["train_accuracy"] for h in self.history if h["generation"] == selected), last.get("train_accuracy")
        )
        if use_best:
            self.metrics["val_accuracy"] = self.best["val"]
        return TuneResult(
            config=self.config,
            requested_mode=self.requested.mode,
            capabilities=self.caps,
            class_names=tuple(self.names),
            z=None if z is None else np.asarray(z, np.float64),
            offset=None if z is None else self._offsets(np.asarray(z, np.float64)),
            projection_std=self.std,
            refiner=refiner,
            kl_weights=(self.lam, self.beta),
            history=self.history,
            queries=self.ledger.to_dict(),
            metrics=self.metrics,
            data=self._data_info(),
            n_generations=self.n_gen,
            selected_generation=int(selected),
            wall_time_s=time.perf_counter() - self.t0,
            extras={"projection_generator": GENERATOR},
        )
