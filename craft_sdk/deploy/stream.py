"""Prediction over any number of image files: discovery, a bounded prefetch thread, bounded concurrency.

:func:`iter_image_paths` walks directory trees, file lists and globs lazily in a
deterministic order (memory does not grow with the number of files);
:func:`predict_stream` decodes the next batches on a background thread while the
black box answers the current ones, keeps at most ``concurrency`` calls in flight,
and yields :class:`BatchResult` in input order. :mod:`craft_sdk.deploy.sinks` writes them
to a resumable JSONL or CSV file.
"""

from __future__ import annotations

import glob
import logging
import os
import queue
import stat
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from PIL import Image

from ..data import IMAGE_SUFFIXES  # one list of image suffixes for datasets and prediction
from ..errors import ConfigError, DataError
from ..images import PREDICT_MAX_PIXELS, read_image, require_regular
from .classifier import CraftClassifier, Predictions

logger = logging.getLogger(__name__)

ON_ERROR = ("fail", "skip")
_GLOB_CHARS = frozenset("*?[")


def _walk(root: str) -> Iterator[str]:
    """Image files under ``root``, sorted per directory, hidden entries skipped, non-regular files skipped."""
    for current, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_SUFFIXES:
                continue
            path = os.path.join(current, name)
            try:
                regular = stat.S_ISREG(os.stat(path).st_mode)
            except OSError:
                regular = False
            if regular:
                yield path
            else:
                logger.warning("skipping %s: not a regular file", path)


def check_inputs(inputs: Sequence[str | Path]) -> None:
    """Fail with one line on an input that is missing, not a regular file, or a glob matching nothing."""
    for item in map(str, inputs):
        if os.path.isdir(item):
            continue
        if not os.path.lexists(item) and _GLOB_CHARS & set(item):
            if next(glob.iglob(item, recursive=True), None) is None:
                raise DataError(f"no file matches the pattern {item!r}")
            continue
        require_regular(item)


def iter_image_paths(inputs: Sequence[str | Path] = (), files_from: str | Path | None = None) -> Iterator[str]:
    """Image file paths from files, directories (recursive, sorted), glob patterns (sorted) and a list file.

    Args:
        inputs: image files (any name), directories (image suffixes only), glob patterns
            (``"shots/**/*.jpg"``).
        files_from: a text file (or pipe) with one path per line (blank lines and ``#`` comments skipped),
            or ``"-"`` for standard input; its paths are yielded unchecked, so that a missing one or a FIFO is
            one image's error when decoded (skipped with ``on_error="skip"``), never opened.

    Raises:
        DataError: a missing or non-regular named file, or a glob that matches nothing.
    """
    check_inputs(inputs)
    for item in map(str, inputs):
        if os.path.isdir(item):
            yield from _walk(item)
        elif not os.path.lexists(item) and _GLOB_CHARS & set(item):
            for path in sorted(glob.glob(item, recursive=True)):
                if os.path.isdir(path):
                    continue
                require_regular(path)
                yield path
        else:
            yield item
    if files_from is not None:
        yield from _iter_list_file(str(files_from))


def _iter_list_file(list_file: str) -> Iterator[str]:
    import sys

    handle = sys.stdin if list_file == "-" else open(list_file, encoding="utf-8")  # noqa: SIM115
    try:
        for line in handle:
            path = line.rstrip("\n")
            if path.strip() and not path.lstrip().startswith("#"):
                yield path
    finally:
        if handle is not sys.stdin:
            handle.close()


