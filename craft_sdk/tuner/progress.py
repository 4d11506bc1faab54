"""Progress of a tuning run as it happens: the callback protocol and the two displays the SDK ships.

A progress callback is any callable taking a :class:`~craft_sdk.tuner.result.Progress` (after the
zero-shot baseline and after every generation). If it also has a ``phase(name)`` method, it hears the
long steps after the search too: ``"selection"`` (the robust protocol's cross-validated choice of the
deployed behaviour, then its calibration). The library prints nothing by itself: :class:`LogProgress`
logs, and :class:`RichProgress` draws a bar on stderr only when a caller asks for progress
(``craft_sdk.tune(progress=True)``, or by default when stderr is a terminal; the CLI always).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .result import Progress

logger = logging.getLogger(__name__)

PHASES = {"selection": "selecting + calibrating"}  # phase name -> what the display says while it runs


def _fields(p: Progress) -> dict[str, str]:
    loss = "-" if p.train_loss != p.train_loss else f"{p.train_loss:.3f}"
    return {"loss": loss, "acc": "-" if p.train_accuracy != p.train_accuracy else f"{p.train_accuracy:.3f}"}


class LogProgress:
    """Logs one INFO line per generation and per phase (``logging.getLogger("craft_sdk.tuner.progress")``)."""

    def __call__(self, p: Progress) -> None:
        f = _fields(p)
        logger.info("generation %d of %d planned: %d of %d queries, loss %s, train acc (current) %s",
                    p.generation, p.n_generations, p.queries_used, p.budget, f["loss"], f["acc"])

    def phase(self, name: str) -> None:
        logger.info("%s ...", PHASES.get(name, name))


class RichProgress:
    """A rich progress bar (queries of the budget, loss, the current model's training accuracy, a spinner
    and the elapsed time, which keep moving during the phases after the search). Use it as a context
    manager; the callback is the object itself.

    Args:
        budget: the bar's total (queries).
        console: a ``rich.console.Console`` (default: stderr).
    """

    def __init__(self, budget: int, console: Any = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Bar

        self.bar = Bar(
            SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("queries"),
            TextColumn("loss {task.fields[loss]}  train acc (current) {task.fields[acc]}"), TimeElapsedColumn(),
            console=console if console is not None else Console(stderr=True), transient=False,
        )
        self.task = self.bar.add_task("tuning", total=budget, loss="-", acc="-")

    def __call__(self, p: Progress) -> None:
        self._start()
        self.bar.update(self.task, completed=p.queries_used, description="tuning", **_fields(p))

    def phase(self, name: str) -> None:
        self._start()
        self.bar.update(self.task, description=PHASES.get(name, name))

    def _start(self) -> None:  # on the first event: a run refused before its first query draws no bar
        if not self.bar.live.is_started:
            self.bar.start()

    def __enter__(self) -> RichProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar.live.is_started:
            self.bar.stop()


class _Both:
    """Two callbacks as one (phases go to whichever has ``phase``)."""

    def __init__(self, *callbacks: Callable[[Progress], None]) -> None:
        self.callbacks = callbacks

    def __call__(self, p: Progress) -> None:
        for cb in self.callbacks:
            cb(p)

    def phase(self, name: str) -> None:
        for cb in self.callbacks:
            if hasattr(cb, "phase"):
                cb.phase(name)


@contextmanager
def progress_display(
    progress: bool | Callable[[Progress], None] | None, budget: int, on_progress: Callable[[Progress], None] | None = None
) -> Iterator[Callable[[Progress], None] | None]:
    """The callback for ``progress`` (True: a :class:`RichProgress` bar; False: none; None: a bar when
    stderr is a terminal; a callable: itself), combined with ``on_progress``, alive for the ``with`` body."""
    if progress is None:
        progress = bool(getattr(sys.stderr, "isatty", lambda: False)())
    if progress is True:
        with RichProgress(budget) as bar:
            yield bar if on_progress is None else _Both(bar, on_progress)
        return
    if progress is not False and not callable(progress):
        from ..errors import ConfigError

        raise ConfigError(f"progress must be True, False, None or a callable taking a Progress, got {progress!r}")
    chosen = [cb for cb in (progress or None, on_progress) if cb is not None]
    yield None if not chosen else chosen[0] if len(chosen) == 1 else _Both(*chosen)  # type: ignore[misc]
