"""The robust protocol (issue 10): zero-shot fallback, query-free selection, early stopping,
calibration, the paper protocol's byte identity, one generation-cost rule, inert prompts."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from craft_sdk import Adapter, CallableClient, Capabilities, ImageDataset, QueryLedger, TuneConfig

pytest.importorskip("torch")
pytest.importorskip("cma")
from craft_sdk.tuner import selection  # noqa: E402
from craft_sdk.tuner.plan import baseline_cost, generation_cost, plan_generations  # noqa: E402
from craft_sdk.tuner.train import Tuner  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
CLASSES = ("cat", "dog", "car", "tree", "boat", "lamp")
N_CTX, CTX_DIM = 2, 8


def _features(images: list) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float32)[::8, ::8].reshape(-1) / 255.0 for im in images])


class SyntheticBox:
    """A cheap black box: logits = scale · (W x) + offsets @ M, so a prompt acts as a learned class bias."""

    def __init__(self, seed: int = 0, ignore_offsets: bool = False) -> None:
        rng = np.random.default_rng(seed)
        self.w = rng.normal(0, 1, (len(CLASSES), 48)).astype(np.float32)
        self.m = rng.normal(0, 1, (N_CTX * CTX_DIM, len(CLASSES))).astype(np.float32)
        self.ignore_offsets = ignore_offsets
        self.calls = 0

    def raw(self, images: list) -> np.ndarray:
        return 3.0 * _features(images) @ self.w.T

    def __call__(self, images: list, names: list, template: str, offsets: np.ndarray | None) -> np.ndarray:
        self.calls += 1
        base = self.raw(images)
        if offsets is None:
            return base
        shift = np.asarray(offsets, np.float32).reshape(offsets.shape[0], -1) @ self.m
        if self.ignore_offsets:
            shift = np.zeros_like(shift)
        return base[None] + shift[:, None, :]

    def client(self) -> CallableClient:
        caps = Capabilities("synthetic-box", n_ctx=N_CTX, ctx_dim=CTX_DIM, ctx_rms=1.0)
        return CallableClient(self, caps)


def _images(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((32, 32), Image.NEAREST) for _ in range(n)]


def _balanced(images: list, scores: np.ndarray, per_class: int) -> tuple[list, np.ndarray]:
    labels = scores.argmax(-1)
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(len(CLASSES))])
    return [images[i] for i in keep], labels[keep]


@pytest.fixture(scope="module")
def planted_bias() -> tuple[SyntheticBox, ImageDataset, ImageDataset]:
    """Labels = argmax(raw + hidden bias): zero-shot is poor, a prompt that learns the bias recovers them."""
    box = SyntheticBox(0)
    images = _images(3000, 1)
    bias = np.array([6.0, -4.0, 3.0, -5.0, 4.0, -3.0], np.float32)
    scores = box.raw(images) + bias
    imgs, labels = _balanced(images, scores, 24)
    order = np.random.default_rng(0).permutation(len(labels))
    train_idx, test_idx = order[: len(order) // 2], order[len(order) // 2 :]
    train = ImageDataset([imgs[i] for i in train_idx], labels[train_idx], CLASSES)
    test = ImageDataset([imgs[i] for i in test_idx], labels[test_idx], CLASSES)
    return box, train, test


def _test_accuracy(box: SyntheticBox, adapter: Adapter, test: ImageDataset) -> float:
    offsets = None if adapter.offset is None else adapter.offset[None]
    out = box(test.images, list(CLASSES), "", offsets)
    logits = out if offsets is None else out[0]
    return float((adapter.refine(logits).argmax(-1) == test.labels).mean())


SMALL = {"intrinsic_dim": 16, "popsize": 10, "refiner_hidden": 32, "seed": 3}
# issue 23: with ~9 images per class a 25 % hold-out leaves too few certify images for any prompt gain the
# plan counts on (the run would not search); half of them held out makes a searched prompt certifiable
SMALL["holdout"] = 0.5


# ------------------------------------------------------------------ fallback and frugality


def test_nothing_can_help_ends_in_the_zero_shot_fallback(planted_bias) -> None:  # noqa: ANN001
    """Training labels independent of the images: no behaviour may replace zero-shot."""
    box, train, _ = planted_bias
    labels = np.random.default_rng(5).permutation(train.labels)
    noise = ImageDataset(train.images, labels, CLASSES)
    result = Tuner(TuneConfig(mode="craft", budget=600, **SMALL)).fit(box.client(), noise)
    adapter = Adapter.from_result(result)
    assert result.selection is not None and result.selection.deployed == "zero-shot"
    assert "zero-shot behaviour deployed" in result.selection.reason
    assert adapter.config.prompt is None and adapter.config.refiner is None and adapter.offset is None
    assert adapter.config.provenance["selection"]["deployed"] == "zero-shot"
    assert set(result.selection.estimates) == {"zero-shot", "prompt", "prompt+refiner", "refiner"}


def test_selection_and_calibration_spend_no_query(planted_bias) -> None:  # noqa: ANN001
    box, train, _ = planted_bias
    box.calls = 0
    ledger = QueryLedger(800)
    cfg = TuneConfig(mode="craft", budget=800, patience=None, **SMALL)
    result = Tuner(cfg).fit(box.client(), train, ledger=ledger)
    generations = len(result.history) - 1
    assert generations == result.n_generations == plan_generations(cfg, has_val=False)
    # exactly the baseline + P + 1 per generation: cross-validation, the decision and the temperature cost nothing
    assert ledger.used == 1 + generations * (cfg.popsize + 1)
    assert box.calls == 1 + 2 * generations  # one batched population call + the mean's, per generation
    assert {k: v for k, v in ledger.counts.items() if v} == {"refine": 1 + generations, "search": generations * cfg.popsize}
    assert result.temperature is not None and result.selection.temperature == pytest.approx(result.temperature, abs=1e-6)


def test_early_stopping_on_an_easy_planted_task_spends_under_half(planted_bias) -> None:  # noqa: ANN001
    box, train, test = planted_bias
    cfg = TuneConfig(mode="pg", budget=3000, **SMALL)
    result = Tuner(cfg).fit(box.client(), train)
    adapter = Adapter.from_result(result)
    assert result.queries.used < 0.5 * cfg.budget
    assert result.metrics.stopped.startswith("stopped: no held-out improvement for")
    assert result.selection.deployed == "prompt"
    assert _test_accuracy(box, adapter, test) > 0.8  # recovered the hidden bias
    zero = Adapter.from_result(Tuner(TuneConfig(mode="zero-shot", budget=10, **SMALL)).fit(box.client(), train))
    assert _test_accuracy(box, zero, test) < 0.6


def test_robust_pr_trains_the_refiner_whatever_the_budget(planted_bias) -> None:  # noqa: ANN001
    """Issue 11 item 5: the refiner's training length is chosen by CV, not by the budget."""
    box, train, test = planted_bias
    result = Tuner(TuneConfig(mode="pr", budget=5, **SMALL)).fit(box.client(), train)
    assert result.queries.used == 1
    assert result.selection.deployed == "refiner" and result.selection.refiner["epochs"] > 0
    adapter = Adapter.from_result(result)
    assert _test_accuracy(box, adapter, test) > 0.7