@dataclass
class BatchResult:
    """One batch of the stream, in input order.

    Args:
        paths: the batch's inputs.
        predictions: predictions for the inputs that decoded (``ok`` order); None when none did.
        ok: indices into ``paths`` of the decoded inputs.
        errors: index into ``paths`` → why that input was skipped (``on_error="skip"``).
        seconds: wall time per stage: ``decode`` (prefetch thread), ``black_box``, ``refiner``.
    """

    paths: list[str]
    predictions: Predictions | None
    ok: list[int]
    errors: dict[int, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class _Decoded:
    paths: list[str]
    images: list[Image.Image]
    ok: list[int]
    errors: dict[int, str]
    decode_s: float


def _decode(paths: list[str]) -> _Decoded:
    t0 = time.perf_counter()
    images, ok, errors = [], [], {}
    for i, path in enumerate(paths):
        try:
            images.append(read_image(path, reduce_above=PREDICT_MAX_PIXELS))
            ok.append(i)
        except DataError as exc:
            errors[i] = str(exc)
    return _Decoded(paths, images, ok, errors, time.perf_counter() - t0)


class _Prefetcher:
    """A daemon thread decoding batches of paths into a bounded queue (at most ``depth`` batches ahead)."""

    _END = object()

    def __init__(self, paths: Iterable[str], batch_size: int, depth: int) -> None:
        self._paths, self._batch_size = iter(paths), batch_size
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="craft-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                chunk = list(islice(self._paths, self._batch_size))
                if not chunk:
                    break
                if not self._put(_decode(chunk)):
                    return
        except BaseException as exc:  # handed to the consumer, raised there in order
            self._put(exc)
            return
        self._put(self._END)

    def __iter__(self) -> Iterator[_Decoded]:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _run_batch(clf: CraftClassifier, item: _Decoded) -> BatchResult:
    seconds = {"decode": item.decode_s, "black_box": 0.0, "refiner": 0.0}
    preds = None
    if item.images:
        preds = clf.predict_all(item.images)
        seconds.update(preds.seconds)
    return BatchResult(item.paths, preds, item.ok, item.errors, seconds)


def predict_stream(
    clf: CraftClassifier,
    paths: Iterable[str],
    *,
    batch_size: int = 64,
    prefetch: int = 2,
    concurrency: int = 1,
    on_error: str = "fail",
    done_before: int = 0,
) -> Iterator[BatchResult]:
    """Predict ``paths`` in batches of ``batch_size`` (one query each), yielding results in input order.

    Decoding runs ``prefetch`` batches ahead on a background thread; up to ``concurrency``
    black-box calls are in flight at once (use > 1 for remote clients).

    Args:
        clf: a fitted :class:`CraftClassifier`.
        paths: image file paths (e.g. from :func:`iter_image_paths`).
        batch_size: images per black-box call.
        prefetch: decoded batches kept ready ahead of the calls (>= 1).
        concurrency: black-box calls in flight (>= 1).
        on_error: ``"fail"``: an unreadable image stops the stream before its batch is sent;
            ``"skip"``: it is reported in :attr:`BatchResult.errors` and the rest is predicted.
        done_before: inputs already done (only used in the error message).

    Example:
        >>> for res in predict_stream(clf, iter_image_paths(["photos/"]), concurrency=8):  # doctest: +SKIP
        ...     print(res.paths[0], res.predictions.labels[0])
    """
    for name, value in (("batch_size", batch_size), ("prefetch", prefetch), ("concurrency", concurrency)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if on_error not in ON_ERROR:
        raise ConfigError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    prefetcher = _Prefetcher(paths, batch_size, prefetch)
    pending: deque[Future[BatchResult]] = deque()
    finished = done_before
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="craft-predict")
    try:
        for item in prefetcher:
            if item.errors and on_error == "fail":
                while pending:
                    finished += len(pending[0].result().paths)
                    yield pending.popleft().result()
                first = min(item.errors)
                raise DataError(f"{item.errors[first]}; {finished} image(s) were done before it (fix it, or skip unreadable "
                                "images with on_error='skip' / --on-error skip)")
            pending.append(pool.submit(_run_batch, clf, item))
            while len(pending) >= concurrency:
                res = pending.popleft().result()
                finished += len(res.paths)
                yield res
        while pending:
            yield pending.popleft().result()
    finally:
        prefetcher.close()
        pool.shutdown(wait=True, cancel_futures=True)
