"""CraftClassifier: agreement with the training-time torch refiner, batching and query counting,
input kinds, construction checks, probability clients, fit, and the predict CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from craft_sdk import (
    Adapter,
    AdapterConfig,
    AdapterError,
    BudgetExceededError,
    CallableClient,
    Capabilities,
    ClassifierConfig,
    ConfigError,
    CraftClassifier,
    NotFittedError,
    QueryLedger,
    export_onnx,
    mlp,
)
from craft_sdk.adapter import ONNX_FILE, PromptSpec, RefinerSpec
from craft_sdk.cli import app
from craft_sdk.projection import project, projection_matrix

torch = pytest.importorskip("torch")

from conftest import CLASS_NAMES, random_images  # noqa: E402

from craft_sdk.tuner.refiner import Refiner  # noqa: E402

TEMPLATE = "a photo of a"


def make_adapter(model_id: str, names: tuple[str, ...] = CLASS_NAMES, prompt: tuple[int, int] | None = (4, 32),
                 output: str = "logits", hidden: int = 64) -> Adapter:
    spec = z = offset = None
    if prompt is not None:
        spec = PromptSpec(n_ctx=prompt[0], ctx_dim=prompt[1], intrinsic_dim=8, seed=5, std=0.05)
        z = np.random.default_rng(2).normal(size=8)
        offset = project(projection_matrix(5, prompt[0] * prompt[1], 8, 0.05), z, *prompt)
    weights = mlp.init_weights(len(names), hidden, 3, residual=False, seed=4)  # non-zero last layer
    cfg = AdapterConfig(model_id, names, TEMPLATE, output=output, prompt=spec, refiner=RefinerSpec(3, hidden, True))
    return Adapter(cfg, z, offset, weights)


def torch_refine(adapter: Adapter, logits: np.ndarray) -> np.ndarray:
    assert adapter.refiner is not None
    with torch.no_grad():
        return Refiner(adapter.refiner, True)(torch.from_numpy(np.asarray(logits, np.float32))).numpy()


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory, tiny_client) -> Path:  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("clf") / "adapter"
    make_adapter(tiny_client.capabilities(TEMPLATE).model_id).save_pretrained(d)
    export_onnx(d)
    return d


class Spy(CallableClient):
    """A CallableClient recording each call's batch size and offset."""

    def __init__(self, caps: Capabilities, scores: np.ndarray | None = None) -> None:
        def fn(ims, names, t, offsets):  # type: ignore[no-untyped-def]
            base = np.stack([np.asarray(im, np.float32).mean(axis=(0, 1))[[0, 1, 2] * len(names)][: len(names)] for im in ims])
            if scores is not None:
                base = np.tile(scores, (len(ims), 1))
            return base if offsets is None else base[None] + offsets.sum() * 0.0
        super().__init__(fn, caps)
        self.calls: list[tuple[int, np.ndarray | None]] = []

    def predict(self, images, class_names, template=TEMPLATE, offsets=None):  # type: ignore[no-untyped-def]
        self.calls.append((len(images), None if offsets is None else np.array(offsets)))
        return super().predict(images, class_names, template, offsets)


@pytest.mark.parametrize("backend", ["onnx", "numpy", "auto"])
def test_backends_match_torch_refiner_on_real_logits(adapter_dir: Path, tiny_client, backend: str) -> None:  # type: ignore[no-untyped-def]
    clf = CraftClassifier.from_pretrained(adapter_dir, tiny_client, config=ClassifierConfig(batch_size=7, backend=backend))
    assert clf.refiner_backend_ == ("numpy" if backend == "numpy" else "onnx")
    ims = random_images(20, seed=9)
    out = clf.predict_all(ims)
    raw = tiny_client.predict(ims, list(CLASS_NAMES), TEMPLATE, clf.adapter_.offset)
    np.testing.assert_allclose(out.raw_logits, raw, atol=1e-5)
    np.testing.assert_allclose(out.logits, torch_refine(clf.adapter_, raw), atol=1e-5, rtol=0)
    assert clf.ledger.counts["predict"] == 3  # 7 + 7 + 6 images: three queries
    probs = clf.predict_proba(ims)
    assert probs.shape == (20, 6) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
    assert clf.predict(ims).tolist() == [CLASS_NAMES[i] for i in out.logits.argmax(-1)]
    np.testing.assert_allclose(clf.decision_function(ims), out.logits, atol=1e-6)
    assert clf.ledger.counts["predict"] == 12


