"""The remote black box on a real server: HTTPClient against ``craft-sdk serve``'s app on loopback."""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASS_NAMES, free_port, random_images, start_serve

from craft_sdk import Adapter, ClientError, ConfigError, ImageDataset, TuneConfig, create_client
from craft_sdk.client.http import HTTPClient
from craft_sdk.wire import encode, parse, read

pytest.importorskip("torch")
pytest.importorskip("fastapi")
from craft_sdk.serve import BackgroundServer, ServerConfig, create_app  # noqa: E402
from craft_sdk.tuner.train import Tuner  # noqa: E402

KEY = secrets.token_hex(16)
CFG = TuneConfig(mode="craft", budget=300, seed=2, intrinsic_dim=16, popsize=6, refiner_hidden=32, val_every=4, max_generations=10)


@pytest.fixture(scope="module")
def remote_model(tiny_model_dir: Path):  # noqa: ANN201
    """A separate OpenCLIPClient instance: the server's model, loaded from the same folder."""
    from craft_sdk.client.openclip import OpenCLIPClient

    return OpenCLIPClient(f"local-dir:{tiny_model_dir}")


@pytest.fixture(scope="module")
def server(remote_model):  # noqa: ANN001, ANN201
    with BackgroundServer(create_app(remote_model, {"alice": KEY}, ServerConfig(max_image_sets=4))) as srv:
        yield srv


@pytest.fixture()
def client(server):  # noqa: ANN001, ANN201
    with HTTPClient(server.url, api_key=KEY) as c:
        yield c


def task() -> tuple[ImageDataset, ImageDataset]:
    imgs = random_images(30, seed=3)
    labels = np.arange(30) % len(CLASS_NAMES)
    return ImageDataset(imgs[:18], labels[:18], CLASS_NAMES), ImageDataset(imgs[18:], labels[18:], CLASS_NAMES)


def test_tune_over_http_equals_in_process(tiny_client, server, client, tmp_path: Path) -> None:  # noqa: ANN001
    train, val = task()
    in_process = Tuner(CFG).fit(tiny_client, train, val)
    local = Adapter.from_result(in_process).save_pretrained(tmp_path / "local")
    before = client.usage()["used"]
    result = Tuner(CFG).fit(client, train, val)
    remote = Adapter.from_result(result).save_pretrained(tmp_path / "remote")
    assert (local / "adapter_model.safetensors").read_bytes() == (remote / "adapter_model.safetensors").read_bytes()
    configs = [json.loads((d / "adapter_config.json").read_text()) for d in (local, remote)]
    usages = [c["provenance"].pop("provider_usage") for c in configs]  # only what the provider billed differs
    # images sent: the search set, then (robust protocol) the search + check images the mean is scored on
    assert configs[0] == configs[1] and usages[0]["requests"] == 0
    assert usages[1]["requests"] == result.queries.usage["requests"] > 0 and usages[1]["images"] == 2 * len(train) + len(val)
    assert client.usage()["used"] - before == result.queries.used  # server and client count the same unit
    queries = [{k: v for k, v in q.to_dict().items() if k not in ("usage", "usage_by_category")} for q in (result.queries, in_process.queries)]
    assert result.n_generations == 10 and queries[0] == queries[1]


def test_predict_shapes_and_values_match_in_process(tiny_client, client) -> None:  # noqa: ANN001
    caps = client.capabilities()
    assert caps == tiny_client.capabilities()
    imgs, names = random_images(9, seed=4), list(CLASS_NAMES)
    off = np.random.default_rng(0).normal(0, caps.ctx_rms, (5, caps.n_ctx, caps.ctx_dim)).astype(np.float32)
    handle = client.upload(imgs)
    assert handle.n_images == 9 and client.upload(imgs) == handle  # known set: no second upload
    for offsets in (None, off[0], off):
        got, want = client.predict(handle, names, offsets=offsets), tiny_client.predict(imgs, names, offsets=offsets)
        assert got.dtype == np.float32 and got.shape == want.shape and np.array_equal(got, want)
    assert np.array_equal(client.predict(imgs, names), tiny_client.predict(imgs, names))  # images, not a handle
    other = client.predict(handle, names, "a drawing of a", off[:2])
    assert np.array_equal(other, tiny_client.predict(imgs, names, "a drawing of a", off[:2]))
    mixed = [*imgs[:3], random_images(1, seed=5, size=40)[0]]  # different sizes travel as separate tensors
    assert np.array_equal(client.predict(mixed, names), tiny_client.predict(mixed, names))