def test_inert_prompt_search_stops_and_keeps_the_refiner(planted_bias, caplog: pytest.LogCaptureFixture) -> None:  # noqa: ANN001
    """Issue 11 item 6: a client that claims soft prompts but ignores them must not burn the budget."""
    box, train, _ = planted_bias
    inert = SyntheticBox(0, ignore_offsets=True)
    with caplog.at_level(logging.WARNING):
        result = Tuner(TuneConfig(mode="craft", budget=2000, **SMALL)).fit(inert.client(), train)
    assert result.queries.used == 1 + 3 * (SMALL["popsize"] + 1)
    assert "inert" in result.metrics.stopped
    assert sum("inert" in r.getMessage() for r in caplog.records) == 1
    assert result.selection.deployed in ("refiner", "zero-shot")
    assert result.selection.deployed == "refiner"  # the bias is learnable from logits alone


def test_robust_run_resumes_to_the_same_adapter(planted_bias, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    box, train, _ = planted_bias
    cfg = TuneConfig(mode="craft", budget=500, **SMALL)
    ref = Adapter.from_result(Tuner(cfg).fit(box.client(), train))
    import craft_sdk.tuner.loop as loop

    original = loop._generation
    calls = {"n": 0}

    def crash(state, io, g):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt
        return original(state, io, g)

    monkeypatch.setattr(loop, "_generation", crash)
    with pytest.raises(KeyboardInterrupt):
        Tuner(cfg, checkpoint_dir=tmp_path / "ck").fit(box.client(), train)
    monkeypatch.setattr(loop, "_generation", original)
    resumed = Adapter.from_result(Tuner(cfg, checkpoint_dir=tmp_path / "ck", resume=True).fit(box.client(), train))
    assert resumed.tensors().keys() == ref.tensors().keys()
    for k, v in ref.tensors().items():
        assert resumed.tensors()[k].tobytes() == v.tobytes(), k
    assert resumed.config.calibration == ref.config.calibration
    assert resumed.config.provenance["selection"] == ref.config.provenance["selection"]


# ------------------------------------------------------------------ selection pieces


def test_temperature_recovers_a_planted_overconfidence() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2.0, (4000, 5))
    labels = np.array([rng.choice(5, p=np.exp(r) / np.exp(r).sum()) for r in logits])
    t = selection.fit_temperature(logits * 3.0, labels)  # the model is 3x overconfident
    assert t == pytest.approx(3.0, rel=0.1)
    probs = np.exp(logits * 3.0 / t) / np.exp(logits * 3.0 / t).sum(-1, keepdims=True)
    raw = np.exp(logits * 3.0) / np.exp(logits * 3.0).sum(-1, keepdims=True)
    assert selection.expected_calibration_error(probs, labels) < 0.03 < selection.expected_calibration_error(raw, labels)
    assert selection.fit_temperature(logits[:19] * 3.0, labels[:19]) == 1.0  # too few held-out predictions to fit


