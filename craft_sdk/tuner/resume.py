"""What a checkpoint holds for a :class:`~craft_sdk.tuner.loop.Run`, and putting it back.

Tensors: the CMA-ES fitness history (the search is replayed from it), the refiner's
weights and AdamW moments, the last logits, and the best snapshot; the JSON state holds
the config, data fingerprint, model id, history, metrics, RNG and stopping states.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .loop import Run


def checkpoint_payload(run: Run, g: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors, state) for generation ``g`` of ``run``."""
    tensors: dict[str, np.ndarray] = {}
    if run.fitness_rows:
        tensors["search.fitness"] = np.stack(run.fitness_rows)
    if run.refiner is not None:
        tensors.update({f"state.{k}": v for k, v in run.refiner.state_tensors().items()})
    optional = {
        "last.logits": run.last_logits,
        "last.val_logits": run.last_val_logits,
        "last.population": run.population,
        "zero.logits": run.zero_logits if run.config.robust else None,
        "best.z": None if run.best.get("z") is None else run.prompts.encode(run.best["z"]),  # type: ignore[union-attr]
        "best.logits": run.best.get("logits"),
        "best.population": run.best.get("population"),
    }
    tensors.update({k: v for k, v in optional.items() if v is not None})
    for k, v in (run.best.get("refiner") or {}).items():
        tensors[f"best.{k}"] = v
    state = {
        "generation": g,
        "n_generations": run.n_gen,
        "config": run.requested.to_dict(),
        "model_id": run.caps.model_id,
        "data": run.data_info(),
        "history": run.history,
        "metrics": run.metrics,
        "best": {k: v for k, v in run.best.items() if k in ("val", "generation")},
        "ask_digests": run.prompts.search.ask_digests if run.prompts is not None else [],
        "refiner": run.refiner.state_json() if run.refiner is not None else None,
    }
    if run.ensemble is not None:  # its logits are the best snapshot's
        state["ensemble"] = {k: list(v) if k == "texts" else v for k, v in run.ensemble.items() if k != "logits"}
    if run.config.robust:
        state["stopping"] = run.stopping.state()
        state["stopped"] = run.stopped
        state["prompt_inert"] = run.prompt_inert
    return tensors, state


def restore(run: Run, tensors: dict[str, np.ndarray], state: dict[str, Any]) -> None:
    """Put a checkpoint's tensors and state back into ``run`` (the search is replayed, not unpickled)."""
    run.n_gen = int(state["n_generations"])
    run.history, run.metrics = state["history"], state["metrics"]
    if "search.fitness" in tensors and run.prompts is not None:
        run.prompts.search.replay(tensors["search.fitness"], state["ask_digests"])
        run.fitness_rows = list(tensors["search.fitness"])
        run.point = run.prompts.search.mean
    if run.refiner is not None:
        run.refiner.load_state({k[6:]: v for k, v in tensors.items() if k.startswith("state.")}, state["refiner"])
    run.last_logits = tensors["last.logits"]
    run.last_val_logits = tensors.get("last.val_logits")
    run.population = tensors.get("last.population")
    run.zero_logits = tensors.get("zero.logits")
    run.best = dict(state["best"])
    if "generation" in run.best:
        run.best["z"] = run.prompts.decode(tensors["best.z"]) if "best.z" in tensors and run.prompts is not None else None
        ref = {k[5:]: v for k, v in tensors.items() if k.startswith("best.refiner.")}
        run.best["refiner"] = ref or None
        run.best["logits"] = tensors.get("best.logits")
        run.best["population"] = tensors.get("best.population")
    if "ensemble" in state:
        run.ensemble = {**state["ensemble"], "texts": tuple(state["ensemble"]["texts"]), "logits": tensors["best.logits"]}
    if "stopping" in state:
        run.stopping.load(state["stopping"])
        run.stopped = state.get("stopped")
        run.prompt_inert = bool(state.get("prompt_inert", False))
