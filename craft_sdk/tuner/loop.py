"""One tuning run: the generation loop over a :class:`~craft_sdk.tuner.state.RunState` (the method is
:mod:`craft_sdk.tuner.train`'s docstring).

:func:`run_tuning` is three steps: :func:`open_run` (plan, checks, uploads: before any query),
:func:`search` (the baseline or a checkpoint, then one generation after another until the plan,
the budget, the stopping rule or an inert prompt ends it), :func:`close_run` (robust protocol:
selection and calibration first; then the drift canary and the result). The loop alone assigns
the state's fields; :mod:`~craft_sdk.tuner.finish`, :mod:`~craft_sdk.tuner.resume` and
:mod:`~craft_sdk.tuner.ensemble` take values and return values.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .. import mlp
from ..client.base import Capabilities, PredictionClient
from ..client.ledger import MeteredClient, QueryLedger
from ..data import ImageDataset, seen_fingerprints
from ..errors import BudgetExceededError, ConfigError
from ..projection import GENERATOR
from ..scores import as_log_scores
from . import selection
from .checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from .config import TuneConfig
from .ensemble import ensemble_bank, select_ensemble
from .finish import finish_paper, finish_robust, record_run_canary
from .plan import (
    ImageSets,
    baseline_cost,
    calls_usage,
    canary_reserve,
    certification_plan,
    effective_config,
    generation_calls,
    generation_cost,
    one_generation_problem,
    plan_generations,
)
from .prompts import create_prompt_space
from .result import DataInfo, GenerationRecord, Progress, QueryReport, TuneResult
from .resume import Restored, check_same_run, checkpoint_payload, restore
from .state import CheckSnapshot, EnsembleSnapshot, Handles, ImageSplit, RunOptions, RunSetup, RunState, ValSnapshot
from .stopping import EarlyStopping

logger = logging.getLogger(__name__)

FLAT_GENERATIONS = 3  # identical fitness for this many generations: the client ignores prompt offsets


@dataclass(frozen=True)
class RunIO:
    """What a run talks to: the metered client, its ledger, and the caller's options."""

    client: MeteredClient
    ledger: QueryLedger
    options: RunOptions


def _accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    return float((scores.argmax(-1) == labels).mean()) if len(labels) else float("nan")


def run_tuning(
    config: TuneConfig, options: RunOptions, client: PredictionClient, ledger: QueryLedger,
    train: ImageDataset, val: ImageDataset | None,
) -> TuneResult:
    """One run of ``config`` through ``client``, paid from ``ledger`` (see :class:`~craft_sdk.tuner.train.Tuner`)."""
    state, io = open_run(config, options, client, ledger, train, val)
    search(state, io)
    return close_run(state, io)


def search(state: RunState, io: RunIO) -> None:
    """The baseline (or the checkpoint), then the generations; a refused query ends the run early."""
    start = _restore(state, io) if _resumable(io) else _baseline(state, io)
    try:
        if state.config.uses_prompt:
            for g in range(start + 1, state.n_gen + 1):
                if state.stopped is not None:
                    break
                _check_affordable(state, io, g)
                _generation(state, io, g)
        elif state.config.mode == "ensemble" and state.ensemble is None and state.stopped is None:
            _ensemble(state, io)
        elif state.refiner is not None and start == 0 and not state.config.robust:
            _train_fixed_prompt(state, io)
    except BudgetExceededError as exc:
        logger.warning("stopping early: %s", exc)
        state.metrics = replace(state.metrics, stopped_early=str(exc))
    if state.stopped is not None:
        state.metrics = replace(state.metrics, stopped=state.stopped)


# ---------------------------------------------------------------- setup


def open_run(
    config: TuneConfig, options: RunOptions, client: PredictionClient, ledger: QueryLedger,
    train: ImageDataset, val: ImageDataset | None,
) -> tuple[RunState, RunIO]:
    """A run planned and checked before its first query (a :class:`ConfigError` names what cannot be paid), its images uploaded."""
    started = time.perf_counter()
    caps = client.capabilities(config.template)
    io = RunIO(MeteredClient(client, ledger), ledger, options)
    setup, n_gen = _setup(config, caps, train, val)
    c = setup.config
    stopped = None
    if not setup.plan.search and (c.uses_prompt or c.mode == "ensemble"):
        stopped = f"not searched: {setup.plan.reason}"  # plan before paying: nothing could certify the search
        logger.warning("%s", stopped)
    prompts = create_prompt_space(c, caps)
    state = RunState(
        setup=setup, n_gen=n_gen, prompts=prompts, point=prompts.zero() if prompts is not None else None,
        refiner=_new_refiner(setup), stopping=EarlyStopping(c.patience if c.robust else None, min_trend=c.stop_trend),
        stopped=stopped, started=started,
    )
    state.handles = _upload(setup.images, io.client)
    return state, io


