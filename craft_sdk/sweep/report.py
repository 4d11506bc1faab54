"""Summaries of sweep records: mean ± std over seeds per (task, shots, mode, hyperparameters)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

GROUP_KEYS = ("task", "shots", "mode", "combo")
AVERAGE_TASK = "mean over tasks"


def combo_label(combo: dict[str, Any]) -> str:
    """``"lam=0.01, beta=0"`` (empty for no grid)."""
    return ", ".join(f"{k}={v}" for k, v in sorted(combo.items()))


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, np.float64)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return float(arr.mean()), std


def summarize(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, shots, mode, combination): means and sample stds over seeds.

    Args:
        records: run records as written by the sweep.

    Returns:
        Rows with ``task``, ``shots``, ``mode``, ``combo``, ``n_seeds``, ``seeds``,
        ``test_accuracy_mean``/``_std``, ``zero_shot_accuracy_mean``/``_std``,
        ``gain_mean`` (test − zero-shot), ``queries_used_mean``, ``wall_time_s_mean``,
        sorted by task, combination, mode and shots.

    Example:
        >>> rows = summarize([{"task": "t", "shots": 1, "mode": "pg", "combo": {}, "seed": s,
        ...     "test_accuracy": a, "zero_shot_accuracy": 0.5, "queries_used": 10, "wall_time_s": 1.0}
        ...     for s, a in ((0, 0.6), (1, 0.8))])
        >>> round(rows[0]["test_accuracy_mean"], 3), round(rows[0]["test_accuracy_std"], 4)
        (0.7, 0.1414)
    """
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for rec in records:
        key = (rec["task"], rec["shots"], rec["mode"], combo_label(rec.get("combo") or {}))
        groups.setdefault(key, []).append(rec)
    rows = []
    for (task, shots, mode, combo), recs in groups.items():
        acc, acc_std = _mean_std([r["test_accuracy"] for r in recs])
        zs, zs_std = _mean_std([r["zero_shot_accuracy"] for r in recs])
        rows.append(
            {
                "task": task,
                "shots": shots,
                "mode": mode,
                "combo": combo,
                "n_seeds": len(recs),
                "seeds": sorted(r["seed"] for r in recs),
                "test_accuracy_mean": acc,
                "test_accuracy_std": acc_std,
                "zero_shot_accuracy_mean": zs,
                "zero_shot_accuracy_std": zs_std,
                "gain_mean": acc - zs,
                "queries_used_mean": float(np.mean([r["queries_used"] for r in recs])),
                "wall_time_s_mean": float(np.mean([r["wall_time_s"] for r in recs])),
            }
        )
    from craft_sdk.tuner.config import MODES

    order = {m: i for i, m in enumerate(MODES)}
    rows.sort(key=lambda r: (r["task"] == AVERAGE_TASK, r["task"], r["combo"], order.get(r["mode"], 99), r["shots"]))
    return rows


def task_average_records(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-seed means over tasks, as records of the pseudo-task ``"mean over tasks"``.

    For each (shots, mode, combination, seed) that finished on *every* task of the
    sweep, one record whose accuracies, queries and wall time are the means over the
    tasks; :func:`summarize` then gives mean ± std over seeds of the task average (the
    paper's "average" column). Empty when the sweep has a single task.

    Example:
        >>> recs = [{"task": t, "shots": 1, "mode": "pg", "combo": {}, "seed": 0, "test_accuracy": a,
        ...     "zero_shot_accuracy": 0.5, "queries_used": 10, "wall_time_s": 1.0} for t, a in (("a", 0.6), ("b", 0.8))]
        >>> round(task_average_records(recs)[0]["test_accuracy"], 3)
        0.7
    """
    records = [r for r in records if r["task"] != AVERAGE_TASK]
    tasks = {r["task"] for r in records}
    if len(tasks) < 2:
        return []
    groups: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for rec in records:
        key = (rec["shots"], rec["mode"], combo_label(rec.get("combo") or {}), rec["seed"])
        groups.setdefault(key, {})[rec["task"]] = rec
    out = []
    for (shots, mode, _, seed), by_task in groups.items():
        if set(by_task) != tasks:
            continue
        recs = list(by_task.values())
        avg = {k: float(np.mean([r[k] for r in recs])) for k in ("test_accuracy", "zero_shot_accuracy", "queries_used", "wall_time_s")}
        out.append({"task": AVERAGE_TASK, "shots": shots, "mode": mode, "combo": recs[0].get("combo") or {}, "seed": seed, **avg})
    return out


def _pct(mean: float, std: float, n: int) -> str:
    if math.isnan(mean):
        return "-"
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if n > 1 else f"{100 * mean:.2f}"


def summary_markdown(rows: list[dict[str, Any]], title: str = "sweep") -> str:
    """A Markdown table of :func:`summarize` rows (accuracies in %)."""
    has_combo = any(r["combo"] for r in rows)
    head = ["task", "shots", "mode"] + (["hyperparameters"] if has_combo else [])
    head += ["test acc (%)", "zero-shot (%)", "gain", "seeds", "queries", "wall s"]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["task"], str(r["shots"]), r["mode"]] + ([r["combo"] or "-"] if has_combo else [])
        cells += [
            _pct(r["test_accuracy_mean"], r["test_accuracy_std"], r["n_seeds"]),
            _pct(r["zero_shot_accuracy_mean"], r["zero_shot_accuracy_std"], r["n_seeds"]),
            f"{100 * r['gain_mean']:+.2f}",
            str(r["n_seeds"]),
            f"{r['queries_used_mean']:.0f}",
            f"{r['wall_time_s_mean']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Mean ± sample std over seeds; gain = test − zero-shot accuracy (points).")
    return "\n".join(lines) + "\n"


def checkpoint_curves(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Accuracy-vs-queries curves: per (task, shots, mode, combination), mean ± std over seeds at each
    checkpoint generation, then the final adapter's accuracy at its training queries, and the
    zero-shot test accuracy (mean over the same runs) as ``zero_shot``."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for rec in records:
        if rec.get("checkpoints"):
            key = (rec["task"], rec["shots"], rec["mode"], combo_label(rec.get("combo") or {}))
            groups.setdefault(key, []).append(rec)
    curves = []
    for (task, shots, mode, combo), recs in sorted(groups.items()):
        by_gen: dict[int, list[tuple[int, float]]] = {}
        for rec in recs:
            for p in rec["checkpoints"]:
                by_gen.setdefault(p["generation"], []).append((p["queries_used"], p["test_accuracy"]))
        points = []
        for gen in sorted(by_gen):
            qs, accs = zip(*by_gen[gen])
            mean, std = _mean_std(list(accs))
            points.append({"generation": gen, "queries": float(np.mean(qs)), "mean": mean, "std": std, "n": len(accs)})
        fmean, fstd = _mean_std([r["test_accuracy"] for r in recs])
        final = {
            "queries": float(np.mean([r["queries_used"] for r in recs])),
            "mean": fmean,
            "std": fstd,
            "n": len(recs),
        }
        zero_shot = float(np.mean([r["zero_shot_accuracy"] for r in recs]))
        curves.append(
            {"task": task, "shots": shots, "mode": mode, "combo": combo, "points": points, "final": final, "zero_shot": zero_shot}
        )
    return curves
