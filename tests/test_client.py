"""Client protocol, query ledger, and the open_clip black box (fast paths vs open_clip's own encode_text)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASS_NAMES, TINY_CFG, random_images, save_tiny_model

from craft_sdk import (
    BudgetExceededError,
    CallableClient,
    Capabilities,
    ClientError,
    ConfigError,
    MeteredClient,
    QueryLedger,
)

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
from craft_sdk.client.openclip import OpenCLIPClient  # noqa: E402


def _cfg(**text: object) -> dict:
    cfg = copy.deepcopy(TINY_CFG)
    cfg["text_cfg"].update(text)
    return cfg


TOWERS = {
    "causal": TINY_CFG,
    "custom-text": {**copy.deepcopy(TINY_CFG), "custom_text": True},
    "no-causal-mask": _cfg(no_causal_mask=True),
    "quickgelu-4-heads": {**_cfg(heads=4), "quick_gelu": True},
}


@pytest.fixture(scope="module", params=sorted(TOWERS))
def tower_client(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> OpenCLIPClient:
    d = save_tiny_model(tmp_path_factory.mktemp(request.param) / "m", seed=3, cfg=TOWERS[request.param])
    return OpenCLIPClient(f"local-dir:{d}")


def _reference_text(client: OpenCLIPClient, names: list[str], offset: np.ndarray) -> np.ndarray:
    """open_clip's own full-length encode_text, with the offset injected by a hook on the token embedding."""
    model = client.model
    tokens = client.tokenizer([f"a photo of a {n}." for n in names])
    pad = torch.zeros(tokens.shape[1], offset.shape[1])
    pad[1 : 1 + offset.shape[0]] = torch.as_tensor(offset)
    emb = model.text.token_embedding if hasattr(model, "text") else model.token_embedding
    handle = emb.register_forward_hook(lambda m, i, o: o + pad)
    try:
        with torch.no_grad():
            feats = model.encode_text(tokens, normalize=True)
    finally:
        handle.remove()
    return feats.numpy()


@pytest.mark.parametrize("mode", ["auto", "prefix", "cut", "full"])
def test_text_paths_match_open_clip_encode_text(tower_client: OpenCLIPClient, mode: str) -> None:
    client = tower_client
    if mode in ("prefix", "cut") and not client.causal:
        with pytest.raises(ConfigError):
            client._pick_mode(mode)
        return
    if mode == "prefix" and client._pick_mode("auto") != "prefix":
        pytest.skip("tower has custom blocks: prefix mode not applicable")
    client.mode = client._pick_mode(mode)
    names = list(CLASS_NAMES)
    caps = client.capabilities()
    rng = np.random.default_rng(0)
    offsets = rng.normal(0, caps.ctx_rms, (3, caps.n_ctx, caps.ctx_dim)).astype(np.float32)
    with torch.no_grad():
        fast = client.encode_text(names, "a photo of a", offsets).numpy()
    for k in range(3):
        ref = _reference_text(client, names, offsets[k])
        assert np.abs(fast[k] - ref).max() < 1e-4
    client.mode = client._pick_mode("auto")


def test_auto_mode_picks_exact_path(tower_client: OpenCLIPClient) -> None:
    expected = "full" if not tower_client.causal else "prefix"
    assert tower_client.mode == expected


def test_batched_population_equals_one_at_a_time(tiny_client: OpenCLIPClient) -> None:
    imgs = random_images(10, 0)
    h = tiny_client.upload(imgs)
    caps = tiny_client.capabilities()
    off = np.random.default_rng(1).normal(0, caps.ctx_rms, (5, caps.n_ctx, caps.ctx_dim)).astype(np.float32)
    batch = tiny_client.predict(h, list(CLASS_NAMES), offsets=off)
    single = np.stack([tiny_client.predict(h, list(CLASS_NAMES), offsets=o) for o in off])
    assert batch.shape == (5, 10, len(CLASS_NAMES))
    np.testing.assert_allclose(batch, single, atol=1e-4)
    # raw images and an uploaded handle give the same logits; zero offset equals no offset
    np.testing.assert_allclose(tiny_client.predict(imgs, list(CLASS_NAMES)), tiny_client.predict(h, list(CLASS_NAMES)), atol=1e-5)
    zero = np.zeros((caps.n_ctx, caps.ctx_dim), np.float32)
    np.testing.assert_allclose(tiny_client.predict(h, list(CLASS_NAMES), offsets=zero), tiny_client.predict(h, list(CLASS_NAMES)), atol=1e-5)


