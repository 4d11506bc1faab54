"""``craft-sdk tune``, ``eval`` and ``inspect``."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from ._app import RUNTIME_ERROR, app, emit_json, err, fail, guarded, open_client, recorded_model

MODEL_HELP = "demo, an open_clip name (ViT-B-32, RN50), local-dir:/path, http(s)://server, zeroshot+http(s)://endpoint, chat+/embed+http(s)://HOST/v1?model=NAME, or text-only:<any of these>"
PRETRAINED_HELP = "pretrained tag or .safetensors file for open_clip names; 'none' = random weights"


def _client(model: str, pretrained: str | None, api_key_file: Path | None = None) -> Any:
    return open_client(model, pretrained, api_key_file)


PRICE_HELP = "prices of the provider's units, e.g. input_per_1m=3,output_per_1m=15,per_image=0.001,per_request=0 (left out: 0)"


def _price(text: str | None, max_cost: float | None) -> Any:
    """The --price table (None without one); --max-cost needs one."""
    from ..client.pricing import PriceTable

    if max_cost is not None and text is None:
        raise fail("--max-cost is money: give --price too, e.g. --price per_request=0.001")
    if max_cost is not None and not max_cost >= 0:
        raise fail(f"--max-cost must be >= 0, got {max_cost}")
    return None if text is None else PriceTable.parse(text)


def _provider_summary(queries: dict[str, Any]) -> dict[str, Any]:
    """The ledger's provider usage as flat summary fields."""
    usage = queries.get("usage") or {}
    return {"provider_requests": usage.get("requests", 0), "provider_images": usage.get("images", 0),
            "input_tokens": usage.get("input_tokens", 0), "output_tokens": usage.get("output_tokens", 0),
            "cost": queries.get("cost"), "max_cost": queries.get("max_cost")}


def _usage_rows(table: Table, summary: dict[str, Any]) -> None:
    """The provider's units (and money when priced) in the tune's table; nothing for an in-process model."""
    if summary["provider_requests"]:
        table.add_row("provider requests / images", f"{summary['provider_requests']} / {summary['provider_images']}")
    if summary["input_tokens"] or summary["output_tokens"]:
        table.add_row("input / output tokens", f"{summary['input_tokens']} / {summary['output_tokens']}")
    if summary["cost"] is not None:
        table.add_row("cost", f"{summary['cost']:.6g}")


AUTO_CHECKPOINT = ".craft-checkpoint"  # under --out when no --checkpoint-dir is given: Ctrl-C leaves a resumable run
TEST_FRACTION_HELP = ("single-folder DATA: fraction of each class held out as test images (default: half, but never "
                      "so many that --shots + --val-shots no longer fit)")


def _resume_command(data: str, checkpoint_dir: Path) -> str:
    """The exact command that resumes this run: this command line plus ``--resume`` (the checkpoint is
    ``--checkpoint-dir``, or the automatic one under ``--out``)."""
    import shlex
    import sys

    argv = sys.argv[1:] if "tune" in sys.argv[1:] else ["tune", data, "--checkpoint-dir", str(checkpoint_dir)]
    return shlex.join(["craft-sdk", *argv, *([] if "--resume" in argv else ["--resume"])])


