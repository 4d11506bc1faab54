"""``craft-sdk check``: has the black box drifted since the adapter was tuned (its drift canary)?"""

from __future__ import annotations

from pathlib import Path

import typer

from ._app import app, emit_json, err, fail, guarded, open_client

DRIFT_EXIT = 3  # --fail-on-drift: the box drifted (1 and 2 stay errors)
MODEL_HELP = "the black box to check: demo, an open_clip name, local-dir:/path, http(s)://server, zeroshot+http(s)://endpoint, or text-only:<any of these>"


@app.command()
@guarded
def check(
    adapter: str = typer.Argument(..., help="adapter directory or Hugging Face Hub repo id org/name"),
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    pretrained: str | None = typer.Option(None, "--pretrained", "-p", help="pretrained tag or .safetensors; 'none' = random weights"),
    api_key_file: Path | None = typer.Option(None, help="file holding the API key for a server URL"),
    revision: str | None = typer.Option(None, help="Hub branch, tag or commit of ADAPTER"),
    subfolder: str | None = typer.Option(None, help="the adapter's folder inside ADAPTER"),
    fail_on_drift: bool = typer.Option(False, "--fail-on-drift", help=f"exit {DRIFT_EXIT} when the box has drifted (to gate a deployment)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object on stdout"),
) -> None:
    """Re-score the adapter's drift canary through MODEL: unchanged (exit 0) or drifted (exit 3 with --fail-on-drift;
    exit 1 when the adapter has no canary)."""
    from ..adapter import Adapter
    from ..deploy.canary import check_canary

    loaded = Adapter.from_pretrained(adapter, revision=revision, subfolder=subfolder)
    if fail_on_drift and loaded.config.canary is None:  # nothing to check: a gate that always passes is no gate
        raise fail(f"{adapter} has no drift canary, so --fail-on-drift cannot gate anything; re-tune it with --canary N "
                   "(or drop --fail-on-drift)", 1)
    report = check_canary(loaded, open_client(model, pretrained, api_key_file))
    if as_json:
        emit_json({"adapter": adapter, "model": model, **report.to_dict()})
    elif not report.recorded:
        typer.echo(report.summary())
    else:
        colour = "red" if report.drifted else "green"
        err.print(f"[bold {colour}]{'drifted' if report.drifted else 'unchanged'}[/]", highlight=False)
        typer.echo(f"distance      {report.distance:.3f} noise units (tolerance {report.tolerance:g}, noise unit {report.noise:.3g})")
        typer.echo(f"agreement     {100 * (report.agreement or 0):.1f}% of the adapter's canary predictions unchanged")
        typer.echo(f"probabilities mean change {report.probability_change:.4f} (total variation)")
        typer.echo(f"queries used  {report.queries_used}")
        typer.echo(f"advice        {report.advice}")
    if report.drifted and fail_on_drift:
        raise typer.Exit(DRIFT_EXIT)
