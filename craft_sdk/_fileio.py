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


def read_lines(path: str | Path, what: str, max_bytes: int = 1 << 20) -> list[str]:
    """The non-blank lines of a small UTF-8 text file, whitespace-normalised.

    Raises:
        ConfigError: the file is missing, larger than ``max_bytes``, or not UTF-8 text (``what`` names it).
    """
    from .errors import ConfigError

    p = Path(path)
    why = f"cannot read {what} {str(path)!r}"
    if not p.is_file():
        raise ConfigError(f"{what} {str(path)!r} is not a file; pass a UTF-8 text file, one entry per line")
    try:
        too_big = p.stat().st_size > max_bytes
        text = "" if too_big else p.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first entry
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # ValueError: a NUL in the path
        raise ConfigError(f"{why} ({exc.__class__.__name__}); pass a UTF-8 text file, one entry per line") from None
    if too_big:
        raise ConfigError(f"{what} {str(path)!r} is over {max_bytes:,} bytes; pass a text file of at most that, one entry per line")
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]