def test_float16_logits_on_request(tiny_client, server) -> None:  # noqa: ANN001
    imgs, names = random_images(6, seed=6), list(CLASS_NAMES)
    with HTTPClient(server.url, api_key=KEY, logits_dtype="float16") as half:
        got = half.predict(imgs, names)
    want = tiny_client.predict(imgs, names)
    assert got.dtype == np.float32 and np.allclose(got, want, rtol=1e-3, atol=2e-2) and not np.array_equal(got, want)


def test_chunked_population_is_close_but_not_the_default(tiny_client, server) -> None:  # noqa: ANN001
    """Chunks computed separately may differ in the last bits (BLAS blocking): one request is the default."""
    caps = tiny_client.capabilities()
    imgs, names = random_images(8, seed=7), list(CLASS_NAMES)
    off = np.random.default_rng(1).normal(0, caps.ctx_rms, (7, caps.n_ctx, caps.ctx_dim)).astype(np.float32)
    with HTTPClient(server.url, api_key=KEY, max_batch=2, max_concurrency=3) as chunked:
        before = chunked.usage()["used"]
        got = chunked.predict(imgs, names, offsets=off)
        assert chunked.usage()["used"] - before == 7  # 4 requests, 7 queries
    want = tiny_client.predict(imgs, names, offsets=off)
    assert got.shape == (7, 8, 6) and np.allclose(got, want, rtol=1e-5, atol=1e-4)
    from craft_sdk.client.http import HTTPClientConfig

    assert HTTPClientConfig().max_batch is None


def test_evicted_image_sets_are_uploaded_again(tiny_client, remote_model, tiny_model_dir: Path) -> None:  # noqa: ANN001
    app = create_app(remote_model, {"alice": KEY}, ServerConfig(max_image_sets=1))
    sets = [random_images(5, seed=s) for s in (10, 11, 12)]
    names = list(CLASS_NAMES)
    with BackgroundServer(app) as srv, HTTPClient(srv.url, api_key=KEY) as c:
        handles = [c.upload(s) for s in sets]  # the server keeps only the last
        for _ in range(2):
            for h, s in zip(handles, sets):
                assert np.array_equal(c.predict(h, names), tiny_client.predict(s, names))
        usage = c.usage()
    assert usage["used"] == 6 and usage["uploads"] == 3 + 6  # round-robin over a 1-set cache: every predict re-uploads; billed once


def test_client_config_and_errors(server) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError, match="API key"):
        HTTPClient(server.url, api_key="")
    with pytest.raises(ConfigError, match="unknown HTTPClient option"):
        HTTPClient(server.url, api_key=KEY, retries=3)
    with pytest.raises(ConfigError, match="max_batch"):
        HTTPClient(server.url, api_key=KEY, max_batch=0)
    with HTTPClient(server.url, api_key="x" * 32) as bad, pytest.raises(ClientError, match="rejected the API key"):
        bad.capabilities()
    with HTTPClient(server.url, api_key=KEY) as c:
        with pytest.raises(ClientError, match="offsets must have shape"):
            c.predict(random_images(2, seed=1), ["a", "b"], offsets=np.zeros((3, 3), np.float32))
        with pytest.raises(ClientError, match="unknown or evicted"):
            c.predict(type(c.upload(random_images(2, seed=1)))("nope", 2), ["a", "b"])
    assert isinstance(create_client(server.url, api_key=KEY), HTTPClient)


