"""Adapters from the Hugging Face Hub (a Hub cache laid out on disk, offline mode), model cards,
and push_to_hub's upload preparation (against a fake HfApi: no network here)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import craft_sdk
from craft_sdk import AdapterError, MissingDependencyError, load_adapter
from craft_sdk.adapter import ONNX_FILE
from craft_sdk.adapter.card import CARD_FILE, render_model_card, write_model_card
from conftest import suite_env  # noqa: E402

hf = pytest.importorskip("huggingface_hub")
hf_constants = pytest.importorskip("huggingface_hub.constants")
yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "adapters" / "digits"
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped digits adapter with a refiner.onnx exported by this craft-sdk (the shipped one may be stale)."""
    from craft_sdk.adapter.export import export_onnx

    pytest.importorskip("onnx")
    path = load_adapter(str(SOURCE)).save_pretrained(tmp_path_factory.mktemp("shipped") / "digits")
    export_onnx(path)
    return path


def _snapshot(cache: Path, repo: str, commit: str, files: dict[str, Path], refs: tuple[str, ...]) -> Path:
    """Lay out one commit of a model repo in a Hub cache, the way huggingface_hub writes it."""
    storage = cache / ("models--" + repo.replace("/", "--"))
    snap = storage / "snapshots" / commit
    for rel, src in files.items():
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, snap / rel)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (storage / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture()
def hub_cache(shipped: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Two commits of org/digits-adapter: main = the shipped adapter at the root, tag v1 = a variant in a subfolder."""
    cache = tmp_path / "hub"
    files = {n: shipped / n for n in ("adapter_config.json", "adapter_model.safetensors", ONNX_FILE)}
    _snapshot(cache, "org/digits-adapter", COMMIT_A, files, ("main",))
    variant = load_adapter(str(shipped))
    assert variant.refiner is not None
    variant.refiner = {k: (v * 0.5 if k.endswith("bias") else v) for k, v in variant.refiner.items()}
    vdir = variant.save_pretrained(tmp_path / "variant")
    _snapshot(cache, "org/digits-adapter", COMMIT_B,
              {f"sub/{n}": vdir / n for n in ("adapter_config.json", "adapter_model.safetensors")}, ("v1",))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_load_from_hub_cache_offline(shipped: Path, hub_cache: Path, tmp_path: Path) -> None:
    shipped, variant = load_adapter(str(shipped)), load_adapter(str(tmp_path / "variant"))
    assert shipped.fingerprint() != variant.fingerprint()
    assert load_adapter("org/digits-adapter").fingerprint() == shipped.fingerprint()
    assert load_adapter("org/digits-adapter", revision=COMMIT_A).fingerprint() == shipped.fingerprint()
    got = craft_sdk.Adapter.from_pretrained("org/digits-adapter", revision="v1", subfolder="sub")
    assert got.fingerprint() == variant.fingerprint()
    for kwargs, needle in (({"revision": "v2"}, "not in the local cache"), ({"subfolder": "sub"}, "has no adapter_config.json")):
        with pytest.raises(AdapterError, match=needle):
            load_adapter("org/digits-adapter", **kwargs)
    with pytest.raises(AdapterError, match="org/missing.*HF_HUB_OFFLINE=1"):
        load_adapter("org/missing")
    with pytest.raises(AdapterError, match="revision='v1' applies to Hub repo ids"):
        load_adapter(str(shipped), revision="v1")


def test_classifier_from_hub_uses_the_repo_onnx(shipped: Path, hub_cache: Path) -> None:
    caps = craft_sdk.Capabilities(load_adapter(str(shipped)).config.model_id, n_ctx=4, ctx_dim=96)
    client = craft_sdk.CallableClient(lambda ims, names, t, o: np.zeros((len(ims), len(names))) + np.arange(len(names)), caps)
    clf = craft_sdk.CraftClassifier.from_pretrained("org/digits-adapter", client)
    local = craft_sdk.CraftClassifier.from_pretrained(shipped, client)
    assert clf.refiner_backend_ == "onnx" and clf.classes_.tolist() == local.classes_.tolist()
    ims = [np.zeros((8, 8, 3), np.uint8)] * 3
    np.testing.assert_allclose(clf.predict_proba(ims), local.predict_proba(ims), atol=1e-6)


def test_cli_predict_takes_a_hub_id_offline(shipped: Path, hub_cache: Path, tmp_path: Path) -> None:
    """The real environment variables, in a fresh process: HF_HUB_OFFLINE=1 and HF_HUB_CACHE are honoured."""
    img = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (16, 16), (200, 30, 30)).save(img)
    env = suite_env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hub_cache))
    cmd = [sys.executable, "-m", "craft_sdk.cli", "predict", "org/digits-adapter", str(img), "--model", "demo", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout)
    assert got["adapter"] == "org/digits-adapter" and got["backend"] == "onnx" and got["queries_used"] == 1
    assert got["predictions"][0]["label"] in load_adapter(str(shipped)).config.class_names
    bad = subprocess.run([*cmd[:4], "org/missing", *cmd[5:]], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 1 and "HF_HUB_OFFLINE=1" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_cli_inspect_takes_a_cached_hub_id(shipped: Path, hub_cache: Path) -> None:
    from typer.testing import CliRunner

    from craft_sdk.cli import app

    res = CliRunner().invoke(app, ["inspect", "org/digits-adapter", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["fingerprint"] == load_adapter(str(shipped)).fingerprint() and "adapter_config.json" in info["files"]
    sub = CliRunner().invoke(app, ["inspect", "org/digits-adapter", "--revision", "v1", "--subfolder", "sub", "--json"])
    assert sub.exit_code == 0 and json.loads(sub.stdout)["fingerprint"] != info["fingerprint"]
    missing = CliRunner().invoke(app, ["inspect", "org/missing"])
    assert missing.exit_code == 1 and "not in the local cache" in missing.output and "FileNotFoundError" not in missing.output


def test_local_paths_need_no_huggingface_hub(shipped: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    assert load_adapter(str(shipped)).n_classes == 10
    with pytest.raises(MissingDependencyError, match=r"pip install 'craft-sdk\[hub\]'"):
        load_adapter("org/digits-adapter")
    with pytest.raises(ImportError):  # MissingDependencyError is an ImportError too
        load_adapter("org/digits-adapter")


def test_model_card_front_matter_body_and_runnable_snippet(shipped: Path, tmp_path: Path) -> None:
    adapter = load_adapter(str(shipped))
    path = adapter.save_pretrained(tmp_path / "ad", repo_id="org/digits-adapter")
    text = (path / CARD_FILE).read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["library_name"] == "craft-sdk" and meta["base_model_id"] == adapter.config.model_id
    assert {"craft-sdk", "few-shot", "image-classification", "mode-craft"} <= set(meta["tags"])
    assert "base_model" not in meta  # the demo VLM is not a Hub repo id
    prov = adapter.config.provenance
    assert f"{prov['queries_used']} of a budget of {prov['budget']}" in text
    assert "- classes (10): zero, one, " in text and "## Limitations" in text
    zs, tr = prov["metrics"]["zero_shot_train_accuracy"], prov["metrics"]["train_accuracy"]
    assert f"the training shots ({prov['data'].get('n_search', prov['data']['n_train'])} images; optimistic) | {100 * zs:.1f}% | {100 * tr:.1f}% |" in text
    assert 'from_pretrained("org/digits-adapter", client)' in text
    # the card's three lines run as written (pointed at the local copy)
    snippet = text.split("```python\n")[1].split("```")[0].replace("org/digits-adapter", str(path))
    assert len(snippet.strip().splitlines()) == 3
    scope: dict = {}
    exec(snippet, scope)
    assert scope["clf"].classes_.tolist()[:2] == ["zero", "one"]
    # an evaluation adds a row that names what it was measured on; re-saving keeps our card current
    write_model_card(path, adapter, evaluation={"dataset": "demo:digits test split", "n_test": 1000,
                                                "zero_shot_accuracy": 0.5, "accuracy": 0.75})
    assert "| demo:digits test split (1000 images) | 50.0% | 75.0% |" in (path / CARD_FILE).read_text()
    adapter.save_pretrained(path)
    assert "demo:digits test split" not in (path / CARD_FILE).read_text()
    card = render_model_card(craft_sdk.Adapter(craft_sdk.AdapterConfig("org/x", ("a", "b"), "a photo of a")))
    assert yaml.safe_load(card.split("---\n")[1])["base_model"] == "org/x"


class FakeApi:
    """Records what push_to_hub would send (no network): the repo, the branch and the uploaded folder's files."""

    calls: list[tuple[str, dict]] = []

    def __init__(self, token: str | None = None) -> None:
        self.token = token

    def create_repo(self, repo_id: str, **kw: object) -> None:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kw}))

    def create_branch(self, repo_id: str, **kw: object) -> None:
        self.calls.append(("create_branch", {"repo_id": repo_id, **kw}))

    def upload_folder(self, **kw: object) -> object:
        folder = Path(str(kw["folder_path"]))
        files = {p.name: p.read_bytes() for p in folder.iterdir()}
        self.calls.append(("upload_folder", {**kw, "files": files}))
        return type("Info", (), {"commit_url": f"https://hub.invalid/{kw['repo_id']}/commit/1"})()


