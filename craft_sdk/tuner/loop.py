"""One tuning run: the generation loop and its state (see :mod:`craft_sdk.tuner.train` for the method).

:class:`Run` holds what one run carries between generations; every attribute is
created in ``__init__``. The loop itself is :meth:`Run.execute`: baseline, then one
generation after another until the plan, the budget, the stopping rule or an inert
prompt ends it, then the result (robust protocol: selection and calibration first).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from ..client.base import PredictionClient
from ..client.ledger import MeteredClient, QueryLedger
from ..data import ImageDataset, seen_fingerprints
from ..errors import BudgetExceededError, ConfigError, CraftError
from ..scores import as_log_scores
from . import mlp, selection
from .checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from .plan import (
    ImageSets, baseline_cost, calls_usage, canary_reserve, certification_plan, effective_config, generation_calls, generation_cost,
    one_generation_problem, plan_generations,
)
from .projection import GENERATOR
from .prompts import create_prompt_space
from .result import Progress, TuneResult
from .stopping import EarlyStopping

if TYPE_CHECKING:
    from .train import Tuner

logger = logging.getLogger(__name__)

FLAT_GENERATIONS = 3  # identical fitness for this many generations: the client ignores prompt offsets


def _accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    return float((scores.argmax(-1) == labels).mean()) if len(labels) else float("nan")


class _Images:
    """The run's image sets: ``search`` (what candidates are scored on) and ``scored`` (what the
    mean is scored on: the search images, then — robust protocol — the check images)."""

    def __init__(self, config: Any, train: ImageDataset, val: ImageDataset | None, holdout: bool = True) -> None:
        self.paper_val = val if not config.robust else None
        if not config.robust:
            self.search, self.check = train, None
        elif val is not None:
            self.search, self.check = train, val
        elif not holdout:  # nothing to certify a prompt with: every image trains (and cross-validates) the refiner
            self.search, self.check = train, None
        else:
            fit_idx, check_idx = selection.split_holdout(train.labels, config.holdout, config.seed)
            self.search, self.check = train.subset(fit_idx), train.subset(check_idx)
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
        # positions into the check images: the select half (stopping, generation, ranking) and the certify half
        self.select, self.certify = selection.split_check(self.y_check, config.seed)
        if not holdout:  # no search: a given validation set only certifies
            self.select, self.certify = np.zeros(0, np.int64), np.arange(len(self.y_check))


class Run:
    """State of one tuning run."""

    def __init__(
        self, tuner: Tuner, client: PredictionClient, ledger: QueryLedger, train: ImageDataset, val: ImageDataset | None
    ) -> None:
        self.started = time.perf_counter()
        self.tuner = tuner
        self.requested = tuner.config
        self.caps = client.capabilities(tuner.config.template)
        self.config = effective_config(tuner.config, self.caps)
        self.ledger = ledger
        self.client = MeteredClient(client, ledger)
        self.train, self.val = train, val
        self.plan = certification_plan(self.config, train.labels, val.labels if val is not None else None)
        self.images = _Images(self.config, train, val, holdout=self.plan.search)
        self.names = list(train.class_names)
        self.lam, self.beta = self.config.kl_weights(len(self.names))
        self.n_gen = plan_generations(self.config, self.images.paper_val is not None) if self.plan.search else 0
        needed = baseline_cost(self.config, self.images.paper_val is not None)
        self.bank: tuple[str, ...] = ()  # ensemble mode: the candidate contexts, one query each
        if self.config.mode == "ensemble" and self.plan.search:
            from .ensemble import ensemble_bank

            self.bank = ensemble_bank(self.config)
            needed += len(self.bank)
        needed += canary_reserve(self.config, min(self.config.ensemble_k or len(self.bank), len(self.bank)) if self.bank else 1)
        if needed > self.config.budget:
            what = f"the zero-shot baseline and {len(self.bank)} ensemble contexts" if self.bank else "the zero-shot baseline"
            raise ConfigError(f"budget {self.config.budget} cannot pay {what} ({needed} queries); raise --budget")
        if self.config.uses_prompt and self.n_gen == 0 and self.config.max_generations != 0 and self.plan.search:
            raise ConfigError(one_generation_problem(self.config, self.images.paper_val is not None))
        self.history: list[dict[str, Any]] = []
        self.fitness_rows: list[np.ndarray] = []
        self.metrics: dict[str, Any] = {}
        self.best: dict[str, Any] = {"val": -1.0}  # best snapshot: z, refiner, scored logits, generation
        self.stopping = EarlyStopping(self.config.patience if self.config.robust else None, min_trend=self.config.stop_trend)
        self.stopped: str | None = None
        if not self.plan.search and (self.config.uses_prompt or self.config.mode == "ensemble"):
            self.stopped = f"not searched: {self.plan.reason}"  # plan before paying: nothing could certify the search
            logger.warning("%s", self.stopped)
        self.prompt_inert = False  # the client ignored every offset: no prompt can be deployed
        self.search_handle: Any = None
        self.scored_handle: Any = None
        self.val_handle: Any = None
        self.zero_logits: np.ndarray | None = None  # zero-shot logits on the scored images
        self.last_logits: np.ndarray | None = None  # the current mean's logits on the scored images
        self.last_val_logits: np.ndarray | None = None  # paper protocol: the last validation logits
        self.population: np.ndarray | None = None  # the last generation's candidates' logits
        self.ensemble: dict[str, Any] | None = None  # ensemble mode: the picked contexts and their logits
        self._data: dict[str, Any] | None = None
        self.prompts = create_prompt_space(self.config, self.caps)
        self.point: Any = self.prompts.zero() if self.prompts is not None else None  # the CMA-ES mean (deployable)
        self.refiner = self._setup_refiner()

    # ---------------------------------------------------------------- setup

    def _setup_refiner(self) -> Any:
        c = self.config
        if not c.uses_refiner:
            return None
        from .refiner import RefinerTrainer

        weights = mlp.init_weights(len(self.names), c.refiner_hidden, c.refiner_layers, c.residual, c.seed)
        return RefinerTrainer(weights, c.residual, c.lr, c.weight_decay, c.batch_size, c.seed + 1)

    def _offsets(self, point: Any) -> np.ndarray | None:
        return self.prompts.offsets(point) if self.prompts is not None else None

    def _query(self, handle: Any, point: Any, category: str) -> np.ndarray:
        """Log-scores [N, C] of one point (zero-shot without a prompt space), or [P, N, C] of a population."""
        if self.prompts is None or point is None:
            out = self.client.predict(handle, self.names, self.config.template, None, category=category)
        else:
            out = self.prompts.score(self.client, handle, self.names, point, category)
        return as_log_scores(out, self.caps.output)

    def _scores(self, logits: np.ndarray) -> np.ndarray:
        return self.refiner.refine(logits) if self.refiner is not None else logits

    # ----------------------------------------------------------------- loop

    def execute(self) -> TuneResult:
        self.search_handle = self.client.upload(self.images.search.images)
        self.scored_handle = self.search_handle
        if self.images.scored is not self.images.search:
            self.scored_handle = self.client.upload(self.images.scored.images)
        if self.images.paper_val is not None:
            self.val_handle = self.client.upload(self.images.paper_val.images)
        start = self._restore() if self._resumable() else self._baseline()
        try:
            if self.config.uses_prompt:
                for g in range(start + 1, self.n_gen + 1):
                    if self.stopped is not None:
                        break
                    self._check_affordable(g)
                    self._generation(g)
            elif self.config.mode == "ensemble" and self.ensemble is None and self.stopped is None:
                self._ensemble()
            elif self.refiner is not None and start == 0 and not self.config.robust:
                self._train_fixed_prompt()
        except BudgetExceededError as exc:
            logger.warning("stopping early: %s", exc)
            self.metrics["stopped_early"] = str(exc)
        if self.stopped is not None:
            self.metrics["stopped"] = self.stopped
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
        cost = generation_cost(self.config, g, self.n_gen, self.val_handle is not None)
        if not self.ledger.can_afford(cost):
            raise BudgetExceededError(
                f"query budget exhausted: {self.ledger.used} of {self.ledger.budget} used, generation {g} "
                f"of {self.n_gen} needs {cost}; raise --budget to continue"
            )
        if self.ledger.max_cost is not None:  # the whole generation or none of it, in money too
            paper_val = self.images.paper_val
            sets = ImageSets(self.images.n_search, len(self.images.scored), len(paper_val) if paper_val is not None else 0)
            calls = generation_calls(self.config, g, self.n_gen, sets, self.caps.soft_prompts)
            if not self.ledger.can_afford_usage(calls_usage(self.client, calls, self.names, self.config.template)):
                raise BudgetExceededError(f"cost ceiling reached: {self.ledger.cost:.6g} of --max-cost {self.ledger.max_cost:g} "
                                          f"spent and generation {g} would pass it; raise --max-cost to continue")

    def _baseline(self) -> int:
        z0 = None if self.prompts is None else self.prompts.zero()
        logits = self._query(self.scored_handle, z0, "refine")
        self.zero_logits = self.last_logits = logits
        n = self.images.n_search
        self.metrics["zero_shot_train_accuracy"] = _accuracy(logits[:n], self.images.y)
        val_acc = None
        if self.val_handle is not None:
            self.last_val_logits = self._query(self.val_handle, z0, "validation")
            val_acc = _accuracy(self.last_val_logits, self.images.paper_val.labels)  # type: ignore[union-attr]
            self.metrics["zero_shot_val_accuracy"] = val_acc
            self._consider(0, val_acc)
        if self.images.check is not None and len(self.images.select):  # no select half (no search): nothing to track
            val_acc = self._check_progress(0, logits)
            self.metrics["zero_shot_check_accuracy"] = val_acc
        self._record(0, float("nan"), self.metrics["zero_shot_train_accuracy"], val_acc, None)
        self._checkpoint(0)
        return 0

    def _generation(self, g: int) -> None:
        from .refiner import fitness

        assert self.prompts is not None
        candidates = self.prompts.search.ask()
        population = self._query(self.search_handle, candidates, "search")
        fit = fitness(population, self.images.y, self.refiner.model if self.refiner is not None else None, self.lam)
        self.prompts.search.tell(candidates, fit)
        self.fitness_rows.append(fit)
        if self.config.refiner_data == "population" and self.config.robust:
            self.population = population
        self.point = self.prompts.search.mean
        mean_logits = self._query(self.scored_handle, self.point, "refine")
        loss = self._fit_refiner(mean_logits, self.config.refiner_epochs)
        acc = _accuracy(self._scores(mean_logits[: self.images.n_search]), self.images.y)
        val_acc = None
        if self.val_handle is not None and (g % self.config.val_every == 0 or g == self.n_gen):
            self.last_val_logits = self._query(self.val_handle, self.point, "validation")
            val_acc = _accuracy(self._scores(self.last_val_logits), self.images.paper_val.labels)  # type: ignore[union-attr]
            self._consider(g, val_acc)
        if self.images.check is not None:
            val_acc = self._check_progress(g, mean_logits)
        self._record(g, loss, acc, val_acc, fit)
        self._check_inert(g)
        if g % self.tuner.checkpoint_every == 0 or g == self.n_gen or self.stopped is not None:
            self._checkpoint(g)

    def _ensemble(self) -> None:
        """``ensemble`` mode: score the bank, pick the contexts (:mod:`craft_sdk.tuner.ensemble`); generation 1."""
        from .ensemble import select_ensemble

        self.ensemble = select_ensemble(self)
        logits, n = self.ensemble["logits"], self.images.n_search
        acc = _accuracy(logits[:n], self.images.y)
        val_acc = _accuracy(logits[n:], self.images.y_check) if self.images.check is not None else None
        self.best = {"val": acc if val_acc is None else val_acc, "generation": 1, "z": None, "refiner": None, "logits": logits, "population": None}
        self._record(1, float("nan"), acc, val_acc, None)
        self._checkpoint(1)  # a resumed run keeps the picked contexts instead of paying for the bank again

    def _check_progress(self, g: int, scored_logits: np.ndarray) -> float:
        """Robust protocol: score the current model on the check images (free) and apply the stopping rule."""
        sel = self.images.select  # the select half only: the certify half is looked at once, in finish_robust
        check = self._scores(scored_logits[self.images.n_search :][sel])
        y_sel = self.images.y_check[sel]
        acc = _accuracy(check, y_sel)
        if self.stopping.update(g, acc, selection.log_loss(check, y_sel)):
            point = None if self.prompts is None else self.prompts.copy(self.point)
            self.best = {"val": acc, "generation": g, "z": point,
                         "logits": np.array(scored_logits, copy=True),
                         "population": None if self.population is None else np.array(self.population, copy=True)}
        if g > 0 and self.stopping.should_stop(g, [float(row.mean()) for row in self.fitness_rows]):
            self.stopped = self.stopping.reason()
            logger.info("%s", self.stopped)
        return acc

    def _check_inert(self, g: int) -> None:
        """Stop the prompt search when offsets change nothing (identical fitness for every candidate)."""
        if g != FLAT_GENERATIONS or len(self.fitness_rows) < FLAT_GENERATIONS:
            return
        spread = max(float(np.ptp(row)) for row in self.fitness_rows[-FLAT_GENERATIONS:])
        if spread <= 1e-9 * (1.0 + abs(float(self.fitness_rows[-1].mean()))):
            self.prompt_inert = True
            self.stopped = (
                f"stopped: the prompt search is inert (every candidate scored the same for {FLAT_GENERATIONS} "
                "generations: the client ignores the prompt)" + ("; the refiner is kept" if self.config.uses_refiner else "")
            )
            logger.warning("%s", self.stopped)

    def _train_fixed_prompt(self) -> None:
        """``pr`` mode, paper protocol: the prompt never changes, so one scoring of the train (and val) set suffices."""
        epochs = self.config.refiner_epochs
        if self.n_gen == 0:
            logger.warning("budget %d leaves no refiner epoch (paper protocol ties them to the budget)", self.config.budget)
        for g in range(1, self.n_gen + 1):
            loss = self._fit_refiner(self.last_logits, epochs)  # type: ignore[arg-type]
            acc = _accuracy(self._scores(self.last_logits), self.images.y)  # type: ignore[arg-type]
            val_acc = None
            if self.val_handle is not None and (g % self.config.val_every == 0 or g == self.n_gen):
                val_acc = _accuracy(self._scores(self.last_val_logits), self.images.paper_val.labels)  # type: ignore[arg-type, union-attr]
                self._consider(g, val_acc)
            self._record(g, loss, acc, val_acc, None)

    def _fit_refiner(self, logits: np.ndarray, epochs: int) -> float:
        self.last_logits = logits
        x, y = logits[: self.images.n_search], self.images.y
        if self.refiner is None:
            from .refiner import fitness

            return float(fitness(x[None], y, None, 0.0)[0])
        if self.population is not None:
            x = np.concatenate([x, self.population.reshape(-1, x.shape[-1])])
            y = np.concatenate([y, np.tile(self.images.y, self.population.shape[0])])
        return self.refiner.train(x, y, self.beta, epochs)

    def _consider(self, g: int, val_acc: float) -> None:
        if val_acc > self.best["val"]:
            self.best = {
                "val": val_acc,
                "generation": g,
                "z": None if self.prompts is None else self.prompts.copy(self.point),
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
            rec["sigma"] = round(self.prompts.search.sigma, 6) if self.prompts is not None else None
        if val_acc is not None:
            rec["val_accuracy"] = round(val_acc, 6)
        self.history.append(rec)
        if self.tuner.on_progress is not None:
            budget = self.ledger.budget if self.ledger.budget is not None else self.config.budget
            self.tuner.on_progress(
                Progress(g, self.n_gen, self.ledger.used, budget, loss, acc, val_acc, self._offsets(self.point), self._scores, self._contexts())
            )

    def _contexts(self) -> tuple[str, ...] | None:
        if self.ensemble is not None:
            return tuple(self.ensemble["texts"])
        return (self.point,) if isinstance(self.point, str) else None

    # ------------------------------------------------------------ checkpoint

    def _checkpoint(self, g: int) -> None:
        directory = self.tuner.checkpoint_dir
        if directory is None:
            return
        from .resume import checkpoint_payload

        tensors, state = checkpoint_payload(self, g)
        save_checkpoint(directory, tensors, state)

    def _restore(self) -> int:
        assert self.tuner.checkpoint_dir is not None
        from .resume import restore

        tensors, state = load_checkpoint(self.tuner.checkpoint_dir)
        self._check_same_run(state)
        restore(self, tensors, state)
        logger.info("resumed at generation %d of %d (%d queries already used)", state["generation"], self.n_gen, self.ledger.used)
        return int(state["generation"])

    def _check_same_run(self, state: dict[str, Any]) -> None:
        saved = {**type(self.requested)().to_dict(), **state["config"]}  # options added since take their defaults
        if "word_search" not in state["config"] and getattr(self.prompts, "kind", None) == "discrete":
            saved["word_search"] = "pg"  # the only word search before the option existed
        requested = self.requested.to_dict()
        if saved != requested:
            differ = ", ".join(sorted(k for k in set(saved) | set(requested) if saved.get(k) != requested.get(k)))
            raise ConfigError(f"the checkpoint was written with a different configuration ({differ}); resume with the same options")
        if state["model_id"] != self.caps.model_id:
            raise CraftError(f"the checkpoint is for model {state['model_id']}, not {self.caps.model_id}")
        if state["data"]["train_fingerprint"] != self.data_info()["train_fingerprint"]:
            raise CraftError("the checkpoint was written for different training data; resume with the same data and seed")

    # ---------------------------------------------------------------- result

    def data_info(self) -> dict[str, Any]:
        if self._data is None:
            counts = self.train.class_counts()
            self._data = {
                "train_fingerprint": self.train.fingerprint(),
                "n_train": len(self.train),
                "shots": int(counts.min()) if counts.min() == counts.max() else None,
                "val_fingerprint": self.val.fingerprint() if self.val is not None else None,
                "n_val": len(self.val) if self.val is not None else 0,
                # what `craft-sdk eval` / evaluate() must never score (issue 11): every trained or selected-on image
                "image_fingerprints": seen_fingerprints(self.train, self.val),
            }
            if self.config.robust:
                self._data["n_search"] = self.images.n_search
                self._data["n_check"] = len(self.images.y_check)
        return self._data

    def _result(self) -> TuneResult:
        from .finish import finish_paper, finish_robust, record_run_canary

        phase = getattr(self.tuner.on_progress, "phase", None)  # a progress display hears the long steps after the search
        if phase is not None and self.config.robust:
            phase("selection")
        parts = finish_robust(self) if self.config.robust else finish_paper(self)
        point, texts = parts.pop("z"), parts.pop("texts", None)
        prompt = self.prompts.result(point) if self.prompts is not None else {"z": None, "offset": None, "projection_std": None}
        if texts is not None and self.ensemble is not None:  # a deployed ensemble: its first context is the template
            prompt.update(template=texts[0], text_prompt={"kind": "ensemble", "texts": list(texts), "initial": self.config.template, "bank": self.ensemble["bank"]})
        template = prompt.pop("template", self.config.template)  # a text prompt space deploys a learned template
        contexts = tuple(texts) if texts is not None and self.ensemble is not None else (template,)
        canary = record_run_canary(self, contexts, prompt.get("offset"))
        return TuneResult(
            config=self.config if template == self.config.template else replace(self.config, template=template),
            requested_mode=self.requested.mode,
            capabilities=self.caps,
            class_names=tuple(self.names),
            kl_weights=(self.lam, self.beta),
            history=self.history,
            queries=self.ledger.to_dict(),
            metrics=self.metrics,
            data=self.data_info(),
            n_generations=int(self.history[-1]["generation"]) if self.history else 0,  # run, not planned
            planned_generations=self.n_gen,
            wall_time_s=time.perf_counter() - self.started,
            extras={"projection_generator": GENERATOR},
            canary=canary,
            **prompt,
            **parts,
        )