def test_input_kinds_agree(adapter_dir: Path, tiny_client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    clf = CraftClassifier.from_pretrained(adapter_dir, tiny_client)
    ims = random_images(5, seed=1)
    paths = []
    for i, im in enumerate(ims):
        im.save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    arrays = [np.asarray(im) for im in ims]
    ref = clf.decision_function(ims)
    for kind in (paths, [str(p) for p in paths], arrays, np.stack(arrays)):
        np.testing.assert_allclose(clf.decision_function(kind), ref, atol=1e-6)


def test_offset_is_sent_once_per_batch_and_none_without_prompt() -> None:
    caps = Capabilities("spy/1", n_ctx=4, ctx_dim=32)
    client = Spy(caps)
    clf = CraftClassifier.from_adapter(make_adapter("spy/1", names=("a", "b", "c")), client, config=ClassifierConfig(batch_size=4))
    clf.predict(random_images(9, seed=0))
    assert [n for n, _ in client.calls] == [4, 4, 1]
    for _, sent in client.calls:
        np.testing.assert_array_equal(sent, clf.adapter_.offset)
    client2 = Spy(caps)
    clf2 = CraftClassifier.from_adapter(make_adapter("spy/1", names=("a", "b", "c"), prompt=None), client2)
    clf2.predict(random_images(3, seed=0))
    assert [(n, o) for n, o in client2.calls] == [(3, None)]
    assert clf2.ledger.to_dict()["counts"]["predict"] == 1


def test_budget_and_shared_ledger() -> None:
    client = Spy(Capabilities("spy/1", n_ctx=4, ctx_dim=32))
    clf = CraftClassifier.from_adapter(make_adapter("spy/1", names=("a", "b", "c")), client, config=ClassifierConfig(batch_size=2, budget=2))
    with pytest.raises(BudgetExceededError):
        clf.predict(random_images(5, seed=0))
    assert len(client.calls) == 2 and clf.ledger.used == 2  # the third call was refused before being sent
    ledger = QueryLedger()
    ledger.charge(5, "search")
    shared = CraftClassifier.from_adapter(make_adapter("spy/1", names=("a", "b", "c")), client, ledger=ledger)
    shared.predict(random_images(2, seed=0))
    assert ledger.counts["predict"] == 1 and ledger.used == 6
    with pytest.raises(ConfigError, match="either a ledger or config.budget"):
        CraftClassifier.from_adapter(make_adapter("spy/1", names=("a", "b", "c")), client, ledger=ledger,
                                     config=ClassifierConfig(budget=3))


def test_not_fitted() -> None:
    clf = CraftClassifier(Spy(Capabilities("spy/1")))
    with pytest.raises(NotFittedError, match="fit"):
        clf.predict(random_images(1, seed=0))
    with pytest.raises(ValueError):
        clf.predict_proba(random_images(1, seed=0))
    with pytest.raises(AttributeError):  # as scikit-learn's NotFittedError
        clf.decision_function(random_images(1, seed=0))
    assert not hasattr(clf, "classes_")


def test_construction_checks(tmp_path: Path) -> None:
    soft, text_only = Capabilities("m/1", n_ctx=4, ctx_dim=32), Capabilities("m/1")
    adapter = make_adapter("m/1", names=("a", "b", "c"))
    with pytest.raises(AdapterError, match="tuned on m/1 but the client serves other/2"):
        CraftClassifier.from_adapter(adapter, Spy(Capabilities("other/2", n_ctx=4, ctx_dim=32)))
    clf = CraftClassifier.from_adapter(adapter, Spy(Capabilities("other/2", n_ctx=4, ctx_dim=32)),
                          config=ClassifierConfig(allow_model_mismatch=True))
    assert list(clf.classes_) == ["a", "b", "c"]
    with pytest.raises(AdapterError, match="text-only"):
        CraftClassifier.from_adapter(adapter, Spy(text_only))
    with pytest.raises(AdapterError, match="needs a refiner.onnx"):
        CraftClassifier.from_adapter(adapter, Spy(soft), config=ClassifierConfig(backend="onnx"))
    adapter.save_pretrained(tmp_path / "ad")
    with pytest.raises(AdapterError, match="export-onnx"):
        CraftClassifier.from_pretrained(tmp_path / "ad", Spy(soft), config=ClassifierConfig(backend="onnx"))
    assert CraftClassifier.from_pretrained(tmp_path / "ad", Spy(soft)).refiner_backend_ == "numpy"  # auto, no file
    # a refiner.onnx from another adapter is refused, naming the fix
    other = make_adapter("m/1", names=("a", "b", "c"), hidden=16)
    export_onnx(other, tmp_path / "ad" / ONNX_FILE)
    with pytest.raises(AdapterError, match="another adapter.*craft-sdk export-onnx"):
        CraftClassifier.from_pretrained(tmp_path / "ad", Spy(soft))


@pytest.mark.parametrize("kwargs, match", [({"batch_size": 0}, "batch_size"), ({"backend": "tensorrt"}, "backend"),
                                           ({"threads": -1}, "threads"), ({"budget": -1}, "budget")])
def test_config_rejects_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ClassifierConfig(**kwargs)


def test_probability_client_is_refined_on_log_probs() -> None:
    p = np.array([0.7, 0.2, 0.1], np.float32)
    client = Spy(Capabilities("p/1", n_ctx=4, ctx_dim=32, output="probs"), scores=p)
    adapter = make_adapter("p/1", names=("a", "b", "c"), output="probs")
    out = CraftClassifier.from_adapter(adapter, client).predict_all(random_images(2, seed=0))
    np.testing.assert_allclose(out.raw_logits, np.log(np.tile(p, (2, 1))), atol=1e-6)
    np.testing.assert_allclose(out.logits, torch_refine(adapter, np.log(np.tile(p, (2, 1)))), atol=1e-5)
    with pytest.raises(AdapterError, match="expects probs but the client returns logits"):
        CraftClassifier.from_adapter(adapter, Spy(Capabilities("p/1", n_ctx=4, ctx_dim=32)))


def test_single_image_or_empty_is_rejected(adapter_dir: Path, tiny_client) -> None:  # type: ignore[no-untyped-def]
    clf = CraftClassifier.from_pretrained(adapter_dir, tiny_client)
    with pytest.raises(ValueError, match="single image"):
        clf.predict(random_images(1, seed=0)[0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        clf.predict([])


def test_fit_tunes_and_returns_self(tiny_client) -> None:  # type: ignore[no-untyped-def]
    ims = random_images(12, seed=4)
    labels = ["forest", "river", "sea or lake"] * 4
    clf = CraftClassifier(tiny_client, mode="pr", budget=20, seed=0, tune_options={"refiner_hidden": 16})
    assert not hasattr(clf, "adapter_")  # the constructor does nothing
    assert clf.fit(ims, labels) is clf
    assert list(clf.classes_) == ["forest", "river", "sea or lake"]  # sorted unique labels
    assert clf.adapter_.config.prompt is None and clf.refiner_backend_ == "numpy"
    assert clf.adapter_.config.hyperparameters["refiner_hidden"] == 16  # tune_options reach the tuner
    assert clf.predict(ims).shape == (12,)
    # every billable call is in the classifier's ledger: the tuning queries and the deployment batch
    tuning = clf.adapter_.config.provenance["queries_used"]
    assert 1 <= tuning <= 20 and clf.ledger.counts["predict"] == 1 and clf.ledger.used == tuning + 1
    with pytest.raises(ValueError, match="class_names"):
        CraftClassifier(tiny_client, mode="pr", budget=20).fit(ims, [0, 1, 2] * 4)


def test_fit_integer_labels_predicts_integers(tiny_client) -> None:  # type: ignore[no-untyped-def]
    ims = random_images(12, seed=4)
    y = np.array([2, 0, 1] * 4)
    names = ["forest", "river", "sea or lake"]
    clf = CraftClassifier(tiny_client, mode="pr", budget=20, class_names=names, tune_options={"refiner_hidden": 16})
    pred = clf.fit(ims, y).predict(ims)
    assert clf.classes_.tolist() == [0, 1, 2] and clf.class_names_ == tuple(names)
    assert pred.dtype.kind == "i" and set(pred.tolist()) <= {0, 1, 2}
    assert clf.score(ims, y) == pytest.approx(float((pred == y).mean()))
    # a mapping names arbitrary labels; the prompt names follow classes_ order
    mapped = CraftClassifier(tiny_client, mode="pr", budget=20, class_names={10: "river", 5: "forest"},
                             tune_options={"refiner_hidden": 16})
    mapped.fit(ims[:8], [5, 10] * 4)
    assert mapped.classes_.tolist() == [5, 10] and mapped.class_names_ == ("forest", "river")
    with pytest.raises(ValueError, match="no name for label"):
        CraftClassifier(tiny_client, class_names={5: "forest"}).fit(ims[:8], [5, 10] * 4)
    with pytest.raises(ValueError, match="at least 2 classes"):
        CraftClassifier(tiny_client).fit(ims[:4], ["a"] * 4)
    with pytest.raises(ValueError, match="one label per image"):
        CraftClassifier(tiny_client).fit(ims[:4], ["a", "b"])
    with pytest.raises(ConfigError, match="tune_options sets"):
        CraftClassifier(tiny_client, tune_options={"budget": 3}).fit(ims[:4], ["a", "b"] * 2)


# ------------------------------------------------------------------ CLI: predict


def test_cli_predict(adapter_dir: Path, tiny_model_dir: Path, tiny_client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    ims = random_images(4, seed=2)
    for i, im in enumerate(ims[:3]):
        im.save(folder / f"{i}.png")
    ims[3].save(folder / "sub" / "3.jpg", quality=100)
    (folder / "notes.txt").write_text("not an image, skipped inside directories")
    model = ["--model", f"local-dir:{tiny_model_dir}"]
    res = CliRunner().invoke(app, ["predict", str(adapter_dir), str(folder), *model, "--top-k", "2", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["backend"] == "onnx" and info["queries_used"] == 1 and len(info["predictions"]) == 4
    files = [Path(r["image"]).name for r in info["predictions"]]
    assert files == ["0.png", "1.png", "2.png", "3.jpg"]
    clf = CraftClassifier.from_pretrained(adapter_dir, tiny_client)
    probs = clf.predict_proba([folder / "0.png", folder / "1.png", folder / "2.png", folder / "sub" / "3.jpg"])
    for row, p in zip(info["predictions"], probs):
        top = [t["label"] for t in row["top_k"]]
        assert top == [CLASS_NAMES[j] for j in np.argsort(-p, kind="stable")[:2]] and row["label"] == top[0]
        assert row["top_k"][0]["prob"] == pytest.approx(float(p.max()), abs=1e-5)
    text = CliRunner().invoke(app, ["predict", str(adapter_dir), str(folder / "0.png"), *model])
    assert text.exit_code == 0 and text.stdout.startswith(str(folder / "0.png") + "\t" + info["predictions"][0]["label"])


def test_cli_predict_fails_on_unreadable_input(adapter_dir: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    good, bad = tmp_path / "good.png", tmp_path / "broken.png"
    Image.new("RGB", (8, 8)).save(good)
    bad.write_bytes(b"\x89PNG garbage")
    model = ["--model", f"local-dir:{tiny_model_dir}"]
    for args, needle in (([str(good), str(bad)], "broken.png"), ([str(tmp_path / "gone.png")], "gone.png")):
        res = CliRunner().invoke(app, ["predict", str(adapter_dir), *args, *model])
        assert res.exit_code == 1 and needle in res.output, res.output  # a data error: runtime
    res = CliRunner().invoke(app, ["predict", str(adapter_dir), str(good), "--client", "http://x", *model])
    assert res.exit_code == 2 and "not both" in res.output  # a bad option combination: usage