def _setup(config: TuneConfig, caps: Capabilities, train: ImageDataset, val: ImageDataset | None) -> tuple[RunSetup, int]:
    c = effective_config(config, caps)
    plan = certification_plan(c, train.labels, val.labels if val is not None else None)
    images = ImageSplit(c, train, val, holdout=plan.search)
    names = tuple(train.class_names)
    kl_weights = c.kl_weights(len(names))
    has_val = images.paper_val is not None
    n_gen = plan_generations(c, has_val) if plan.search else 0
    needed = baseline_cost(c, has_val)
    bank: tuple[str, ...] = ()
    if c.mode == "ensemble" and plan.search:
        bank = ensemble_bank(c)
        needed += len(bank)
    needed += canary_reserve(c, min(c.ensemble_k or len(bank), len(bank)) if bank else 1)
    if needed > c.budget:
        what = f"the zero-shot baseline and {len(bank)} ensemble contexts" if bank else "the zero-shot baseline"
        raise ConfigError(f"budget {c.budget} cannot pay {what} ({needed} queries); raise --budget")
    if c.uses_prompt and n_gen == 0 and c.max_generations != 0 and plan.search:
        raise ConfigError(one_generation_problem(c, has_val))
    setup = RunSetup(c, config, caps, names, kl_weights, plan, images, bank, _data_info(c, train, val, images))
    return setup, n_gen


def _data_info(config: TuneConfig, train: ImageDataset, val: ImageDataset | None, images: ImageSplit) -> DataInfo:
    counts = train.class_counts()
    return DataInfo(
        train_fingerprint=train.fingerprint(),
        n_train=len(train),
        shots=int(counts.min()) if counts.min() == counts.max() else None,
        val_fingerprint=val.fingerprint() if val is not None else None,
        n_val=len(val) if val is not None else 0,
        # what `craft-sdk eval` / evaluate() must never score (issue 11): every trained or selected-on image
        image_fingerprints=seen_fingerprints(train, val),
        n_search=images.n_search if config.robust else None,
        n_check=len(images.y_check) if config.robust else None,
    )


def _new_refiner(setup: RunSetup) -> Any:
    c = setup.config
    if not c.uses_refiner:
        return None
    from .refiner import RefinerTrainer

    weights = mlp.init_weights(len(setup.names), c.refiner_hidden, c.refiner_layers, c.residual, c.seed)
    return RefinerTrainer(weights, c.residual, c.lr, c.weight_decay, c.batch_size, c.seed + 1, mlp.input_rms_for(setup.caps))


def _upload(images: ImageSplit, client: MeteredClient) -> Handles:
    search_handle = client.upload(images.search.images)
    scored = search_handle if images.scored is images.search else client.upload(images.scored.images)
    val = client.upload(images.paper_val.images) if images.paper_val is not None else None
    return Handles(search_handle, scored, val)


def _handles(state: RunState) -> Handles:
    assert state.handles is not None
    return state.handles


def _query(state: RunState, io: RunIO, handle: Any, point: Any, category: str) -> np.ndarray:
    """Log-scores [N, C] of one point (zero-shot without a prompt space), or [P, N, C] of a population."""
    names = list(state.setup.names)
    if state.prompts is None or point is None:
        out = io.client.predict(handle, names, state.config.template, None, category=category)
    else:
        out = state.prompts.score(io.client, handle, names, point, category)
    return as_log_scores(out, state.setup.caps.output)


# ----------------------------------------------------------------- steps


def _check_affordable(state: RunState, io: RunIO, g: int) -> None:
    """Refuse a generation the ledger cannot pay in full (e.g. after a resume redid lost work)."""
    c, ledger, images = state.config, io.ledger, state.images
    cost = generation_cost(c, g, state.n_gen, _handles(state).val is not None)
    if not ledger.can_afford(cost):
        raise BudgetExceededError(
            f"query budget exhausted: {ledger.used} of {ledger.budget} used, generation {g} "
            f"of {state.n_gen} needs {cost}; raise --budget to continue"
        )
    if ledger.max_cost is not None:  # the whole generation or none of it, in money too
        paper_val = images.paper_val
        sets = ImageSets(images.n_search, len(images.scored), len(paper_val) if paper_val is not None else 0)
        calls = generation_calls(c, g, state.n_gen, sets, state.setup.caps.soft_prompts)
        if not ledger.can_afford_usage(calls_usage(io.client, calls, list(state.setup.names), c.template)):
            raise BudgetExceededError(f"cost ceiling reached: {ledger.cost:.6g} of --max-cost {ledger.max_cost:g} "
                                      f"spent and generation {g} would pass it; raise --max-cost to continue")


