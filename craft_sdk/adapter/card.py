"""Model cards: the ``README.md`` written next to every saved adapter (Hugging Face's convention).

The front matter (``library_name: craft-sdk``, the base model id, tags) is what the Hub
indexes; the body says what the adapter does, for which classes, how well (and on
what that was measured), what it cost in queries, how to load it, and its limits.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

from .._fileio import write_bytes_atomic
from .files import CARD_FILE

TAGS = ("craft-sdk", "craft", "black-box-tuning", "few-shot", "image-classification", "vision-language-model")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_MD_SPECIAL = re.compile(r"([\\`*_\[|~])")  # with < > & escaped too, no emphasis, code, link, table cell or tag
_SCHEME = re.compile(r"(?i)\b(javascript|vbscript|data)(\s*):")


def _text(value: Any) -> str:
    """``value`` as inert Markdown text: one line, Markdown punctuation backslash-escaped, HTML escaped, and no
    ``javascript:``/``vbscript:``/``data:`` scheme left for an auto-linker (class names and provenance come from
    whoever wrote the adapter, possibly a stranger on the Hub)."""
    one_line = "".join(ch for ch in " ".join(str(value).split()) if ch.isprintable())
    return _SCHEME.sub(r"\1\2&#58;", html.escape(_MD_SPECIAL.sub(r"\\\1", one_line), quote=False))


def _literal(value: Any) -> str:
    """``value`` as a one-line Python string literal that cannot close a code fence nor read as a tag."""
    text = json.dumps(str(value))
    return text.replace("`", "\\u0060").replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _client_hint(model_id: str) -> str:
    if model_id.startswith("craft-demo-vlm"):
        return 'craft_sdk.create_client("demo")'
    return f"craft_sdk.create_client(...)  # the black box serving {_literal(model_id)}"


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100 * float(value):.1f}%"


def _front_matter(model_id: str, mode: Any) -> list[str]:
    """YAML front matter written by a YAML serializer (or, without pyyaml, as JSON scalars, which are YAML):
    no value can add a key or a line."""
    meta: dict[str, Any] = {"library_name": "craft-sdk", "pipeline_tag": "image-classification", "base_model_id": str(model_id)}
    if _HUB_ID.fullmatch(model_id):
        meta["base_model"] = model_id
    meta["tags"] = [*TAGS, f"mode-{mode}"]
    try:
        import yaml
    except ImportError:
        lines = [f"{k}: {json.dumps(v)}" for k, v in meta.items() if k != "tags"]
        lines += ["tags:", *(f"- {json.dumps(t)}" for t in meta["tags"])]  # ensure_ascii: no U+2028 line breaks
    else:
        lines = yaml.safe_dump(meta, sort_keys=False, allow_unicode=False, width=1 << 20).splitlines()
    return ["---", *lines, "---", ""]


def _accuracy_rows(prov: dict[str, Any], evaluation: dict[str, Any] | None) -> list[str]:
    metrics, data = prov.get("metrics") or {}, prov.get("data") or {}
    rows = ["| measured on | zero-shot accuracy | adapter accuracy |", "|---|---|---|"]
    if evaluation:
        where = _text(evaluation.get("dataset", "held-out test set"))
        rows.append(f"| {where} ({_text(evaluation.get('n_test', '?'))} images) | "
                    f"{_pct(evaluation.get('zero_shot_accuracy'))} | {_pct(evaluation.get('accuracy'))} |")
    if metrics.get("train_accuracy") is not None:
        n_fit = data.get("n_search", data.get("n_train", "?"))  # robust protocol: the check images are not trained on
        rows.append(f"| the training shots ({_text(n_fit)} images; optimistic) | "
                    f"{_pct(metrics.get('zero_shot_train_accuracy'))} | {_pct(metrics.get('train_accuracy'))} |")
    if metrics.get("val_accuracy") is not None:
        zero = metrics.get("zero_shot_val_accuracy", metrics.get("zero_shot_check_accuracy"))
        n_val = data.get("n_val")
        if isinstance(n_val, int) and n_val > 0:
            where = f"the validation split ({_text(n_val)} images; used for model selection)"
        else:  # robust protocol without validation data: the check images held out of the training images
            where = f"the check images ({_text(data.get('n_check', '?'))} training images held out of the search; used for model selection)"
        rows.append(f"| {where} | {_pct(zero)} | {_pct(metrics.get('val_accuracy'))} |")
    if len(rows) == 2:
        return ["No accuracy was recorded for this adapter."]
    return rows


def _cost_lines(usage: Any) -> list[str]:
    """What the tune cost in the provider's units (and money when priced); nothing for an in-process model."""
    if not isinstance(usage, dict) or not any(usage.get(k) for k in ("requests", "images", "input_tokens", "output_tokens")):
        return []
    line = (f"- provider usage to tune: {usage.get('requests', 0)} requests, {usage.get('images', 0)} images, "
            f"{usage.get('input_tokens', 0)} input tokens, {usage.get('output_tokens', 0)} output tokens")
    cost = usage.get("cost")
    if isinstance(cost, (int, float)) and not isinstance(cost, bool):
        price = usage.get("price") if isinstance(usage.get("price"), dict) else {}
        rates = ", ".join(f"{k} {float(v):g}" for k, v in sorted(price.items()) if isinstance(v, (int, float)) and v)
        line += f"; cost {float(cost):.6g} at {rates or 'the recorded prices'}"
    return [_text(line)]  # recorded values, as inert text


