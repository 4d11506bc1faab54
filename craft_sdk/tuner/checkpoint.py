"""Crash-safe checkpoints: one safetensors file (tensors + JSON state in its metadata).

A checkpoint directory holds ``checkpoint.safetensors`` (CMA-ES fitness history,
refiner weights and AdamW moments, last logits, best-so-far state; the JSON
state holds the config, data fingerprint, model id, history and RNG states) and
``ledger.jsonl``, the query journal: every charge is appended and fsynced
*before* its query is sent.

The checkpoint is written to a temporary file, fsynced, then renamed over the
previous one, so a kill at any instant leaves either the old or the new
checkpoint, never half of one.

Resume semantics: a resumed run restarts after the last checkpointed generation
and redoes what followed it, with exactly the same candidates, so its adapter
tensors are byte-identical to an uninterrupted run's. The queries billed for
the work lost at the kill (at most ``checkpoint_every`` generations, i.e. the
generation in flight with the default of 1) stay in the journal and count
against the budget: the adapter's provenance records them honestly. If the
budget has no room to redo the lost work, the run stops before the first
generation it cannot afford, with a warning, and never exceeds the budget.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save

from .._fileio import write_bytes_atomic
from ..errors import CraftError

CHECKPOINT_FILE = "checkpoint.safetensors"
LEDGER_FILE = "ledger.jsonl"
FORMAT = "craft-sdk-checkpoint/1"


def save_checkpoint(directory: Path, tensors: dict[str, np.ndarray], state: dict[str, Any]) -> Path:
    """Atomically write ``directory/checkpoint.safetensors`` (fsynced temp file, rename, fsynced folder)."""
    payload = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    data = save(payload, metadata={"format": FORMAT, "state": json.dumps(state, sort_keys=True)})
    return write_bytes_atomic(directory / CHECKPOINT_FILE, data, sync_dir=True)


def journal_used(directory: Path) -> int:
    """Queries billed in ``directory``'s journal (read only; a torn last line was never sent)."""
    path = directory / LEDGER_FILE
    if not path.is_file():
        return 0
    total = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            total += int(json.loads(line)["n"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return total


def resume_can_match(ledger_used: int, checkpoint_used: int, planned_total: int, budget: int | None) -> bool:
    """Whether a resumed run can still end byte-identical to the uninterrupted run.

    The ``ledger_used - checkpoint_used`` queries billed after the last checkpoint were lost at the
    kill and stay counted; the resumed run redoes that work, so it needs ``planned_total`` (what the
    uninterrupted run's plan costs in all) plus the lost queries. When the budget cannot pay that,
    the run stops early and its adapter differs from the uninterrupted one.

    Args:
        ledger_used: queries in the journal now (checkpointed work + the work lost at the kill).
        checkpoint_used: queries used at the last checkpoint (its history's last ``queries_used``).
        planned_total: queries of the whole planned run (baseline + every planned generation).
        budget: the hard budget (None: unlimited).

    Example:
        >>> resume_can_match(ledger_used=41, checkpoint_used=35, planned_total=71, budget=80)
        True
        >>> resume_can_match(ledger_used=41, checkpoint_used=35, planned_total=71, budget=71)
        False
    """
    lost = max(ledger_used - checkpoint_used, 0)
    return budget is None or planned_total + lost <= budget


def planned_total(config: Any, n_generations: int, has_val: bool) -> int:
    """Queries the whole plan costs: the baseline and each generation (the tuner's own cost rules)."""
    from .plan import baseline_cost, generation_cost

    if not config.uses_prompt:  # refiner-only rounds reuse the baseline's logits
        return baseline_cost(config, has_val)
    return baseline_cost(config, has_val) + sum(generation_cost(config, g, n_generations, has_val) for g in range(1, n_generations + 1))


def has_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` holds a checkpoint file."""
    return (directory / CHECKPOINT_FILE).is_file()


def load_checkpoint(directory: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read what :func:`save_checkpoint` wrote."""
    path = directory / CHECKPOINT_FILE
    if not path.is_file():
        raise CraftError(f"no checkpoint in {directory}; start a run with --checkpoint-dir {directory} first")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        first = (str(exc).splitlines() or [exc.__class__.__name__])[0]
        raise CraftError(f"checkpoint {path} is unreadable ({first}); delete {directory} to start over") from None
    if meta.get("format") != FORMAT:
        raise CraftError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    try:
        return tensors, json.loads(meta["state"])
    except (KeyError, json.JSONDecodeError):
        raise CraftError(f"checkpoint {path} has no readable state; delete {directory} to start over") from None
