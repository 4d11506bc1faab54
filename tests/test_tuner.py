"""The tuner: planted-solution recovery, determinism, modes, budgets, validation-based selection."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASS_NAMES
from PIL import Image

from craft_sdk import Adapter, CallableClient, Capabilities, ConfigError, ImageDataset, QueryLedger, TuneConfig

pytest.importorskip("torch")
pytest.importorskip("cma")
from craft_sdk.projection import project, projection_matrix  # noqa: E402
from craft_sdk.tuner.plan import plan_generations  # noqa: E402
from craft_sdk.tuner.search import PromptSearch  # noqa: E402
from craft_sdk.tuner.train import Tuner  # noqa: E402


def block_images(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((32, 32), Image.NEAREST) for _ in range(n)]


PLANT_CFG = TuneConfig(mode="pg", budget=1500, seed=7, intrinsic_dim=32, popsize=10, protocol="paper")  # the optimiser alone


@pytest.fixture(scope="module")
def planted(tiny_client):  # noqa: ANN001, ANN201
    """A task whose labels the tiny model produces under a hidden offset A z* in the tuner's own subspace,
    sampled so that zero-shot (z = 0) is at chance level."""
    caps = tiny_client.capabilities()
    d = PLANT_CFG.intrinsic_dim
    a = projection_matrix(PLANT_CFG.seed, caps.n_ctx * caps.ctx_dim, d, PLANT_CFG.prompt_scale * caps.ctx_rms / math.sqrt(d))
    z_star = np.random.default_rng(6).normal(0, 1.0, d) * 5.0
    imgs = block_images(900, 0)
    names = list(CLASS_NAMES)
    y = tiny_client.predict(imgs, names, offsets=project(a, z_star, caps.n_ctx, caps.ctx_dim)).argmax(-1)
    y0 = tiny_client.predict(imgs, names).argmax(-1)
    disagree = np.flatnonzero(y != y0)
    agree = np.flatnonzero(y == y0)[: len(disagree) // 5]
    keep = np.random.default_rng(0).permutation(np.concatenate([disagree, agree]))
    half = len(keep) // 2
    train = ImageDataset([imgs[i] for i in keep[:half]], y[keep[:half]], CLASS_NAMES)
    test = ImageDataset([imgs[i] for i in keep[half:]], y[keep[half:]], CLASS_NAMES)
    return train, test


def _test_accuracy(client, adapter: Adapter, test: ImageDataset) -> float:  # noqa: ANN001
    logits = client.predict(test.images, list(test.class_names), adapter.config.template, adapter.offset)
    return float((adapter.refine(logits).argmax(-1) == test.labels).mean())


def test_planted_solution_is_recovered(tiny_client, planted) -> None:  # noqa: ANN001
    train, test = planted
    result = Tuner(PLANT_CFG).fit(tiny_client, train)
    adapter = Adapter.from_result(result)
    zero_shot = result.metrics.zero_shot_train_accuracy
    assert zero_shot < 0.3  # chance is 1/6
    acc = _test_accuracy(tiny_client, adapter, test)
    assert acc > 0.75, f"PG recovered only {acc:.3f} (zero-shot {zero_shot:.3f})"
    assert result.queries.used <= PLANT_CFG.budget


def test_planted_solution_needs_the_fitness(tiny_client, planted, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """Control: the same run with the CMA-ES fitness replaced by noise must not recover the solution."""
    import craft_sdk.tuner.refiner as refiner_mod

    train, test = planted
    rng = np.random.default_rng(0)
    monkeypatch.setattr(refiner_mod, "fitness", lambda f, y, r, lam: rng.random(f.shape[0]))
    adapter = Adapter.from_result(Tuner(PLANT_CFG).fit(tiny_client, train))
    assert _test_accuracy(tiny_client, adapter, test) < 0.45


@pytest.mark.parametrize("mode", ["craft", "pg", "pr", "pg+pr", "zero-shot"])
def test_same_seed_gives_byte_identical_adapter(tiny_client, planted, mode: str, tmp_path: Path) -> None:  # noqa: ANN001
    train, _ = planted
    cfg = TuneConfig(mode=mode, budget=130, seed=3, intrinsic_dim=16, popsize=6, refiner_hidden=32)
    paths = []
    for run in range(2):
        adapter = Adapter.from_result(Tuner(cfg).fit(tiny_client, train))
        paths.append(adapter.save_pretrained(tmp_path / f"run{run}"))
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (paths[0] / name).read_bytes() == (paths[1] / name).read_bytes()
    other = Adapter.from_result(Tuner(TuneConfig(**{**cfg.to_dict(), "seed": 4})).fit(tiny_client, train))
    if mode != "zero-shot":
        assert other.fingerprint() != Adapter.from_pretrained(paths[0]).fingerprint()


def test_modes_learn_what_they_should(tiny_client, planted) -> None:  # noqa: ANN001
    train, _ = planted
    base = dict(budget=200, seed=1, intrinsic_dim=16, popsize=8, refiner_hidden=64)
    shapes = {}
    for mode in ("zero-shot", "pg", "pr", "pg+pr", "craft"):
        r = Tuner(TuneConfig(mode=mode, **base)).fit(tiny_client, train)
        shapes[mode] = (r.z is not None, r.refiner is not None, r.queries.used)
        assert r.queries.used <= 200
        if mode in ("pr", "craft", "pg+pr"):
            assert r.metrics.train_accuracy > r.metrics.zero_shot_train_accuracy
    assert shapes["zero-shot"] == (False, False, 1)
    assert shapes["pr"] == (False, True, 1)
    # issue 23: craft's deployed behaviour is certified and ranked on the check images; here
    # the refiner alone may win, so only the refiner is asserted (the search ran: the query count below)
    assert shapes["pg"][:2] == (True, False) and shapes["craft"][1]
    assert shapes["craft"][2] == 1 + 22 * 9  # baseline + 22 generations of (8 candidates + 1 mean)


def test_kl_weights_default_and_modes() -> None:
    assert TuneConfig(mode="craft").kl_weights(10) == (pytest.approx(0.01), pytest.approx(0.01))
    assert TuneConfig(mode="pg+pr").kl_weights(10) == (0.0, 0.0)
    assert TuneConfig(mode="craft", lam=0.5, beta=0.0).kl_weights(10) == (0.5, 0.0)


def test_budget_is_a_hard_ceiling_even_with_validation(tiny_client, planted) -> None:  # noqa: ANN001
    train, test = planted
    for budget in (60, 97, 333):  # the paper protocol spends the plan; it pays validation queries
        cfg = TuneConfig(budget=budget, seed=0, intrinsic_dim=8, popsize=5, refiner_hidden=16, val_every=3, protocol="paper")
        r = Tuner(cfg).fit(tiny_client, train, val=test)
        assert r.queries.used <= budget
        assert r.queries.used > budget - (5 + 3)  # the plan uses what it can
        assert r.queries.counts["validation"] >= 1
    for budget in (60, 97, 333):  # the robust protocol: the validation images ride along, never above the budget
        cfg = TuneConfig(budget=budget, seed=0, intrinsic_dim=8, popsize=5, refiner_hidden=16, patience=None)
        r = Tuner(cfg).fit(tiny_client, train, val=test)
        assert budget - (5 + 1) < r.queries.used <= budget and r.queries.counts["validation"] == 0
    assert plan_generations(TuneConfig(budget=8000), has_val=False) == 195


def test_external_ledger_ceiling_stops_run_cleanly(tiny_client, planted) -> None:  # noqa: ANN001
    train, _ = planted
    ledger = QueryLedger(budget=40)  # tighter than the config's budget: the run must stop, not overrun
    r = Tuner(TuneConfig(budget=500, intrinsic_dim=8, popsize=5, refiner_hidden=16)).fit(tiny_client, train, ledger=ledger)
    assert ledger.used <= 40 and r.metrics.stopped_early is not None


def test_validation_selection_never_sees_test(tiny_client, planted) -> None:  # noqa: ANN001
    train, test = planted
    val = ImageDataset(test.images[:30], test.labels[:30], test.class_names)
    cfg = TuneConfig(budget=300, seed=2, intrinsic_dim=16, popsize=8, refiner_hidden=32, val_every=5, protocol="paper")
    r = Tuner(cfg).fit(tiny_client, train, val=val)
    vals = [h.val_accuracy for h in r.history if h.val_accuracy is not None]
    assert r.metrics.val_accuracy == pytest.approx(max(vals))
    assert r.selected_generation in [h.generation for h in r.history if h.val_accuracy is not None]
    assert r.data.val_fingerprint == val.fingerprint()
    robust = Tuner(TuneConfig(**{**cfg.to_dict(), "protocol": "robust"})).fit(tiny_client, train, val=val)
    assert robust.selection is not None and robust.selection.n_check == len(val)  # the validation set is the check set
    assert robust.data.val_fingerprint == val.fingerprint() and robust.data.n_search == len(train)


def test_text_only_client_searches_words_not_offsets(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(0)
    proto = rng.normal(size=(3, 5))

    def fn(images, names, template, offsets):  # noqa: ANN001
        x = np.stack([np.asarray(im, np.float32).mean(axis=(0, 1))[:3] for im in images]) / 255.0
        return (x @ proto)[:, : len(names)] * 3

    client = CallableClient(fn, Capabilities("text-only-model"))
    imgs = block_images(80, 1)  # 80 images: enough check images that the robust plan buys a search (40 cannot certify)
    labels = np.asarray([int(np.asarray(im)[0, 0, 0] > 127) for im in imgs])
    ds = ImageDataset(imgs, labels, ("dark", "light"))
    with caplog.at_level("WARNING"):
        r = Tuner(TuneConfig(mode="craft", budget=50, popsize=4, refiner_hidden=16)).fit(client, ds)
    # the discrete prompt space (tuner/discrete.py): no offsets; this client ignores the words, so the search is inert
    assert r.config.mode == "craft" and r.z is None and r.offset is None and "inert" in caplog.text
    assert Tuner(TuneConfig(mode="pg", budget=50, popsize=4)).fit(client, ds).config.template == "a photo of a"


def test_probability_clients_are_tuned_on_log_probs() -> None:
    def fn(images, names, template, offsets):  # noqa: ANN001
        x = np.stack([np.asarray(im, np.float32).mean(axis=(0, 1))[:2] for im in images])
        e = np.exp(x / 40.0)
        return e / e.sum(-1, keepdims=True)

    client = CallableClient(fn, Capabilities("probs-model", output="probs"))
    imgs = block_images(30, 2)
    ds = ImageDataset(imgs, np.asarray([int(np.argmax(np.asarray(im, np.float32).mean(axis=(0, 1))[:2])) for im in imgs]), ("r", "g"))
    r = Tuner(TuneConfig(mode="pr", budget=50, refiner_hidden=16)).fit(client, ds)
    assert r.metrics.zero_shot_train_accuracy == 1.0
    assert Adapter.from_result(r).config.output == "probs"


def test_prompt_search_isolates_global_rng() -> None:
    np.random.seed(123)
    before = np.random.random()
    np.random.seed(123)
    s = PromptSearch(dim=6, popsize=4, sigma0=0.5, seed=0)
    z = s.ask()
    s.tell(z, (z**2).sum(1))
    assert np.random.random() == before  # pycma did not consume the caller's stream
    # replay reproduces the state exactly
    s1 = PromptSearch(dim=6, popsize=4, sigma0=0.5, seed=1)
    rows = []
    for _ in range(5):
        z = s1.ask()
        f = (z**2).sum(1)
        s1.tell(z, f)
        rows.append(f)
    s2 = PromptSearch(dim=6, popsize=4, sigma0=0.5, seed=1)
    s2.replay(np.stack(rows), s1.ask_digests)
    np.testing.assert_array_equal(s1.mean, s2.mean)
    np.testing.assert_array_equal(s1.ask(), s2.ask())


def test_prompt_search_minimises_a_planted_quadratic() -> None:
    target = np.random.default_rng(0).normal(size=10)
    s = PromptSearch(dim=10, popsize=10, sigma0=1.0, seed=0)
    for _ in range(120):
        z = s.ask()
        s.tell(z, ((z - target) ** 2).sum(1))
    assert np.abs(s.mean - target).max() < 1e-2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mode="bbt"), "mode"),
        (dict(budget=0), "budget"),
        (dict(popsize=1), "popsize"),
        (dict(sigma0=-1.0), "sigma0"),
        (dict(lam=-0.1), "lam"),
        (dict(selection="first"), "selection"),
        (dict(template="  "), "template"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TuneConfig(**kwargs)


def test_config_from_dict_rejects_typos() -> None:
    with pytest.raises(ConfigError, match="unknown tuning option"):
        TuneConfig.from_dict({"budgett": 10})
    assert TuneConfig.from_dict(TuneConfig(budget=10).to_dict()) == TuneConfig(budget=10)

