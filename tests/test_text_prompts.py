"""Text prompts in the adapter format (``prompt.kind``: continuous, discrete, ensemble) and the ``ensemble`` mode.

A discrete adapter's learned words and an ensemble's contexts are what every prediction sends
(CraftClassifier, ``craft-sdk predict``, ``evaluate``), nothing else; the JSON names the kind;
adapters written before the kind existed load as continuous; the ensemble mode pays exactly
one query per bank context and picks the contexts a planted black box rewards.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import suite_env  # noqa: E402
from PIL import Image

from craft_sdk import (
    Adapter,
    AdapterConfig,
    AdapterError,
    ConfigError,
    CraftClassifier,
    ImageDataset,
    QueryLedger,
    load_adapter,
    mlp,
)
from craft_sdk.adapter import CONFIG_FILE, DiscretePromptSpec, EnsemblePromptSpec, PromptSpec, RefinerSpec
from craft_sdk.client import CallableClient, Capabilities
from craft_sdk.deploy.query import raw_scores
from craft_sdk.tuner.templates import CLIP_IMAGENET_CONTEXTS, ensemble_log_probs

HERE = Path(__file__).resolve().parent
NAMES = ("cat", "dog", "bird")
LEARNED = "a sketch of the"
CAPS = Capabilities("text/planted-v1")  # text only: no n_ctx / ctx_dim


def text_box(images: list[Image.Image], names: list[str], template: str, offsets: object) -> np.ndarray:
    """A text-only black box: pixel statistics, plus a context-dependent shift, plus the true class when 'sketch' is said."""
    assert offsets is None
    px = np.stack([np.asarray(im, np.float32).mean(axis=(0, 1)) / 255.0 for im in images])  # [N, 3]
    y = np.array([im.getpixel((0, 0))[0] % len(names) for im in images])
    logits = px @ np.arange(3 * len(names), dtype=np.float32).reshape(3, len(names)) * 0.1
    logits += 0.05 * (sum(map(ord, template)) % 7) * np.arange(len(names))
    if "sketch" in template.split():
        logits[np.arange(len(images)), y] += 3.0
    return logits


class Spy(CallableClient):
    def __init__(self) -> None:
        super().__init__(text_box, CAPS)
        self.sent: list[tuple[str, object]] = []

    def predict(self, images, class_names, template="a photo of a", offsets=None):  # type: ignore[no-untyped-def]
        self.sent.append((template, offsets))
        return super().predict(images, class_names, template, offsets)


def pictures(n: int, seed: int = 0) -> tuple[list[Image.Image], np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(NAMES)
    ims = []
    for k, y in enumerate(labels):
        a = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        a[0, 0, 0] = 3 * int(rng.integers(0, 80)) + int(y)  # the label, readable by the box
        a[0, 0, 1] = k % 256
        ims.append(Image.fromarray(a))
    return ims, labels


def discrete_adapter(refiner: bool = True) -> Adapter:
    cfg = AdapterConfig(
        model_id=CAPS.model_id,
        class_names=NAMES,
        template=LEARNED,
        prompt=DiscretePromptSpec(text=LEARNED, initial="a photo of a", n_slots=4, vocabulary_size=250),
        refiner=RefinerSpec(3, 8, True) if refiner else None,
        provenance={"mode": "pg"},
    )
    return Adapter(cfg, None, None, mlp.init_weights(3, 8, 3, residual=False, seed=1) if refiner else None)


def ensemble_adapter() -> Adapter:
    texts = ("a sketch of a", "a photo of the", "art of a")
    cfg = AdapterConfig(CAPS.model_id, NAMES, texts[0], prompt=EnsemblePromptSpec(texts, initial="a photo of a", bank="clip-imagenet"))
    return Adapter(cfg)


# --------------------------------------------------------------------------- the format


@pytest.mark.parametrize("make", [discrete_adapter, ensemble_adapter])
def test_text_adapters_round_trip_and_name_their_kind(tmp_path: Path, make) -> None:  # noqa: ANN001
    a = make()
    a.save_pretrained(tmp_path / "ad")
    raw = json.loads((tmp_path / "ad" / CONFIG_FILE).read_text())
    assert raw["prompt"]["kind"] == a.config.prompt.kind and raw["format_version"] == 1
    b = load_adapter(str(tmp_path / "ad"))
    assert b.config == a.config and b.fingerprint() == a.fingerprint() and b.z is None and b.offset is None
    b.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / CONFIG_FILE).read_bytes() == (tmp_path / "ad" / CONFIG_FILE).read_bytes()
    assert a.config.prompt.describe() in (tmp_path / "ad" / "README.md").read_text()  # the model card says it


def test_continuous_prompts_say_so_and_kindless_configs_load_as_continuous(tmp_path: Path) -> None:
    old = load_adapter(str(HERE / "fixtures" / "deploy_adapter"))  # committed before prompt.kind existed
    assert "kind" not in json.loads((HERE / "fixtures" / "deploy_adapter" / CONFIG_FILE).read_text())["prompt"]
    assert isinstance(old.config.prompt, PromptSpec) and old.config.prompt.kind == "continuous"
    old.save_pretrained(tmp_path / "re")
    # a continuous prompt is written without a kind: earlier craft-sdk versions read it, and the fingerprint
    # (so the refiner.onnx exported from it) is unchanged
    assert "kind" not in json.loads((tmp_path / "re" / CONFIG_FILE).read_text())["prompt"]
    assert (tmp_path / "re" / CONFIG_FILE).read_bytes() == (HERE / "fixtures" / "deploy_adapter" / CONFIG_FILE).read_bytes()
    assert load_adapter(str(tmp_path / "re")).fingerprint() == old.fingerprint()
    from craft_sdk.adapter.export import OnnxRefiner

    OnnxRefiner(HERE / "fixtures" / "deploy_adapter" / "refiner.onnx", load_adapter(str(tmp_path / "re")))


def _write(tmp_path: Path, adapter: Adapter, edit) -> Path:  # noqa: ANN001
    adapter.save_pretrained(tmp_path / "ad")
    path = tmp_path / "ad" / CONFIG_FILE
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return tmp_path / "ad"


@pytest.mark.parametrize(
    "make, edit, message",
    [
        (discrete_adapter, lambda d: d["prompt"].update(kind="hologram"), "unknown prompt.kind 'hologram'"),
        (discrete_adapter, lambda d: d.update(template="a photo of a"), "differs from its discrete prompt's text"),
        (discrete_adapter, lambda d: d["prompt"].update(text="a {} of"), "without braces"),
        (discrete_adapter, lambda d: d["prompt"].update(n_slots=0), "prompt.n_slots must be a positive integer"),
        (discrete_adapter, lambda d: d.update(prompt=["a sketch"]), "must be a JSON object"),
        (ensemble_adapter, lambda d: d["prompt"].update(texts=["a sketch of a", "a sketch of a"]), "duplicates"),
        (ensemble_adapter, lambda d: d["prompt"].update(texts=[]), "1 to 100 contexts"),
        (ensemble_adapter, lambda d: d.update(template="art of a"), "is not its ensemble's first context"),
        (ensemble_adapter, lambda d: d["prompt"].update(bogus=1), "adapter config is malformed"),
        (ensemble_adapter, lambda d: d["prompt"].update(bank=float("nan")), "prompt.bank must be a short string"),
        (ensemble_adapter, lambda d: d["prompt"].update(bank={"a": 1}), "prompt.bank must be a short string"),
    ],
)
def test_malformed_text_prompts_are_one_line_errors(tmp_path: Path, make, edit, message: str) -> None:  # noqa: ANN001
    directory = _write(tmp_path, make(), edit)
    with pytest.raises(AdapterError, match=message) as info:
        load_adapter(str(directory))
    assert "\n" not in str(info.value)


def test_a_discrete_prompt_carries_no_offset_tensors() -> None:
    a = discrete_adapter(refiner=False)
    with pytest.raises(AdapterError, match="disagree on whether there is a prompt offset"):
        Adapter(a.config, np.zeros(3), np.zeros((2, 2), np.float32), None)


# --------------------------------------------------------------------------- what predictions send


def test_classifier_sends_the_learned_words_and_no_offset() -> None:
    client, ledger = Spy(), QueryLedger(budget=10)
    adapter = discrete_adapter()
    clf = CraftClassifier.from_adapter(adapter, client, ledger=ledger)
    ims, _ = pictures(10)
    out = clf.predict_all(ims)
    assert client.sent and all(t == LEARNED and o is None for t, o in client.sent)
    expected = mlp.forward(adapter.refiner, text_box(ims, list(NAMES), LEARNED, None), residual=True)
    np.testing.assert_allclose(out.logits, expected, atol=1e-5, rtol=1e-5)
    assert ledger.used == len(client.sent)


def test_an_ensemble_costs_one_query_per_context_and_averages_their_log_probabilities() -> None:
    from craft_sdk.deploy.classifier import ClassifierConfig

    client, ledger = Spy(), QueryLedger(budget=100)
    adapter = ensemble_adapter()
    clf = CraftClassifier.from_adapter(adapter, client, config=ClassifierConfig(batch_size=4), ledger=ledger)
    ims, _ = pictures(10)
    out = clf.predict_all(ims)
    texts = adapter.config.prompt.texts
    assert ledger.counts["predict"] == 3 * len(texts)  # 3 batches (4 + 4 + 2) x 3 contexts
    assert [t for t, _ in client.sent[:3]] == list(texts)
    expected = ensemble_log_probs(np.stack([text_box(ims, list(NAMES), t, None) for t in texts]))
    np.testing.assert_allclose(out.raw_logits, expected, atol=1e-5)
    np.testing.assert_allclose(out.probs.sum(-1), 1.0, atol=1e-6)


def test_an_ensemble_prediction_is_paid_in_full_or_not_at_all() -> None:
    from craft_sdk import BudgetExceededError
    from craft_sdk.client import MeteredClient

    client, ledger = Spy(), QueryLedger(budget=2)
    with pytest.raises(BudgetExceededError, match="sends 3 contexts"):
        raw_scores(ensemble_adapter(), MeteredClient(client, ledger), pictures(4)[0])
    assert ledger.used == 0 and client.sent == []


def test_evaluate_measures_zero_shot_with_the_initial_template() -> None:
    from craft_sdk import evaluate

    ims, labels = pictures(30)
    test = ImageDataset(ims, labels, NAMES)
    adapter = discrete_adapter(refiner=False)
    res = evaluate(adapter, Spy(), test)
    zero = (text_box(ims, list(NAMES), "a photo of a", None).argmax(-1) == labels).mean()
    learned = (text_box(ims, list(NAMES), LEARNED, None).argmax(-1) == labels).mean()
    assert res["zero_shot_accuracy"] == pytest.approx(zero) and res["accuracy"] == pytest.approx(learned)
    assert learned > zero + 0.3 and res["queries_used"] == 2


# --------------------------------------------------------------------------- the ensemble mode


def _tune(**options):  # noqa: ANN003, ANN202
    pytest.importorskip("torch")
    from craft_sdk import tune

    ims, labels = pictures(48)
    client = Spy()
    budget = options.pop("budget", 1000)
    # issue 23: 12 images per class with a 25 % hold-out leave 6 certify images, too few for the gain a plan
    # counts on (the robust run would buy no bank); half held out leaves 12 (ignored by the paper protocol)
    options.setdefault("holdout", 0.5)
    ledger = QueryLedger(budget=budget)
    adapter = tune(client, ImageDataset(ims, labels, NAMES), mode="ensemble", budget=budget, ledger=ledger, **options)
    return adapter, ledger, client


@pytest.mark.parametrize("protocol", ["robust", "paper"])
def test_ensemble_mode_pays_the_bank_once_and_picks_the_rewarded_context(protocol: str) -> None:
    adapter, ledger, client = _tune(protocol=protocol, ensemble_k=2, seed=0)
    spec = adapter.config.prompt
    assert ledger.used == 1 + len(CLIP_IMAGENET_CONTEXTS) and ledger.counts["search"] == len(CLIP_IMAGENET_CONTEXTS)
    assert isinstance(spec, EnsemblePromptSpec) and len(spec.texts) == 2 and spec.initial == "a photo of a"
    assert spec.texts[0] == "a sketch of a" and adapter.config.template == "a sketch of a"  # the only context that says 'sketch'
    assert adapter.config.provenance["mode"] == "ensemble" and adapter.offset is None and adapter.refiner is None
    if protocol == "robust":
        assert adapter.config.provenance["selection"]["deployed"] == "ensemble"


def test_ensemble_falls_back_to_zero_shot_when_no_context_helps(tmp_path: Path) -> None:
    bank = tmp_path / "bank.txt"
    bank.write_text("a photo of the\n\nart of a\n  a  drawing of a \n")  # blank lines skipped, spaces normalised
    adapter, ledger, _ = _tune(template_bank=str(bank), ensemble_k=0, seed=1)
    assert ledger.used == 1 + 3
    assert adapter.config.prompt is None and adapter.config.template == "a photo of a"
    assert adapter.config.provenance["selection"]["deployed"] == "zero-shot"


def test_a_resumed_ensemble_keeps_its_contexts_and_pays_nothing_again(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from craft_sdk import tune

    ims, labels = pictures(48)
    train = ImageDataset(ims, labels, NAMES)
    first = tune(Spy(), train, mode="ensemble", ensemble_k=2, checkpoint_dir=tmp_path, seed=0, holdout=0.5)  # see _tune
    client, ledger = Spy(), QueryLedger(budget=1000)
    again = tune(client, train, mode="ensemble", ensemble_k=2, checkpoint_dir=tmp_path, resume=True, seed=0, ledger=ledger, holdout=0.5)
    assert client.sent == [] and again.config.prompt == first.config.prompt and again.config.prompt is not None


def test_a_robust_ensemble_without_check_images_spends_nothing_on_the_bank() -> None:
    pytest.importorskip("torch")
    from craft_sdk import tune

    ims, labels = pictures(3)  # one image per class: nothing can be held out
    ledger = QueryLedger(budget=1000)
    adapter = tune(Spy(), ImageDataset(ims, labels, NAMES), mode="ensemble", ledger=ledger, seed=0)
    assert ledger.used == 1 and adapter.config.prompt is None


@pytest.mark.parametrize(
    "options, message",
    [
        ({"budget": 20}, "cannot pay the zero-shot baseline and 41 ensemble contexts"),
        ({"ensemble_k": 101}, "ensemble_k must be at most 100"),
        ({"template": "a {} of"}, "without braces"),
        ({"template": "word " * 300}, "at most 1000 characters"),
        ({"template_bank": "no-such-bank"}, "neither clip-imagenet nor clip-selected nor a file"),
        ({"template_bank": "clip-selected", "ensemble_k": 7}, "ensemble_k 7 exceeds the 6 contexts"),
        ({"ensemble_k": -1}, "ensemble_k must be a non-negative integer"),
    ],
)
def test_ensemble_options_are_checked_before_any_query(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _tune(**options)


def test_bank_files_with_braces_or_duplicates_are_refused(tmp_path: Path) -> None:
    from craft_sdk.tuner.ensemble import load_bank

    (tmp_path / "a.txt").write_text("a {} of\n")
    (tmp_path / "b.txt").write_text("a photo of\na photo of\n")
    with pytest.raises(ConfigError, match="has braces"):
        load_bank(str(tmp_path / "a.txt"))
    with pytest.raises(ConfigError, match="distinct contexts"):
        load_bank(str(tmp_path / "b.txt"))
    (tmp_path / "c.txt").write_text("a photo of\n" * 200_000)  # 2.2 MB: refused before it is read
    with pytest.raises(ConfigError, match="is over 1,048,576 bytes"):
        load_bank(str(tmp_path / "c.txt"))
    (tmp_path / "e.txt").write_text("a " * 600 + "\n")
    with pytest.raises(ConfigError, match="over 1000 characters"):
        load_bank(str(tmp_path / "e.txt"))
    (tmp_path / "f.txt").write_text("\n".join(f"context number {i} of a" for i in range(150)))
    assert len(load_bank(str(tmp_path / "f.txt"))) == 150
    with pytest.raises(ConfigError, match="over the 100 an adapter may send"):
        _tune(template_bank=str(tmp_path / "f.txt"), ensemble_k=0)
    (tmp_path / "g.txt").write_bytes("\ufeffa photo of the\nart of a\n".encode())
    assert load_bank(str(tmp_path / "g.txt")) == ("a photo of the", "art of a")  # the byte-order mark is dropped
    with pytest.raises(ConfigError, match="template_bank .a.x00b. is not a file"):
        from craft_sdk._fileio import read_lines

        read_lines("a\0b", "template_bank")
    (tmp_path / "d.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(ConfigError, match="pass a UTF-8 text file"):
        load_bank(str(tmp_path / "d.txt"))


# --------------------------------------------------------------------------- the command line


def test_cli_inspects_and_predicts_with_a_text_adapter(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A discrete adapter on a real (tiny, random) open_clip model behind ``text-only:``: inspect names the
    kind and the words; ``craft-sdk predict`` gives the Python API's answer."""
    pytest.importorskip("torch")
    from craft_sdk import create_client

    client = create_client(f"text-only:local-dir:{tiny_model_dir}")
    assert not client.capabilities().soft_prompts
    a = discrete_adapter()
    cfg = AdapterConfig(client.capabilities().model_id, NAMES, LEARNED, prompt=a.config.prompt, refiner=a.config.refiner)
    adapter = Adapter(cfg, None, None, a.refiner)
    adapter.save_pretrained(tmp_path / "ad")
    folder = tmp_path / "images"
    folder.mkdir()
    ims, _ = pictures(5)
    for k, im in enumerate(ims):
        im.resize((32, 32)).save(folder / f"{k}.png")
    env = suite_env()
    cli = [sys.executable, "-m", "craft_sdk.cli"]
    info = subprocess.run([*cli, "inspect", str(tmp_path / "ad")], capture_output=True, text=True, env=env, timeout=120)
    assert info.returncode == 0 and f"discrete: '{LEARNED}' (searched from 'a photo of a'" in info.stdout, info.stderr
    as_json = json.loads(subprocess.run([*cli, "inspect", str(tmp_path / "ad"), "--json"], capture_output=True, text=True, env=env, timeout=120).stdout)
    assert as_json["prompt"]["kind"] == "discrete" and as_json["prompt"]["text"] == LEARNED
    res = subprocess.run([*cli, "predict", str(tmp_path / "ad"), str(folder), "--model", f"text-only:local-dir:{tiny_model_dir}", "--json"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {Path(r["image"]).name: r["top_k"][0]["label"] for r in json.loads(res.stdout)["predictions"]}
    clf = CraftClassifier.from_adapter(adapter, client)
    expected = clf.predict([Image.open(folder / f"{k}.png") for k in range(5)])
    assert [rows[f"{k}.png"] for k in range(5)] == list(expected)
