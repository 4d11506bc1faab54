"""An adapter directory on disk: written atomically (temp directory, then rename), read back as raw parts.

This module moves bytes and tensors; what they mean (and every check on them) is
:mod:`craft_sdk.adapter.format`'s. Loading needs numpy and safetensors only.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .._fileio import umask
from ..errors import AdapterError
from .files import ADAPTER_FILES, CARD_FILE, CONFIG_FILE, WEIGHTS_FILE

logger = logging.getLogger(__name__)


def check_target(target: Path) -> None:
    """Refuse to write an adapter over a file, or into a non-empty directory that is not an adapter."""
    if target.exists() and not target.is_dir():
        raise AdapterError(f"{target} exists and is not a directory; choose another --out")
    if target.is_dir() and any(target.iterdir()) and not (target / CONFIG_FILE).exists():
        raise AdapterError(f"{target} is a non-empty directory that is not an adapter; choose another --out")


def write_adapter_dir(target: Path, config: bytes, tensors: dict[str, np.ndarray], card: str) -> Path:
    """Write ``config`` (the JSON bytes), ``tensors`` (safetensors) and the model ``card`` to ``target`` atomically.

    Files in ``target`` that are not the adapter's own (see :data:`~craft_sdk.adapter.files.ADAPTER_FILES`)
    are kept; a stale ``refiner.onnx`` is dropped.
    """
    from safetensors.numpy import save_file

    check_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        (tmp / CONFIG_FILE).write_bytes(config)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "craft-sdk-adapter"})
        (tmp / CARD_FILE).write_bytes(card.encode("utf-8"))
        _default_permissions(tmp)
        _swap_in(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("saved adapter to %s", target)
    return target


def read_adapter_dir(root: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The parsed ``adapter_config.json`` and the tensors of the adapter directory ``root``.

    Raises:
        AdapterError: a file is missing, is not JSON / safetensors, or is nested too deeply.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    cfg_path, w_path = root / CONFIG_FILE, root / WEIGHTS_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise AdapterError(f"{p} is missing; {root} is not a complete adapter directory")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{cfg_path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise AdapterError(f"{cfg_path} is nested too deeply to be an adapter config; it is damaged or not one") from None
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{w_path} is not a readable safetensors file ({exc})") from None
    return config, tensors


def _default_permissions(directory: Path) -> None:
    """Give a directory made by mkdtemp (0700) and its files the modes a plain mkdir/open would."""
    mask = umask()
    os.chmod(directory, 0o777 & ~mask)
    for f in directory.iterdir():
        os.chmod(f, 0o666 & ~mask)


def _swap_in(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.replace(tmp, target)
        return
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    os.replace(tmp, target)
    for extra in old.iterdir():  # keep files we do not own (e.g. an exported refiner.onnx is stale: drop it)
        if extra.name not in ADAPTER_FILES:
            shutil.move(str(extra), str(target / extra.name))
    shutil.rmtree(old, ignore_errors=True)
