"""One run of a sweep: load the task, tune, evaluate, and return a JSON-ready record.

Runs execute in worker processes (local or Ray), so everything that crosses the
process boundary is a plain dict: :meth:`RunSpec.to_dict` in, a record out.

"Accuracy vs queries" checkpoints are taken by an evaluation-only
``on_progress`` callback: when the training ledger first passes a checkpoint, the
model of that generation (``Progress.offset``: the CMA-ES mean's prompt offset,
``Progress.refine``: the current refiner) is scored on the test set through the
sweep's own ledger (category ``eval``). Nothing the callback does feeds back into
training; the test set never enters the tuner.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from craft_sdk import (
    ImageDataset,
    ImageSetHandle,
    MeteredClient,
    PredictionClient,
    QueryLedger,
    __version__,
    create_client,
    evaluate,
    load_data,
    tune,
)
from craft_sdk.api import pretrained_kwargs
from craft_sdk.scores import as_log_scores
from craft_sdk.tuner.templates import ensemble_log_probs

from .spec import RunSpec

logger = logging.getLogger(__name__)

RECORD_FORMAT = "craft-sdk-sweep-run"
RECORD_VERSION = 1
_CLIENTS: dict[tuple[str, str | None], PredictionClient] = {}


def set_threads(threads: int | None) -> None:
    """Set torch's intra-op threads in this process (None: leave as is)."""
    if threads is None:
        return
    import torch

    torch.set_num_threads(max(1, int(threads)))


DEBUG_ENV = "CRAFT_SDK_DEBUG"  # set by ``craft-sdk --debug``; inherited by worker processes


def init_worker(threads: int) -> None:
    """Initializer of a fresh worker process: OpenMP and torch use ``threads`` threads."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    set_threads(threads)


def get_client(model: str, pretrained: str | None) -> PredictionClient:
    """A client for ``model``, created once per process and reused by later runs."""
    key = (model, pretrained)
    if key not in _CLIENTS:
        _CLIENTS[key] = create_client(model, **pretrained_kwargs(pretrained))
    return _CLIENTS[key]


class _TestProbe:
    """``on_progress`` callback: scores the current model (prompt + refiner) on the test set at query checkpoints."""

    def __init__(
        self, client: PredictionClient, test: ImageDataset, template: str, eval_at: Sequence[int], ledger: QueryLedger
    ) -> None:
        self.metered = MeteredClient(client, ledger)
        self.output = client.capabilities(template).output
        self.test = test
        self.template = template
        self.pending = sorted(eval_at)
        self.handle: ImageSetHandle | None = None
        self.points: list[dict[str, Any]] = []

    def __call__(self, progress: Any) -> None:
        if not self.pending or progress.queries_used < self.pending[0]:
            return
        while self.pending and progress.queries_used >= self.pending[0]:
            self.pending.pop(0)
        if self.handle is None:
            self.handle = self.metered.upload(self.test.images)
        names = list(self.test.class_names)
        contexts = progress.contexts or (self.template,)  # a text search's words, an ensemble's contexts
        rows = [as_log_scores(self.metered.predict(self.handle, names, t, progress.offset, category="eval"), self.output) for t in contexts]
        scores = rows[0] if len(rows) == 1 else ensemble_log_probs(np.stack(rows))
        if progress.refine is not None:
            scores = progress.refine(scores)
        acc = float((np.asarray(scores).argmax(-1) == self.test.labels).mean())
        point = {"generation": progress.generation, "queries_used": progress.queries_used, "test_accuracy": acc}
        self.points.append(point)


def execute_run(payload: dict[str, Any], threads: int | None = None) -> dict[str, Any]:
    """Run one sweep run (a :meth:`RunSpec.to_dict` payload) and return its record.

    Args:
        payload: the run, as a dict (it crosses process boundaries).
        threads: torch threads for this process (None: unchanged).

    Returns:
        The JSON-ready record (see ``craft_sdk.sweep`` module doc).
    """
    set_threads(threads)
    run = RunSpec.from_dict(payload)
    t0 = time.perf_counter()
    data = load_data(f"demo:{run.task}" if run.is_demo else run.task, shots=run.shots, seed=run.seed)
    if data.test is None or len(data.test) == 0:
        from craft_sdk import DataError

        raise DataError(f"task {run.task_label} has no test split; add a test/ folder")
    client = get_client(run.model, run.pretrained)
    eval_ledger = QueryLedger()
    probe = _TestProbe(client, data.test, run.config["template"], run.eval_at, eval_ledger)
    t1 = time.perf_counter()
    adapter = tune(client, data.train, data.val, run.tune_config(), on_progress=probe, progress=False)
    tune_s = time.perf_counter() - t1
    metrics = evaluate(adapter, client, data.test, ledger=eval_ledger)
    prov = adapter.config.provenance
    return {
        "format": RECORD_FORMAT,
        "format_version": RECORD_VERSION,
        "craft_sdk_version": __version__,
        "run_id": run.run_id,
        "digest": run.digest,
        "run": run.to_dict(),
        "task": run.task_label,
        "shots": run.shots,
        "mode": run.mode,
        "seed": run.seed,
        "combo": run.combo,
        "model_id": adapter.config.model_id,
        "config": run.config,
        "test_accuracy": metrics["accuracy"],
        "zero_shot_accuracy": metrics["zero_shot_accuracy"],
        "ece": metrics.get("ece"),
        "ece_uncalibrated": metrics.get("ece_uncalibrated"),
        "deployed": (prov.get("selection") or {}).get("deployed"),
        "stopped": prov["metrics"].get("stopped"),
        "n_train": len(data.train),
        "n_test": metrics["n_test"],
        "queries_used": int(prov["queries_used"]),
        "queries": {"training": dict(prov["queries"]), "eval": eval_ledger.counts["eval"]},
        "n_generations": prov["n_generations"],
        "selected_generation": prov["selected_generation"],
        "train_accuracy": prov["metrics"].get("train_accuracy"),
        "checkpoints": probe.points,
        "history": prov["history"],
        "wall_time_s": round(time.perf_counter() - t0, 3),
        "tune_time_s": round(tune_s, 3),
        "host": {"node": platform.node(), "pid": os.getpid(), "threads": _torch_threads()},
    }


def _torch_threads() -> int | None:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return None
    return int(torch.get_num_threads())


def safe_execute(payload: dict[str, Any], threads: int | None = None) -> tuple[str, dict[str, Any] | str]:
    """:func:`execute_run` that returns ``("ok", record)`` or ``("error", one line)``, never raises."""
    try:
        return "ok", execute_run(payload, threads)
    except Exception as exc:  # a failed run must not stop the sweep
        if os.environ.get(DEBUG_ENV):  # craft-sdk --debug: the traceback too (else the driver logs one line)
            logger.exception("sweep run %s failed", payload.get("task"))
        msg = str(exc).splitlines()[0] if str(exc) else ""
        return "error", f"{exc.__class__.__name__}: {msg}"
