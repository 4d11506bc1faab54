"""``craft-sdk serve``: the model owner's side of the black box."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import typer

from ._app import app, emit_json, err, fail, guarded
from ._tune import MODEL_HELP, PRETRAINED_HELP

SPEC_ENV = "CRAFT_SERVE_SPEC"
STATE_HELP = ("where meters, budgets and idempotency records persist: a SQLite file (default: API_KEY_FILE.state.db), "
              "'memory' (lost on restart; one process, so not with --workers) or redis://host:port/db (pip install "
              "'craft-sdk\\[redis]'; its password from the CRAFT_REDIS_PASSWORD environment variable or the file named by "
              "CRAFT_REDIS_PASSWORD_FILE, never in the URL)")  # "\\[": rich markup would eat "[redis]"
BUDGET_HELP = ("queries each key may use (same unit as the tuner's ledger); stored in --state, so a restart without "
               "this option keeps the stored budget. A state that holds no meters yet (new, or a flushed Redis) needs it, or --no-budget")
NO_BUDGET_HELP = "serve without any query budget (stored in --state like a budget); the explicit opt-out a new state needs"
STORE_TIMEOUT_HELP = "seconds one state-store call may take; beyond it metered routes answer 503 (Retry-After) and /v1/health says why"


def default_state(api_key_file: Path) -> str:
    """The state file beside the key file: ``keys.txt`` → ``keys.txt.state.db``."""
    return str(api_key_file.with_name(api_key_file.name + ".state.db"))


def _build_app(spec: dict[str, Any]) -> Any:
    """The app of one server process (also each ``--workers`` process, from the spec in the environment)."""
    from .. import create_client
    from ..serve import ServerConfig, create_app, load_api_keys, open_store

    keys = load_api_keys(spec["api_key_file"])
    config = ServerConfig(**spec["config"])
    store = open_store(spec["state"], config.budget_per_key, config.lease_s, timeout_s=config.store_timeout_s)
    client = create_client(spec["model"], device=spec["device"], cache_size=config.max_image_sets, **spec["pretrained"])
    if spec["text_only"]:
        from ..client.zeroshot import TextOnlyClient

        client = TextOnlyClient(client)
    return create_app(client, keys, config, store)


def _check_free(host: str, port: int) -> None:
    """Refuse a port another process listens on, in one line, before anything loads or "serving on" is said."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a TIME_WAIT port is free
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise fail(f"port {port} on {host} is already in use (another server?); pass a free --port", 1) from None
            raise fail(f"cannot bind {host}:{port} ({exc.strerror}); pass another --host or --port", 1) from None


def app_from_env() -> Any:
    """uvicorn's app factory for ``craft-sdk serve --workers N`` (reads the spec the parent process wrote)."""
    return _build_app(json.loads(os.environ[SPEC_ENV]))


