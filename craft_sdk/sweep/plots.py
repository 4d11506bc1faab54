"""PNG plots of a sweep (matplotlib, Agg canvas; matplotlib is imported only here, when plotting)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from craft_sdk.errors import require

from .report import AVERAGE_TASK

logger = logging.getLogger(__name__)

SHOTS_PLOT = "accuracy_vs_shots.png"
QUERIES_PLOT = "accuracy_vs_queries.png"


def _figure(n_panels: int) -> tuple[Any, list[Any]]:
    hint = "pass plots=False / --no-plots"
    FigureCanvasAgg = require("matplotlib.backends.backend_agg", "train", "sweep plots", otherwise=hint).FigureCanvasAgg
    Figure = require("matplotlib.figure", "train", "sweep plots", otherwise=hint).Figure
    cols = min(n_panels, 3)
    rows = (n_panels + cols - 1) // cols
    fig = Figure(figsize=(4.6 * cols, 3.6 * rows), dpi=110)
    FigureCanvasAgg(fig)  # attaches a non-interactive canvas; no global backend change
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n_panels)]
    return fig, axes


def _label(mode: str, combo: str, shots: int | None = None) -> str:
    parts = [mode] + ([combo] if combo else []) + ([f"{shots}-shot"] if shots is not None else [])
    return ", ".join(parts)


def plot_accuracy_vs_shots(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Test accuracy (mean ± std over seeds) against shots: one panel per task, one line per mode/combination.

    Args:
        rows: :func:`craft_sdk.sweep.report.summarize` rows.
        path: the PNG to write.
        title: figure title.
    """
    tasks = sorted({r["task"] for r in rows}, key=lambda t: (t == AVERAGE_TASK, t))
    fig, axes = _figure(len(tasks))
    for ax, task in zip(axes, tasks):
        lines: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in rows:
            if r["task"] == task:
                lines.setdefault((r["mode"], r["combo"]), []).append(r)
        for (mode, combo), pts in lines.items():
            pts.sort(key=lambda r: r["shots"])
            x = [p["shots"] for p in pts]
            y = [100 * p["test_accuracy_mean"] for p in pts]
            err = [100 * p["test_accuracy_std"] for p in pts]
            ax.errorbar(
                x,
                y,
                yerr=err,
                marker="o",
                capsize=3,
                linestyle="--" if mode == "zero-shot" else "-",
                label=_label(mode, combo),
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["shots"] for r in rows if r["task"] == task}))
        ax.get_xaxis().set_major_formatter("{x:.0f}")
        _style(ax, "shots per class", task)
    return _save(fig, path, title)


def plot_accuracy_vs_queries(curves: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Test accuracy against training queries: one panel per task, one line per mode/shots/combination.

    Lines are the model of the checkpoint generation (CMA-ES mean prompt + current
    refiner); the star is the final, selected adapter; the dashed line is zero-shot.

    Args:
        curves: :func:`craft_sdk.sweep.report.checkpoint_curves` output.
        path: the PNG to write.
        title: figure title.
    """
    tasks = sorted({c["task"] for c in curves})
    fig, axes = _figure(len(tasks))
    for ax, task in zip(axes, tasks):
        for c in (c for c in curves if c["task"] == task):
            x = [p["queries"] for p in c["points"]]
            y = [100 * p["mean"] for p in c["points"]]
            lo = [100 * (p["mean"] - p["std"]) for p in c["points"]]
            hi = [100 * (p["mean"] + p["std"]) for p in c["points"]]
            (line,) = ax.plot(x, y, marker="o", markersize=3, label=_label(c["mode"], c["combo"], c["shots"]))
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15)
            ax.plot(
                [c["final"]["queries"]], [100 * c["final"]["mean"]], marker="*", markersize=10, color=line.get_color()
            )
        zs = [c["zero_shot"] for c in curves if c["task"] == task and "zero_shot" in c]
        if zs:
            ax.axhline(100 * sum(zs) / len(zs), color="0.4", linestyle="--", linewidth=1.2, label="zero-shot")
        _style(ax, "training queries", f"{task}  (★ = final adapter)")
    return _save(fig, path, title)


def _style(ax: Any, xlabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _save(fig: Any, path: str | Path, title: str = "") -> Path:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    logger.info("wrote %s", out)
    return out