def test_wire_codec_round_trip() -> None:
    arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.zeros((2, 2, 3), np.uint8), "c": np.ones(3, np.float16)}
    body = encode(arrays, {"request": json.dumps({"x": 1})})
    entries, meta = parse(body)
    assert json.loads(meta["request"]) == {"x": 1}
    for k, v in arrays.items():
        got = read(body, entries[k], k)
        assert got.dtype == v.dtype and np.array_equal(got, v)


def test_deploy_path_needs_no_torch_and_no_fastapi(server, tiny_client) -> None:  # noqa: ANN001
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['fastapi'] = None; sys.modules['uvicorn'] = None\n"
        "import numpy as np, craft_sdk\n"
        "from PIL import Image\n"
        f"c = craft_sdk.HTTPClient({server.url!r}, api_key={KEY!r})\n"
        "rng = np.random.default_rng(0)\n"
        "imgs = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]\n"
        "out = c.predict(imgs, ['a cat', 'a dog'])\n"
        "sys.stdout.buffer.write(out.tobytes())\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr.decode()[-1500:]
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    assert res.stdout == tiny_client.predict(imgs, ["a cat", "a dog"]).tobytes()


def test_cli_tune_through_the_server(server, tiny_client, tmp_path: Path) -> None:  # noqa: ANN001
    from typer.testing import CliRunner

    from craft_sdk.cli import app

    root = tmp_path / "data"
    for k, cls in enumerate(("forest", "river")):
        (root / cls).mkdir(parents=True)
        for i, im in enumerate(random_images(5, seed=30 + k)):
            im.save(root / cls / f"{i}.png")
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    res = CliRunner().invoke(app, ["tune", str(root), "--model", server.url, "--api-key-file", str(key_file), "--shots", "3",
                                   "--budget", "40", "--popsize", "6", "--intrinsic-dim", "8", "--protocol", "paper",
                                   "--out", str(tmp_path / "a"), "--json"])  # 9 images certify nothing: paper searches
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["queries_used"] == 1 + 5 * 7 and Adapter.from_pretrained(tmp_path / "a").config.model_id == tiny_client.capabilities().model_id


def test_serve_command_runs_a_real_server(tiny_model_dir: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# owner's keys\nalice {KEY}\n")
    port = free_port()
    proc, _ = start_serve(["--model", f"local-dir:{tiny_model_dir}", "--api-key-file", str(keys), "--budget-per-key", "3"],
                          port=port, stdout=subprocess.PIPE)
    try:
        with HTTPClient(f"http://127.0.0.1:{port}", api_key=KEY, max_retries=0) as c:
            assert c.predict(random_images(2, seed=0), ["a", "b"]).shape == (2, 2)
            assert c.usage() == {"used": 1, "budget": 3, "remaining": 2, "uploads": 1}
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    text = err.decode()  # uvicorn shuts down gracefully, then re-raises SIGTERM (exit -15)
    assert proc.returncode in (0, -signal.SIGTERM) and "Shutting down" in text and KEY not in text
    assert "serving open_clip/local-dir/tiny-clip" in text


def test_client_config_is_shared_by_http_clients() -> None:
    from craft_sdk.client.http import HTTPClientConfig, client_config

    eight = HTTPClientConfig(max_concurrency=8)
    assert client_config(None, {}, "X", eight) == eight  # a client's own default
    assert client_config(HTTPClientConfig(max_concurrency=2), {}, "X", eight).max_concurrency == 2  # the caller's config wins
    assert client_config(None, {"max_concurrency": 3}, "X", eight).max_concurrency == 3  # and keyword overrides win over both
    assert client_config(None, {}, "X") == HTTPClientConfig()
    with pytest.raises(ConfigError, match=r"unknown ZeroShotAPIClient option\(s\) \['nope'\]"):
        client_config(None, {"nope": 1}, "ZeroShotAPIClient")
