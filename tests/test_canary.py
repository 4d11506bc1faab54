"""Drift canaries: recorded at tune time, checked by check_canary / ``craft-sdk check`` / CraftClassifier.

Real boxes only: tiny open_clip local-dir models (weights perturbed, another init, another
preprocessing), our server on loopback, the zero-shot API route with a changed hidden template.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import CLASS_NAMES, random_images, save_tiny_model
from typer.testing import CliRunner

from craft_sdk import (
    Adapter,
    AdapterError,
    BaseClient,
    ClassifierConfig,
    ConfigError,
    CraftClassifier,
    DriftError,
    ImageDataset,
    QueryLedger,
    TuneConfig,
    check_canary,
)
from craft_sdk.adapter import CONFIG_FILE, WEIGHTS_FILE
from craft_sdk.client.canary import probe_images, splitmix64

pytest.importorskip("torch")
pytest.importorskip("cma")
from craft_sdk.client.openclip import OpenCLIPClient  # noqa: E402
from craft_sdk.tuner.plan import plan_generations  # noqa: E402
from craft_sdk.tuner.train import Tuner  # noqa: E402

# paper protocol: the deployed prompt is the searched offset and a refiner (the canary is taken under both)
CFG = TuneConfig(mode="craft", budget=40, seed=1, intrinsic_dim=16, popsize=6, refiner_hidden=32, canary=8, protocol="paper")


def train_set() -> ImageDataset:
    labels = np.arange(24) % len(CLASS_NAMES)
    return ImageDataset(random_images(24, seed=3), labels, CLASS_NAMES)


@pytest.fixture(scope="module")
def tuned(tiny_client: Any) -> tuple[Adapter, Any]:
    result = Tuner(CFG).fit(tiny_client, train_set(), None)
    return Adapter.from_result(result), result


@pytest.fixture(scope="module")
def saved(tuned: tuple[Adapter, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tuned[0].save_pretrained(tmp_path_factory.mktemp("canary") / "adapter")


def variant(src: Path, dst: Path, preprocess: dict | None = None, eps: float = 0.0) -> OpenCLIPClient:
    """A copy of a local-dir model with its preprocessing changed and/or every weight perturbed by ``eps`` x its std."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    if preprocess:
        cfg = json.loads((dst / "open_clip_config.json").read_text())
        cfg["preprocess_cfg"].update(preprocess)
        (dst / "open_clip_config.json").write_text(json.dumps(cfg))
    if eps:
        rng = np.random.default_rng(0)
        state = load_file(str(src / "open_clip_model.safetensors"))
        state = {k: (v + eps * v.std() * rng.standard_normal(v.shape).astype(v.dtype)) if v.dtype.kind == "f" and v.size > 1 else v
                 for k, v in state.items()}
        save_file(state, str(dst / "open_clip_model.safetensors"))
    return OpenCLIPClient(f"local-dir:{dst}")


# ------------------------------------------------------------------ probes


def test_probes_are_regenerated_from_the_seed_by_a_pinned_generator() -> None:
    assert [hex(int(v)) for v in splitmix64(0, 3)] == ["0xe220a8397b1dcdaf", "0x6e789e6aa1b965f4", "0x6c45d188009454f"]
    assert np.array_equal(splitmix64(5, 2, start=1), splitmix64(5, 3)[1:])
    a, b, other = probe_images(7, 3), probe_images(7, 3), probe_images(8, 3)
    assert [im.size for im in a] == [(64, 48)] * 3 and all(im.mode == "RGB" for im in a)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(other[0])) and not np.array_equal(np.asarray(a[0]), np.asarray(a[1]))
    assert np.asarray(probe_images(0, 1)[0])[0, 0].tolist() == [224, 92, 25]  # the generator never changes
    pixels = np.asarray(a[0]).astype(float)
    assert 90 < pixels.mean() < 165 and pixels.std() > 40  # varied, not flat


# ------------------------------------------------------------------ recording


