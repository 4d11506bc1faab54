"""What a checkpoint holds for a run's :class:`~craft_sdk.tuner.state.RunState`, and reading it back.

Tensors: the CMA-ES fitness history (the search is replayed from it), the refiner's
weights and AdamW moments, the last logits, and the best snapshot; the JSON state holds
the config, data fingerprint, model id, history, metrics, RNG and stopping states.

Both directions are functions of values: :func:`checkpoint_payload` reads a state,
:func:`restore` returns a :class:`Restored` that the loop applies; neither assigns to the state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..client.base import Capabilities
from ..errors import ConfigError, CraftError
from .config import TuneConfig
from .ensemble import EnsemblePick
from .protocols import PromptSpace
from .result import DataInfo, GenerationRecord, Metrics
from .state import CheckSnapshot, EnsembleSnapshot, NoSnapshot, RunState, Snapshot, ValSnapshot


def _snapshot_tensors(best: Snapshot, prompts: PromptSpace | None) -> dict[str, np.ndarray]:
    z = getattr(best, "z", None)
    optional = {
        "best.z": None if z is None or prompts is None else prompts.encode(z),
        "best.logits": getattr(best, "logits", None),
        "best.population": getattr(best, "population", None),
    }
    tensors = {k: v for k, v in optional.items() if v is not None}
    if isinstance(best, ValSnapshot):
        tensors.update({f"best.{k}": v for k, v in (best.refiner or {}).items()})
    return tensors


def checkpoint_payload(state: RunState, g: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors, state) for generation ``g`` of a run (read only)."""
    tensors: dict[str, np.ndarray] = {}
    if state.fitness_rows:
        tensors["search.fitness"] = np.stack(state.fitness_rows)
    if state.refiner is not None:
        tensors.update({f"state.{k}": v for k, v in state.refiner.state_tensors().items()})
    optional = {
        "last.logits": state.last_logits,
        "last.val_logits": state.last_val_logits,
        "last.population": state.population,
        "zero.logits": state.zero_logits if state.config.robust else None,
    }
    tensors.update({k: v for k, v in optional.items() if v is not None})
    tensors.update(_snapshot_tensors(state.best, state.prompts))
    best: dict[str, Any] = {"val": state.best.val}
    if not isinstance(state.best, NoSnapshot):
        best["generation"] = state.best.generation
    payload: dict[str, Any] = {
        "generation": g,
        "n_generations": state.n_gen,
        "config": state.setup.requested.to_dict(),
        "model_id": state.setup.caps.model_id,
        "data": state.setup.data.to_dict(),
        "history": [h.to_dict() for h in state.history],
        "metrics": state.metrics.to_dict(),
        "best": best,
        "ask_digests": state.prompts.search.ask_digests if state.prompts is not None else [],
        "refiner": state.refiner.state_json() if state.refiner is not None else None,
    }
    if state.ensemble is not None:  # its logits are the best snapshot's
        payload["ensemble"] = {"texts": list(state.ensemble.texts), "bank": state.ensemble.bank}
    if state.config.robust:
        payload["stopping"] = state.stopping.state()
        payload["stopped"] = state.stopped
        payload["prompt_inert"] = state.prompt_inert
    return tensors, payload


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields, not records
class Restored:
    """A checkpoint read back: the values the loop puts into its state (``fitness`` and ``ask_digests``
    replay the search; ``refiner_tensors``/``refiner_json`` load the refiner; ``stopping``: the stopping
    rule's state, robust protocol only, None otherwise — then ``stopped``/``prompt_inert`` are not restored)."""

    generation: int
    n_gen: int
    history: list[GenerationRecord]
    metrics: Metrics
    fitness: np.ndarray | None
    ask_digests: list[str]
    refiner_tensors: dict[str, np.ndarray]
    refiner_json: dict[str, Any] | None
    last_logits: np.ndarray
    last_val_logits: np.ndarray | None
    population: np.ndarray | None
    zero_logits: np.ndarray | None
    best: Snapshot
    ensemble: EnsemblePick | None
    stopping: dict[str, Any] | None
    stopped: str | None
    prompt_inert: bool


def _restore_best(tensors: dict[str, np.ndarray], state: dict[str, Any], robust: bool, prompts: PromptSpace | None) -> Snapshot:
    val = state["best"]["val"]
    if "generation" not in state["best"]:
        return NoSnapshot(val)
    g = state["best"]["generation"]
    if "ensemble" in state:
        return EnsembleSnapshot(val, g, tensors["best.logits"])
    z = prompts.decode(tensors["best.z"]) if "best.z" in tensors and prompts is not None else None
    if robust:
        return CheckSnapshot(val, g, z, tensors["best.logits"], tensors.get("best.population"))
    refiner = {k[5:]: v for k, v in tensors.items() if k.startswith("best.refiner.")}
    return ValSnapshot(val, g, z, refiner or None)


def restore(tensors: dict[str, np.ndarray], state: dict[str, Any], robust: bool, prompts: PromptSpace | None) -> Restored:
    """What a checkpoint's ``tensors`` and ``state`` put back (the search is replayed, not unpickled);
    ``prompts`` only decodes the best point."""
    fitness = tensors["search.fitness"] if "search.fitness" in tensors and prompts is not None else None
    ensemble = None
    if "ensemble" in state:
        ensemble = EnsemblePick(tuple(state["ensemble"]["texts"]), tensors["best.logits"], state["ensemble"]["bank"])
    return Restored(
        generation=int(state["generation"]),
        n_gen=int(state["n_generations"]),
        history=[GenerationRecord.from_dict(h) for h in state["history"]],
        metrics=Metrics.from_dict(state["metrics"]),
        fitness=fitness,
        ask_digests=state["ask_digests"],
        refiner_tensors={k[6:]: v for k, v in tensors.items() if k.startswith("state.")},
        refiner_json=state["refiner"],
        last_logits=tensors["last.logits"],
        last_val_logits=tensors.get("last.val_logits"),
        population=tensors.get("last.population"),
        zero_logits=tensors.get("zero.logits"),
        best=_restore_best(tensors, state, robust, prompts),
        ensemble=ensemble,
        stopping=state["stopping"] if "stopping" in state else None,
        stopped=state.get("stopped"),
        prompt_inert=bool(state.get("prompt_inert", False)),
    )


def check_same_run(
    state: dict[str, Any], requested: TuneConfig, caps: Capabilities, prompt_kind: str | None, data: DataInfo
) -> None:
    """Refuse a checkpoint written by another configuration, model or training set."""
    saved = {**type(requested)().to_dict(), **state["config"]}  # options added since take their defaults
    if "word_search" not in state["config"] and prompt_kind == "discrete":
        saved["word_search"] = "pg"  # the only word search before the option existed
    wanted = requested.to_dict()
    if saved != wanted:
        differ = ", ".join(sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k)))
        raise ConfigError(f"the checkpoint was written with a different configuration ({differ}); resume with the same options")
    if state["model_id"] != caps.model_id:
        raise CraftError(f"the checkpoint is for model {state['model_id']}, not {caps.model_id}")
    if state["data"]["train_fingerprint"] != data.train_fingerprint:
        raise CraftError("the checkpoint was written for different training data; resume with the same data and seed")
