"""Sweeps: grids of tuning runs (tasks × shots × modes × seeds × hyperparameters), run in parallel.

A consumer of the public API, kept apart from the core library: this package
imports ``craft_sdk``, and nothing in ``craft_sdk`` imports it. Each run writes a
JSON record (config, test and zero-shot accuracy, training queries and, separately,
evaluation queries, wall time, per-generation history, test accuracy at query
checkpoints); the sweep writes a mean ± std summary and PNG plots, and resumes.

Example:
    >>> from craft_sdk.sweep import SweepSpec, run_sweep
    >>> spec = SweepSpec(tasks=("digits",), shots=(1, 4), modes=("pg", "craft"), seeds=(0, 1, 2))
    >>> result = run_sweep(spec, "sweeps/demo", workers=2)  # doctest: +SKIP
"""

from __future__ import annotations

from .driver import SweepResult, load_record, run_sweep
from .report import AVERAGE_TASK, checkpoint_curves, summarize, summary_markdown, task_average_records
from .runner import execute_run
from .spec import BY_SHOTS, RunSpec, SweepSpec, budget_for_shots, load_spec

__all__ = [
    "AVERAGE_TASK",
    "BY_SHOTS",
    "RunSpec",
    "SweepResult",
    "SweepSpec",
    "budget_for_shots",
    "checkpoint_curves",
    "execute_run",
    "load_record",
    "load_spec",
    "run_sweep",
    "summarize",
    "summary_markdown",
    "task_average_records",
]