def test_push_to_hub_uploads_a_complete_adapter(shipped: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hf, "HfApi", FakeApi)
    FakeApi.calls = []
    adapter = load_adapter(str(shipped))
    url = adapter.push_to_hub("org/digits-adapter", source_dir=shipped, revision="v1", private=True, token="t")
    assert url == "https://hub.invalid/org/digits-adapter/commit/1"
    assert [c[0] for c in FakeApi.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert FakeApi.calls[0][1]["private"] is True and FakeApi.calls[1][1]["branch"] == "v1"
    upload = FakeApi.calls[2][1]
    assert upload["repo_id"] == "org/digits-adapter" and upload["revision"] == "v1"
    files = upload["files"]
    assert sorted(files) == sorted(["adapter_config.json", "adapter_model.safetensors", ONNX_FILE, CARD_FILE])
    assert files[ONNX_FILE] == (shipped / ONNX_FILE).read_bytes()
    assert b'from_pretrained("org/digits-adapter", client)' in files[CARD_FILE]
    # what was uploaded loads back as the same adapter
    back = tmp_path / "back"
    back.mkdir()
    for name, data in files.items():
        (back / name).write_bytes(data)
    assert load_adapter(str(back)).fingerprint() == adapter.fingerprint()
    # a refiner.onnx from another adapter is refused before anything is sent
    other = load_adapter(str(tmp_path / "back"))
    other.refiner = {k: v * 2 for k, v in (other.refiner or {}).items()}
    FakeApi.calls = []
    with pytest.raises(AdapterError, match="another adapter"):
        other.push_to_hub("org/digits-adapter", source_dir=shipped)
    assert FakeApi.calls == []
    with pytest.raises(AdapterError, match="org/name"):
        adapter.push_to_hub("not a repo id")