def test_decision_needs_a_gain_beyond_noise() -> None:
    """Certified on every check image with an exact sign test (Holm over the options)."""
    y = np.arange(40) % 4
    zero = np.eye(4)[(y + 1) % 4]  # zero-shot is always wrong
    zero[:20] = np.eye(4)[y[:20]]  # ... except on the first half
    lucky = zero.copy()
    lucky[20] = np.eye(4)[y[20]]  # one more image right: noise
    strong = np.eye(4)[y]  # 20 more images right
    ev = {"zero-shot": (zero, zero, y), "prompt": (lucky, zero, y)}
    opt, reason, est = selection.decide(ev, ev, 0.05)
    assert opt == "zero-shot" and "beyond noise" in reason and est["prompt"]["gain"] == pytest.approx(1 / 40)
    assert est["prompt"]["p_value"] == 0.5 and est["prompt"]["b"] == 1 and not est["prompt"]["certified"]
    ev["refiner"] = (strong, zero, y)
    opt, _, est = selection.decide(ev, ev, 0.05)
    assert opt == "refiner" and est["refiner"]["p_value"] == pytest.approx(0.5**20)


def test_sign_test_and_min_flips_are_exact() -> None:
    assert selection.sign_test_p(5, 0) == 1 / 32 and selection.sign_test_p(4, 0) == 1 / 16
    assert selection.sign_test_p(7, 1) == pytest.approx(9 / 256) and selection.sign_test_p(0, 3) == 1.0
    assert selection.min_flips(0.05) == 5 and selection.min_flips(0.025) == 6
    assert selection.alpha_of(1.645) == pytest.approx(0.05, abs=1e-4)
    assert selection.holm({"a": 0.02, "b": 0.04}, 0.05) == {"a", "b"}  # 0.02 <= 0.025, then 0.04 <= 0.05
    assert selection.holm({"a": 0.03, "b": 0.04}, 0.05) == set()  # 0.03 > 0.025 stops the procedure


