"""Discrete prompt search (text-only black boxes) and template ensembles: a planted hidden word is recovered
by a plain ask/tell loop through a metered text-only client; controls with shuffled or ignored fitness are not."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from PIL import Image

from craft_sdk import BudgetExceededError, ConfigError, CraftError
from craft_sdk.client import CallableClient, Capabilities, MeteredClient, QueryLedger
from craft_sdk.tuner.discrete import VOCABULARY, DiscretePromptSearch, DiscreteSearchConfig
from craft_sdk.tuner.templates import (
    CLIP_IMAGENET_CONTEXTS,
    CLIP_SELECTED,
    ensemble_log_probs,
    greedy_templates,
    score_templates,
)

HIDDEN = "sketch"
C, N = 5, 40
NAMES = [f"c{i}" for i in range(C)]
GENERATIONS = 70


def planted_client(margin: float = 2.0, crash_at: int | None = None, jitter: float = 0.0, n: int = N) -> tuple[CallableClient, list[Image.Image], np.ndarray]:
    """A text-only black box whose logits favour the true class by ``margin`` only if the context holds HIDDEN.

    Image k is a 2x2 picture whose red channel encodes its label and green channel its index (for fixed noise).
    ``jitter``: every context also shifts the class logits a little (a real model is never blind to a word).
    ``n``: the number of images (at most 256).
    """
    labels = np.arange(n) % C
    images = [Image.new("RGB", (2, 2), (int(y) * 40, k, 0)) for k, y in enumerate(labels)]
    noise = np.random.default_rng(0).normal(0, 1, (n, C))

    calls = [0]

    def fn(ims: list[Image.Image], names: list[str], template: str, offsets: object) -> np.ndarray:
        assert offsets is None
        calls[0] += 1
        if calls[0] == crash_at:
            raise KeyboardInterrupt("simulated crash")
        red_green = np.array([im.getpixel((0, 0))[:2] for im in ims])
        y, k = red_green[:, 0] // 40, red_green[:, 1]
        logits = noise[k].copy()
        logits += jitter * np.random.default_rng(zlib.crc32(template.encode())).normal(size=logits.shape[1])
        if HIDDEN in template.split():
            logits[np.arange(len(ims)), y] += margin
        return logits

    return CallableClient(fn, Capabilities("planted-text-only")), images, labels


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    m = logits.max(-1, keepdims=True)
    log_z = m[..., 0] + np.log(np.exp(logits - m).sum(-1))
    return float((log_z - np.take_along_axis(logits, labels[:, None], -1)[:, 0]).mean())


def search_loop(fitness_of: str, seed: int = 0, config: DiscreteSearchConfig | None = None) -> tuple[DiscretePromptSearch, QueryLedger]:
    client, images, labels = planted_client()
    search = DiscretePromptSearch(config, seed=seed)
    ledger = QueryLedger(budget=GENERATIONS * search.popsize)
    metered = MeteredClient(client, ledger)
    handle = metered.upload(images)
    shuffle = np.random.default_rng(seed + 1)
    for _ in range(GENERATIONS):
        contexts = search.ask()
        fit = np.array([cross_entropy(metered.predict(handle, NAMES, t, category="search"), labels) for t in contexts])
        if fitness_of == "shuffled":
            fit = shuffle.permutation(fit)
        elif fitness_of == "ignored":
            fit = np.ones_like(fit)
        search.tell(contexts, fit)
    return search, ledger


def hidden_mass(search: DiscretePromptSearch) -> float:
    return float(search.probabilities[:, search.vocabulary.index(HIDDEN)].max())


@pytest.mark.parametrize("seed_template", ["a photo of a", None])
def test_planted_word_is_recovered_within_budget(seed_template: str | None) -> None:
    search, ledger = search_loop("true", config=DiscreteSearchConfig(seed_template=seed_template))
    assert HIDDEN in search.mean.split() and hidden_mass(search) > 0.9, (search.mean, hidden_mass(search))
    assert search.generation == GENERATIONS and ledger.counts["search"] == ledger.budget == GENERATIONS * 20


@pytest.mark.parametrize("fitness_of", ["shuffled", "ignored"])
def test_control_without_signal_does_not_find_it(fitness_of: str) -> None:
    search, _ = search_loop(fitness_of)
    assert HIDDEN not in search.mean.split() and hidden_mass(search) < 0.5, (search.mean, hidden_mass(search))
    if fitness_of == "ignored":  # no advantage, no step: the distribution stays at its seed
        assert search.mean == "a photo of a" and np.allclose(search.probabilities, DiscretePromptSearch().probabilities)


def test_budget_is_a_hard_ceiling() -> None:
    client, images, _ = planted_client()
    metered = MeteredClient(client, QueryLedger(budget=25))
    search = DiscretePromptSearch(seed=0)
    contexts = search.ask()
    with pytest.raises(BudgetExceededError):
        score_templates(metered, metered.upload(images), NAMES, contexts + contexts)
    assert metered.ledger.used == 25


def test_deterministic_and_replay_rebuilds_the_state() -> None:
    rng = np.random.default_rng(3)
    a, b = DiscretePromptSearch(seed=7), DiscretePromptSearch(seed=7)
    rows = []
    for _ in range(6):
        ca, cb = a.ask(), b.ask()
        assert ca == cb
        fit = rng.normal(size=len(ca))
        rows.append(fit)
        a.tell(ca, fit)
        b.tell(cb, fit)
    resumed = DiscretePromptSearch(seed=7)
    resumed.replay(np.stack(rows), a.ask_digests)
    assert resumed.generation == 6 and resumed.mean == a.mean and np.array_equal(resumed.probabilities, a.probabilities)
    assert resumed.ask() == a.ask()  # the next population too
    assert DiscretePromptSearch(seed=8).ask() != DiscretePromptSearch(seed=7).ask()
    other = DiscretePromptSearch(DiscreteSearchConfig(vocabulary=VOCABULARY[::-1]), seed=7)
    with pytest.raises(CraftError, match="replay diverged at generation 1"):
        other.replay(np.stack(rows), a.ask_digests)


def test_from_template_seeds_any_context() -> None:
    s = DiscretePromptSearch.from_template("a centered satellite photo of a", popsize=6, seed=1, lr=3.0)
    assert s.mean == "a centered satellite photo of a" and s.n_slots == 6 and s.config.lr == 3.0
    assert "centered" in s.vocabulary and s.vocabulary[: len(VOCABULARY)] == VOCABULARY
    assert DiscretePromptSearch.from_template("itap of a").mean == "itap of a"
    with pytest.raises(ConfigError, match="single words"):
        DiscretePromptSearch.from_template("a {weird} photo of a")


def test_tell_checks_its_input_and_config_validates() -> None:
    s = DiscretePromptSearch(seed=0)
    with pytest.raises(CraftError, match="follow ask"):
        s.tell(["a photo of a"] * s.popsize, np.zeros(s.popsize))
    contexts = s.ask()
    with pytest.raises(CraftError, match="finite"):
        s.tell(contexts, [float("nan")] * s.popsize)
    with pytest.raises(CraftError, match="same candidates"):
        s.tell(contexts[::-1] if contexts[::-1] != contexts else ["x"] * s.popsize, np.zeros(s.popsize))
    for bad, match in [
        (dict(popsize=1), "popsize"),
        (dict(lr=0.0), "lr"),
        (dict(seed_template="a photo"), "n_slots"),
        (dict(seed_template="a zebrafoo of a"), "not in the vocabulary"),
        (dict(vocabulary=("a", "a b")), "single words"),
        (dict(seed_mass=1.0), "seed_mass"),
    ]:
        with pytest.raises(ConfigError, match=match):
            DiscreteSearchConfig(**bad)


# ------------------------------------------------------------------------------ template ensembles


def test_template_bank_is_usable_as_contexts() -> None:
    bank = CLIP_IMAGENET_CONTEXTS + CLIP_SELECTED
    assert "a photo of a" in CLIP_IMAGENET_CONTEXTS and len(set(CLIP_IMAGENET_CONTEXTS)) == len(CLIP_IMAGENET_CONTEXTS)
    assert all("{" not in t and t == t.strip() and t for t in bank)
    assert all(w in VOCABULARY for t in bank for w in t.split())  # any bank template is a reachable candidate


def test_ensemble_averages_log_probabilities() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 5))
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    assert np.allclose(ensemble_log_probs(logits), log_p.mean(0), atol=1e-6)
    assert np.allclose(ensemble_log_probs(log_p), ensemble_log_probs(logits + 3.0), atol=1e-6)  # shift-invariant
    with pytest.raises(ConfigError):
        ensemble_log_probs(logits[0])


def test_greedy_selection_picks_the_informative_templates() -> None:
    client, images, labels = planted_client(margin=3.0)
    templates = ["a photo of a", "a sketch of a", "a drawing of a", "the sketch of the", "a bad photo of the"]
    metered = MeteredClient(client, QueryLedger())
    scores = score_templates(metered, metered.upload(images), NAMES, templates)
    assert scores.shape == (5, N, C) and metered.ledger.counts["search"] == 5  # one query per template
    picked = greedy_templates(scores, labels, 2)
    assert sorted(picked) == [1, 3]  # the two templates holding the hidden word, each once
    assert sorted(greedy_templates(scores, labels, 5)) == [0, 1, 2, 3, 4]
    with pytest.raises(ConfigError, match="between 1 and the 5"):
        greedy_templates(scores, labels, 6)
    ens = ensemble_log_probs(scores[picked])
    assert cross_entropy(ens, labels) < cross_entropy(ensemble_log_probs(scores), labels)


# ------------------------------------------------------------------------- the tuner's loop


def test_tuner_searches_the_template_words_of_a_text_only_client(tmp_path) -> None:  # noqa: ANN001
    """pg through the tuner (the discrete prompt space): the learned template is the adapter's; resume is exact."""
    pytest.importorskip("torch")
    from craft_sdk import Adapter, ImageDataset, TuneConfig
    from craft_sdk.tuner.train import Tuner

    client, images, labels = planted_client(jitter=0.02)
    train = ImageDataset(images, labels, tuple(NAMES))
    cfg = TuneConfig(mode="pg", protocol="paper", popsize=20, budget=1 + 72 * 21, max_generations=70, seed=0)  # slack: a resume redoes the generation lost
    result = Tuner(cfg).fit(client, train)
    adapter = Adapter.from_result(result)
    spec = adapter.config.prompt
    assert result.config.mode == "pg" and spec is not None and spec.kind == "discrete" and adapter.offset is None
    assert spec.text == adapter.config.template and spec.initial == "a photo of a" and spec.n_slots == 4
    assert HIDDEN in adapter.config.template.split(), adapter.config.template
    assert result.queries.counts["search"] == 70 * 20 and result.queries.used <= cfg.budget
    zero = client.predict(images, NAMES, "a photo of a").argmax(-1)
    tuned = client.predict(images, NAMES, adapter.config.template).argmax(-1)
    assert (tuned == labels).mean() > (zero == labels).mean() + 0.2

    ckpt = tmp_path / "ckpt"
    crashing, _, _ = planted_client(crash_at=700, jitter=0.02)
    with pytest.raises(KeyboardInterrupt):
        Tuner(cfg, checkpoint_dir=ckpt).fit(crashing, train)
    resumed = Tuner(cfg, checkpoint_dir=ckpt, resume=True).fit(planted_client(jitter=0.02)[0], train)
    assert resumed.config.template == result.config.template
    assert [h.best_fitness for h in resumed.history] == [h.best_fitness for h in result.history]


