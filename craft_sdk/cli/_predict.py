"""``craft-sdk predict`` and ``export-onnx``: the deploy half of the command line."""

from __future__ import annotations

import time
from itertools import islice
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ._app import REMOTE, RUNTIME_ERROR, app, emit_json, err, fail, guarded, is_remote, open_client, recorded_model

MODEL_HELP = "demo, an open_clip name, local-dir:/path, the http(s):// URL of a craft-sdk server, zeroshot+http(s)://endpoint, chat+/embed+http(s)://HOST/v1?model=NAME, or text-only:<any of these> (default: the model the adapter records)"


def _client(model: str | None, pretrained: str | None, url: str | None, api_key_file: Path | None, concurrency: int) -> Any:
    if url is not None and model is not None:
        raise fail("pass either --client URL or --model, not both")
    if url is not None and not url.startswith(REMOTE):
        raise fail(f"--client must be an http(s):// URL, got {url!r}; use --model for local models")
    return open_client(url or model or "demo", pretrained, api_key_file, max_concurrency=concurrency)


def _recorded_model_id(root: Path) -> str | None:
    """The ``model_id`` an adapter folder records (None: unreadable; loading it says why)."""
    import json

    from ..adapter import CONFIG_FILE

    try:
        return json.loads((Path(root) / CONFIG_FILE).read_text()).get("model_id")
    except (OSError, ValueError, AttributeError):
        return None


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]predicting"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
        TextColumn("{task.fields[rate]} img/s"), TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=False,
    )


def cost_summary(usage: Any, n_images: int, price: Any) -> dict[str, Any]:
    """Provider usage of a predict run, its cost (None without a price), and both per 1,000 images classified."""
    from ..client.pricing import usage_summary

    return usage_summary(usage, n_images, price)


def _per_1000_text(summary: dict[str, Any]) -> str:
    per = summary["per_1000_images"] or {}
    text = f"{per.get('requests', 0):g} requests, {per.get('images', 0):g} images, {per.get('input_tokens', 0):g} input tokens"
    return text + ("" if per.get("cost") is None else f", cost {per['cost']:.6g}")


