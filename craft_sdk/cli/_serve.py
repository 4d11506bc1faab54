"""``craft-sdk serve``: the model owner's side of the black box."""

from __future__ import annotations

from pathlib import Path

import typer

from ._app import app, err, guarded, parse_pretrained
from ._tune import MODEL_HELP, PRETRAINED_HELP


@app.command()
@guarded
def serve(
    model: str = typer.Option("demo", "--model", "-m", help=MODEL_HELP.replace(", or http(s)://server", "")),
    pretrained: str | None = typer.Option(None, "--pretrained", "-p", help=PRETRAINED_HELP),
    host: str = typer.Option("127.0.0.1", help="address to bind; loopback by default (use a TLS proxy to expose it)"),
    port: int = typer.Option(8765, help="TCP port"),
    api_key_file: Path = typer.Option(..., help="file of API keys: one KEY or 'NAME KEY' per line"),
    budget_per_key: int | None = typer.Option(None, help="queries each key may use (same unit as the tuner's ledger)"),
    max_body_mb: int = typer.Option(256, help="largest request body in MiB"),
    cache_size: int = typer.Option(8, help="uploaded image sets whose features are kept"),
    device: str = typer.Option("cpu", help="torch device of the model"),
    text_only: bool = typer.Option(False, "--text-only", help="refuse context offsets (a text-only provider); /v1/zero-shot/* still answers"),
) -> None:
    """Serve MODEL as a prediction-only HTTP service (logits only, metered per API key)."""
    from .. import create_client
    from ..serve import ServerConfig, create_app, load_api_keys, run_server

    if model.startswith(("http://", "https://")):
        raise ValueError("serve a local model (demo, an open_clip name or local-dir:), not another server")
    keys = load_api_keys(api_key_file)
    config = ServerConfig(budget_per_key=budget_per_key, max_body_bytes=max_body_mb << 20, max_image_sets=cache_size)
    client = create_client(model, device=device, cache_size=cache_size, **parse_pretrained(model, pretrained))
    if text_only:
        from ..client.zeroshot import TextOnlyClient

        client = TextOnlyClient(client)
    caps = client.capabilities()
    err.print(f"serving {caps.model_id} on http://{host}:{port}/v1 to {len(keys)} key(s)", highlight=False)
    run_server(create_app(client, keys, config), host=host, port=port)