def _baseline(state: RunState, io: RunIO) -> int:
    images, handles = state.images, _handles(state)
    z0 = None if state.prompts is None else state.prompts.zero()
    logits = _query(state, io, handles.scored, z0, "refine")
    state.zero_logits = state.last_logits = logits
    train_acc = _accuracy(logits[: images.n_search], images.y)
    state.metrics = replace(state.metrics, zero_shot_train_accuracy=train_acc)
    val_acc = None
    if handles.val is not None and images.paper_val is not None:
        state.last_val_logits = _query(state, io, handles.val, z0, "validation")
        val_acc = _accuracy(state.last_val_logits, images.paper_val.labels)
        state.metrics = replace(state.metrics, zero_shot_val_accuracy=val_acc)
        _consider(state, 0, val_acc)
    if images.check is not None and len(images.select):  # no search (nothing stops on them): nothing to track
        val_acc = _check_progress(state, 0, logits)
        state.metrics = replace(state.metrics, zero_shot_check_accuracy=val_acc)
    _record(state, io, 0, float("nan"), train_acc, val_acc, None)
    _checkpoint(state, io, 0)
    return 0


def _generation(state: RunState, io: RunIO, g: int) -> None:
    from .refiner import fitness

    c, images, handles, prompts = state.config, state.images, _handles(state), state.prompts
    assert prompts is not None
    candidates = prompts.search.ask()
    population = _query(state, io, handles.search, candidates, "search")
    fit = fitness(population, images.y, state.refiner.model if state.refiner is not None else None, state.setup.kl_weights[0])
    prompts.search.tell(candidates, fit)
    state.fitness_rows.append(fit)
    if c.refiner_data == "population" and c.robust:
        state.population = population
    state.point = prompts.search.mean
    mean_logits = _query(state, io, handles.scored, state.point, "refine")
    loss = _fit_refiner(state, mean_logits, c.refiner_epochs)
    acc = _accuracy(state.scores(mean_logits[: images.n_search]), images.y)
    val_acc = None
    if handles.val is not None and images.paper_val is not None and (g % c.val_every == 0 or g == state.n_gen):
        state.last_val_logits = _query(state, io, handles.val, state.point, "validation")
        val_acc = _accuracy(state.scores(state.last_val_logits), images.paper_val.labels)
        _consider(state, g, val_acc)
    if images.check is not None:
        val_acc = _check_progress(state, g, mean_logits)
    _record(state, io, g, loss, acc, val_acc, fit)
    _check_inert(state, g)
    if g % io.options.checkpoint_every == 0 or g == state.n_gen or state.stopped is not None:
        _checkpoint(state, io, g)


def _ensemble(state: RunState, io: RunIO) -> None:
    """``ensemble`` mode: score the bank, pick the contexts (:mod:`craft_sdk.tuner.ensemble`); generation 1."""
    images = state.images
    pick = select_ensemble(state.config, state.setup.bank, io.client, io.ledger, _handles(state).scored, list(state.setup.names), images.y)
    state.ensemble = pick
    n = images.n_search
    acc = _accuracy(pick.logits[:n], images.y)
    val_acc = _accuracy(pick.logits[n:], images.y_check) if images.check is not None else None
    state.best = EnsembleSnapshot(acc if val_acc is None else val_acc, 1, pick.logits)
    _record(state, io, 1, float("nan"), acc, val_acc, None)
    _checkpoint(state, io, 1)  # a resumed run keeps the picked contexts instead of paying for the bank again


def _check_progress(state: RunState, g: int, scored_logits: np.ndarray) -> float:
    """Robust protocol: score the current model on the check images (free) and apply the stopping rule."""
    images = state.images
    sel = images.select  # every check image (selection.split_check): the run deploys the generation it stops at
    check = state.scores(scored_logits[images.n_search :][sel])
    y_sel = images.y_check[sel]
    acc = _accuracy(check, y_sel)
    if state.stopping.update(g, acc, selection.log_loss(check, y_sel)):
        point = None if state.prompts is None else state.prompts.copy(state.point)
        population = None if state.population is None else np.array(state.population, copy=True)
        state.best = CheckSnapshot(acc, g, point, np.array(scored_logits, copy=True), population)
    if g > 0 and state.stopping.should_stop(g, [float(row.mean()) for row in state.fitness_rows], _proven(state, check, y_sel)):
        state.stopped = state.stopping.reason()
        logger.info("%s", state.stopped)
    return acc