def test_split_holdout_is_stratified_and_seeded() -> None:
    y = np.repeat(np.arange(5), 16)
    fit, check = selection.split_holdout(y, 0.25, 0)
    assert len(check) == 20 and np.bincount(y[check]).tolist() == [4] * 5
    assert not set(fit) & set(check) and len(fit) + len(check) == len(y)
    assert np.array_equal(check, selection.split_holdout(y, 0.25, 0)[1])
    one_shot = selection.split_holdout(np.arange(10), 0.25, 0)[1]
    assert len(one_shot) == 3


# ------------------------------------------------------------------ generation cost (issue 11 item 3)


@pytest.mark.parametrize("popsize", [2, 10, 40])
@pytest.mark.parametrize("has_val", [False, True])
@pytest.mark.parametrize("protocol", ["paper", "robust"])
def test_planned_generations_are_affordable_and_maximal(popsize: int, has_val: bool, protocol: str) -> None:
    for budget in range(baseline_cost(TuneConfig(protocol=protocol), has_val), 10001):
        cfg = TuneConfig(budget=budget, popsize=popsize, val_every=10, protocol=protocol, intrinsic_dim=4)
        n = plan_generations(cfg, has_val)
        total = baseline_cost(cfg, has_val) + sum(generation_cost(cfg, g, n, has_val) for g in range(1, n + 1))
        more = baseline_cost(cfg, has_val) + sum(generation_cost(cfg, g, n + 1, has_val) for g in range(1, n + 2))
        assert total <= budget < more, (budget, n, total, more)


def test_planner_and_loop_agree_where_they_used_to_differ(planted_bias) -> None:  # noqa: ANN001
    """Budget 125, popsize 40, val_every 10, validation data: the loop now runs every planned generation."""
    box, train, _ = planted_bias
    val = ImageDataset(train.images[:12], train.labels[:12], CLASSES)
    for budget in (125, 126, 167, 1000):
        cfg = TuneConfig(mode="craft", budget=budget, popsize=40, val_every=10, protocol="paper", intrinsic_dim=8, refiner_hidden=16)
        result = Tuner(cfg).fit(box.client(), train, val)
        assert len(result.history) - 1 == result.n_generations == plan_generations(cfg, True)
        assert result.metrics.stopped_early is None and result.queries.used <= budget


def test_a_budget_below_the_baseline_is_refused(planted_bias) -> None:  # noqa: ANN001
    from craft_sdk import ConfigError

    box, train, _ = planted_bias
    val = ImageDataset(train.images[:12], train.labels[:12], CLASSES)
    with pytest.raises(ConfigError, match="cannot pay the zero-shot baseline"):
        Tuner(TuneConfig(mode="craft", budget=1, protocol="paper", **SMALL)).fit(box.client(), train, val)


# ------------------------------------------------------------------ the paper protocol, byte for byte


def _paper_reference():  # noqa: ANN202
    import sys

    from safetensors.numpy import load_file

    sys.path.insert(0, str(FIXTURES))
    try:
        import make_paper_reference as ref
    finally:
        sys.path.pop(0)
    return ref, load_file(str(FIXTURES / "paper_protocol_reference.safetensors"))


