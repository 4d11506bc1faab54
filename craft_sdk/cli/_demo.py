"""``craft-sdk demo``: the whole pipeline on the shipped demo VLM and demo tasks, offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..adapter.files import ONNX_FILE
from ._app import app, emit_json, err, fail, guarded


@app.command()
@guarded
def demo(
    task: str = typer.Option("digits", "--task", "-t", help="demo task (see --list)"),
    list_tasks: bool = typer.Option(False, "--list", help="list the demo tasks and exit"),
    out: Path = typer.Option(Path("craft-demo"), "--out", "-o", help="output directory"),
    budget: int = typer.Option(8000, help="training query budget (hard ceiling)"),
    shots: int = typer.Option(16, help="training images per class"),
    seed: int = typer.Option(0, help="seed of sampling and tuning"),
    mode: str = typer.Option("craft", help="zero-shot | pg | pr | pg+pr | craft"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object on stdout"),
) -> None:
    """Tune CraFT on a demo task with the shipped demo VLM, evaluate, export ONNX, deploy, and report."""
    from ..demo import demo_task_info, list_demo_tasks

    if list_tasks:
        infos = [demo_task_info(name) for name in list_demo_tasks()]
        if as_json:
            emit_json({"tasks": [{"name": i.name, "n_classes": len(i.class_names), "class_names": list(i.class_names),
                                  "description": i.description, "source": i.source, "license": i.license} for i in infos]})
            return
        for info in infos:
            typer.echo(f"{info.name:20s} {len(info.class_names):3d} classes  {info.description}")
        return
    from ..apps.demo import run_demo
    from ..errors import DataError

    try:
        demo_task_info(task)
    except DataError as exc:  # an unknown --task is a bad option value: a usage error
        raise fail(str(exc)) from None

    with Progress(TextColumn("[bold]tuning"), BarColumn(), MofNCompleteColumn(), TextColumn("queries"),
                  TextColumn("train acc {task.fields[acc]}"), TimeElapsedColumn(), console=err) as bar:
        bar_task = bar.add_task("tune", total=budget, acc="-")

        def on_progress(p: Any) -> None:
            bar.update(bar_task, completed=p.queries_used, acc=f"{p.train_accuracy:.3f}")

        report = run_demo(task, out, budget=budget, seed=seed, shots=shots, mode=mode, on_progress=on_progress)
    if as_json:
        emit_json({k: v for k, v in vars(report).items() if k not in ("curve",)})
        return
    table = Table(title=f"craft-sdk demo: {task} ({shots} shots, seed {seed})")
    table.add_column("")
    table.add_column("test accuracy", justify="right")
    table.add_row("zero-shot", f"{report.zero_shot_accuracy:.3f}")
    table.add_row(report.mode, f"{report.accuracy:.3f}")
    typer.echo("")
    err.print(table)
    typer.echo(f"queries used: {report.queries_used} / {report.budget} (training)  +{report.eval_queries} evaluation")
    if report.stopped:
        typer.echo(report.stopped)
    if report.decision:
        typer.echo(f"deployed: {report.decision}")
    if report.ece is not None:
        typer.echo(f"calibration: temperature {report.temperature:.2f}, test ECE {report.ece_uncalibrated:.3f} -> {report.ece:.3f}")
    typer.echo(f"wall time: {report.wall_time_s:.1f} s   test images: {report.n_test}")
    has_onnx = (Path(report.adapter_dir) / ONNX_FILE).is_file()
    typer.echo(f"held-out predictions (CraftClassifier{', ONNX refiner' if has_onnx else ', no refiner'}):")
    for s in report.samples[:8]:
        mark = "ok " if s["predicted"] == s["true"] else "err"
        typer.echo(f"  [{mark}] true {s['true']:>10s}  predicted {s['predicted']:>10s}  p={s['probability']:.2f}")
    typer.echo(f"adapter: {report.adapter_dir} ({'with refiner.onnx' if has_onnx else 'no refiner deployed'})   report: {report.report_png}")