def _proven(state: RunState, check: np.ndarray, y_check: np.ndarray) -> bool:
    """Whether the current model beats zero-shot on the check images in the exact sign test at the run's
    level (one option, before the final Holm correction): what lets the stopping rule search on."""
    zero = state.zero_logits
    if zero is None or not len(y_check):
        return False
    z = zero[state.images.n_search :][state.images.select]
    return selection.paired_p_value(check, y_check, z) <= selection.alpha_of(state.config.z_noise)


def _check_inert(state: RunState, g: int) -> None:
    """Stop the prompt search when offsets change nothing (identical fitness for every candidate)."""
    rows = state.fitness_rows
    if g != FLAT_GENERATIONS or len(rows) < FLAT_GENERATIONS:
        return
    spread = max(float(np.ptp(row)) for row in rows[-FLAT_GENERATIONS:])
    if spread <= 1e-9 * (1.0 + abs(float(rows[-1].mean()))):
        state.prompt_inert = True
        state.stopped = (
            f"stopped: the prompt search is inert (every candidate scored the same for {FLAT_GENERATIONS} "
            "generations: the client ignores the prompt)" + ("; the refiner is kept" if state.config.uses_refiner else "")
        )
        logger.warning("%s", state.stopped)


def _train_fixed_prompt(state: RunState, io: RunIO) -> None:
    """``pr`` mode, paper protocol: the prompt never changes, so one scoring of the train (and val) set suffices."""
    c, images = state.config, state.images
    if state.n_gen == 0:
        logger.warning("budget %d leaves no refiner epoch (paper protocol ties them to the budget)", c.budget)
    assert state.last_logits is not None
    for g in range(1, state.n_gen + 1):
        loss = _fit_refiner(state, state.last_logits, c.refiner_epochs)
        acc = _accuracy(state.scores(state.last_logits), images.y)
        val_acc = None
        paper_val, val_logits = images.paper_val, state.last_val_logits
        if paper_val is not None and val_logits is not None and (g % c.val_every == 0 or g == state.n_gen):
            val_acc = _accuracy(state.scores(val_logits), paper_val.labels)
            _consider(state, g, val_acc)
        _record(state, io, g, loss, acc, val_acc, None)


def _fit_refiner(state: RunState, logits: np.ndarray, epochs: int) -> float:
    state.last_logits = logits
    x, y = logits[: state.images.n_search], state.images.y
    if state.refiner is None:
        from .refiner import fitness

        return float(fitness(x[None], y, None, 0.0)[0])
    if state.population is not None:
        x = np.concatenate([x, state.population.reshape(-1, x.shape[-1])])
        y = np.concatenate([y, np.tile(state.images.y, state.population.shape[0])])
    return state.refiner.train(x, y, state.setup.kl_weights[1], epochs)


def _consider(state: RunState, g: int, val_acc: float) -> None:
    """Paper protocol: keep the generation with the best validation accuracy."""
    if val_acc > state.best.val:
        point = None if state.prompts is None else state.prompts.copy(state.point)
        refiner = None if state.refiner is None else state.refiner.model.numpy_weights()
        state.best = ValSnapshot(val_acc, g, point, refiner)


def _record(state: RunState, io: RunIO, g: int, loss: float, acc: float, val_acc: float | None, fit: np.ndarray | None) -> None:
    state.history.append(GenerationRecord(
        generation=g,
        queries_used=io.ledger.used,
        train_loss=None if math.isnan(loss) else round(loss, 6),
        train_accuracy=round(acc, 6),
        best_fitness=round(float(fit.min()), 6) if fit is not None else None,
        mean_fitness=round(float(fit.mean()), 6) if fit is not None else None,
        sigma=round(state.prompts.search.sigma, 6) if fit is not None and state.prompts is not None else None,
        val_accuracy=round(val_acc, 6) if val_acc is not None else None,
    ))
    on_progress = io.options.on_progress
    if on_progress is not None:
        budget = io.ledger.budget if io.ledger.budget is not None else state.config.budget
        offsets = state.prompts.offsets(state.point) if state.prompts is not None else None
        on_progress(Progress(g, state.n_gen, io.ledger.used, budget, loss, acc, val_acc, offsets, state.scores, _contexts(state)))