# Float re-association tolerance for a reference recorded on another machine (issue 19): every element within
# REF_RTOL of its tensor's largest magnitude. Measured: the same runs at 1 and 2 torch threads on one machine
# differ by at most 2e-5 of a tensor's scale (refiner.2.weight). One extra generation moves the prompt offset
# by 16 % of its scale and every refiner tensor by 0.35-5 %; another seed moves everything by 16-130 % (test
# below). 1e-3 sits 50x above the re-association noise and 3.5x below the smallest real change.
REF_RTOL = 1e-3


def _disagreements(adapter: Adapter, reference: dict[str, np.ndarray], index: int) -> list[str]:
    got = adapter.tensors()
    want = {k.split("/", 1)[1]: v for k, v in reference.items() if k.startswith(f"case{index}/")}
    if sorted(got) != sorted(want):
        return [f"tensor names {sorted(got)} != {sorted(want)}"]
    bad = []
    for name, ref_value in want.items():
        value = np.asarray(got[name], np.float64)
        scale = float(np.abs(ref_value).max(initial=0.0))
        err = float(np.abs(value - ref_value).max(initial=0.0)) if value.shape == ref_value.shape else np.inf
        if not err <= REF_RTOL * scale + 1e-12:
            bad.append(f"{name}: max |diff| {err:.3g} > {REF_RTOL:g} x {scale:.3g}")
    return bad


def test_paper_protocol_reproduces_the_previous_default() -> None:
    """Tensors of the tuner before the robust protocol existed (tests/fixtures/make_paper_reference.py),
    compared within float re-association, since the reference was recorded on another machine."""
    ref, reference = _paper_reference()
    checked = 0
    for index, case in ref.checked_cases():
        bad = _disagreements(ref.run(case, {"protocol": "paper"}), reference, index)
        assert not bad, (case, bad)
        checked += 1
    assert checked == 5


@pytest.mark.parametrize("mutation", [{"seed": 4}, {"budget": 250 + 11}], ids=["other-seed", "one-more-generation"])
def test_the_paper_reference_comparison_catches_a_real_change(mutation: dict) -> None:
    """The tolerance is tight enough to fail on a real change of behaviour: another seed, or one more
    generation (P + 1 = 11 queries), of the craft case."""
    ref, reference = _paper_reference()
    index, case = ref.checked_cases()[0]
    assert case["mode"] == "craft"
    bad = _disagreements(ref.run({**case, **mutation}, {"protocol": "paper"}), reference, index)
    assert bad and any(name.startswith("prompt_offset") for name in bad)


def test_adapters_record_every_image_they_saw_whatever_the_entry_point(planted_bias) -> None:  # noqa: ANN001
    """Issue 11 item 2: the tuner itself records per-image digests (Tuner, api.tune, CraftClassifier.fit, demo)."""
    from craft_sdk.data import seen_fingerprints
    from craft_sdk.errors import DataError

    box, train, test = planted_bias
    val = ImageDataset(test.images[:12], test.labels[:12], CLASSES)
    result = Tuner(TuneConfig(mode="pr", budget=5, **SMALL)).fit(box.client(), train, val)
    assert Adapter.from_result(result).config.provenance["data"]["image_fingerprints"] == seen_fingerprints(train, val)
    single = ImageDataset(train.images[:4], np.zeros(4, np.int64), CLASSES)
    with pytest.raises(DataError, match="single class"):
        Tuner(TuneConfig(mode="pr", budget=5, **SMALL)).fit(box.client(), single)


def test_no_held_out_image_is_a_clean_zero_shot_decision() -> None:
    """Empty evidence (e.g. one image per class and fewer than 4 classes) decides zero-shot, JSON-safe."""
    empty = np.zeros((0, 3), np.float32)
    y = np.zeros(0, np.int64)
    ev = {"zero-shot": (empty, empty, y), "prompt": (empty, empty, y)}
    opt, reason, est = selection.decide(ev, ev, 0.05)
    assert opt == "zero-shot" and "no held-out images" in reason
    json.dumps(est, allow_nan=False)
