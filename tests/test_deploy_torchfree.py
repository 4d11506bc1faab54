"""The deploy path without torch: a committed adapter + refiner.onnx run through a CallableClient.

CI runs this file in a virtual environment with only the base install (no torch);
it must pass in the full environment too. Fixture: ``tests/fixtures/deploy_adapter``,
made by ``tests/fixtures/make_deploy_fixture.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from craft_sdk import CallableClient, Capabilities, CraftClassifier, QueryLedger, load_adapter, mlp
from craft_sdk.adapter import ONNX_FILE
from craft_sdk.adapter.export import OnnxRefiner
from craft_sdk.deploy.classifier import ClassifierConfig

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"
ADAPTER_DIR = FIXTURES / "deploy_adapter"
EXPECTED = load_file(str(FIXTURES / "deploy_expected.safetensors"))
CAPS = Capabilities("fixture/pixel-stats-v1", n_ctx=2, ctx_dim=4)
TEXT_DIR = FIXTURES / "text_adapter"
TEXT_EXPECTED = load_file(str(FIXTURES / "text_expected.safetensors"))
TEXT_CAPS = Capabilities("fixture/pixel-stats-text-v1")  # text only: offsets refused


def pixel_stats(images: list[Image.Image], names: list[str], template: str, offsets: np.ndarray | None) -> np.ndarray:
    """A deterministic toy black box: mean RGB against fixed class vectors, shifted by the offset."""
    feats = np.stack([np.asarray(im, np.float32).mean(axis=(0, 1)) / 255.0 for im in images])  # [N, 3]
    w = np.array([[len(n), ord(n[0]) % 7, ord(n[-1]) % 5] for n in names], np.float32)  # [C, 3]
    base = 10.0 * feats @ w.T - 5.0
    if offsets is None:
        return base
    shift = offsets.reshape(len(offsets), -1).sum(-1)[:, None, None] * np.arange(len(names), dtype=np.float32)
    return base[None] + shift


class SpyClient(CallableClient):
    def __init__(self) -> None:
        super().__init__(pixel_stats, CAPS)
        self.calls: list[tuple[int, np.ndarray | None]] = []

    def predict(self, images, class_names, template="a photo of a", offsets=None):  # type: ignore[no-untyped-def]
        self.calls.append((len(images), None if offsets is None else np.array(offsets)))
        return super().predict(images, class_names, template, offsets)


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (12, 12, 3), dtype=np.uint8) for _ in range(n)]


def test_onnx_and_numpy_match_committed_torch_outputs() -> None:
    adapter = load_adapter(str(ADAPTER_DIR))
    assert adapter.refiner is not None
    onnx_out = OnnxRefiner(ADAPTER_DIR / ONNX_FILE, adapter)(EXPECTED["logits"])
    np.testing.assert_allclose(onnx_out, EXPECTED["refined"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(adapter.refine(EXPECTED["logits"]), EXPECTED["refined"], atol=1e-5, rtol=0)
    assert np.abs(EXPECTED["refined"] - EXPECTED["logits"]).max() > 0.1  # the refiner is not the identity


@pytest.mark.parametrize("backend", ["auto", "numpy"])
def test_classifier_with_callable_client(backend: str) -> None:
    client, ledger = SpyClient(), QueryLedger(budget=10)
    clf = CraftClassifier.from_pretrained(
        ADAPTER_DIR, client, config=ClassifierConfig(batch_size=4, backend=backend), ledger=ledger
    )
    assert clf.refiner_backend_ == ("onnx" if backend == "auto" else "numpy")
    ims = images(10)
    out = clf.predict_all(ims)
    adapter = clf.adapter_
    assert adapter.offset is not None and adapter.refiner is not None
    # three calls (4 + 4 + 2), each carrying the learned offset, one query each
    assert [n for n, _ in client.calls] == [4, 4, 2]
    for _, sent in client.calls:
        np.testing.assert_array_equal(sent, adapter.offset)
    assert ledger.counts["predict"] == 3 and ledger.used == 3
    raw = pixel_stats([Image.fromarray(a) for a in ims], list(clf.classes_), "a photo of a", adapter.offset[None])[0]
    np.testing.assert_allclose(out.raw_logits, raw, atol=1e-6)
    expected = mlp.forward(adapter.refiner, raw, residual=True)
    np.testing.assert_allclose(out.logits, expected, atol=1e-5, rtol=0)
    assert out.labels.tolist() == [clf.classes_[i] for i in expected.argmax(-1)]
    np.testing.assert_allclose(out.probs.sum(-1), 1.0, atol=1e-6)
    assert list(clf.classes_) == ["cat", "dog", "bird", "fish"]


def text_stats(images: list[Image.Image], names: list[str], template: str, offsets: np.ndarray | None) -> np.ndarray:
    """A text-only toy black box: pixel_stats shifted by the words of the context."""
    assert offsets is None
    words = np.array([sum(map(ord, w)) % 11 for w in template.split()], np.float32)
    return pixel_stats(images, names, template, None) + 0.1 * words.sum() * np.arange(len(names), dtype=np.float32)


class TextSpy(CallableClient):
    def __init__(self) -> None:
        super().__init__(text_stats, TEXT_CAPS)
        self.sent: list[tuple[str, object]] = []

    def predict(self, images, class_names, template="a photo of a", offsets=None):  # type: ignore[no-untyped-def]
        self.sent.append((template, offsets))
        return super().predict(images, class_names, template, offsets)


def test_text_adapter_sends_its_words_through_onnx() -> None:
    """A discrete-prompt adapter (prompt.kind: discrete) deploys like any other: the learned words on every call."""
    adapter = load_adapter(str(TEXT_DIR))
    assert adapter.config.prompt is not None and adapter.config.prompt.kind == "discrete" and adapter.offset is None
    np.testing.assert_allclose(OnnxRefiner(TEXT_DIR / ONNX_FILE, adapter)(TEXT_EXPECTED["logits"]), TEXT_EXPECTED["refined"], atol=1e-5, rtol=0)
    client, ledger = TextSpy(), QueryLedger(budget=10)
    clf = CraftClassifier.from_pretrained(TEXT_DIR, client, config=ClassifierConfig(batch_size=4), ledger=ledger)
    assert clf.refiner_backend_ == "onnx"
    ims = images(6, seed=2)
    out = clf.predict_all(ims)
    assert [t for t, _ in client.sent] == [adapter.config.prompt.text] * 2 and all(o is None for _, o in client.sent)
    raw = text_stats([Image.fromarray(a) for a in ims], list(clf.classes_), adapter.config.template, None)
    np.testing.assert_allclose(out.logits, mlp.forward(adapter.refiner, raw, residual=True), atol=1e-5, rtol=0)
    z = out.logits / 1.7  # the adapter's calibration temperature
    np.testing.assert_allclose(out.probs, np.exp(z - z.max(-1, keepdims=True)) / np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True), atol=1e-6)
    assert ledger.used == 2


def test_ensemble_adapter_deploys_without_torch(tmp_path: Path) -> None:
    from craft_sdk import Adapter, AdapterConfig
    from craft_sdk.adapter import EnsemblePromptSpec
    from craft_sdk.client.contexts import ensemble_log_probs

    texts = ("a sketch of a", "itap of a")
    cfg = AdapterConfig(TEXT_CAPS.model_id, ("cat", "dog", "bird", "fish"), texts[0], prompt=EnsemblePromptSpec(texts, bank="clip-imagenet"))
    Adapter(cfg).save_pretrained(tmp_path / "ens")
    client, ledger = TextSpy(), QueryLedger(budget=10)
    out = CraftClassifier.from_pretrained(tmp_path / "ens", client, ledger=ledger).predict_all(images(5))
    assert [t for t, _ in client.sent] == list(texts) and ledger.used == 2
    pil = [Image.fromarray(a) for a in images(5)]
    expected = ensemble_log_probs(np.stack([text_stats(pil, list(cfg.class_names), t, None) for t in texts]))
    np.testing.assert_allclose(out.raw_logits, expected, atol=1e-5)


def test_drift_canary_records_and_checks_without_torch() -> None:
    import dataclasses

    from craft_sdk import check_canary
    from craft_sdk.client.canary import record_canary

    adapter = load_adapter(str(ADAPTER_DIR))
    client = CallableClient(pixel_stats, CAPS)
    record = record_canary(client, adapter.config.class_names, adapter.contexts, adapter.offset, "logits", 4, 0)
    config = dataclasses.replace(adapter.config, canary=record.spec)
    canaried = type(adapter)(config, adapter.z, adapter.offset, adapter.refiner, record.scores)
    ledger = QueryLedger()
    assert not check_canary(canaried, client, ledger=ledger).drifted and ledger.counts["canary"] == 1
    brighter = CallableClient(lambda ims, names, t, o: pixel_stats(ims, names, t, o) * 1.01, CAPS)  # a 1 % change of the box
    report = check_canary(canaried, brighter)
    assert report.drifted and report.distance > report.tolerance


TRAINING = "[m for m in sys.modules if m == 'craft_sdk.tuner' or m.startswith('craft_sdk.tuner.')]"


def test_import_does_not_pull_torch_or_runtimes() -> None:
    code = (
        "import sys\n"
        "import craft_sdk, craft_sdk.deploy, craft_sdk.deploy.query, craft_sdk.adapter.export\n"
        "from craft_sdk import CraftClassifier, export_onnx\n"
        f"assert not {TRAINING}, {TRAINING}\n"
        "import craft_sdk.cli\n"  # the CLI derives tune's options from TuneConfig: the tuner's config, no torch
        "heavy = [m for m in ('torch', 'open_clip', 'onnx', 'onnxruntime', 'cma') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ}, cwd=HERE)
    assert out.returncode == 0, out.stderr


def test_deploy_runs_with_torch_blocked() -> None:
    """Even where torch is installed, the deploy path never touches it."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "import test_deploy_torchfree as t\n"
        "t.test_onnx_and_numpy_match_committed_torch_outputs()\n"
        "t.test_classifier_with_callable_client('auto')\n"
        "t.test_text_adapter_sends_its_words_through_onnx()\n"
        "t.test_drift_canary_records_and_checks_without_torch()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(HERE)], capture_output=True, text=True, cwd=HERE)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_the_deploy_path_loads_no_training_module() -> None:
    """Importing craft_sdk.deploy, loading adapters (continuous, discrete, ensemble), predicting and checking a
    canary load no craft_sdk.tuner module at all (the projection is craft_sdk.projection, the context rules
    craft_sdk.client.contexts)."""
    code = (
        "import sys, tempfile\n"
        "import craft_sdk.deploy\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "import test_deploy_torchfree as t\n"
        "from pathlib import Path\n"
        "t.test_classifier_with_callable_client('auto')\n"
        "t.test_classifier_with_callable_client('numpy')\n"
        "t.test_text_adapter_sends_its_words_through_onnx()\n"
        "t.test_drift_canary_records_and_checks_without_torch()\n"
        "with tempfile.TemporaryDirectory() as d:\n"
        "    t.test_ensemble_adapter_deploys_without_torch(Path(d))\n"
        f"assert not {TRAINING}, {TRAINING}\n"
        "assert 'craft_sdk.projection' in sys.modules and 'craft_sdk.adapter.format' in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(HERE)], capture_output=True, text=True, cwd=HERE)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_text_adapter_deploys_through_a_chat_vlm_without_torch() -> None:
    """Base install + the openai extra: the discrete adapter through ChatVLMClient against a stdlib HTTP server on
    loopback that answers the chat completions shape with text_stats' class log-probabilities."""
    pytest.importorskip("openai")
    import base64
    import io
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from craft_sdk.client.chat import LETTERS, ChatVLMClient, parse_question

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            req = json.loads(self.rfile.read(int(self.headers["content-length"])))
            parts = req["messages"][0]["content"]
            template, options = parse_question(next(p["text"] for p in parts if p["type"] == "text"))
            uri = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
            im = Image.open(io.BytesIO(base64.b64decode(uri.partition(",")[2]))).convert("RGB")
            z = text_stats([im], options, template, None)[0].astype(np.float64)
            lp = z - z.max() - np.log(np.exp(z - z.max()).sum())
            top = [{"token": LETTERS[c], "logprob": float(lp[c]), "bytes": [ord(LETTERS[c])]} for c in np.argsort(-lp)]
            choice = {"index": 0, "message": {"role": "assistant", "content": top[0]["token"], "refusal": None},
                      "logprobs": {"content": [{**top[0], "top_logprobs": top}], "refusal": None}, "finish_reason": "stop"}
            body = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": req["model"],
                               "choices": [choice], "usage": {"prompt_tokens": 100, "completion_tokens": 1, "total_tokens": 101}}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        chat = ChatVLMClient(f"http://127.0.0.1:{httpd.server_port}/v1", "m", api_key="k", model_id=TEXT_CAPS.model_id)
        adapter = load_adapter(str(TEXT_DIR))
        out = CraftClassifier.from_pretrained(TEXT_DIR, chat, config=ClassifierConfig(batch_size=4)).predict_all(images(6, seed=2))
        raw = text_stats([Image.fromarray(a) for a in images(6, seed=2)], list(adapter.config.class_names), adapter.config.prompt.text, None)
        lsm = raw - raw.max(-1, keepdims=True) - np.log(np.exp(raw - raw.max(-1, keepdims=True)).sum(-1, keepdims=True))
        np.testing.assert_allclose(out.raw_logits, lsm, atol=1e-4)  # log-probabilities of the box, in class order
        np.testing.assert_allclose(out.logits, mlp.forward(adapter.refiner, out.raw_logits, residual=True), atol=1e-5)
        assert chat.usage.requests == 6 and chat.usage.input_tokens == 600 and sum(chat.problems.values()) == 0
        chat.close()
        code = "import sys, craft_sdk.client.chat, craft_sdk.client.embed; assert 'torch' not in sys.modules and 'fastapi' not in sys.modules"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE)
        assert done.returncode == 0, done.stderr[-2000:]
    finally:
        httpd.shutdown()