def test_logits_use_model_logit_scale(tiny_client: OpenCLIPClient) -> None:
    imgs = random_images(4, 2)
    logits = tiny_client.predict(imgs, list(CLASS_NAMES))
    assert np.abs(logits).max() <= 50.0 + 1e-3  # 50 · cosine
    assert tiny_client.capabilities().logit_scale == pytest.approx(50.0, rel=1e-5)


def test_image_features_cached_once(tiny_client: OpenCLIPClient, monkeypatch: pytest.MonkeyPatch) -> None:
    imgs = random_images(6, 3)
    calls = []
    orig = tiny_client.model.encode_image
    monkeypatch.setattr(tiny_client.model, "encode_image", lambda x: calls.append(len(x)) or orig(x))
    h = tiny_client.upload(imgs)
    for _ in range(3):
        tiny_client.predict(h, list(CLASS_NAMES))
    assert calls == [6]
    assert tiny_client.upload(imgs) == h and calls == [6]


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((3, 4)), "shape"),
        (np.zeros((2, 5, 32)), "shape"),
        (np.full((4, 32), np.nan), "NaN"),
    ],
)
def test_bad_offsets_rejected(tiny_client: OpenCLIPClient, bad: np.ndarray, match: str) -> None:
    with pytest.raises(ClientError, match=match):
        tiny_client.predict(random_images(2, 0), ["a", "b"], offsets=bad)


def test_bad_class_lists_and_handles(tiny_client: OpenCLIPClient) -> None:
    from craft_sdk import ImageSetHandle

    imgs = random_images(2, 0)
    with pytest.raises(ClientError, match="duplicates"):
        tiny_client.predict(imgs, ["a", "a"])
    with pytest.raises(ClientError, match="empty"):
        tiny_client.predict(imgs, [])
    with pytest.raises(ClientError, match="handle"):
        tiny_client.predict(ImageSetHandle("deadbeef", 2), ["a", "b"])
    with pytest.raises(ClientError, match="context"):
        tiny_client.predict(imgs, ["a " * 40, "b"])


# ---------------------------------------------------------------- loading errors


def test_random_weights_must_be_explicit() -> None:
    with pytest.raises(ConfigError, match="pretrained=None"):
        OpenCLIPClient("ViT-B-32")


def test_local_dir_without_weights_is_an_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    d = tmp_path / "noweights"
    d.mkdir()
    (d / "open_clip_config.json").write_text((tiny_model_dir / "open_clip_config.json").read_text())
    with pytest.raises(ClientError, match="random weights"):
        OpenCLIPClient(f"local-dir:{d}")
    with pytest.raises(ClientError, match="does not exist"):
        OpenCLIPClient(f"local-dir:{tmp_path / 'missing'}")


def test_pretrained_file_errors(tmp_path: Path) -> None:
    pt = tmp_path / "w.bin"
    pt.write_bytes(b"\x80\x04")
    with pytest.raises(ClientError, match="never unpickles"):
        OpenCLIPClient("RN50", pretrained=str(pt))
    with pytest.raises(ClientError, match="neither a file nor a known tag"):
        OpenCLIPClient("RN50", pretrained=str(tmp_path / "nope.safetensors"))


def test_named_tag_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-cache")
    with pytest.raises(ClientError, match="not in the local cache"):
        OpenCLIPClient("ViT-B-32", pretrained="openai")


@pytest.mark.parametrize("name, match", [("ViT-B-32-SigLIP2-256", "tokenizer"), ("roberta-ViT-B-32", "Hugging Face text tower"), ("coca_ViT-B-32", "CoCa"), ("no-such-model", "unknown")])
def test_unsupported_models(name: str, match: str) -> None:
    with pytest.raises(ClientError, match=match):
        OpenCLIPClient(name, pretrained=None)


