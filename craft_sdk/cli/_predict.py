"""``craft-sdk predict`` and ``export-onnx``: the deploy half of the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from ._app import app, emit_json, fail, guarded, parse_pretrained

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def _expand(inputs: list[Path]) -> list[Path]:
    """Files named on the command line, plus image files found under named directories (sorted)."""
    files: list[Path] = []
    for p in inputs:
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*")
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            if not found:
                raise fail(f"{p} contains no image files ({', '.join(IMAGE_SUFFIXES[:4])}, ...)")
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise fail(f"{p} does not exist")
    return files


def _check_readable(files: list[Path]) -> None:
    """Decode every input before any query is sent; fail naming the first unreadable one."""
    from ..errors import DataError
    from ..images import to_pil

    bad: list[str] = []
    for f in files:
        try:
            to_pil(f)
        except DataError as exc:
            bad.append(str(exc))
    if bad:
        more = f" (and {len(bad) - 1} more unreadable inputs)" if len(bad) > 1 else ""
        raise fail(f"{bad[0]}{more}; no queries were sent")


def _client(model: str | None, pretrained: str | None, url: str | None, api_key_file: Path | None) -> Any:
    from .. import create_client

    if url is not None:
        if model is not None or pretrained is not None:
            raise fail("pass either --client URL or --model/--pretrained, not both")
        if not url.startswith(("http://", "https://")):
            raise fail(f"--client must be an http(s):// URL, got {url!r}; use --model for local models")
        kwargs: dict[str, Any] = {"api_key": api_key_file.read_text().strip()} if api_key_file is not None else {}
        return create_client(url, **kwargs)
    return create_client(model or "demo", **parse_pretrained(model or "demo", pretrained))


@app.command()
@guarded
def predict(
    adapter_dir: Path = typer.Argument(..., help="adapter directory (uses its refiner.onnx when present)"),
    inputs: list[Path] = typer.Argument(..., help="image files and/or directories of images"),
    model: str | None = typer.Option(None, "--model", "-m", help="demo, an open_clip name, or local-dir:/path (default: demo)"),
    pretrained: str | None = typer.Option(None, "--pretrained", "-p", help="pretrained tag or .safetensors; 'none' = random weights"),
    client_url: str | None = typer.Option(None, "--client", help="URL of a craft-sdk prediction server (instead of --model)"),
    api_key_file: Path | None = typer.Option(None, help="file holding the API key for --client"),
    top_k: int = typer.Option(1, "--top-k", "-k", min=1, help="labels to show per image"),
    batch_size: int = typer.Option(64, help="images per black-box call (one query each)"),
    backend: str = typer.Option("auto", help="refiner backend: auto | onnx | numpy"),
    allow_model_mismatch: bool = typer.Option(False, help="serve the adapter through another model"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object on stdout"),
) -> None:
    """Classify images with a tuned adapter: labels and probabilities per image."""
    from .. import ClassifierConfig, CraftClassifier

    config = ClassifierConfig(batch_size=batch_size, backend=backend, allow_model_mismatch=allow_model_mismatch)
    files = _expand(inputs)
    _check_readable(files)
    client = _client(model, pretrained, client_url, api_key_file)
    clf = CraftClassifier.from_pretrained(adapter_dir, client, config=config)
    probs = clf.predict_proba(files)
    k = min(top_k, probs.shape[1])
    order = (-probs).argsort(axis=1, kind="stable")[:, :k]
    rows: list[dict[str, Any]] = []
    for f, p, o in zip(files, probs, order):
        top = [{"label": str(clf.classes_[j]), "prob": round(float(p[j]), 6)} for j in o]
        rows.append({"image": str(f), "label": top[0]["label"], "top_k": top})
        if not as_json:
            typer.echo(f"{f}\t" + "  ".join(f"{t['label']} {t['prob']:.4f}" for t in top))
    if as_json:
        emit_json({"adapter": str(adapter_dir), "backend": clf.refiner_backend_, "queries_used": clf.ledger.used, "predictions": rows})


@app.command("export-onnx")
@guarded
def export_onnx_cmd(
    adapter_dir: Path = typer.Argument(..., help="adapter directory"),
    out: Path | None = typer.Option(None, "--out", "-o", help="output file (default: ADAPTER/refiner.onnx)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object on stdout"),
) -> None:
    """Export the adapter's refiner to ONNX (logits in, refined logits out; no softmax)."""
    from ..export import OPSET, export_onnx

    path = export_onnx(adapter_dir, out)
    size = path.stat().st_size
    if as_json:
        emit_json({"onnx": str(path), "bytes": size, "opset": OPSET})
        return
    typer.echo(f"refiner exported to {path} ({size / 1024:.1f} KiB, opset {OPSET})")
