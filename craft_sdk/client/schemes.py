"""The model-string schemes, in one table: what a ``--model`` / ``create_client`` value names.

Every parser of a model string reads :data:`SCHEMES` through :func:`parse_model` (``create_client``,
the CLI's remote check, ``serve``'s refusal of a server URL, open_clip's ``demo`` / ``local-dir:``).
A string that matches no scheme is an open_clip model name.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scheme:
    """One row of the table: a model string starting with ``prefix`` (equal to it when ``exact``) is a ``kind``;
    its client receives the string without ``strip``."""

    prefix: str
    kind: str
    strip: str = ""
    exact: bool = False
    remote: bool = False


SCHEMES: tuple[Scheme, ...] = (
    Scheme("text-only:", "text-only", strip="text-only:"),  # a text-only view of the model after it
    Scheme("zeroshot+http://", "zeroshot", strip="zeroshot+", remote=True),
    Scheme("zeroshot+https://", "zeroshot", strip="zeroshot+", remote=True),
    Scheme("chat+http://", "chat", strip="chat+", remote=True),
    Scheme("chat+https://", "chat", strip="chat+", remote=True),
    Scheme("embed+http://", "embed", strip="embed+", remote=True),
    Scheme("embed+https://", "embed", strip="embed+", remote=True),
    Scheme("http://", "server", remote=True),  # a craft-sdk prediction server
    Scheme("https://", "server", remote=True),
    Scheme("local-dir:", "local-dir", strip="local-dir:"),  # an open_clip folder
    Scheme("demo", "demo", exact=True),  # the demo VLM shipped with craft-sdk
    Scheme("craft-demo-vlm", "demo", exact=True),
)
OPEN_CLIP = "open_clip"
# The prefixes of models served elsewhere (the ones ``--api-key-file`` applies to).
REMOTE: tuple[str, ...] = tuple(s.prefix for s in SCHEMES if s.remote)
DEMO_NAMES: tuple[str, ...] = tuple(s.prefix for s in SCHEMES if s.kind == "demo")


@dataclass(frozen=True)
class ModelRef:
    """A parsed model string: its ``kind`` (a :class:`Scheme` kind, or ``"open_clip"``) and the ``target`` its
    client receives (the URL after ``zeroshot+``, the folder after ``local-dir:``, the inner model of ``text-only:``)."""

    kind: str
    target: str
    remote: bool = False


def parse_model(model: str) -> ModelRef:
    """The scheme of ``model``, the first row of :data:`SCHEMES` that matches.

    Example:
        >>> parse_model("zeroshot+http://h:1/p")
        ModelRef(kind='zeroshot', target='http://h:1/p', remote=True)
        >>> parse_model("ViT-B-32").kind
        'open_clip'
    """
    for s in SCHEMES:
        if model == s.prefix if s.exact else model.startswith(s.prefix):
            return ModelRef(s.kind, model.removeprefix(s.strip), s.remote)
    return ModelRef(OPEN_CLIP, model)


def is_remote(model: str) -> bool:
    """Whether ``model`` names a service (``text-only:`` views included), not a model loaded here."""
    ref = parse_model(model)
    return is_remote(ref.target) if ref.kind == "text-only" else ref.remote
