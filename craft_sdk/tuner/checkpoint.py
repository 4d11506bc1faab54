"""Crash-safe checkpoints: one safetensors file (tensors + JSON state in its metadata).

Written to a temporary file, fsynced, then renamed over the previous one, so a
kill at any instant leaves either the old or the new checkpoint, never half of one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

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
    except (SafetensorError, OSError) as exc:
        raise CraftError(f"checkpoint {path} is unreadable ({exc}); delete it to start over") from None
    if meta.get("format") != FORMAT:
        raise CraftError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return tensors, json.loads(meta["state"])