def _echo_rows(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        if "error" in r:
            typer.echo(f"{r['image']}\terror: {r['error']}")
        else:
            typer.echo(f"{r['image']}\t" + "  ".join(f"{t['label']} {t['prob']:.4f}" for t in r["top_k"]))


@app.command()
@guarded
def predict(
    adapter: str = typer.Argument(..., help="adapter directory or Hugging Face Hub repo id org/name (uses its refiner.onnx)"),
    inputs: list[str] = typer.Argument(None, help="image files, directories (recursive) and/or glob patterns"),
    files_from: Path | None = typer.Option(None, "--files-from", help="text file of image paths, one per line ('-': stdin)"),
    model: str | None = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    pretrained: str | None = typer.Option(None, "--pretrained", "-p", help="pretrained tag or .safetensors; 'none' = random weights"),
    client_url: str | None = typer.Option(None, "--client", help="URL of a craft-sdk prediction server (same as --model URL)"),
    api_key_file: Path | None = typer.Option(None, help="file holding the API key for a server URL"),
    revision: str | None = typer.Option(None, help="Hub branch, tag or commit of ADAPTER"),
    subfolder: str | None = typer.Option(None, help="the adapter's folder inside ADAPTER"),
    output: Path | None = typer.Option(None, "--output", "-o", help="write rows to this .jsonl or .csv file as batches finish"),
    fmt: str = typer.Option("auto", "--format", help="output format: auto (from the suffix) | jsonl | csv"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted --output run (finished batches are not re-queried)"),
    top_k: int = typer.Option(1, "--top-k", "-k", min=1, help="labels to show per image"),
    batch_size: int = typer.Option(64, help="images per black-box call (one query each)"),
    prefetch: int = typer.Option(2, min=1, help="batches decoded ahead of the black-box calls"),
    concurrency: int | None = typer.Option(None, min=1, help="black-box calls in flight (default: 4 for a server URL, 1 for a local model)"),
    on_error: str = typer.Option("fail", help="unreadable image: fail (stop before its batch is sent) | skip (record the error)"),
    backend: str = typer.Option("auto", help="refiner backend: auto | onnx | numpy"),
    allow_model_mismatch: bool = typer.Option(False, help="serve the adapter through another model"),
    canary_every: int = typer.Option(0, min=0, help="check the adapter's drift canary before the first batch and every N batches (1 query per check; 0: never)"),
    on_drift: str = typer.Option("raise", help="when the canary drifted: raise (stop, exit 1) | warn (log and go on)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object on stdout (with --output: a run summary)"),
    price_text: str | None = typer.Option(None, "--price", help="prices of the provider's units, e.g. per_request=0.001,per_image=0 (reports the cost per 1,000 images)"),
) -> None:
    """Classify images with a tuned adapter, streaming over any number of files in batches."""
    from .. import ClassifierConfig, CraftClassifier
    from ..adapter.hub import resolve_adapter_dir
    from ..deploy.sinks import PredictionSink, infer_format, rows_of
    from ..client.pricing import PriceTable
    from ..client.usage import usage_of
    from ..deploy.stream import IMAGE_SUFFIXES, check_inputs, iter_image_paths, predict_stream

    if not inputs and files_from is None:
        raise fail("name images, directories or glob patterns, or pass --files-from LIST")
    if resume and output is None:
        raise fail("--resume continues an --output file; pass --output")
    remote = is_remote(client_url or model or "")
    workers = concurrency or (4 if remote else 1)
    config = ClassifierConfig(batch_size=batch_size, backend=backend, allow_model_mismatch=allow_model_mismatch,
                              canary_every=canary_every, on_drift=on_drift)
    check_inputs(inputs or [])
    if files_from is not None and str(files_from) != "-" and not files_from.exists():
        raise fail(f"--files-from {files_from} does not exist; pass a file of image paths, one per line, or '-' for stdin")
    once = files_from is not None and (str(files_from) == "-" or not files_from.is_file())  # a pipe is read once
    total = None if once else sum(1 for _ in iter_image_paths(inputs or [], files_from))
    if total == 0:
        raise fail(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES)[:4])}, ...) found in {' '.join(inputs or [])}", RUNTIME_ERROR)
    root = resolve_adapter_dir(adapter, revision=revision, subfolder=subfolder)  # a Hub miss fails before the model loads
    if model is None and client_url is None:
        model, pretrained = recorded_model(_recorded_model_id(root), pretrained)
    client = _client(model, pretrained, client_url, api_key_file, workers)
    price = None if price_text is None else PriceTable.parse(price_text)
    clf = CraftClassifier.from_pretrained(root, client, config=config)
    meter = usage_of(client)
    before = meter.snapshot()
    sink = None
    if output is not None:
        meta = {"adapter": clf.adapter_.fingerprint(), "classes": [str(c) for c in clf.classes_]}
        sink = PredictionSink(output, infer_format(output, fmt), top_k, meta, resume)
    paths = iter_image_paths(inputs or [], files_from)
    skipped = sink.done if sink is not None else 0
    if skipped:  # skip the finished inputs without holding them in memory
        seen, last = 0, ""
        for path in islice(paths, skipped):
            seen, last = seen + 1, path
        if seen < skipped:
            raise fail(f"{output} has {skipped} rows but there are only {seen} inputs; rerun without --resume", RUNTIME_ERROR)
        assert sink is not None
        sink.check_resume_point(last)
    collected: list[dict[str, Any]] = []
    n_done, n_errors, t0 = 0, 0, time.perf_counter()
    try:
        with _progress() as bar:
            task = bar.add_task("predict", total=total, completed=skipped, rate="-")
            for res in predict_stream(clf, paths, batch_size=batch_size, prefetch=prefetch, concurrency=workers,
                                      on_error=on_error, done_before=skipped):
                rows = rows_of(res, top_k)
                n_done, n_errors = n_done + len(rows), n_errors + len(res.errors)
                if sink is not None:
                    sink.write(rows)
                elif as_json:
                    collected += rows
                else:
                    _echo_rows(rows)
                bar.update(task, advance=len(rows), rate=f"{n_done / max(time.perf_counter() - t0, 1e-9):.1f}")
    finally:
        if sink is not None:
            sink.close()
    wall = time.perf_counter() - t0
    summary = {"adapter": adapter, "backend": clf.refiner_backend_, "queries_used": clf.ledger.used, "images": n_done,
               "resumed_after": skipped, "errors": n_errors, "images_per_s": round(n_done / max(wall, 1e-9), 2),
               **cost_summary(meter.minus(before), n_done - n_errors, price)}
    if sink is not None:
        summary["output"] = str(output)
        if as_json:
            emit_json(summary)
        else:
            err.print(f"{n_done} images -> {output} ({skipped} already done, {n_errors} errors, "
                      f"{clf.ledger.used} queries, {summary['images_per_s']} img/s)", highlight=False)
            if summary["provider_usage"]["requests"]:
                err.print(f"provider usage per 1,000 images: {_per_1000_text(summary)}", highlight=False)
    elif as_json:
        emit_json({**summary, "predictions": collected})
    elif summary["provider_usage"]["requests"]:
        err.print(f"provider usage per 1,000 images: {_per_1000_text(summary)}", highlight=False)


@app.command("export-onnx")
@guarded
def export_onnx_cmd(
    adapter_dir: Path = typer.Argument(..., help="adapter directory"),
    out: Path | None = typer.Option(None, "--out", "-o", help="output file (default: ADAPTER/refiner.onnx)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object on stdout"),
) -> None:
    """Export the adapter's refiner to ONNX (logits in, refined logits out; no softmax)."""
    from ..adapter.export import OPSET, export_onnx

    path = export_onnx(adapter_dir, out)
    size = path.stat().st_size
    if as_json:
        emit_json({"onnx": str(path), "bytes": size, "opset": OPSET})
        return
    typer.echo(f"refiner exported to {path} ({size / 1024:.1f} KiB, opset {OPSET})")
