"""The model card of a hostile adapter (issue 20): class names, model id and provenance come from whoever wrote
the adapter, so the card escapes Markdown and HTML, neutralises script links, and its front matter is written by
a serializer (YAML, or JSON scalars without pyyaml) so that a newline cannot add a key."""

from __future__ import annotations

import re
import sys

import pytest

import craft_sdk
from craft_sdk.adapter.card import TAGS, render_model_card

yaml = pytest.importorskip("yaml")
markdown_it = pytest.importorskip("markdown_it")

NAMES = (
    "<script>alert(1)</script>",
    "[click me](javascript:alert(1))",
    "<img src=x onerror=alert(2)>",
    "a\nlibrary_name: evil",
    "`code` | **bold** | ~~gone~~",
    "<a href='JavaScript:alert(3)'>x</a>",
    "plain",
)
MODEL_ID = "org/x\nlicense: mit\n---\n<script>alert(4)</script>"
PROVENANCE = {"mode": "craft\nevil_key: 1", "shots": "<b>4</b>", "seed": "[s](javascript:x)", "queries_used": 10, "budget": 20,
              "metrics": {"train_accuracy": 0.5, "zero_shot_train_accuracy": 0.25}, "data": {"n_train": "1\n# heading"}}


def hostile_card() -> str:
    cfg = craft_sdk.AdapterConfig(MODEL_ID, NAMES, "a photo of a", provenance=PROVENANCE)
    return render_model_card(craft_sdk.Adapter(cfg), repo_id="org/x\n```\nimport os",
                             evaluation={"dataset": "<iframe src=javascript:alert(5)>", "n_test": 3, "accuracy": 0.5})


def front_matter(card: str) -> tuple[dict, str]:
    assert card.startswith("---\n")
    head, _, body = card[4:].partition("\n---\n")
    return yaml.safe_load(head), body


def expected_meta() -> dict:
    return {"library_name": "craft-sdk", "pipeline_tag": "image-classification", "base_model_id": MODEL_ID,
            "tags": [*TAGS, "mode-craft\nevil_key: 1"]}


@pytest.mark.parametrize("with_yaml", [True, False])
def test_front_matter_keeps_its_keys_whatever_the_values(with_yaml: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not with_yaml:
        monkeypatch.setitem(sys.modules, "yaml", None)  # the torch-free base install: no pyyaml
    card = hostile_card()
    meta, body = front_matter(card)
    assert meta == expected_meta()  # no license, no evil_key; the values round-trip exactly
    assert body.lstrip().startswith("# CraFT adapter: 7-class")


def test_the_body_renders_no_html_and_no_script_link() -> None:
    _, body = front_matter(hostile_card())
    html = markdown_it.MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"]).render(body)
    for tag in ("<script", "<img", "<iframe", "<a href='javascript", "<b>", "<del", "<em", "<h2>1"):
        assert tag not in html.lower().replace('"', "'"), tag
    assert not re.search(r"<a\s[^>]*href=[\"']?\s*(javascript|vbscript|data):", html, re.I)
    assert html.count("<a ") == 1  # the card's own craft-sdk link only
    assert "javascript:" not in body.lower()
    assert "<script" not in body and "<img" not in body and "<iframe" not in body
    assert html.count("<code>") == 2 and html.count("<strong>") == 1  # the card's own, none from a class name
    assert html.count("<h1>") == 1 and html.count("<table>") == 1  # no heading or table smuggled in
    assert html.count("<tr>") == 3 and html.count("<td") == 6  # the evaluation and the training shots, 3 cells each
    text = re.sub(r"<[^>]+>", "", html)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text  # shown as text, not lost
    assert "plain" in text and "evil_key" in text
    assert not any(line.startswith(("library_name", "license", "evil_key", "#  heading")) for line in body.splitlines())


def test_the_snippet_stays_one_python_block() -> None:
    _, body = front_matter(hostile_card())
    blocks = body.split("```python\n")
    assert len(blocks) == 2
    snippet = blocks[1].split("```")[0]
    assert len(snippet.strip().splitlines()) == 3 and "import os" not in snippet.splitlines()
    compile(snippet, "<card>", "exec")  # still valid Python: the repo id is a string literal


def test_an_ordinary_card_is_unchanged_in_substance() -> None:
    cfg = craft_sdk.AdapterConfig("org/digits", ("zero", "one"), "a photo of a", provenance={"mode": "craft"})
    card = render_model_card(craft_sdk.Adapter(cfg), repo_id="org/digits-adapter")
    meta, body = front_matter(card)
    assert meta["base_model"] == "org/digits" and meta["tags"][-1] == "mode-craft"
    assert "- classes (2): zero, one" in body and 'from_pretrained("org/digits-adapter", client)' in body
