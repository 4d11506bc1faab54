"""Atomic file writes with the file modes a plain ``open()`` would give (internal)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def umask() -> int:
    """The process umask (read without changing it for longer than two calls)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | Path, data: bytes, *, sync_dir: bool = False) -> Path:
    """Write ``data`` to ``path`` via a fsynced temporary file in the same folder and a rename.

    Readers never see a torn file; a failure leaves no temporary behind. An existing file keeps
    its mode; a new one gets ``0o666 & ~umask`` (``mkstemp`` alone would leave 0600). With
    ``sync_dir`` the folder is fsynced after the rename, so the new name survives a power cut.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    mode = target.stat().st_mode & 0o777 if target.exists() else 0o666 & ~umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_dir:
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return target