def test_canary_is_recorded_and_costs_what_it_states(tuned: tuple[Adapter, Any]) -> None:
    adapter, result = tuned
    spec = adapter.config.canary
    assert spec is not None and spec.n_probes == 8 and spec.seed == CFG.seed and spec.queries == 2
    assert adapter.canary_scores is not None and adapter.canary_scores.shape == (8, len(CLASS_NAMES))
    assert result.queries.counts["canary"] == spec.queries  # 1 canary + 1 noise repeat, in its own category
    assert result.queries.used <= CFG.budget and adapter.config.provenance["queries"]["canary"] == 2
    assert spec.noise == 0.0 and spec.unit == spec.floor > 0  # a local model is bit-exact: the floor is the unit
    assert adapter.offset is not None and adapter.refiner is not None  # taken under the searched offset


def test_the_plan_reserves_the_canary_inside_the_budget() -> None:
    fits_five = 1 + 5 * (CFG.popsize + 1)  # baseline + 5 generations: nothing left for a canary
    without = TuneConfig(**{**CFG.to_dict(), "canary": 0, "budget": fits_five})
    with_canary = TuneConfig(**{**CFG.to_dict(), "budget": fits_five})
    assert plan_generations(without, False) == 5 and plan_generations(with_canary, False) == 4


def test_saved_canary_round_trips_and_old_adapters_still_load(tuned: tuple[Adapter, Any], saved: Path, tmp_path: Path,
                                                              tiny_client: Any) -> None:
    adapter, _ = tuned
    loaded = Adapter.from_pretrained(saved)
    assert loaded.config.canary == adapter.config.canary and np.array_equal(loaded.canary_scores, adapter.canary_scores)
    assert loaded.fingerprint() == adapter.fingerprint() and json.loads((saved / CONFIG_FILE).read_text())["format_version"] == 1
    old = Adapter(adapter.config.__class__(**{**adapter.config.__dict__, "canary": None}), adapter.z, adapter.offset, adapter.refiner)
    old.save_pretrained(tmp_path / "old")
    assert "canary" not in json.loads((tmp_path / "old" / CONFIG_FILE).read_text())  # same bytes as before canaries
    report = check_canary(Adapter.from_pretrained(tmp_path / "old"), tiny_client)
    assert not report.recorded and not report.drifted and report.queries_used == 0 and "no canary recorded" in report.summary()
    from craft_sdk.cli import app

    gate = CliRunner().invoke(app, ["check", str(tmp_path / "old"), "--model", "demo", "--fail-on-drift"])  # a gate that checks nothing
    assert gate.exit_code == 1 and "--canary N" in gate.output and len(gate.output.strip().splitlines()) == 1, gate.output
    assert CliRunner().invoke(app, ["check", str(tmp_path / "old"), "--model", "demo"]).exit_code == 0  # without the gate: says so