def test_craft_on_a_text_only_client_keeps_the_refiner_and_the_words() -> None:
    pytest.importorskip("torch")
    from craft_sdk import Adapter, ImageDataset, TuneConfig
    from craft_sdk.tuner.train import Tuner

    # 100 images: 25 check images can certify a gain under +50 points, so the robust plan buys the search (40 cannot)
    client, images, labels = planted_client(jitter=0.02, n=100)
    result = Tuner(TuneConfig(mode="craft", popsize=8, budget=200, seed=1, refiner_hidden=16)).fit(client, ImageDataset(images, labels, tuple(NAMES)))
    adapter = Adapter.from_result(result)
    spec = adapter.config.prompt  # robust protocol: the words are deployed only when they beat zero-shot
    assert result.config.mode == "craft" and (spec is None or (spec.kind == "discrete" and spec.text == adapter.config.template))
    assert len(adapter.config.template.split()) == 4 and all(w in VOCABULARY for w in adapter.config.template.split())
    assert any(h.sigma is not None for h in result.history)  # the loop records the search's spread (entropy)


# ------------------------------------------------------------------------- options


def test_a_vocabulary_file_and_word_lr_reach_the_search(tmp_path) -> None:  # noqa: ANN001
    """--vocabulary FILE: the (policy-gradient) search draws only those words (plus the template's); the adapter records the size."""
    pytest.importorskip("torch")
    from craft_sdk import Adapter, ImageDataset, TuneConfig
    from craft_sdk.tuner.train import Tuner

    words = ["sketch", "drawing", "blurry", "toy", "plastic", "bright"]
    vocab = tmp_path / "words.txt"
    vocab.write_text("\n".join(words) + "\n\n")
    client, images, labels = planted_client(jitter=0.02)
    cfg = TuneConfig(mode="pg", protocol="paper", popsize=10, budget=1 + 30 * 11, seed=0, vocabulary=str(vocab), word_lr=3.0, word_search="pg")
    adapter = Adapter.from_result(Tuner(cfg).fit(client, ImageDataset(images, labels, tuple(NAMES))))
    spec = adapter.config.prompt
    assert spec is not None and spec.vocabulary_size == len(words) + len({"a", "photo", "of"})
    assert HIDDEN in adapter.config.template.split() and set(adapter.config.template.split()) <= set(words) | {"a", "photo", "of"}
    assert adapter.config.hyperparameters["word_lr"] == 3.0


