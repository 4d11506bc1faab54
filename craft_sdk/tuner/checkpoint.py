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
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from ..client.ledger import repair_journal  # noqa: F401  (re-exported: the ledger repairs its own journal)
from ..errors import CraftError

CHECKPOINT_FILE = "checkpoint.safetensors"
LEDGER_FILE = "ledger.jsonl"
FORMAT = "craft-sdk-checkpoint/1"


def save_checkpoint(directory: Path, tensors: dict[str, np.ndarray], state: dict[str, Any]) -> Path:
    """Atomically write ``directory/checkpoint.safetensors``."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / CHECKPOINT_FILE
    tmp = directory / f".{CHECKPOINT_FILE}.tmp"
    payload = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    save_file(payload, str(tmp), metadata={"format": FORMAT, "state": json.dumps(state, sort_keys=True)})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return final


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
