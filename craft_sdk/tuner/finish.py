"""The end of a run: what it deploys.

``paper`` protocol: the last generation, or the best validation one (``selection``).
``robust`` protocol: the prompt of the generation the run stopped at, then the behaviour (certified
and ranked on all the check images), refiner and temperature, by
:mod:`craft_sdk.tuner.selection` from logits already paid for.

Each function reads the run's :class:`~craft_sdk.tuner.state.RunState` and returns a
:class:`Finish`; none assigns to the state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .. import mlp
from ..client.canary import CanaryRecord, canary_cost, record_canary
from ..errors import ClientError
from . import selection
from .result import Metrics, SelectionReport
from .state import CheckSnapshot, EnsembleSnapshot, RunState, ValSnapshot, snapshot_generation

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields, not records
class Finish:
    """What a run deploys: the point (``z``), the contexts of a deployed ensemble (``texts``), the
    refiner's weights, and the run's final metrics; robust protocol: the selection record too."""

    z: Any
    texts: tuple[str, ...] | None
    refiner: dict[str, np.ndarray] | None
    selected_generation: int
    metrics: Metrics
    refiner_shape: tuple[int, int] | None = None
    selection: SelectionReport | None = None
    temperature: float | None = None


def finish_paper(run: RunState) -> Finish:
    """What a paper-protocol run deploys: the last generation, or the best validation one (``best-val``)."""
    best = run.best
    use_best = run.config.selection == "best-val" and isinstance(best, (ValSnapshot, EnsembleSnapshot))
    if isinstance(best, ValSnapshot) and use_best:
        z, refiner = best.z, best.refiner
    elif use_best:  # an ensemble's pick: no point, no refiner
        z, refiner = None, None
    else:
        z = run.point if run.prompts is not None else None
        refiner = run.refiner.model.numpy_weights() if run.refiner else None
    selected = snapshot_generation(best) if use_best else (run.history[-1].generation if run.history else 0)
    last = run.history[-1].train_accuracy if run.history else None
    train_accuracy = next((h.train_accuracy for h in run.history if h.generation == selected), last)
    metrics = replace(run.metrics, train_accuracy=train_accuracy)
    if use_best:
        metrics = replace(metrics, val_accuracy=best.val)
    texts = run.ensemble.texts if run.ensemble is not None else None
    return Finish(z, texts, refiner, int(selected), metrics)


def _training_spec(run: RunState) -> selection.RefinerTraining:
    c = run.config  # candidates: a linear map and the configured MLP depth
    layers = tuple(sorted({1, c.refiner_layers}))
    return selection.RefinerTraining(c.refiner_hidden, c.lr, c.weight_decay, c.batch_size, run.setup.kl_weights[1], c.seed, layers, residual=c.residual,
                                     input_rms=mlp.input_rms_for(run.setup.caps))


def _candidates(run: RunState, spec: selection.RefinerTraining) -> dict[str, dict[str, Any]]:
    """Each behaviour's logits on the check images, its held-out logits for calibration, and its refiner choice."""
    n, y, y_check = run.images.n_search, run.images.y, run.images.y_check
    zero = run.zero_logits if run.zero_logits is not None else run.last_logits
    assert zero is not None
    bases: dict[str, tuple[np.ndarray, np.ndarray | None]] = {"zero-shot": (zero, None)}
    best = run.best
    searched = run.config.uses_prompt and not run.prompt_inert and snapshot_generation(best) > 0
    if searched and isinstance(best, CheckSnapshot) and best.z is not None:
        bases["prompt"] = (best.logits, best.population)
    if run.ensemble is not None:  # ensemble mode: the picked contexts, judged like a prompt
        bases["ensemble"] = (run.ensemble.logits, None)
    out: dict[str, dict[str, Any]] = {}
    for name, (logits, population) in bases.items():
        held = logits if name == "zero-shot" else logits[n:]  # zero-shot fitted nothing: every image is held out
        held_y = np.concatenate([y, y_check]) if name == "zero-shot" else y_check
        out[name] = {"check": logits[n:], "held": held, "held_y": held_y, "logits": logits, "choice": None}
        if not run.config.uses_refiner:
            continue
        choice, oof = selection.cross_validate_refiners(logits[:n], y, spec, run.config.cv_folds, population)
        if choice is None:
            continue
        weights = selection.train_refiner(spec, choice, logits[:n], y, population)
        refined_check = _refine(weights, logits[n:], spec.residual)
        key = "refiner" if name == "zero-shot" else "prompt+refiner"
        out[key] = {"check": refined_check, "held": np.concatenate([oof, refined_check]), "oof": oof,
                    "held_y": np.concatenate([y, y_check]), "logits": logits, "choice": choice, "population": population}
    return out


