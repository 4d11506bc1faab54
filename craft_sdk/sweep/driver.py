"""Run a sweep: skip finished runs, execute the rest locally (process pool) or on Ray, then summarise.

Output layout under ``out_dir``::

    sweep.json                   the resolved spec and its run ids
    runs/<run_id>.json           one record per finished run (written atomically)
    failures.json                runs that raised this time (absent when none)
    summary.json, summary.md     mean ± std over seeds
    plots/accuracy_vs_shots.png, plots/accuracy_vs_queries.png

A run's record appears only once the run has finished, via a temporary file
renamed into place, so a killed sweep leaves either a complete record or none;
running the same spec into the same folder again skips every run whose record
exists and matches the run's digest.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from craft_sdk import ConfigError, __version__
from craft_sdk._fileio import write_bytes_atomic

from .report import checkpoint_curves, summarize, summary_markdown, task_average_records
from .runner import RECORD_FORMAT, RECORD_VERSION, init_worker, safe_execute
from .spec import RunSpec, SweepSpec, as_spec, run_order

logger = logging.getLogger(__name__)

RUNS_DIR = "runs"
PLOTS_DIR = "plots"
OnRunDone = Callable[[RunSpec, "dict[str, Any] | None", "str | None"], None]


@dataclass
class SweepResult:
    """What :func:`run_sweep` did.

    Args:
        out_dir: the output folder.
        records: records of every run of the grid that has finished (this time or before).
        summary: :func:`~craft_sdk.sweep.report.summarize` rows.
        ran: runs executed this time.
        skipped: runs skipped because their record already existed.
        failed: run id → one-line error, for runs that raised this time.
        plots: PNG files written.
    """

    out_dir: Path
    records: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    ran: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    plots: list[Path] = field(default_factory=list)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` via a temporary file and a rename (never a torn file)."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` via a temporary file and a rename (never a torn file)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def load_record(path: Path, run: RunSpec) -> dict[str, Any] | None:
    """The finished record of ``run`` at ``path``, or None (missing, torn, or for another run)."""
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        logger.warning("ignoring unreadable sweep record %s; the run will be repeated", path)
        return None
    ok = isinstance(rec, dict) and rec.get("format") == RECORD_FORMAT and rec.get("format_version") == RECORD_VERSION
    if not ok or rec.get("digest") != run.digest:
        logger.warning("sweep record %s does not match its run; the run will be repeated", path)
        return None
    return rec


def _clean_temporaries(runs_dir: Path) -> None:
    for tmp in runs_dir.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def _default_workers(n_pending: int) -> int:
    return max(1, min(os.cpu_count() or 1, n_pending))


def run_sweep(
    spec: SweepSpec | Mapping[str, Any] | str | Path,
    out_dir: str | Path,
    *,
    workers: int | None = None,
    ray_address: str | None = None,
    threads_per_run: int | None = None,
    plots: bool = True,
    on_run_done: OnRunDone | None = None,
) -> SweepResult:
    """Run every run of ``spec`` not already finished in ``out_dir``; write records, summary and plots.

    Args:
        spec: a :class:`SweepSpec`, a mapping, or a spec file (YAML, TOML, JSON).
        out_dir: output folder; reusing it resumes the sweep.
        workers: local worker processes (default: CPU cores, at most the pending runs);
            1 runs in this process. Ignored with ``ray_address``.
        ray_address: run on Ray instead: ``"local"`` starts a local instance, ``"auto"`` or
            ``"ray://host:10001"`` joins a cluster (needs ``pip install 'craft-sdk[ray]'``; every node
            needs craft-sdk, the model and the task folders at the same paths). An already
            initialised Ray session is used as is.
        threads_per_run: torch threads per run (local default: cores // workers; Ray default: 1,
            also the CPUs each Ray task reserves).
        plots: write PNG plots (needs matplotlib).
        on_run_done: called in this process as ``on_run_done(run, record, error)`` after each run.

    Returns:
        A :class:`SweepResult`.

    Example:
        >>> result = run_sweep("benchmarks/sweeps/table3.yaml", "sweeps/table3", workers=2)  # doctest: +SKIP
        >>> result.summary[0]["test_accuracy_mean"]  # doctest: +SKIP
    """
    sweep = as_spec(spec)
    if workers is not None and workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    if threads_per_run is not None and threads_per_run < 1:
        raise ConfigError(f"threads_per_run must be >= 1, got {threads_per_run}")
    out = Path(out_dir)
    runs_dir = out / RUNS_DIR
    runs_dir.mkdir(parents=True, exist_ok=True)
    _clean_temporaries(runs_dir)
    runs = sweep.runs()
    write_json_atomic(
        out / "sweep.json",
        {"spec": sweep.to_dict(), "run_ids": [r.run_id for r in runs], "craft_sdk_version": __version__},
    )
    done = {r.run_id: rec for r in runs if (rec := load_record(runs_dir / f"{r.run_id}.json", r)) is not None}
    pending = [r for r in runs if r.run_id not in done]
    logger.info("sweep %s: %d runs, %d already finished, %d to run", sweep.name, len(runs), len(done), len(pending))
    failed: dict[str, str] = {}

    def finish(run: RunSpec, status: str, value: Any) -> None:
        if status == "ok":
            write_json_atomic(runs_dir / f"{run.run_id}.json", value)
            done[run.run_id] = value
        else:
            failed[run.run_id] = value
            logger.error("sweep run %s failed: %s", run.run_id, value)
        if on_run_done is not None:
            on_run_done(run, value if status == "ok" else None, None if status == "ok" else value)

    ordered = run_order(pending)
    if ordered and ray_address is not None:
        from .ray_backend import run_on_ray

        run_on_ray(ordered, ray_address, threads_per_run or 1, finish)
    elif ordered:
        _run_local(ordered, workers or _default_workers(len(ordered)), threads_per_run, finish)
    return _finalise(sweep, out, runs, done, failed, len(pending) - len(failed), len(runs) - len(pending), plots)


def _run_local(runs: list[RunSpec], workers: int, threads: int | None, finish: Callable[..., None]) -> None:
    if workers == 1:
        for run in runs:
            finish(run, *safe_execute(run.to_dict(), threads))
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold torch/OpenMP threads
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=init_worker, initargs=(threads,)) as pool:
        futures = {pool.submit(safe_execute, run.to_dict(), threads): run for run in runs}
        try:
            for fut in as_completed(futures):
                finish(futures[fut], *fut.result())
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _finalise(
    sweep: SweepSpec,
    out: Path,
    runs: list[RunSpec],
    done: dict[str, dict[str, Any]],
    failed: dict[str, str],
    ran: int,
    skipped: int,
    plots: bool,
) -> SweepResult:
    records = [done[r.run_id] for r in runs if r.run_id in done]
    rows = summarize(records + task_average_records(records))
    write_json_atomic(
        out / "summary.json", {"name": sweep.name, "n_runs": len(runs), "n_finished": len(records), "rows": rows}
    )
    write_text_atomic(out / "summary.md", summary_markdown(rows, sweep.name))
    failures = out / "failures.json"
    if failed:
        write_json_atomic(failures, failed)
    else:
        failures.unlink(missing_ok=True)
    written: list[Path] = []
    if plots and records:
        from .plots import QUERIES_PLOT, SHOTS_PLOT, plot_accuracy_vs_queries, plot_accuracy_vs_shots

        written.append(plot_accuracy_vs_shots(rows, out / PLOTS_DIR / SHOTS_PLOT, sweep.name))
        curves = checkpoint_curves(records)
        if curves:
            written.append(plot_accuracy_vs_queries(curves, out / PLOTS_DIR / QUERIES_PLOT, sweep.name))
    return SweepResult(out, records, rows, ran, skipped, failed, written)
