"""``craft-sdk sweep``: a thin layer over :func:`craft_sdk.sweep.run_sweep`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ._app import RUNTIME_ERROR, app, emit_json, err, fail, guarded


def _dry_run(spec: Any, out: Path, as_json: bool) -> None:
    runs = spec.runs()
    budget = sum(int(r.config["budget"]) for r in runs if r.mode != "zero-shot") + sum(
        r.mode == "zero-shot" for r in runs
    )
    info = {
        "name": spec.name,
        "out": str(out),
        "n_runs": len(runs),
        "max_training_queries": budget,
        "run_ids": [r.run_id for r in runs],
    }
    if as_json:
        emit_json(info)
        return
    typer.echo(f"sweep {spec.name}: {len(runs)} runs, at most {budget:,} training queries in all -> {out}")
    for run_id in info["run_ids"][:10]:
        typer.echo(f"  {run_id}")
    if len(runs) > 10:
        typer.echo(f"  ... and {len(runs) - 10} more")


def _summary_table(rows: list[dict[str, Any]], title: str) -> Table:
    has_combo = any(r["combo"] for r in rows)
    table = Table(title=title, show_header=True)
    for col in ["task", "shots", "mode"] + (["hyperparameters"] if has_combo else []):
        table.add_column(col)
    for col in ("test acc %", "zero-shot %", "gain", "seeds", "queries"):
        table.add_column(col, justify="right")
    for r in rows:
        std = f" ± {100 * r['test_accuracy_std']:.2f}" if r["n_seeds"] > 1 else ""
        cells = [r["task"], str(r["shots"]), r["mode"]] + ([r["combo"] or "-"] if has_combo else [])
        cells += [
            f"{100 * r['test_accuracy_mean']:.2f}{std}",
            f"{100 * r['zero_shot_accuracy_mean']:.2f}",
            f"{100 * r['gain_mean']:+.2f}",
            str(r["n_seeds"]),
            f"{r['queries_used_mean']:.0f}",
        ]
        table.add_row(*cells)
    return table


@app.command()
@guarded
def sweep(
    spec_file: Path = typer.Argument(..., help="grid file (.yaml, .toml or .json): tasks, shots, modes, seeds, grid"),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="output folder (default: sweeps/<spec file name>); reuse it to resume"
    ),
    workers: int | None = typer.Option(None, "--workers", "-w", help="local worker processes (default: CPU cores)"),
    ray: str | None = typer.Option(
        None, "--ray", help="run on Ray: 'local', 'auto' or ray://host:port (needs the craft-sdk 'ray' extra)"
    ),
    threads: int | None = typer.Option(
        None, "--threads", help="torch threads per run (default: cores / workers; Ray: 1)"
    ),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="write PNG plots (needs matplotlib)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate the grid and list its runs; run nothing"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object on stdout"),
) -> None:
    """Run a grid of tuning runs; one JSON record per run, a mean ± std summary and plots. Resumes."""
    from ..sweep import load_spec, run_sweep

    spec = load_spec(spec_file)
    out = out if out is not None else Path("sweeps") / spec_file.stem
    if dry_run:
        _dry_run(spec, out, as_json)
        return
    n_runs = len(spec.runs())
    bar = Progress(
        TextColumn("[bold]sweep"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("runs  {task.fields[last]}"),
        TimeElapsedColumn(),
        console=err,
        transient=False,
        disable=as_json,
    )
    with bar:
        task = bar.add_task("sweep", total=n_runs, last="")

        def on_run_done(run: Any, record: dict[str, Any] | None, error: str | None) -> None:
            last = f"{run.run_id}: " + (f"{100 * record['test_accuracy']:.1f}%" if record else "FAILED")
            bar.update(task, advance=1, last=last)

        result = run_sweep(
            spec, out, workers=workers, ray_address=ray, threads_per_run=threads, plots=plots, on_run_done=on_run_done
        )
        bar.update(task, completed=len(result.records) + len(result.failed))
    summary = {
        "out": str(out),
        "n_runs": n_runs,
        "ran": result.ran,
        "skipped": result.skipped,
        "failed": result.failed,
        "summary": result.summary,
        "plots": [str(p) for p in result.plots],
    }
    if as_json:
        emit_json(summary)
    else:
        err.print(_summary_table(result.summary, f"craft-sdk sweep {spec.name}"))
        typer.echo(f"{result.ran} run(s) done, {result.skipped} skipped as finished; results in {out}")
    if result.failed:
        first_id, first_msg = next(iter(result.failed.items()))
        raise fail(
            f"{len(result.failed)} of {n_runs} runs failed (first: {first_id}: {first_msg}); "
            f"see {out / 'failures.json'}; rerun the same command to retry them",
            code=RUNTIME_ERROR,
        )