def _contexts(state: RunState) -> tuple[str, ...] | None:
    if state.ensemble is not None:
        return state.ensemble.texts
    return (state.point,) if isinstance(state.point, str) else None


# ------------------------------------------------------------ checkpoint


def _resumable(io: RunIO) -> bool:
    directory = io.options.checkpoint_dir
    if not io.options.resume or directory is None:
        return False
    if has_checkpoint(directory):
        return True
    logger.info("no checkpoint in %s yet: starting the run (%d queries already billed)", directory, io.ledger.used)
    return False


def _checkpoint(state: RunState, io: RunIO, g: int) -> None:
    directory = io.options.checkpoint_dir
    if directory is None:
        return
    tensors, payload = checkpoint_payload(state, g)
    save_checkpoint(directory, tensors, payload)


def _restore(state: RunState, io: RunIO) -> int:
    directory = io.options.checkpoint_dir
    assert directory is not None
    tensors, saved = load_checkpoint(directory)
    setup = state.setup
    check_same_run(saved, setup.requested, setup.caps, getattr(state.prompts, "kind", None), setup.data)
    restored = restore(tensors, saved, state.config.robust, state.prompts)
    _apply(state, restored)
    logger.info("resumed at generation %d of %d (%d queries already used)", restored.generation, state.n_gen, io.ledger.used)
    return restored.generation


def _apply(state: RunState, r: Restored) -> None:
    """Put a restored checkpoint into the run: replay the search, load the refiner, take the values."""
    state.n_gen = r.n_gen
    state.history, state.metrics = r.history, r.metrics
    if r.fitness is not None and state.prompts is not None:
        state.prompts.search.replay(r.fitness, r.ask_digests)
        state.fitness_rows = list(r.fitness)
        state.point = state.prompts.search.mean
    if state.refiner is not None:
        state.refiner.load_state(r.refiner_tensors, r.refiner_json or {})
    state.last_logits, state.last_val_logits = r.last_logits, r.last_val_logits
    state.population, state.zero_logits = r.population, r.zero_logits
    state.best = r.best
    if r.ensemble is not None:
        state.ensemble = r.ensemble
    if r.stopping is not None:
        state.stopping.load(r.stopping)
        state.stopped, state.prompt_inert = r.stopped, r.prompt_inert


# ---------------------------------------------------------------- result


def close_run(state: RunState, io: RunIO) -> TuneResult:
    """What the run deploys (robust protocol: selection and calibration), its drift canary, the result."""
    setup, c = state.setup, state.config
    phase = getattr(io.options.on_progress, "phase", None)  # a progress display hears the long steps after the search
    if phase is not None and c.robust:
        phase("selection")
    end = finish_robust(state) if c.robust else finish_paper(state)
    state.metrics = end.metrics
    prompt = state.prompts.result(end.z) if state.prompts is not None else {"z": None, "offset": None, "projection_std": None}
    if end.texts is not None and state.ensemble is not None:  # a deployed ensemble: its first context is the template
        text_prompt = {"kind": "ensemble", "texts": list(end.texts), "initial": c.template, "bank": state.ensemble.bank}
        prompt.update(template=end.texts[0], text_prompt=text_prompt)
    template = prompt.pop("template", c.template)  # a text prompt space deploys a learned template
    contexts = tuple(end.texts) if end.texts is not None and state.ensemble is not None else (template,)
    canary = record_run_canary(c, io.client, io.ledger, setup.names, setup.caps.output, contexts, prompt.get("offset"))
    return TuneResult(
        config=c if template == c.template else replace(c, template=template),
        requested_mode=setup.requested.mode,
        capabilities=setup.caps,
        class_names=setup.names,
        kl_weights=setup.kl_weights,
        history=state.history,
        queries=QueryReport.from_dict(io.ledger.to_dict()),
        metrics=state.metrics,
        data=setup.data,
        n_generations=state.history[-1].generation if state.history else 0,  # run, not planned
        planned_generations=state.n_gen,
        wall_time_s=time.perf_counter() - state.started,
        extras={"projection_generator": GENERATOR},
        canary=canary,
        refiner=end.refiner,
        selected_generation=end.selected_generation,
        refiner_shape=end.refiner_shape,
        selection=end.selection,
        temperature=end.temperature,
        **prompt,
    )