def _tune_command(
    data: str = typer.Argument(..., help="ImageFolder (DATA/train, DATA/test or DATA/<class>), or demo:<task>"),
    model: str = typer.Option("demo", "--model", "-m", help=MODEL_HELP),
    pretrained: str | None = typer.Option(None, "--pretrained", "-p", help=PRETRAINED_HELP),
    shots: int = typer.Option(16, help="training images per class (seeded sample)"),
    out: Path = typer.Option(Path("craft-adapter"), "--out", "-o", help="adapter directory to write"),
    val_shots: int = typer.Option(0, help="images per class held out of training for model selection"),
    test_fraction: float | None = typer.Option(None, "--test-fraction", help=TEST_FRACTION_HELP),
    split_file: Path | None = typer.Option(None, "--split", help="CoOp split_zhou_*.json (paths relative to DATA)"),
    checkpoint_dir: Path | None = typer.Option(None, help="write a resumable checkpoint (and the query journal) here"),
    checkpoint_every: int = typer.Option(1, help="generations between checkpoints"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --checkpoint-dir, or the automatic checkpoint an interrupted run left under --out (same data, model and options)"),
    api_key_file: Path | None = typer.Option(None, help="file holding the API key for an http(s) model"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object on stdout"),
    price_text: str | None = typer.Option(None, "--price", help=PRICE_HELP),
    max_cost: float | None = typer.Option(None, "--max-cost", help="hard ceiling on the tune's cost at --price, checked before each call"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan (splits, generations, queries, requests, images, tokens, cost, what is refused) and exit; sends nothing"),
    **options: Any,
) -> None:
    """Tune a CraFT adapter on DATA through a prediction-only black box (every TuneConfig field is an option)."""
    from .. import load_data
    from ..api import tune_run
    from ..data import require_classes
    from ..tuner.checkpoint import LEDGER_FILE
    from ..tuner.progress import RichProgress
    from ._options import config_from

    if shots < 1:
        raise fail(f"--shots must be >= 1, got {shots}")
    if val_shots < 0:
        raise fail(f"--val-shots must be >= 0 (0 = no validation split), got {val_shots}")
    config = config_from(options)
    budget, seed = config.budget, config.seed
    price = _price(price_text, max_cost)
    t0 = time.perf_counter()
    kwargs: dict[str, Any] = {"split_file": split_file} if split_file else {}
    if dry_run:  # prints the plan and exits
        from ._dryrun import dry_run as plan_only

        load = lambda: load_data(data, shots=shots, seed=seed, val_shots=val_shots, test_fraction=test_fraction, **kwargs)  # noqa: E731
        plan_only(config, load, lambda: _client(model, pretrained, api_key_file), price=price, max_cost=max_cost, as_json=as_json)
    splits = load_data(data, shots=shots, seed=seed, val_shots=val_shots, test_fraction=test_fraction, **kwargs)
    require_classes(splits.train, str(data))
    client = _client(model, pretrained, api_key_file)
    auto_dir = out / AUTO_CHECKPOINT
    ckpt = checkpoint_dir if checkpoint_dir is not None else auto_dir
    if resume and checkpoint_dir is None and not (auto_dir / LEDGER_FILE).exists():
        raise fail(f"--resume continues a run: pass its --checkpoint-dir (no interrupted run left one in {auto_dir})")
    if not resume and checkpoint_dir is None and (auto_dir / LEDGER_FILE).exists():
        raise fail(f"{auto_dir} holds an interrupted run of this --out; resume it with: {_resume_command(data, ckpt)} "
                   f"(or delete {auto_dir} to start over)")
    resume_matches = _resume_outlook(config, ckpt, splits.val is not None) if resume else None
    try:
        with RichProgress(budget, console=err) as bar:
            run = tune_run(client, splits.train, splits.val, config, checkpoint_dir=ckpt, checkpoint_every=checkpoint_every,
                           resume=resume, progress=bar, price=price, max_cost=max_cost)
    except KeyboardInterrupt:
        err.print(f"interrupted; the run is saved in {ckpt}. Resume it with:\n  {_resume_command(data, ckpt)}", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    except Exception:
        _after_failure(ckpt, auto_dir)
        raise
    result, adapter = run.result, run.adapter
    if resume_matches is False and _early_stopping(config):
        resume_matches = _resume_result(result)
    if ckpt.resolve() == auto_dir.resolve():
        shutil.rmtree(auto_dir, ignore_errors=True)  # finished: the adapter replaces the automatic checkpoint
    adapter.config.provenance["data"] = {**adapter.config.provenance.get("data", {}), "test_fraction": test_fraction}
    adapter.save_pretrained(out)
    summary = {
        "adapter": str(out),
        "mode": result.config.mode,
        "requested_mode": result.requested_mode,
        "budget": budget,
        "queries_used": result.queries.used,
        "queries": result.queries.counts,
        "zero_shot_train_accuracy": result.metrics.zero_shot_train_accuracy,
        "train_accuracy": result.metrics.train_accuracy,
        "val_accuracy": result.metrics.val_accuracy,
        "n_train": len(splits.train),
        "n_generations": result.n_generations,
        "planned_generations": result.planned_generations,
        "selected_generation": result.selected_generation,
        "wall_time_s": round(time.perf_counter() - t0, 2),
        "skipped_files": len(splits.skipped),
        "deployed": result.selection.deployed if result.selection is not None else None,
        "decision": result.selection.reason if result.selection is not None else None,
        "stopped": result.metrics.stopped,
        "temperature": result.temperature,
        "resume_can_match": resume_matches,
        **_provider_summary(result.queries.to_dict()),
    }
    if summary["deployed"] == "zero-shot" and result.config.mode != "zero-shot":
        err.print(f"[yellow]note:[/] {summary['decision']}")
    if as_json:
        emit_json(summary)
        return
    Console().print(_summary_table(summary))
    typer.echo(f"adapter written to {out}")


def _summary_table(summary: dict[str, Any]) -> Table:
    """The headline table of a tune (printed on stdout)."""
    budget = summary["budget"]
    table = Table(title=f"craft-sdk tune ({summary['mode']})", show_header=True)
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("zero-shot train accuracy", f"{summary['zero_shot_train_accuracy']:.3f}")
    table.add_row("deployed train accuracy", f"{summary['train_accuracy']:.3f}")
    if summary["val_accuracy"] is not None:
        table.add_row("held-out accuracy (selection: check or validation images)", f"{summary['val_accuracy']:.3f}")
    table.add_row("queries used / budget", f"{summary['queries_used']} / {budget}")
    table.add_row("generations run / planned", f"{summary['n_generations']} / {summary['planned_generations']}")
    _usage_rows(table, summary)
    if summary["deployed"] is not None:
        table.add_row("deployed", str(summary["deployed"]))
    if summary["stopped"]:
        table.add_row("stopped", str(summary["stopped"]).removeprefix("stopped: "))
    table.add_row("wall time", f"{summary['wall_time_s']:.1f} s")
    return table


def _register_tune() -> None:
    """``tune``'s signature: its own options, then one option per TuneConfig field (cli/_options.py)."""
    import inspect

    from ._options import config_parameters

    own = [p for p in inspect.signature(_tune_command).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    command = guarded(_tune_command)
    command.__signature__ = inspect.Signature([*own, *config_parameters()])  # type: ignore[attr-defined]
    app.command("tune")(command)


_register_tune()


def _resume_outlook(config: Any, checkpoint_dir: Path | None, has_val: bool) -> bool | None:
    """Say on stderr whether resuming can still give the uninterrupted run's result; None: nothing to resume."""
    from ..tuner.checkpoint import has_checkpoint, journal_used, load_checkpoint, planned_total, resume_can_match

    if checkpoint_dir is None or not has_checkpoint(checkpoint_dir):
        return None
    state = load_checkpoint(checkpoint_dir)[1]
    used, at_checkpoint = journal_used(checkpoint_dir), int(state["history"][-1]["queries_used"])
    planned = planned_total(config, int(state["n_generations"]), has_val)
    can = resume_can_match(used, at_checkpoint, planned, config.budget)
    lost = max(used - at_checkpoint, 0)
    if can:
        err.print(f"resume: {lost} queries billed after the last checkpoint stay counted; the budget ({config.budget}) "
                  "leaves room to redo them, so the result can equal the uninterrupted run's", highlight=False)
    elif _early_stopping(config):
        err.print(f"resume: {lost} queries billed after the last checkpoint stay counted and the whole plan needs "
                  f"{planned}, more than the budget ({config.budget}) leaves; early stopping (--patience) usually ends the "
                  "run sooner, and then the result equals the uninterrupted run's (said at the end)", highlight=False)
    else:
        err.print(f"[yellow]resume:[/] {lost} queries billed after the last checkpoint stay counted and the plan needs "
                  f"{planned}; the budget ({config.budget}) has no room to redo them all, so the run will stop early "
                  "and its result will differ from the uninterrupted run's", highlight=False)
    return can


def _after_failure(ckpt: Path, auto_dir: Path) -> None:
    """A failed run keeps a checkpoint to resume (the next run into --out names the command); an automatic
    one with nothing to resume is removed, with the --out folder it created (the error stays one line)."""
    from ..tuner.checkpoint import has_checkpoint

    if not has_checkpoint(ckpt) and ckpt.resolve() == auto_dir.resolve():
        shutil.rmtree(auto_dir, ignore_errors=True)
        if auto_dir.parent.is_dir() and not any(auto_dir.parent.iterdir()):
            auto_dir.parent.rmdir()  # the --out folder this run created for its checkpoint


def _early_stopping(config: Any) -> bool:
    """Whether the run may stop before its plan (robust protocol with a patience)."""
    return bool(config.robust and config.patience is not None)


def _resume_result(result: Any) -> bool:
    """After a resumed run whose plan the budget could not cover: did it end before the budget ran out?"""
    ran_out = result.metrics.stopped_early is not None
    if ran_out:
        err.print("[yellow]resume:[/] the budget ran out before the run ended, so its result differs from the "
                  "uninterrupted run's", highlight=False)
    else:
        err.print("resume: the run ended (early stopping) before the budget ran out, so its result equals the "
                  "uninterrupted run's", highlight=False)
    return not ran_out


@app.command("eval")
@guarded
def eval_(
    adapter_dir: Path = typer.Argument(..., help="adapter directory"),
    data: str = typer.Argument(..., help="dataset with a test split (or a single ImageFolder), or demo:<task>"),
    model: str | None = typer.Option(None, "--model", "-m", help=f"{MODEL_HELP} (default: the model the adapter records)"),
    pretrained: str | None = typer.Option(None, "--pretrained", "-p", help=PRETRAINED_HELP),
    seed: int | None = typer.Option(None, help="seed of the hold-out split (default: the adapter's seed)"),
    split_file: Path | None = typer.Option(None, "--split", help="CoOp split_zhou_*.json"),
    test_fraction: float | None = typer.Option(None, "--test-fraction", help="single-folder DATA: the test fraction (default: the tune's)"),
    allow_model_mismatch: bool = typer.Option(False, help="evaluate even if the client serves another model"),
    api_key_file: Path | None = typer.Option(None, help="file holding the API key for an http(s) model"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object on stdout"),
) -> None:
    """Test accuracy of zero-shot and of the adapter on DATA's test split."""
    from .. import evaluate, load_adapter, load_data

    adapter = load_adapter(str(adapter_dir))
    seed = adapter.config.provenance.get("seed", 0) if seed is None else seed
    kwargs: dict[str, Any] = {"split_file": split_file} if split_file else {}
    prov = adapter.config.provenance
    n_val = int((prov.get("data") or {}).get("n_val") or 0)  # rebuild the tune's exact split: shots + val shots
    val_shots = n_val // adapter.n_classes if n_val % adapter.n_classes == 0 else 0
    if test_fraction is None:
        test_fraction = (prov.get("data") or {}).get("test_fraction")
    splits = load_data(data, seed=seed, shots=prov.get("shots"), val_shots=val_shots, test_fraction=test_fraction, **kwargs)
    if splits.test is None or len(splits.test) == 0:
        raise fail(f"{data} has no test split; use DATA/train + DATA/test, a single ImageFolder, or --split", RUNTIME_ERROR)
    if model is None:
        model, pretrained = recorded_model(adapter.config.model_id, pretrained)
    client = _client(model, pretrained, api_key_file)
    res = evaluate(adapter, client, splits.test, allow_model_mismatch=allow_model_mismatch)
    if res["n_excluded"]:
        err.print(f"[yellow]note:[/] excluded {res['n_excluded']} test image(s) the adapter was tuned or selected on")
    if as_json:
        emit_json(res)
        return
    typer.echo(
        f"test accuracy {res['accuracy']:.4f} (zero-shot {res['zero_shot_accuracy']:.4f}) "
        f"on {res['n_test']} images, {res['queries_used']} queries"
    )


@app.command()
@guarded
def inspect(
    adapter_dir: str = typer.Argument(..., help="adapter directory or Hugging Face Hub repo id org/name (cached or online)"),
    revision: str | None = typer.Option(None, help="Hub branch, tag or commit of ADAPTER"),
    subfolder: str | None = typer.Option(None, help="the adapter's folder inside ADAPTER"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object on stdout"),
) -> None:
    """Describe an adapter without loading any model."""
    from .. import load_adapter
    from ..adapter import describe_prompt
    from ..adapter.hub import resolve_adapter_dir

    root = resolve_adapter_dir(adapter_dir, revision=revision, subfolder=subfolder)
    adapter = load_adapter(str(root), verify_projection=False)  # describing it regenerates nothing
    cfg = adapter.config
    prov = {k: v for k, v in cfg.provenance.items() if k != "history"}
    files = {p.name: p.stat().st_size for p in sorted(root.iterdir()) if p.is_file()}
    info = {
        "model_id": cfg.model_id,
        "classes": list(cfg.class_names),
        "n_classes": len(cfg.class_names),
        "template": cfg.template,
        "calibration": None if cfg.calibration is None else vars(cfg.calibration),
        "prompt": None if cfg.prompt is None else vars(cfg.prompt),
        "refiner": None if cfg.refiner is None else vars(cfg.refiner),
        "canary": None if cfg.canary is None else cfg.canary.to_dict(),
        "format_version": cfg.format_version,
        "craft_sdk_version": cfg.craft_sdk_version,
        "fingerprint": adapter.fingerprint(),
        "files": files,
        "provenance": prov,
    }
    if as_json:
        emit_json(info)
        return
    typer.echo(f"adapter {adapter_dir}  (format {cfg.format_version}, craft-sdk {cfg.craft_sdk_version})")
    typer.echo(f"  model      {cfg.model_id}")
    typer.echo(f"  classes    {len(cfg.class_names)}: {', '.join(cfg.class_names[:8])}{' ...' if len(cfg.class_names) > 8 else ''}")
    typer.echo(f"  mode       {prov.get('mode')}  seed {prov.get('seed')}  shots {prov.get('shots')}")
    typer.echo(f"  queries    {prov.get('queries_used')} of {prov.get('budget')}")
    typer.echo(f"  template   {cfg.template!r}")
    typer.echo(f"  prompt     {describe_prompt(cfg.prompt)}")
    selection = prov.get("selection") or {}
    if selection:
        typer.echo(f"  deployed   {selection.get('reason', selection.get('deployed'))}")
    if cfg.calibration is not None:
        typer.echo(f"  calibrated temperature {cfg.calibration.temperature:.3f}")
    canary = cfg.canary
    typer.echo(f"  canary     {'none recorded' if canary is None else f'{canary.n_probes} probes, seed {canary.seed}, noise unit {canary.unit:.3g}'}")
    typer.echo(f"  refiner    {'none' if cfg.refiner is None else cfg.refiner.describe()}")
    typer.echo(f"  files      {', '.join(f'{k} ({v / 1024:.1f} KiB)' for k, v in files.items())}")
