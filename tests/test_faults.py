"""Fault injection between the real HTTPClient and the real server: the tune completes with the same
result, or stops with a clear error and a resumable checkpoint; never a silent wrong result or a budget overrun."""

from __future__ import annotations

import json
import logging
import secrets
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import CLASS_NAMES, random_images
from faultinject import FaultInjector, restarting_server

from craft_sdk import Adapter, ClientError, ImageDataset, TuneConfig
from craft_sdk.client.http import HTTPClient
from craft_sdk.tuner.checkpoint import LEDGER_FILE, load_checkpoint

pytest.importorskip("torch")
pytest.importorskip("fastapi")
from craft_sdk.serve import BackgroundServer, ServerConfig, create_app  # noqa: E402
from craft_sdk.tuner.train import Tuner  # noqa: E402

KEY = secrets.token_hex(16)
P = 6
CFG = TuneConfig(mode="craft", budget=300, seed=4, intrinsic_dim=16, popsize=P, refiner_hidden=32, val_every=4, max_generations=8)
FAST = dict(backoff=0.02, max_backoff=0.5, max_retries=8, timeout=1.0)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path):  # noqa: ANN201
    from craft_sdk.client.openclip import OpenCLIPClient

    return OpenCLIPClient(f"local-dir:{tiny_model_dir}")


@pytest.fixture(scope="module")
def task() -> tuple[ImageDataset, ImageDataset]:
    imgs = random_images(30, seed=8)
    labels = np.arange(30) % len(CLASS_NAMES)
    return ImageDataset(imgs[:18], labels[:18], CLASS_NAMES), ImageDataset(imgs[18:], labels[18:], CLASS_NAMES)


