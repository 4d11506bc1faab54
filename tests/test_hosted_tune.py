"""Tuning and deployment through the hosted shapes on loopback: ``craft-sdk tune``/``predict`` over ``chat+``,
the robust ``craft`` protocol over ``embed+``, then CraftClassifier with the exported ONNX refiner."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import random_images, suite_env

from craft_sdk import CraftClassifier, ImageDataset, create_client, tune

pytest.importorskip("openai")
pytest.importorskip("torch")
pytest.importorskip("fastapi")
from craft_sdk.serve import BackgroundServer, create_app  # noqa: E402
from craft_sdk.serve.openai_compat import image_embedding_counts  # noqa: E402

KEY = secrets.token_hex(16)
CLASSES = ("forest", "river", "highway")


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path):  # noqa: ANN201
    from craft_sdk.client.openclip import OpenCLIPClient

    with BackgroundServer(create_app(OpenCLIPClient(f"local-dir:{tiny_model_dir}"), {"alice": KEY})) as srv:
        yield srv


def used(srv: Any) -> int:
    return srv.app.state.craft.store.usage("alice")["used"]


def image_folder(root: Path, per_class: int, seed: int) -> Path:
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(random_images(per_class, seed=seed + c)):
            im.save(root / name / f"{i}.png")
    return root


def cli(*args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "craft_sdk", *args], capture_output=True, text=True, env=suite_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cli_tune_pr_over_chat_then_predict(server, tmp_path: Path) -> None:  # noqa: ANN001
    data = tmp_path / "data"
    image_folder(data / "train", 4, seed=100)
    image_folder(data / "test", 2, seed=200)
    (tmp_path / "key").write_text(KEY)
    model = f"chat+{server.url}/v1?model=tiny"
    before = used(server)
    summary = cli("tune", str(data), "--model", model, "--api-key-file", str(tmp_path / "key"), "--mode", "pr",
                  "--budget", "12", "--popsize", "4", "--shots", "4", "--refiner-hidden", "16", "--json", "-o", str(tmp_path / "ad"))
    assert summary["mode"] == "pr" and 0 < summary["queries_used"] <= 12
    spent = used(server) - before  # one server query per image request: a client query over n images is n requests
    assert summary["queries_used"] <= spent <= 12 * summary["queries_used"]
    rows = cli("predict", str(tmp_path / "ad"), str(data / "test"), "--model", model, "--api-key-file", str(tmp_path / "key"),
               "--top-k", "3", "--json")
    assert rows["images"] == 6 and rows["errors"] == 0
    got = {Path(r["image"]).name + Path(r["image"]).parent.name: r["top_k"][0]["label"] for r in rows["predictions"]}
    chat = create_client(model, api_key=KEY)
    clf = CraftClassifier.from_pretrained(tmp_path / "ad", chat)
    paths = sorted((data / "test").rglob("*.png"))
    from PIL import Image

    labels = clf.predict([Image.open(p).convert("RGB") for p in paths])
    assert set(labels) <= set(CLASSES) and len(labels) == 6
    assert [got[p.name + p.parent.name] for p in paths] == list(labels)  # the CLI and the library deploy alike


def test_robust_craft_over_embed_then_onnx_deploy(server, tmp_path: Path) -> None:  # noqa: ANN001
    from craft_sdk.adapter.export import export_onnx
    from craft_sdk.deploy.query import raw_scores

    counts = image_embedding_counts(server.app.state.craft)
    train_imgs, test_imgs = random_images(12, seed=300), random_images(6, seed=301)
    train = ImageDataset(train_imgs, np.arange(12) % 3, CLASSES)
    client = create_client(f"embed+{server.url}/v1?model=tiny", api_key=KEY, model_id="tiny-embed")
    before = sum(counts.values())
    adapter = tune(client, train, mode="craft", budget=24, popsize=4, refiner_hidden=16, seed=0)
    assert adapter.config.model_id == "tiny-embed" and adapter.config.provenance["protocol"] == "robust"
    adapter.save_pretrained(tmp_path / "ad")
    export_onnx(tmp_path / "ad")
    clf = CraftClassifier.from_pretrained(tmp_path / "ad", client)
    if adapter.refiner is not None:  # the exported refiner.onnx is what runs
        assert clf.refiner_backend_ == "onnx"
    out = clf.predict_all(test_imgs)
    raw = raw_scores(adapter, client, client.upload(test_imgs))
    np.testing.assert_allclose(out.logits, adapter.refine(raw), atol=1e-4)
    clf.predict_all(test_imgs[:3])  # a second stream over seen images: no new image embedding
    assert sum(counts.values()) - before == 18 and max(counts.values()) == 1  # every image embedded once, by the server's count
    assert client.usage.images == 18


@pytest.mark.parametrize(("kind", "mode"), [("chat", "craft"), ("embed", "pr")])
def test_the_other_mode_on_each_shape(server, kind: str, mode: str) -> None:  # noqa: ANN001
    """craft (a word search, robust protocol) over chat and pr over embeddings: the server bills what the client counted."""
    train = ImageDataset(random_images(6, seed=400), np.arange(6) % 3, CLASSES)
    client = create_client(f"{kind}+{server.url}/v1?model=tiny", api_key=KEY, model_id=f"tiny-{kind}")
    before = used(server)
    adapter = tune(client, train, mode=mode, budget=12, popsize=4, refiner_hidden=16, seed=1)
    assert adapter.config.provenance["protocol"] == "robust" and adapter.config.model_id == f"tiny-{kind}"
    assert used(server) - before == client.usage.requests > 0  # no retries on loopback: one query per request
    labels = CraftClassifier.from_adapter(adapter, client).predict(random_images(3, seed=401))
    assert set(labels) <= set(CLASSES)