def render_model_card(adapter: Any, *, repo_id: str | None = None, evaluation: dict[str, Any] | None = None) -> str:
    """The model card of ``adapter`` as Markdown with YAML front matter.

    Args:
        adapter: an :class:`~craft_sdk.Adapter`.
        repo_id: the Hub repo id to show in the loading snippet (default: a local path).
        evaluation: an :func:`~craft_sdk.evaluate` result plus ``dataset`` (what it was measured on).

    Example:
        >>> print(render_model_card(adapter, repo_id="org/digits"))  # doctest: +SKIP
    """
    cfg = adapter.config
    prov = dict(cfg.provenance or {})
    mode, names = prov.get("mode", "unknown"), list(cfg.class_names)
    shown = ", ".join(_text(n) for n in names[:50]) + (f", ... ({len(names)} in all)" if len(names) > 50 else "")
    where = _literal(repo_id or "path/to/this-adapter")
    model, prompt = _text(cfg.model_id), "none" if cfg.prompt is None else _text(cfg.prompt.describe())
    lines = _front_matter(cfg.model_id, mode)
    lines += [
        f"# CraFT adapter: {len(names)}-class image classification on {model}",
        "",
        "A [craft-sdk](https://pypi.org/project/craft-sdk/) adapter (CraFT, ICML 2024): a learned prompt offset and a",
        "small refiner on the output of a **black-box** vision-language model that is only queried for predictions.",
        "",
        "## Task",
        "",
        f"- classes ({len(names)}): {shown}",
        f"- prompt template: {_text(cfg.template)} &lt;class name&gt;.",
        f"- mode: {_text(mode)}, {_text(prov.get('shots', '?'))} shots per class, seed {_text(prov.get('seed', '?'))}",
        f"- prompt: {prompt}; "
        f"refiner: {'none' if cfg.refiner is None else cfg.refiner.describe()}",
        f"- queries used to tune: {_text(prov.get('queries_used', '?'))} of a budget of {_text(prov.get('budget', '?'))}",
        *_cost_lines(prov.get("provider_usage")),
        "",
        "## Accuracy",
        "",
        *_accuracy_rows(prov, evaluation),
        "",
        "## Use it",
        "",
        "```python",
        "import craft_sdk",
        f"client = {_client_hint(cfg.model_id)}",
        f"clf = craft_sdk.CraftClassifier.from_pretrained({where}, client)",
        "```",
        "",
        "Then `clf.predict(images)` (paths, PIL images or uint8 arrays); each batch of images is one black-box query.",
        "From the shell: `craft-sdk predict ADAPTER IMAGES... --output preds.jsonl`.",
        "",
        "## Limitations",
        "",
        f"- It works only through the black box it was tuned on ({model}); another model is refused at load.",
        "- It predicts only the classes above; every image gets one of them, however far from them it is.",
        "- It was tuned on a few images per class: accuracy on the training shots is optimistic, and a shift in",
        "  image style, resolution or class balance away from those shots can cost more than it costs zero-shot.",
        "- The refiner can memorise few-shot training data; compare with zero-shot on your own held-out images.",
        "",
        f"Format {_text(cfg.format_version)}, written by craft-sdk {_text(cfg.craft_sdk_version)}.",
    ]
    return "\n".join(lines) + "\n"


def write_model_card(directory: str | Path, adapter: Any, **kwargs: Any) -> Path:
    """Write ``directory/README.md`` (atomically); see :func:`render_model_card` for ``kwargs``."""
    return write_bytes_atomic(Path(directory) / CARD_FILE, render_model_card(adapter, **kwargs).encode("utf-8"))