@app.command()
@guarded
def serve(
    model: str = typer.Option("demo", "--model", "-m", help=MODEL_HELP.replace(", or http(s)://server", "")),
    pretrained: str | None = typer.Option(None, "--pretrained", "-p", help=PRETRAINED_HELP),
    host: str = typer.Option("127.0.0.1", help="address to bind; loopback by default (use a TLS proxy to expose it)"),
    port: int = typer.Option(8765, help="TCP port"),
    api_key_file: Path = typer.Option(..., help="file of API keys: one KEY or 'NAME KEY' per line"),
    budget_per_key: int | None = typer.Option(None, help=BUDGET_HELP),
    no_budget: bool = typer.Option(False, "--no-budget", help=NO_BUDGET_HELP),
    state: str | None = typer.Option(None, "--state", help=STATE_HELP),
    workers: int = typer.Option(1, help="server processes sharing the port and the state (each loads the model)"),
    max_body_mb: int = typer.Option(256, help="largest request body in MiB"),
    cache_size: int = typer.Option(8, help="uploaded image sets whose features are kept, per key"),
    max_prompts: int = typer.Option(16_384, help="P x C prompts one request may ask (its compute; raise it on a GPU)"),
    store_timeout: int = typer.Option(5, "--store-timeout", help=STORE_TIMEOUT_HELP),
    max_request_s: int = typer.Option(60, "--max-request-s", help="seconds of model time one request may use; beyond, it stops (413, not billed)"),
    device: str = typer.Option("cpu", help="torch device of the model"),
    text_only: bool = typer.Option(False, "--text-only", help="refuse context offsets (a text-only provider); /v1/zero-shot/* still answers"),
) -> None:
    """Serve MODEL as a prediction-only HTTP service (logits only, metered per API key, meters persisted)."""
    from ..api import pretrained_kwargs
    from ..client.schemes import parse_model
    from ..serve import ServerConfig, load_api_keys, open_store, run_server
    from ..serve.runner import check_port

    if parse_model(model).kind == "server":
        raise fail("serve a local model (demo, an open_clip name or local-dir:), not another server")
    check_port(port)  # everything cheap is checked before the model loads
    _check_free(host, port)
    if workers < 1:
        raise fail(f"--workers must be >= 1, got {workers}")
    if no_budget and budget_per_key is not None:
        raise fail("give either --budget-per-key or --no-budget, not both")
    if workers > 1 and state == "memory":
        raise fail("--state memory keeps meters in one process, so --workers would multiply every budget; use a SQLite file or redis://")
    check_state_url(state)
    keys = load_api_keys(api_key_file)
    config = ServerConfig(budget_per_key=budget_per_key, max_body_bytes=max_body_mb << 20, max_image_sets=cache_size,
                          max_prompts=max_prompts, store_timeout_s=store_timeout,
                          max_request_s=max_request_s)
    spec = {"model": model, "pretrained": pretrained_kwargs(pretrained), "device": device, "text_only": text_only,
            "api_key_file": str(api_key_file), "config": asdict(config), "state": state or default_state(api_key_file)}
    # a bad --state fails now, and so does a state without meters and no budget (fail closed); logs Redis persistence problems
    store = open_store(spec["state"], config.budget_per_key, config.lease_s, timeout_s=config.store_timeout_s, budget_required=True,
                       unlimited=no_budget)
    stored = store.usage("")["budget"]  # the default budget every process on this state enforces
    store.close()
    where = "memory (lost on restart)" if spec["state"] == "memory" else spec["state"]
    where += f"; budget per key: {'unlimited' if stored is None else stored}"
    if workers > 1:
        os.environ[SPEC_ENV] = json.dumps(spec)
        err.print(f"serving {model} on http://{host}:{port}/v1 to {len(keys)} key(s) with {workers} workers; state: {where}", highlight=False)
        run_server(None, host=host, port=port, workers=workers, factory=f"{__name__}:app_from_env")
        return
    server_app = _build_app(spec)
    caps = server_app.state.craft.model.client.capabilities()
    err.print(f"serving {caps.model_id} on http://{host}:{port}/v1 to {len(keys)} key(s); state: {where}", highlight=False)
    run_server(server_app, host=host, port=port)


keys_app = typer.Typer(help="Meters of a server's API keys: list usage, top up, set or reset budgets.", no_args_is_help=True)
app.add_typer(keys_app, name="serve-keys")


def _echo_usage(store: Any, name: str) -> None:
    """What a key command prints, with or without --json: one JSON object, the key's usage."""
    typer.echo(json.dumps({name: store.usage(name)}))


def check_state_url(state: str | None) -> None:
    """Refuse a Redis password in --state: a command line is visible to every user of the machine."""
    from urllib.parse import urlsplit

    if state and state.startswith(("redis://", "rediss://", "unix://")) and urlsplit(state).password is not None:
        raise fail("do not put the Redis password in --state (every user sees a command line); "
                   "set CRAFT_REDIS_PASSWORD or CRAFT_REDIS_PASSWORD_FILE instead")