def test_corrupt_canaries_are_refused(saved: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    broken = tmp_path / "shape"
    shutil.copytree(saved, broken)
    tensors = load_file(str(broken / WEIGHTS_FILE))
    tensors["canary_scores"] = tensors["canary_scores"][:3]
    save_file(tensors, str(broken / WEIGHTS_FILE))
    with pytest.raises(AdapterError, match="canary_scores has shape"):
        Adapter.from_pretrained(broken)
    bad = tmp_path / "gen"
    shutil.copytree(saved, bad)
    cfg = json.loads((bad / CONFIG_FILE).read_text())
    cfg["canary"]["generator"] = "mersenne"
    (bad / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="unknown canary generator"):
        Adapter.from_pretrained(bad)
    with pytest.raises(ConfigError, match="canary"):
        TuneConfig(canary=-1)


# ------------------------------------------------------------------ checking


def test_same_box_100_checks_no_false_alarm(tuned: tuple[Adapter, Any], tiny_model_dir: Path) -> None:
    adapter, _ = tuned
    ledger = QueryLedger()
    box = OpenCLIPClient(f"local-dir:{tiny_model_dir}")  # a fresh load of the same model
    reports = [check_canary(adapter, box, ledger=ledger) for _ in range(100)]
    assert not any(r.drifted for r in reports) and max(r.distance for r in reports) < 0.5
    assert all(r.agreement == 1.0 and r.probability_change < 1e-4 and r.queries_used == 1 for r in reports)
    assert ledger.counts["canary"] == 100 and ledger.used == 100


@pytest.mark.parametrize(
    "change",
    [
        {"eps": 1e-2},  # weights perturbed by 1 % of each tensor's std
        {"eps": 2e-3},  # ... by 0.2 % (the smallest detected is about 0.1 %: BENCHMARKS.md)
        {"preprocess": {"mean": [0.48, 0.46, 0.41], "std": [0.27, 0.26, 0.28]}},  # normalisation
        {"preprocess": {"interpolation": "bilinear"}},  # resize interpolation
        {"preprocess": {"resize_mode": "squash"}},  # resize: squash instead of centre crop
    ],
    ids=["weights-1e-2", "weights-2e-3", "normalisation", "interpolation", "resize-mode"],
)
def test_drift_is_detected(tuned: tuple[Adapter, Any], tiny_model_dir: Path, tmp_path: Path, change: dict) -> None:
    adapter, _ = tuned
    report = check_canary(adapter, variant(tiny_model_dir, tmp_path / "drifted", **change))
    assert report.recorded and report.drifted and report.distance > report.tolerance == 3.0
    assert report.advice != "nothing to do"


def test_another_checkpoint_is_detected_and_the_effect_estimated(tuned: tuple[Adapter, Any], tmp_path: Path) -> None:
    adapter, _ = tuned
    other = OpenCLIPClient(f"local-dir:{save_tiny_model(tmp_path / 'other', seed=1)}")
    report = check_canary(adapter, other)
    assert report.drifted and report.distance > 100 and report.agreement < 0.9 and report.probability_change > 0.05
    assert report.advice.startswith("re-tune") and report.tuned_model_id != report.model_id


# ------------------------------------------------------------------ deployment


def test_classifier_checks_before_the_first_batch_and_every_n(tuned: tuple[Adapter, Any], tiny_client: Any) -> None:
    adapter, _ = tuned
    clf = CraftClassifier.from_adapter(adapter, tiny_client, config=ClassifierConfig(batch_size=2, canary_every=2))
    clf.predict(random_images(9, seed=4))  # 5 batches: checks before batches 1, 3 and 5
    assert clf.ledger.counts["canary"] == 3 and clf.ledger.counts["predict"] == 5
    assert clf.canary_report_ is not None and not clf.canary_report_.drifted
    with pytest.raises(ConfigError, match="on_drift"):
        ClassifierConfig(on_drift="ignore")
    with pytest.raises(ConfigError, match="canary_every"):
        ClassifierConfig(canary_every=-1)


def test_classifier_raises_or_warns_on_drift(tuned: tuple[Adapter, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    adapter, _ = tuned
    drifted = OpenCLIPClient(f"local-dir:{save_tiny_model(tmp_path / 'other', seed=2)}")
    strict = ClassifierConfig(batch_size=4, canary_every=10, allow_model_mismatch=True)
    clf = CraftClassifier.from_adapter(adapter, drifted, config=strict)
    with pytest.raises(DriftError, match="craft-sdk check"):
        clf.predict(random_images(4, seed=4))
    assert clf.ledger.counts["predict"] == 0 and clf.ledger.counts["canary"] == 1  # nothing sent after the alarm
    with pytest.raises(DriftError):  # still refused until a later check passes
        clf.predict(random_images(4, seed=4))
    lenient = ClassifierConfig(batch_size=4, canary_every=10, allow_model_mismatch=True, on_drift="warn")
    clf = CraftClassifier.from_adapter(adapter, drifted, config=lenient)
    with caplog.at_level(logging.WARNING, logger="craft_sdk.deploy.classifier"):
        assert len(clf.predict(random_images(8, seed=4))) == 8
    assert sum("craft-sdk check" in r.getMessage() for r in caplog.records) == 1 and clf.ledger.counts["canary"] == 1


def test_ensemble_canary_costs_two_queries_per_context(tiny_client: Any) -> None:
    cfg = TuneConfig(mode="ensemble", budget=60, seed=0, template_bank="clip-selected", ensemble_k=2, canary=4, protocol="paper")
    result = Tuner(cfg).fit(tiny_client, train_set(), None)
    adapter = Adapter.from_result(result)
    k = len(adapter.contexts)
    assert k == 2 and adapter.config.canary.queries == 2 * k == result.queries.counts["canary"]
    report = check_canary(adapter, tiny_client)
    assert not report.drifted and report.queries_used == k


# ------------------------------------------------------------------ the command


def test_check_command(saved: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    from craft_sdk.cli import app

    runner = CliRunner()
    same = runner.invoke(app, ["check", str(saved), "--model", f"local-dir:{tiny_model_dir}", "--json", "--fail-on-drift"])
    assert same.exit_code == 0, same.output
    out = json.loads(same.stdout)
    assert out["drifted"] is False and out["distance"] == 0.0 and out["tolerance"] == 3.0 and out["queries_used"] == 1
    other = save_tiny_model(tmp_path / "other", seed=3)
    drift = runner.invoke(app, ["check", str(saved), "--model", f"local-dir:{other}", "--json", "--fail-on-drift"])
    assert drift.exit_code == 3 and json.loads(drift.stdout)["drifted"] is True
    plain = runner.invoke(app, ["check", str(saved), "--model", f"local-dir:{other}"])
    assert plain.exit_code == 0 and "advice" in plain.stdout and "distance" in plain.stdout
    assert runner.invoke(app, ["check", str(tmp_path / "missing"), "--model", f"local-dir:{other}"]).exit_code == 1
    assert runner.invoke(app, ["check", str(saved)]).exit_code == 2  # --model is required
    described = runner.invoke(app, ["inspect", str(saved), "--json"])
    assert described.exit_code == 0 and json.loads(described.stdout)["canary"]["n_probes"] == 8


# ------------------------------------------------------------------ over the wire


KEY = secrets.token_hex(16)


class HiddenTemplate(BaseClient):
    """A provider that wraps every context in a hidden prompt before its model sees it."""

    def __init__(self, model: Any, hidden: str) -> None:
        super().__init__()
        self.model, self.hidden = model, hidden

    def capabilities(self, template: str = "a photo of a") -> Any:
        return self.model.capabilities(template)

    def _predict_images(self, prepared: Any, class_names: list[str], template: str, offsets: Any) -> np.ndarray:
        return self.model.predict(prepared, class_names, f"{self.hidden}{template}", offsets)


def test_over_http_no_false_alarm(tuned: tuple[Adapter, Any], tiny_model_dir: Path) -> None:
    pytest.importorskip("fastapi")
    from craft_sdk.client.http import HTTPClient
    from craft_sdk.serve import BackgroundServer, create_app

    adapter, _ = tuned
    model = OpenCLIPClient(f"local-dir:{tiny_model_dir}")
    with BackgroundServer(create_app(model, {"alice": KEY})) as srv, HTTPClient(srv.url, api_key=KEY) as client:
        reports = [check_canary(adapter, client) for _ in range(20)]
        assert client.usage()["used"] == 20  # the server billed what the checks state
    assert not any(r.drifted for r in reports) and all(r.queries_used == 1 for r in reports)


def test_text_only_server_hidden_template_change_is_detected(tiny_model_dir: Path) -> None:
    pytest.importorskip("fastapi")
    from craft_sdk import create_client
    from craft_sdk.serve import BackgroundServer, create_app

    model = OpenCLIPClient(f"local-dir:{tiny_model_dir}")
    cfg = TuneConfig(mode="zero-shot", budget=10, canary=4)
    with BackgroundServer(create_app(HiddenTemplate(model, ""), {"alice": KEY})) as before:
        client = create_client(f"zeroshot+{before.url}/v1/zero-shot/tiny", api_key=KEY)
        result = Tuner(cfg).fit(client, train_set(), None)
        adapter = Adapter.from_result(result)
        assert result.queries.counts["canary"] == 2 and adapter.config.output == "probs"
        assert not any(check_canary(adapter, client).drifted for _ in range(5))
    with BackgroundServer(create_app(HiddenTemplate(model, "itap of "), {"alice": KEY})) as after:
        report = check_canary(adapter, create_client(f"zeroshot+{after.url}/v1/zero-shot/tiny", api_key=KEY))
    assert report.drifted and report.distance > 10 * report.tolerance  # a changed hidden prompt moves every score


@pytest.mark.parametrize("shape", ["chat", "embed"])
def test_hosted_clients_carry_a_canary(shape: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
    from craft_sdk import create_client
    from craft_sdk.serve import BackgroundServer, create_app

    model = OpenCLIPClient(f"local-dir:{tiny_model_dir}")
    with BackgroundServer(create_app(model, {"alice": KEY})) as srv:
        client = create_client(f"{shape}+{srv.url}/v1?model=tiny", api_key=KEY)
        result = Tuner(TuneConfig(mode="zero-shot", budget=10, canary=4)).fit(client, train_set(), None)
        adapter = Adapter.from_result(result)
        assert result.queries.counts["canary"] == adapter.config.canary.queries == 2
        assert not any(check_canary(adapter, client).drifted for _ in range(5))
    other = OpenCLIPClient(f"local-dir:{save_tiny_model(tmp_path / 'other', seed=1)}")
    with BackgroundServer(create_app(other, {"alice": KEY})) as srv:
        assert check_canary(adapter, create_client(f"{shape}+{srv.url}/v1?model=tiny", api_key=KEY)).drifted


def test_predict_command_checks_the_canary(saved: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    from craft_sdk.cli import app

    for i, im in enumerate(random_images(5, seed=9)):
        im.save(tmp_path / f"{i}.png")
    runner = CliRunner()
    args = ["predict", str(saved), str(tmp_path), "--batch-size", "2", "--canary-every", "2", "--json"]
    same = runner.invoke(app, [*args, "--model", f"local-dir:{tiny_model_dir}"])
    assert same.exit_code == 0, same.output
    assert json.loads(same.stdout)["queries_used"] == 3 + 2  # 3 batches, checks before batches 1 and 3
    other = save_tiny_model(tmp_path / "other", seed=4)
    drift = runner.invoke(app, [*args, "--model", f"local-dir:{other}", "--allow-model-mismatch"])
    assert drift.exit_code == 1 and "craft-sdk check" in drift.output
    warned = runner.invoke(app, [*args, "--model", f"local-dir:{other}", "--allow-model-mismatch", "--on-drift", "warn"])
    assert warned.exit_code == 0 and len(json.loads(warned.stdout)["predictions"]) == 5
    assert runner.invoke(app, [*args, "--model", f"local-dir:{other}", "--on-drift", "ignore"]).exit_code == 2


def test_text_only_view_with_searched_words(tiny_client: Any, tmp_path: Path) -> None:
    from craft_sdk.client.zeroshot import TextOnlyClient

    cfg = TuneConfig(mode="pg", budget=30, seed=0, popsize=6, canary=4, protocol="paper")
    result = Tuner(cfg).fit(TextOnlyClient(tiny_client), train_set(), None)
    adapter = Adapter.from_result(result)
    assert adapter.config.prompt.kind == "discrete" and result.queries.counts["canary"] == 2
    ledger = QueryLedger()
    assert not any(check_canary(adapter, TextOnlyClient(tiny_client), ledger=ledger).drifted for _ in range(10))
    assert ledger.counts["canary"] == 10
    other = TextOnlyClient(OpenCLIPClient(f"local-dir:{save_tiny_model(tmp_path / 'other', seed=5)}"))
    assert check_canary(adapter, other).drifted


def test_a_noisy_box_sets_its_own_tolerance() -> None:
    """A box whose answers carry run-to-run noise: the unit is the measured noise, not the floor."""
    from craft_sdk import AdapterConfig, CallableClient, Capabilities
    from craft_sdk.client.canary import record_canary

    rng = np.random.default_rng(0)
    names = ("a", "b", "c", "d")

    def box(gain: float) -> CallableClient:
        def scores(ims: list, cls: list, template: str, offsets: Any) -> np.ndarray:
            feats = np.stack([np.asarray(im, np.float32)[::8, ::8].reshape(-1)[:12] / 255.0 for im in ims])  # [N, 12]
            w = np.cos(np.arange(12 * len(cls)).reshape(len(cls), 12))
            return gain * 5.0 * feats @ w.T + rng.normal(0.0, 0.05, (len(ims), len(cls)))  # noise on every call
        return CallableClient(scores, Capabilities("noisy-box"))

    record = record_canary(box(1.0), names, ("a photo of a",), None, "logits", 16, 0)
    assert record.spec.noise > 10 * record.spec.floor and record.spec.unit == record.spec.noise
    adapter = Adapter(AdapterConfig("noisy-box", names, "a photo of a", canary=record.spec), canary_scores=record.scores)
    same = [check_canary(adapter, box(1.0)) for _ in range(100)]
    assert not any(r.drifted for r in same) and max(r.distance for r in same) < 2.0
    assert check_canary(adapter, box(1.5)).drifted  # a change of the box well above its noise stands out


def test_a_small_canary_raises_no_false_alarm() -> None:
    """1 probe over 2 classes: the unit is one centred difference, so with tolerance 3 an unchanged noisy box
    alarmed in about 18% of recordings; the tolerance derived from F(d, d) keeps false alarms near 1e-4."""
    from craft_sdk import AdapterConfig, CallableClient, Capabilities
    from craft_sdk.client.canary import canary_tolerance, record_canary

    rng = np.random.default_rng(0)
    names = ("a", "b")

    def scores(ims: list, cls: list, template: str, offsets: Any) -> np.ndarray:
        return np.tile([[2.0, -1.0]], (len(ims), 1)) + rng.normal(0.0, 0.05, (len(ims), len(cls)))  # noise on every call

    box = CallableClient(scores, Capabilities("noisy-box"))
    alarms = 0
    for _ in range(300):
        record = record_canary(box, names, ("a photo of a",), None, "logits", 1, 0)
        assert record.spec.tolerance == canary_tolerance(1, 2) > 100
        adapter = Adapter(AdapterConfig("noisy-box", names, "a photo of a", canary=record.spec), canary_scores=record.scores)
        alarms += check_canary(adapter, box).drifted
    assert alarms <= 2
    assert canary_tolerance(16, 6) == canary_tolerance(14, 2) == 3.0 and canary_tolerance(13, 2) > 3.0


def test_the_same_embed_client_sees_a_box_changed_in_place(tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
    import torch

    from craft_sdk import create_client
    from craft_sdk.serve import BackgroundServer, create_app

    model = OpenCLIPClient(f"local-dir:{save_tiny_model(tmp_path / 'm', seed=0)}")
    with BackgroundServer(create_app(model, {"alice": KEY})) as srv:
        client = create_client(f"embed+{srv.url}/v1?model=tiny", api_key=KEY)
        adapter = Adapter.from_result(Tuner(TuneConfig(mode="zero-shot", budget=10, canary=4)).fit(client, train_set(), None))
        assert not check_canary(adapter, client).drifted
        with torch.no_grad():  # the provider changes the weights behind the same endpoint
            g = torch.Generator().manual_seed(0)
            for p in model.model.parameters():
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
        assert check_canary(adapter, create_client(f"embed+{srv.url}/v1?model=tiny", api_key=KEY)).drifted  # a new client sees it
        assert check_canary(adapter, client).drifted  # the client that served the adapter (CraftClassifier's) does not
