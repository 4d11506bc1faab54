"""The typer app, global options, and the error boundary shared by every command."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

from .._version import __version__
from ..client.schemes import REMOTE, is_remote  # the one table of model-string schemes

app = typer.Typer(
    name="craft-sdk",
    help="Adapt a black-box vision-language model to your few-shot task (CraFT), and deploy it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)


def _hide_flag_types() -> None:
    """Help lists an on/off flag without a ``<bool>`` type (it takes no value)."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich
    if getattr(shown, "hides_flags", False):
        return

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        return None if getattr(self, "is_flag", False) else shown(self, ctx)

    display_type_rich.hides_flags = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_hide_flag_types()
_state: dict[str, bool] = {"debug": False}
F = TypeVar("F", bound=Callable[..., Any])
USAGE_ERROR = 2  # a bad option value or combination (Click's own code for usage errors)
RUNTIME_ERROR = 1  # anything else: data, adapter, client, budget...


def _version(value: bool) -> None:
    if value:
        typer.echo(f"craft-sdk {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details to stderr."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    _state["debug"] = debug
    if debug:
        os.environ["CRAFT_SDK_DEBUG"] = "1"  # sweep worker processes show tracebacks too (craft_sdk.sweep.runner)
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s: %(message)s",
        stream=sys.stderr,
    )


def fail(message: str, code: int = USAGE_ERROR) -> typer.Exit:
    """Print a one-line error and return the Exit to raise (default: a usage error, exit 2)."""
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


# click's UsageError, found through typer: typer vendors click in some releases and depends on it in
# others, and the base install must not need click itself
_UsageError: type[BaseException] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def exit_code(exc: BaseException) -> int:
    """The exit status of a handled error: 2 for a usage error (bad option value or combination), 1 otherwise."""
    from ..errors import ConfigError

    return USAGE_ERROR if isinstance(exc, (ConfigError, _UsageError)) else RUNTIME_ERROR


def guarded(fn: F) -> F:
    """Turn any exception into a one-line error and a non-zero exit (:func:`exit_code`; ``--debug`` re-raises)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ..errors import CraftError

        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None
        except BrokenPipeError:
            raise  # stdout's reader left (`| head`): click exits quietly (status 1)
        except Exception as exc:  # the CLI's error boundary: no tracebacks for users
            if _state["debug"]:
                raise
            msg = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
            if isinstance(exc, RecursionError):  # a file or input nested past what a reader can take
                raise fail("an input is nested too deeply to read (a damaged or hostile file?); check the files "
                           "this command reads (--debug shows where)", RUNTIME_ERROR) from None
            if not isinstance(exc, CraftError):
                msg = f"{exc.__class__.__name__}: {msg} (run with --debug for the traceback)"
            raise fail(msg, exit_code(exc)) from None

    return wrapper  # type: ignore[return-value]


def open_client(model: str, pretrained: str | None, api_key_file: Any = None, **remote: Any) -> Any:
    """The client of a ``--model`` value: a local model (``--pretrained`` applies), a server URL
    (``--api-key-file`` and ``remote`` keywords apply), either behind ``text-only:``."""
    from .. import create_client
    from ..api import pretrained_kwargs

    if not is_remote(model):
        return create_client(model, **pretrained_kwargs(pretrained))
    if pretrained is not None:
        raise fail("--pretrained applies to local models, not to a server URL")
    if api_key_file is not None:
        remote["api_key"] = api_key_file.read_text().strip()
    return create_client(model, **remote)


def recorded_model(model_id: str | None, pretrained: str | None) -> tuple[str, str | None]:
    """``--model``/``--pretrained`` when ``--model`` is not given: the model the adapter records (``model_id``)."""
    from ..client.model_ids import client_args, client_hint

    args = client_args(model_id) if model_id else ("demo", None)
    if args is None:
        raise fail(f"the adapter was tuned on {model_id}, which its id alone cannot reopen; pass {client_hint(str(model_id))}")
    return args[0], pretrained if pretrained is not None else args[1]


def emit_json(obj: Any) -> None:
    """One JSON object on stdout."""
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")


def main() -> None:
    """Console-script entry point."""
    app()
