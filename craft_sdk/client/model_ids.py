"""From a recorded model id back to the ``--model``/``--pretrained`` that open a client serving it.

An adapter records the ``model_id`` of the client it was tuned through (``craft-demo-vlm/sha256:…``,
``open_clip/ViT-B-32/openai``, ``open_clip/local-dir/NAME/sha256:…``, ``zeroshot-api:URL``, ``chat:URL?model=NAME``, ``embed:…``); `eval` and
`predict` default to that model, and a mismatch error names the options to pass.
"""

from __future__ import annotations

import re

_OPEN_CLIP = re.compile(r"^open_clip/(?P<name>[^/]+)/(?P<tag>[^/]+)$")


def client_args(model_id: str) -> tuple[str, str | None] | None:
    """``(model, pretrained)`` that reopen the model of ``model_id``, or None when the id alone cannot
    (a local folder or weights file whose path it does not record, a remote server).

    Example:
        >>> client_args("craft-demo-vlm/sha256:0123"), client_args("open_clip/RN50/openai")
        (('demo', None), ('RN50', 'openai'))
        >>> client_args("open_clip/RN50/random-seed0"), client_args("open_clip/local-dir/m/sha256:ab") is None
        (('RN50', 'none'), True)
    """
    if model_id.startswith("craft-demo-vlm/"):
        return "demo", None
    if model_id.startswith("zeroshot-api:"):
        return "zeroshot+" + model_id[len("zeroshot-api:") :], None
    for kind in ("chat", "embed"):  # hosted shapes: "chat:URL?model=NAME" is served by "chat+URL?model=NAME"
        if model_id.startswith(f"{kind}:http"):
            return f"{kind}+" + model_id[len(kind) + 1 :], None
    m = _OPEN_CLIP.match(model_id)
    if m is None or m["tag"].startswith("sha256:"):
        return None
    return m["name"], "none" if m["tag"].startswith("random-seed") else m["tag"]


def client_hint(model_id: str) -> str:
    """The options that serve ``model_id``, as a user would type them (``--model X --pretrained Y``).

    Example:
        >>> client_hint("open_clip/ViT-B-32/openai")
        '--model ViT-B-32 --pretrained openai'
        >>> client_hint("open_clip/local-dir/tiny/sha256:ab")
        '--model local-dir:/path/to/tiny'
    """
    args = client_args(model_id)
    if args is not None:
        return f"--model {args[0]}" + (f" --pretrained {args[1]}" if args[1] is not None else "")
    if model_id.startswith("open_clip/local-dir/"):
        return f"--model local-dir:/path/to/{model_id.split('/')[2]}"
    m = _OPEN_CLIP.match(model_id)
    if m is not None:
        return f"--model {m['name']} --pretrained /path/to/the-weights.safetensors (sha256 {m['tag'][7:]}...)"
    return f"--model http(s)://a-server-serving-{model_id}"