def _open(state: str | None, api_key_file: Path | None, name: str | None = None) -> Any:
    """The server's existing state (never a new one), and ``name`` checked against the key file and the state."""
    from ..serve import load_api_keys, open_store

    if state is None and api_key_file is None:
        raise fail("name the server's state with --state, or its --api-key-file (the state then lies beside it)")
    if state == "memory":
        raise fail("--state memory lives inside a server process; serve-keys operates a SQLite file or redis:// state")
    check_state_url(state)
    store = open_store(state or default_state(api_key_file), create=False)  # type: ignore[arg-type]
    if name is not None:
        known = set(load_api_keys(api_key_file)) if api_key_file is not None else set(store.keys())
        if name not in known:
            store.close()
            where = str(api_key_file) if api_key_file is not None else "the state (no request was ever metered for it)"
            raise fail(f"no key named {name!r} in {where}; check the name (craft-sdk serve-keys list), or pass the server's --api-key-file")
    return store


STATE_OPT = typer.Option(None, "--state", help="the server's --state (an existing SQLite file or redis:// URL; "
                         "the Redis password from CRAFT_REDIS_PASSWORD or CRAFT_REDIS_PASSWORD_FILE)")
KEYS_OPT = typer.Option(None, "--api-key-file", help="the server's key file (its default state lies beside it)")
JSON_OPT = typer.Option(False, "--json", help="print one JSON object on stdout")
JSON_ALWAYS_OPT = typer.Option(False, "--json", help="print one JSON object on stdout (this command's output either way)")


@keys_app.command("list")
@guarded
def keys_list(state: str | None = STATE_OPT, api_key_file: Path | None = KEYS_OPT, as_json: bool = JSON_OPT) -> None:
    """Every key's used queries, budget and remaining queries."""
    store = _open(state, api_key_file)
    names = set(store.keys())
    if api_key_file is not None:
        from ..serve import load_api_keys

        names |= set(load_api_keys(api_key_file))
    rows = {name: _usage_or_error(store, name) for name in sorted(names)}
    if as_json:
        emit_json(rows)
        return
    typer.echo(f"{'key':<24} {'used':>10} {'budget':>10} {'remaining':>10} {'uploads':>8}")
    for name, u in rows.items():
        if "error" in u:
            typer.echo(f"{name:<24} {u['error']}")
            continue
        fmt = [("-" if u[k] is None else str(u[k])) for k in ("used", "budget", "remaining", "uploads")]
        typer.echo(f"{name:<24} {fmt[0]:>10} {fmt[1]:>10} {fmt[2]:>10} {fmt[3]:>8}")


def _usage_or_error(store: Any, name: str) -> dict[str, Any]:
    """A key's usage, or ``{"error": why}`` when its record cannot be read (one bad key never hides the others)."""
    from ..errors import StoreError

    try:
        return store.usage(name)  # type: ignore[no-any-return]
    except StoreError as exc:
        return {"error": str(exc).splitlines()[0]}


@keys_app.command("top-up")
@guarded
def keys_top_up(
    name: str, queries: int, state: str | None = STATE_OPT, api_key_file: Path | None = KEYS_OPT, as_json: bool = JSON_ALWAYS_OPT
) -> None:
    """Raise key NAME's budget by QUERIES."""
    if queries < 1:
        raise fail(f"QUERIES must be >= 1, got {queries}")
    store = _open(state, api_key_file, name)
    store.top_up(name, queries)
    _echo_usage(store, name)


@keys_app.command("set-budget")
@guarded
def keys_set_budget(
    name: str, budget: str, state: str | None = STATE_OPT, api_key_file: Path | None = KEYS_OPT, as_json: bool = JSON_ALWAYS_OPT
) -> None:
    """Give key NAME a budget of its own (BUDGET queries, or 'default' for the server's --budget-per-key)."""
    if budget != "default" and not (budget.isascii() and budget.isdigit()):
        raise fail(f"BUDGET must be a number of queries or 'default', got {budget!r}")
    store = _open(state, api_key_file, name)
    store.set_budget(name, None if budget == "default" else int(budget))
    _echo_usage(store, name)


@keys_app.command("reset")
@guarded
def keys_reset(name: str, state: str | None = STATE_OPT, api_key_file: Path | None = KEYS_OPT, as_json: bool = JSON_ALWAYS_OPT) -> None:
    """Set key NAME's used queries back to 0."""
    store = _open(state, api_key_file, name)
    store.reset(name)
    _echo_usage(store, name)
