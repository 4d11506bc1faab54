"""Every adapter shipped in adapters/ still reproduces its recorded test accuracy (within 1 point)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")

import craft_sdk  # noqa: E402
from craft_sdk.demo import load_demo_task  # noqa: E402

ROOT = Path(__file__).resolve().parents[1] / "adapters"
MANIFEST = json.loads((ROOT / "manifest.json").read_text())["adapters"]


@pytest.fixture(scope="module")
def demo_client():  # noqa: ANN201
    return craft_sdk.create_client("demo")


def test_every_demo_task_has_an_adapter() -> None:
    from craft_sdk.demo import list_demo_tasks

    assert sorted(r["task"] for r in MANIFEST) == sorted(list_demo_tasks())


@pytest.mark.parametrize("row", MANIFEST, ids=[r["task"] for r in MANIFEST])
def test_shipped_adapter_reproduces_its_table(row: dict, demo_client) -> None:  # noqa: ANN001
    path = ROOT / row["task"]
    adapter = craft_sdk.load_adapter(str(path))
    # issue 23: a refiner.onnx ships exactly when a refiner is deployed (not with a zero-shot fallback)
    assert (path / "refiner.onnx").is_file() == (adapter.config.refiner is not None)
    assert adapter.config.model_id == demo_client.capabilities().model_id
    test = load_demo_task(row["task"], shots=row["shots"], seed=row["seed"]).test
    res = craft_sdk.evaluate(adapter, demo_client, test)
    assert abs(res["accuracy"] - row["accuracy"]) <= 0.01
    assert abs(res["zero_shot_accuracy"] - row["zero_shot_accuracy"]) <= 0.01
    # the deployed path (CraftClassifier with the ONNX refiner) agrees with evaluate()
    clf = craft_sdk.CraftClassifier.from_pretrained(path, demo_client)
    labels = clf.predict(test.images[:64])
    expected = [test.class_names[i] for i in adapter.refine(demo_client.predict(test.images[:64], list(test.class_names), adapter.config.template, adapter.offset)).argmax(-1)]
    assert list(labels) == expected