@pytest.fixture(scope="module")
def reference(tiny_client, task, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:  # noqa: ANN001
    result = Tuner(CFG).fit(tiny_client, *task)
    return Adapter.from_result(result).save_pretrained(tmp_path_factory.mktemp("ref") / "adapter"), result


def same_files(a: Path, b: Path, names: tuple[str, ...] = ("adapter_config.json", "adapter_model.safetensors")) -> bool:
    """Same tensor bytes, and the same config apart from ``provenance.provider_usage``: what the provider was sent
    (retried requests included; an in-process reference sends nothing) is the one thing a fault may change."""
    for name in names:
        if name != "adapter_config.json":
            if (a / name).read_bytes() != (b / name).read_bytes():
                return False
            continue
        configs = [json.loads((d / name).read_text()) for d in (a, b)]
        for config in configs:
            config["provenance"].pop("provider_usage", None)
        if configs[0] != configs[1]:
            return False
    return True


def used(app: Any) -> int:
    return app.state.craft.store.usage("alice")["used"]


def test_tune_through_every_transient_fault_gives_the_same_adapter(model, task, reference, tmp_path: Path, caplog) -> None:  # noqa: ANN001
    # predict requests: 1-2 baseline (train, val), then per generation: search, refine (+ validation every 4th)
    faults = {3: "500", 5: "429", 6: "slow", 9: "truncate", 12: "short", 14: "short-nosum", 16: "lost", 19: "500"}
    app = create_app(model, {"alice": KEY})
    injector = FaultInjector(app, faults)
    with BackgroundServer(injector) as srv, HTTPClient(srv.url, api_key=KEY, **FAST) as client:
        with caplog.at_level(logging.WARNING, logger="craft_sdk.client.http"):
            result = Tuner(CFG).fit(client, *task)
    assert sorted(injector.fired) == sorted(faults.values())
    out = Adapter.from_result(result).save_pretrained(tmp_path / "adapter")
    assert same_files(reference[0], out)  # same tensors, same query accounting
    assert used(app) == result.queries.used == reference[1].queries.used  # retried queries never billed twice
    for cause in ("HTTP 500", "HTTP 429", "timed out", "connection failed", "does not match", "corrupt response body"):
        assert cause in caplog.text, cause


def test_server_dies_and_comes_back_empty(model, task, reference, tmp_path: Path) -> None:  # noqa: ANN001
    """A restart loses handles, idempotency cache and meters: the client uploads again and carries on."""
    srv, apps, die_and_restart = restarting_server(lambda: create_app(model, {"alice": KEY}))

    srv.start(FaultInjector(apps[0], {10: "die"}, on_die=die_and_restart))
    try:
        with HTTPClient(srv.url, api_key=KEY, **FAST) as client:
            result = Tuner(CFG).fit(client, *task)
    finally:
        srv.stop()
    assert len(apps) == 2 and apps[1].state.craft.store.usage("alice")["uploads"] == 2  # train and val sets again
    assert same_files(reference[0], Adapter.from_result(result).save_pretrained(tmp_path / "adapter"))
    assert used(apps[0]) + used(apps[1]) == result.queries.used  # the request cut off was never computed


def test_outage_stops_with_a_clear_error_and_the_run_resumes(model, task, reference, tmp_path: Path) -> None:  # noqa: ANN001
    app = create_app(model, {"alice": KEY})
    srv = BackgroundServer(None)
    srv.start(FaultInjector(app, {12: "die"}, on_die=srv.stop))
    ckpt = tmp_path / "ckpt"
    with HTTPClient(srv.url, api_key=KEY, backoff=0.01, max_backoff=0.05, max_retries=3, timeout=1.0) as client:
        with pytest.raises(ClientError, match=r"POST /predict .* failed after 4 attempts: connection failed") as err:
            Tuner(CFG, checkpoint_dir=ckpt).fit(client, *task)
    assert "\n" not in str(err.value) and "resumed" in str(err.value)
    state = load_checkpoint(ckpt)[1]
    assert 1 <= state["generation"] < CFG.max_generations  # the generations before the one in flight are safe
    journal = sum(json.loads(line).get("n", 0) for line in (ckpt / LEDGER_FILE).read_text().splitlines())  # usage lines carry no "n"
    assert journal == state["history"][-1]["queries_used"] + P  # the population in flight was charged
    srv.start(create_app(model, {"alice": KEY}))  # back, with fresh state
    try:
        with HTTPClient(srv.url, api_key=KEY, **FAST) as client:
            resumed = Tuner(CFG, checkpoint_dir=ckpt, resume=True).fit(client, *task)
    finally:
        srv.stop()
    out = Adapter.from_result(resumed).save_pretrained(tmp_path / "adapter")
    assert same_files(reference[0], out, ("adapter_model.safetensors",))
    assert resumed.queries.used == reference[1].queries.used + P <= CFG.budget


def test_server_budget_stops_the_tune_cleanly(model, task, caplog) -> None:  # noqa: ANN001
    app = create_app(model, {"alice": KEY}, ServerConfig(budget_per_key=30))
    injector = FaultInjector(app, {})
    with BackgroundServer(injector) as srv, HTTPClient(srv.url, api_key=KEY, **FAST) as client:
        with caplog.at_level(logging.WARNING):
            result = Tuner(CFG).fit(client, *task)
        assert client.usage()["used"] <= 30
    assert result.metrics.stopped_early is not None and "budget of this API key is spent" in result.metrics.stopped_early
    assert "retry" not in caplog.text  # a spent budget is final: never retried
    refused = injector.n - len([h for h in result.history]) - 1
    assert refused >= 1 and 30 - (P + 1) < used(app) <= 30  # the next generation no longer fits
    assert result.queries.used == used(app)  # the refused request is refunded: the ledger equals the server's bill


def test_ledger_equals_the_servers_bill_when_the_server_refuses(model, task) -> None:  # noqa: ANN001
    """Issue 11.4: a key budget below the tune's budget; every request the server refuses is refunded client-side."""
    app = create_app(model, {"alice": KEY}, ServerConfig(budget_per_key=45))
    cfg = TuneConfig(**{**CFG.to_dict(), "budget": 300, "max_generations": 12})
    with BackgroundServer(app) as srv, HTTPClient(srv.url, api_key=KEY, **FAST) as client:
        result = Tuner(cfg).fit(client, *task)
        server = client.usage()
    assert result.metrics.stopped_early is not None
    assert result.queries.used == server["used"] == used(app) <= 45


class SlowModel:
    """The real model behind a slow first prediction (a long computation on the server)."""

    def __init__(self, client: Any, delay: float) -> None:
        self.client, self.delay, self.calls = client, delay, 0

    def capabilities(self, template: str = "a photo of a") -> Any:
        return self.client.capabilities(template)

    def upload(self, images: Any) -> Any:
        return self.client.upload(images)

    def predict(self, *args: Any) -> Any:
        self.calls += 1
        if self.calls == 1:
            time.sleep(self.delay)
        return self.client.predict(*args)


def test_a_retry_waits_for_the_computation_in_flight(model, tiny_client) -> None:  # noqa: ANN001
    slow = SlowModel(model, delay=0.8)
    with BackgroundServer(create_app(slow, {"alice": KEY})) as srv, HTTPClient(srv.url, api_key=KEY, backoff=0.01, timeout=0.5) as c:
        imgs = random_images(3, seed=0)
        out = c.predict(imgs, ["a", "b"])  # times out once; the retry joins the computation in flight
        assert np.array_equal(out, tiny_client.predict(imgs, ["a", "b"]))
        assert slow.calls == 1 and c.usage()["used"] == 1


def test_timeouts_give_up_with_a_clear_error(model) -> None:  # noqa: ANN001
    injector = FaultInjector(create_app(model, {"alice": KEY}), {1: "slow", 2: "slow", 3: "slow"}, slow_s=0.6)
    with BackgroundServer(injector) as srv, HTTPClient(srv.url, api_key=KEY, backoff=0.01, max_retries=2, timeout=0.3) as client:
        with pytest.raises(ClientError, match="failed after 3 attempts: timed out"):
            client.predict(random_images(3, seed=0), ["a", "b"])
        time.sleep(0.7)
        assert client.usage()["used"] == 0  # each request was abandoned before the server read it: nothing billed