def test_safetensors_pretrained_file_loads(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = json.loads((tiny_model_dir / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["embed_dim"] == 32
    c = OpenCLIPClient(f"local-dir:{tiny_model_dir}")
    assert c.model_id.startswith("open_clip/local-dir/")


# ------------------------------------------------------------------- ledger


def _fn_client() -> CallableClient:
    caps = Capabilities("fake", n_ctx=2, ctx_dim=3, ctx_rms=1.0)

    def fn(images, names, template, offsets):  # noqa: ANN001
        p = 1 if offsets is None else offsets.shape[0]
        base = np.arange(len(images) * len(names), dtype=np.float32).reshape(len(images), len(names))
        shift = np.zeros(p) if offsets is None else offsets.sum(axis=(1, 2))
        return base[None] + shift[:, None, None]

    return CallableClient(fn, caps)


def test_ledger_counts_every_candidate_and_refuses_over_budget() -> None:
    ledger = QueryLedger(budget=10)
    client = MeteredClient(_fn_client(), ledger)
    imgs = random_images(3, 0)
    h = client.upload(imgs)
    out = client.predict(h, ["a", "b"], offsets=np.ones((4, 2, 3)), category="search")
    assert out.shape == (4, 3, 2) and ledger.used == 4
    client.predict(h, ["a", "b"], category="refine")
    assert ledger.counts["search"] == 4 and ledger.counts["refine"] == 1 and ledger.uploads == 1
    with pytest.raises(BudgetExceededError, match="budget"):
        client.predict(h, ["a", "b"], offsets=np.ones((6, 2, 3)), category="search")
    assert ledger.used == 5  # refused before being sent: nothing charged
    client.predict(h, ["a", "b"], offsets=np.ones((5, 2, 3)), category="search")
    assert ledger.used == 10 and ledger.remaining == 0
    with pytest.raises(BudgetExceededError):
        client.predict(h, ["a", "b"], category="eval")


def test_ledger_journal_survives_restart(tmp_path: Path) -> None:
    j = tmp_path / "ledger.jsonl"
    a = QueryLedger(100, journal=j)
    a.charge(40, "search")
    a.charge(1, "refine")
    b = QueryLedger(100, journal=j)
    assert b.used == 41 and b.counts["search"] == 40


def test_ledger_repairs_a_torn_journal(tmp_path: Path) -> None:
    j = tmp_path / "ledger.jsonl"
    j.write_text('{"n": 40, "category": "search"}\n{"n": 4')  # killed mid-append
    ledger = QueryLedger(100, journal=j)
    assert ledger.used == 40  # the torn charge was never sent
    ledger.charge(1, "refine")
    assert QueryLedger(100, journal=j).used == 41


def test_callable_client_output_is_validated() -> None:
    bad = CallableClient(lambda ims, n, t, o: np.zeros((1, 1)), Capabilities("bad"))
    with pytest.raises(ClientError, match="shape"):
        bad.predict(random_images(2, 0), ["a", "b"])
    nan = CallableClient(lambda ims, n, t, o: np.full((len(ims), len(n)), np.nan), Capabilities("nan"))
    with pytest.raises(ClientError, match="NaN"):
        nan.predict(random_images(2, 0), ["a", "b"])
    text_only = CallableClient(lambda ims, n, t, o: np.zeros((len(ims), len(n))), Capabilities("t"))
    with pytest.raises(ClientError, match="text-only"):
        text_only.predict(random_images(2, 0), ["a", "b"], offsets=np.zeros((1, 1)))


def test_capabilities_validation() -> None:
    with pytest.raises(ConfigError):
        Capabilities("x", n_ctx=4)
    with pytest.raises(ConfigError):
        Capabilities("x", output="scores")  # type: ignore[arg-type]
    assert not Capabilities("x").soft_prompts and Capabilities("x", 4, 8).soft_prompts