@pytest.mark.parametrize(
    "content, message",
    [("two words\nok\n", "is not one word"), ("same\nsame\n", "at least two distinct words"), (None, "vocabulary .* is not a file")],
)
def test_bad_vocabularies_are_one_line_config_errors(tmp_path, content: str | None, message: str) -> None:  # noqa: ANN001
    from craft_sdk.tuner.discrete import load_vocabulary

    path = tmp_path / "v.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message) as info:
        load_vocabulary(str(path))
    assert "\n" not in str(info.value)


def test_word_lr_must_be_positive() -> None:
    from craft_sdk import TuneConfig

    with pytest.raises(ConfigError, match="word_lr must be a positive finite number"):
        TuneConfig(word_lr=0.0)


def test_a_checkpoint_from_before_new_options_still_resumes(tmp_path) -> None:  # noqa: ANN001
    """Options added after a checkpoint was written take their defaults when it is resumed."""
    pytest.importorskip("torch")
    from craft_sdk import ImageDataset, TuneConfig
    from craft_sdk.tuner.checkpoint import load_checkpoint, save_checkpoint
    from craft_sdk.tuner.train import Tuner

    client, images, labels = planted_client(jitter=0.02)
    train = ImageDataset(images, labels, tuple(NAMES))
    cfg = TuneConfig(mode="pg", protocol="paper", popsize=10, budget=1 + 12 * 11, max_generations=10, seed=0)
    full = Tuner(cfg).fit(client, train)
    crashing, _, _ = planted_client(crash_at=60, jitter=0.02)
    with pytest.raises(KeyboardInterrupt):
        Tuner(cfg, checkpoint_dir=tmp_path).fit(crashing, train)
    tensors, state = load_checkpoint(tmp_path)
    for key in ("vocabulary", "word_lr", "ensemble_k", "template_bank"):
        del state["config"][key]
    save_checkpoint(tmp_path, tensors, state)
    resumed = Tuner(cfg, checkpoint_dir=tmp_path, resume=True).fit(planted_client(jitter=0.02)[0], train)
    assert resumed.config.template == full.config.template
    changed = TuneConfig(**{**cfg.to_dict(), "word_lr": 1.0})
    with pytest.raises(ConfigError, match="different configuration"):
        Tuner(changed, checkpoint_dir=tmp_path, resume=True).fit(planted_client(jitter=0.02)[0], train)
