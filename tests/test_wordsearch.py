"""The default word search of text-only clients (successive halving over words, tuner/wordsearch.py): a planted
word is recovered at a budget where the policy gradient does not, and not when the vocabulary lacks it; the ledger
is a hard ceiling; replay and checkpoint/resume are exact."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from craft_sdk import Adapter, BudgetExceededError, ConfigError, CraftError, ImageDataset, TuneConfig
from craft_sdk.client import CallableClient, Capabilities, MeteredClient, QueryLedger
from craft_sdk.tuner.discrete import VOCABULARY, DiscretePromptSearch, DiscreteSearchConfig
from craft_sdk.tuner.wordsearch import WordHalvingSearch, WordSearchConfig

HIDDEN = "sketch"
C, N = 5, 60
NAMES = [f"c{i}" for i in range(C)]


class Crash(Exception):
    pass


def planted_client(margin: float = 1.0, crash_at: int | None = None, jitter: float = 0.1) -> tuple[CallableClient, ImageDataset]:
    """A text-only black box: fixed N(0, 1) logits per image, a small class shift per word said (``jitter``), and
    ``margin`` more on the true class when the context says HIDDEN. Raises Crash on call ``crash_at``."""
    labels = np.arange(N) % C
    images = [Image.new("RGB", (2, 2), (int(y) * 40, k, 0)) for k, y in enumerate(labels)]
    noise = np.random.default_rng(0).normal(0, 1, (N, C))
    calls = [0]

    def fn(ims: list[Image.Image], names: list[str], template: str, offsets: object) -> np.ndarray:
        assert offsets is None
        calls[0] += 1
        if calls[0] == crash_at:
            raise Crash()
        pix = np.array([im.getpixel((0, 0))[:2] for im in ims])
        y, k = pix[:, 0] // 40, pix[:, 1]
        logits = noise[k].copy()
        for w in template.split():
            logits += np.random.default_rng(zlib.crc32(w.encode())).normal(0, jitter, C)
        if HIDDEN in template.split():
            logits[np.arange(len(ims)), y] += margin
        return logits

    return CallableClient(fn, Capabilities("planted-words")), ImageDataset(images, labels, tuple(NAMES))


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    m = logits.max(-1, keepdims=True)
    log_z = m[..., 0] + np.log(np.exp(logits - m).sum(-1))
    return float((log_z - np.take_along_axis(logits, labels[:, None], -1)[:, 0]).mean())


def search_loop(search: Any, budget: int, fitness_of: str = "true") -> tuple[Any, QueryLedger]:
    """A plain ask/tell loop through a metered client until the next generation would exceed ``budget``."""
    client, train = planted_client()
    ledger = QueryLedger(budget=budget)
    metered = MeteredClient(client, ledger)
    handle = metered.upload(train.images)
    while ledger.can_afford(search.popsize):
        contexts = search.ask()
        fit = np.array([cross_entropy(metered.predict(handle, NAMES, t, category="search"), train.labels) for t in contexts])
        search.tell(contexts, np.ones_like(fit) if fitness_of == "ignored" else fit)
    return search, ledger


BUDGET = 400  # 20 generations of 20: the policy gradient's test (test_discrete.py) needs 1,400


def test_halving_recovers_the_planted_word_at_a_budget_where_pg_does_not() -> None:
    found = [search_loop(WordHalvingSearch(WordSearchConfig(), seed=s), BUDGET)[0] for s in range(3)]
    assert all(HIDDEN in s.mean.split() for s in found), [s.mean for s in found]
    assert all(s.generation == 20 and s.rounds >= 1 for s in found)
    pg = [search_loop(DiscretePromptSearch(DiscreteSearchConfig(), seed=s), BUDGET)[0] for s in range(3)]
    assert not any(HIDDEN in s.mean.split() for s in pg), [s.mean for s in pg]  # the control: same budget, old search


def test_controls_without_the_word_or_without_signal_do_not_find_it() -> None:
    without = WordHalvingSearch(WordSearchConfig(vocabulary=tuple(w for w in VOCABULARY if w != HIDDEN)), seed=0)
    search, _ = search_loop(without, BUDGET)
    assert HIDDEN not in search.mean.split()
    ignored, _ = search_loop(WordHalvingSearch(seed=0), BUDGET, fitness_of="ignored")
    assert ignored.mean == "a photo of a"  # nothing beat the incumbent: it stays


def test_every_word_is_screened_and_the_rungs_halve() -> None:
    def cost(context: str) -> float:  # word wi costs i, a template word 5: w0…w4 help
        return float(sum(int(w[1:]) if w.startswith("w") else 5 for w in context.split()))

    s = WordHalvingSearch(WordSearchConfig(popsize=10, vocabulary=tuple(f"w{i}" for i in range(27)) + ("a", "photo", "of")), seed=1)
    sizes = [len(s.survivors)]
    tested: set[str] = set()
    while s.rounds == 0:
        contexts = s.ask()
        assert contexts[0] == s.incumbent == "a photo of a"
        tested.update(w for c in contexts[1:] for w in c.split())
        s.tell(contexts, [cost(c) for c in contexts])
        if len(s.survivors) != sizes[-1]:
            sizes.append(len(s.survivors))
    assert tested == set(s.vocabulary) and sizes == [30, 10, 4, 2, 30]  # ⌈n / 3⌉ until 2 finalists, placed; round 2
    assert s.incumbent == s.mean and s.mean.split().count("w0") >= 1 and s.sigma == 1.0
    assert cost(s.mean) <= 15 and all(cost(w) <= 5 for w in s.mean.split()), s.mean  # the template costs 20


def test_budget_is_a_hard_ceiling() -> None:
    client, train = planted_client()
    metered = MeteredClient(client, QueryLedger(budget=25))
    search = WordHalvingSearch(seed=0)
    handle = metered.upload(train.images)
    with pytest.raises(BudgetExceededError):
        for context in search.ask() + search.ask():
            metered.predict(handle, NAMES, context)
    assert metered.ledger.used == 25


def test_deterministic_and_replay_rebuilds_the_state() -> None:
    rng = np.random.default_rng(3)
    a, b = WordHalvingSearch(seed=7), WordHalvingSearch(seed=7)
    rows = []
    for _ in range(12):
        ca, cb = a.ask(), b.ask()
        assert ca == cb
        fit = rng.normal(size=len(ca))
        rows.append(fit)
        a.tell(ca, fit)
        b.tell(cb, fit)
    resumed = WordHalvingSearch(seed=7)
    resumed.replay(np.stack(rows), a.ask_digests)
    assert resumed.generation == 12 and resumed.mean == a.mean and resumed.survivors == a.survivors
    assert resumed.ask() == a.ask()  # the next population too
    assert WordHalvingSearch(seed=8).ask() != WordHalvingSearch(seed=7).ask()
    with pytest.raises(CraftError, match="replay diverged at generation 1"):
        WordHalvingSearch(WordSearchConfig(vocabulary=VOCABULARY[::-1]), seed=7).replay(np.stack(rows), a.ask_digests)


def test_tell_checks_its_input_and_config_validates() -> None:
    s = WordHalvingSearch(seed=0)
    with pytest.raises(CraftError, match="follow ask"):
        s.tell(["a photo of a"] * s.popsize, np.zeros(s.popsize))
    contexts = s.ask()
    with pytest.raises(CraftError, match="finite"):
        s.tell(contexts, [float("nan")] * s.popsize)
    for bad, match in [
        (dict(popsize=1), "popsize"), (dict(group=0), "group"), (dict(eta=1), "eta"), (dict(finalists=0), "finalists"),
        (dict(template="a zebrafoo of a"), "must be words of the vocabulary"), (dict(vocabulary=("a", "a b")), "single words"),
    ]:
        with pytest.raises(ConfigError, match=match):
            WordSearchConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="word_search must be one of"):
        TuneConfig(word_search="bandit")


# ------------------------------------------------------------------------- the tuner's loop


def test_default_tune_of_a_text_only_client_uses_halving_and_finds_the_word() -> None:
    """``mode="pg"`` through the public tune(), robust protocol: halving (the default) deploys the word, pg does not."""
    import craft_sdk

    client, train = planted_client()
    assert TuneConfig().word_search == "halving"
    adapter = craft_sdk.tune(client, train, mode="pg", budget=600, seed=0, holdout=0.5)  # enough images to certify
    spec = adapter.config.prompt
    assert spec is not None and spec.kind == "discrete" and HIDDEN in adapter.config.template.split(), adapter.config.template
    assert adapter.config.hyperparameters["word_search"] == "halving" and adapter.config.provenance["queries_used"] <= 600
    old = craft_sdk.tune(planted_client()[0], train, mode="pg", budget=600, seed=0, word_search="pg", holdout=0.5)
    assert HIDDEN not in old.config.template.split()


def test_budget_is_never_exceeded_through_the_tuner() -> None:
    from craft_sdk.tuner.train import Tuner

    client, train = planted_client()
    for budget in (23, 64, 337):
        ledger = QueryLedger(budget=budget)
        result = Tuner(TuneConfig(mode="pg", protocol="paper", popsize=10, budget=budget, seed=1)).fit(client, train, ledger=ledger)
        assert ledger.used == result.queries.used <= budget and budget - ledger.used < 11  # the last generation fits
        assert result.queries.counts["search"] == 10 * (len(result.history) - 1)


def save(result: Any, path: Path) -> Path:
    return Adapter.from_result(result).save_pretrained(path)


@pytest.mark.parametrize("protocol", ["paper", "robust"])
def test_resume_after_a_checkpoint_is_byte_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, protocol: str) -> None:
    from craft_sdk.tuner import loop as loop_mod
    from craft_sdk.tuner.train import Tuner

    client, train = planted_client()
    cfg = TuneConfig(mode="pg", protocol=protocol, popsize=10, budget=1 + 30 * 11, patience=None, seed=2, holdout=0.5)
    ref = save(Tuner(cfg).fit(client, train), tmp_path / "ref")
    real, saves = loop_mod.save_checkpoint, []

    def crashing_save(*args: Any) -> Any:
        out = real(*args)
        saves.append(args[2]["generation"])
        if len(saves) == 14:
            raise Crash()
        return out

    monkeypatch.setattr(loop_mod, "save_checkpoint", crashing_save)
    with pytest.raises(Crash):
        Tuner(cfg, checkpoint_dir=tmp_path / "ckpt").fit(client, train)
    monkeypatch.setattr(loop_mod, "save_checkpoint", real)
    resumed = save(Tuner(cfg, checkpoint_dir=tmp_path / "ckpt", resume=True).fit(client, train), tmp_path / "resumed")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (ref / name).read_bytes() == (resumed / name).read_bytes(), name
    assert HIDDEN in Adapter.from_pretrained(resumed).config.template.split()


def test_crash_mid_generation_resumes_to_the_same_words_within_budget(tmp_path: Path) -> None:
    from craft_sdk.tuner.train import Tuner

    _, train = planted_client()
    cfg = TuneConfig(mode="pg", protocol="paper", popsize=10, budget=1 + 32 * 11, max_generations=30, seed=3)
    ref = Tuner(cfg).fit(planted_client()[0], train)
    with pytest.raises(Crash):
        Tuner(cfg, checkpoint_dir=tmp_path).fit(planted_client(crash_at=150)[0], train)
    resumed = Tuner(cfg, checkpoint_dir=tmp_path, resume=True).fit(planted_client()[0], train)
    assert resumed.config.template == ref.config.template and HIDDEN in ref.config.template.split()
    assert [h.best_fitness for h in resumed.history] == [h.best_fitness for h in ref.history]
    assert ref.queries.used < resumed.queries.used <= cfg.budget  # the generation in flight is paid twice


def test_a_pg_checkpoint_from_before_the_option_is_named_on_resume(tmp_path: Path) -> None:
    """A checkpoint without ``word_search`` was written by the policy gradient: resuming it names the option."""
    from craft_sdk.tuner.checkpoint import load_checkpoint, save_checkpoint
    from craft_sdk.tuner.train import Tuner

    client, train = planted_client()
    cfg = TuneConfig(mode="pg", protocol="paper", popsize=10, budget=1 + 12 * 11, max_generations=10, seed=0, word_search="pg")
    full = Tuner(cfg).fit(client, train)
    with pytest.raises(Crash):
        Tuner(cfg, checkpoint_dir=tmp_path).fit(planted_client(crash_at=60)[0], train)
    tensors, state = load_checkpoint(tmp_path)
    del state["config"]["word_search"]
    save_checkpoint(tmp_path, tensors, state)
    with pytest.raises(ConfigError, match=r"different configuration \(word_search\)"):
        Tuner(TuneConfig(**{**cfg.to_dict(), "word_search": "halving"}), checkpoint_dir=tmp_path, resume=True).fit(client, train)
    assert Tuner(cfg, checkpoint_dir=tmp_path, resume=True).fit(client, train).config.template == full.config.template


def test_the_cli_derives_word_search_and_rejects_a_bad_one() -> None:
    pytest.importorskip("typer")
    from typer.testing import CliRunner

    from craft_sdk.cli import app

    res = CliRunner().invoke(app, ["tune", "demo:digits", "--model", "text-only:demo", "--word-search", "bandit"])
    assert res.exit_code == 2 and "word_search must be one of ('halving', 'pg')" in res.output and "Traceback" not in res.output