Evidence = dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]


def _evidence(run: RunState, candidates: dict[str, dict[str, Any]]) -> tuple[Evidence, Evidence, Evidence]:
    """(select, certify, rank): per behaviour, (its logits, zero-shot's logits, labels) on the check images
    the stopping rule read, on the images that certify it, and on every check image (the same for all)."""
    zero = candidates["zero-shot"]["logits"]
    n, y_check = run.images.n_search, run.images.y_check
    sel, cert = run.images.select, run.images.certify
    select = {k: (v["check"][sel], zero[n:][sel], y_check[sel]) for k, v in candidates.items()}
    certify = {k: (v["check"][cert], zero[n:][cert], y_check[cert]) for k, v in candidates.items()}
    rank = {k: (v["check"], zero[n:], y_check) for k, v in candidates.items()}  # to rank the certified: paired
    if "refiner" in candidates:  # zero-shot logits were fitted to nothing: its out-of-fold predictions count too
        ref = candidates["refiner"]
        certify["refiner"] = (np.concatenate([ref["oof"], ref["check"][cert]]), np.concatenate([zero[:n], zero[n:][cert]]),
                              np.concatenate([run.images.y, y_check[cert]]))
    return select, certify, rank


def _refine(weights: dict[str, np.ndarray], logits: np.ndarray, residual: bool = True) -> np.ndarray:
    from .. import mlp

    return mlp.forward(weights, logits, residual)


def finish_robust(run: RunState) -> Finish:
    """What a robust-protocol run deploys: selection, final refiner fit, calibration."""
    spec = _training_spec(run)
    candidates = _candidates(run, spec)
    select, certify, rank = _evidence(run, candidates)
    option, reason, estimates = selection.decide(select, certify, selection.alpha_of(run.config.z_noise), rank)
    chosen = candidates[option]
    refiner = None
    if chosen["choice"] is not None:  # refit on every labelled image: search + check
        y_all = np.concatenate([run.images.y, run.images.y_check])
        refiner = selection.train_refiner(spec, chosen["choice"], chosen["logits"], y_all, chosen.get("population"))
    temperature, calibration = selection.calibrate(chosen["held"], chosen["held_y"], run.config.z_noise, run.config.seed)
    extras = {"calibration": calibration, "plan": run.setup.plan.to_dict()}
    decision = selection.Decision(option, reason, estimates, len(run.images.y_check), chosen["choice"], temperature, extras)
    uses_prompt = option in ("prompt", "prompt+refiner", "ensemble")
    selected = snapshot_generation(run.best) if uses_prompt else 0
    train_scores = chosen["logits"][: run.images.n_search]
    if refiner is not None:
        train_scores = _refine(refiner, train_scores, spec.residual)
    metrics = replace(
        run.metrics,
        train_accuracy=selection.accuracy(train_scores, run.images.y),
        val_accuracy=estimates[option]["accuracy"] if len(run.images.y_check) else None,
        deployed=option,
    )
    logger.info("deployed %s (%s); temperature %.3f", option, reason, temperature)
    shape = (chosen["choice"].layers, chosen["choice"].hidden) if chosen["choice"] is not None else None
    return Finish(
        z=run.best.z if uses_prompt and isinstance(run.best, CheckSnapshot) else None,
        texts=run.ensemble.texts if option == "ensemble" and run.ensemble is not None else None,
        refiner=refiner,
        selected_generation=selected,
        metrics=metrics,
        refiner_shape=shape,
        selection=SelectionReport.from_dict(decision.to_dict()),
        temperature=temperature,
    )


def record_run_canary(
    config: Any, client: Any, ledger: Any, names: tuple[str, ...], output: str, contexts: tuple[str, ...], offset: np.ndarray | None
) -> CanaryRecord | None:
    """The drift canary under the deployed prompt (``config.canary`` probes), or None: none asked for, or
    the budget or the black box refused it (a warning; the tuned adapter is kept either way)."""
    n_probes = config.canary
    if not n_probes:
        return None
    cost = canary_cost(len(contexts))
    if not ledger.can_afford(cost):
        logger.warning("no drift canary recorded: it costs %d queries and %s remain", cost, ledger.remaining)
        return None
    try:
        return record_canary(client, list(names), contexts, offset, output, n_probes, config.seed)
    except ClientError as exc:
        logger.warning("no drift canary recorded: the black box failed (%s)", exc)
        return None
