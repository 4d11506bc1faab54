"""``craft-sdk tune``'s tuning options, derived from :class:`~craft_sdk.TuneConfig`: one source of
names, defaults and help (the dataclass and its docstring), typer's ``Annotated`` style.

Every TuneConfig field ``name`` becomes ``--name`` (underscores as dashes; booleans as
``--name/--no-name``); an optional field whose default is not None (``--patience``)
also accepts ``none``, and so does one whose default is None (``--lam none`` = its default rule).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import MISSING, fields
from typing import Annotated, Any, Optional

import typer

from ..tuner.config import TuneConfig

_BASE = {"int": int, "float": float, "str": str, "bool": bool}


def _field_help() -> dict[str, str]:
    """``name: text`` entries of TuneConfig's ``Args:`` section, continuation lines joined."""
    doc = inspect.getdoc(TuneConfig) or ""
    args = doc.split("Args:", 1)[1] if "Args:" in doc else ""
    out: dict[str, str] = {}
    current: list[str] = []
    for line in args.splitlines():
        m = re.match(r"^    (\w+(?:, \w+)*): (.*)$", line)
        if m:
            current = [n.strip() for n in m.group(1).split(",")]
            for n in current:
                out[n] = m.group(2).strip()
        elif line.startswith("        ") and current:
            for n in current:
                out[n] += " " + line.strip()
    return {k: v.replace("``", "'") for k, v in out.items()}


def _parts(type_text: str) -> tuple[type, bool]:
    names = [t.strip() for t in str(type_text).split("|")]
    optional = "None" in names
    base = next(_BASE[n] for n in names if n in _BASE)
    return base, optional


def config_parameters() -> list[inspect.Parameter]:
    """One keyword parameter per TuneConfig field, annotated for typer."""
    helps = _field_help()
    params = []
    for f in fields(TuneConfig):
        default = f.default if f.default is not MISSING else None
        base, optional = _parts(f.type)
        text = helps.get(f.name, "")
        dash = f.name.replace("_", "-")
        if base is bool:
            annotation: Any = Annotated[bool, typer.Option(f"--{dash}/--no-{dash}", help=text)]
        elif optional and default is not None:
            annotation, default = Annotated[str, typer.Option(f"--{dash}", help=f"{text} ('none' to disable)")], str(default)
        elif optional and base is not str:  # a number or 'none' (the help's "None = ...")
            annotation = Annotated[Optional[str], typer.Option(f"--{dash}", help=f"{text} (a {base.__name__} or 'none')")]  # noqa: UP045
        elif optional:
            annotation = Annotated[Optional[base], typer.Option(f"--{dash}", help=text)]  # noqa: UP045 (typer needs Optional)
        else:
            annotation = Annotated[base, typer.Option(f"--{dash}", help=text)]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))
    return params


def config_from(values: dict[str, Any]) -> TuneConfig:
    """The TuneConfig from the command's parsed options (``none`` → None for optional fields)."""
    from ._app import fail

    kwargs: dict[str, Any] = {}
    for f in fields(TuneConfig):
        value = values[f.name]
        base, optional = _parts(f.type)
        if optional and isinstance(value, str) and base is not str:
            if value.strip().lower() == "none":
                value = None
            else:
                try:
                    value = base(value)
                except ValueError:
                    raise fail(f"--{f.name.replace('_', '-')} must be a {base.__name__} or 'none', got {value!r}") from None
        kwargs[f.name] = value
    return TuneConfig(**kwargs)
