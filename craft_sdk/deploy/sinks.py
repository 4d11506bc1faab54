"""Resumable prediction files: JSONL or CSV rows appended batch by batch, one row per input, in input order.

Rows are flushed and fsynced after every batch, so an interrupted run loses at most the
batch in flight; a torn last line is cut off on resume. Because rows follow the input
order, resuming needs only the number of complete rows (and checks the last one's
path): the first N inputs are skipped and never queried again. A sidecar
``OUTPUT.meta.json`` records the adapter's fingerprint and the row layout, so a resume
with another adapter or layout is refused.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._fileio import write_bytes_atomic
from ..errors import ConfigError, DataError
from .stream import BatchResult

FORMATS = ("jsonl", "csv")


def infer_format(path: str | Path, fmt: str = "auto") -> str:
    """``jsonl`` or ``csv`` from ``fmt``, or from the file suffix when ``fmt`` is ``"auto"``."""
    if fmt != "auto":
        if fmt not in FORMATS:
            raise ConfigError(f"format must be one of {FORMATS} or 'auto', got {fmt!r}")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    raise ConfigError(f"cannot tell the format of {path} from its suffix; name it .jsonl or .csv, or pass --format")


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet reads as a formula (OWASP CSV injection)


def csv_cell(value: Any) -> Any:
    """``value`` safe for a spreadsheet: a string starting with ``= + - @``, a tab or a carriage return gets a
    leading ``'`` (OWASP's CSV-injection advice), so ``=1+2`` from a downloaded adapter's class names or a file
    name is shown as text, never evaluated. Other values are returned unchanged."""
    return "'" + value if isinstance(value, str) and value.startswith(_FORMULA_START) else value


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def rows_of(result: BatchResult, top_k: int) -> list[dict[str, Any]]:
    """One dict per input of ``result``: ``image``, ``label``, ``prob``, ``top_k`` (or ``image``, ``error``)."""
    rows: list[dict[str, Any]] = [{"image": p} for p in result.paths]
    for i, msg in result.errors.items():
        rows[i]["error"] = msg
    preds = result.predictions
    if preds is not None:
        k = min(top_k, preds.probs.shape[1])
        order = (-preds.probs).argsort(axis=1, kind="stable")[:, :k]
        for i, probs, idx in zip(result.ok, preds.probs, order):
            top = [{"label": _plain(preds.classes[j]), "prob": round(float(probs[j]), 6)} for j in idx]
            rows[i].update(label=top[0]["label"], prob=top[0]["prob"], top_k=top)
    return rows


def _last_newline_end(f: Any, limit: int, chunk: int) -> int:
    """Offset just past the last ``\\n`` before ``limit`` in binary file ``f`` (0 when there is none)."""
    pos = limit
    while pos > 0:
        step = min(chunk, pos)
        pos -= step
        f.seek(pos)
        i = f.read(step).rfind(b"\n")
        if i >= 0:
            return pos + i + 1
    return 0


class PredictionSink:
    """An append-only JSONL or CSV prediction file that a later run can resume.

    Args:
        path: the output file.
        fmt: ``"jsonl"`` or ``"csv"``.
        top_k: labels per row (CSV: columns ``label, prob, label_2, prob_2, ...``).
        meta: what identifies the run (adapter fingerprint...); must match on resume.
        resume: continue an existing file (else an existing file is an error).
    """

    def __init__(self, path: str | Path, fmt: str, top_k: int, meta: dict[str, Any], resume: bool) -> None:
        self.path, self.fmt, self.top_k = Path(path), fmt, top_k
        self.meta_path = self.path.with_name(self.path.name + ".meta.json")
        meta = {**meta, "format": fmt, "top_k": top_k}
        self.done, self.last_image = 0, None
        if self.path.exists():
            if not resume:
                raise DataError(f"{self.path} exists; pass --resume to continue it, or remove it")
            self._check_meta(meta)
            self.done, self.last_image = self._repair_and_count()
        elif self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True)
        write_bytes_atomic(self.meta_path, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
        self._file = open(self.path, "a", encoding="utf-8", newline="")  # noqa: SIM115
        if self.fmt == "csv" and self.done == 0 and self._file.tell() == 0:
            self._file.write(self._csv_line(self._header()))

    def _check_meta(self, meta: dict[str, Any]) -> None:
        try:
            old = json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            raise DataError(f"{self.path} has no readable {self.meta_path.name}; cannot resume it safely, remove it") from None
        diff = sorted(k for k in meta if old.get(k) != meta[k])
        if diff:
            raise DataError(f"cannot resume {self.path}: it was written with different {', '.join(diff)}; use another --output")

    def _repair_and_count(self) -> tuple[int, str | None]:
        """Cut a torn last line, then count complete rows and read the last one, in constant memory."""
        chunk = 1 << 20
        with open(self.path, "r+b") as f:
            size = f.seek(0, os.SEEK_END)
            end = _last_newline_end(f, size, chunk)
            if end < size:  # a torn last line from an interrupted write
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        if self.fmt == "csv":
            count, last = -1, None  # the header is not a row
            with open(self.path, encoding="utf-8", newline="") as fh:
                for record in csv.reader(fh):
                    count, last = count + 1, record
            return max(count, 0), (last[0] if last is not None and count > 0 else None)
        count = 0
        with open(self.path, "rb") as f:
            while block := f.read(chunk):
                count += block.count(b"\n")
            if count == 0:
                return 0, None
            start = _last_newline_end(f, end - 1, chunk)
            f.seek(start)
            try:
                row = json.loads(f.read(end - start).decode("utf-8"))
                return count, str(row["image"])
            except (ValueError, KeyError, TypeError):  # UnicodeDecodeError is a ValueError
                raise DataError(f"the last row of {self.path} is not a prediction row (damaged or another file); "
                                "rerun without --resume into a new --output") from None

    def check_resume_point(self, image: str) -> None:
        """Fail if input number ``done`` is not the image of the last row written (the inputs changed)."""
        if self.last_image is not None and (csv_cell(image) if self.fmt == "csv" else image) != self.last_image:
            raise DataError(f"the inputs changed since {self.path} was written: its row {self.done} is {self.last_image}, "
                            f"input {self.done} is {image}; rerun without --resume into a new --output")

    def _header(self) -> list[str]:
        cols = ["image", "label", "prob"]
        for k in range(2, self.top_k + 1):
            cols += [f"label_{k}", f"prob_{k}"]
        return [*cols, "error"]

    @staticmethod
    def _csv_line(values: Sequence[Any]) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\r\n").writerow([csv_cell(v) for v in values])  # RFC 4180: a CR in a cell is quoted
        return buf.getvalue()

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Append ``rows`` and make them durable (flush + fsync)."""
        if self.fmt == "jsonl":
            out = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows)
        else:
            lines = []
            for r in rows:
                values: list[Any] = [r["image"]]
                top = r.get("top_k", [])
                for k in range(self.top_k):
                    values += [top[k]["label"], top[k]["prob"]] if k < len(top) else ["", ""]
                lines.append(self._csv_line([*values, r.get("error", "")]))
            out = "".join(lines)
        self._file.write(out)
        self._file.flush()
        os.fsync(self._file.fileno())
        self.done += len(rows)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> PredictionSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
