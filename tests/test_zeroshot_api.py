"""The hosted zero-shot classification shape end to end: ZeroShotAPIClient against ``craft-sdk serve`` on loopback,
the fault matrix of test_faults.py (500, 429, timeouts, truncated bodies, a restart), and ``--text-only``."""

from __future__ import annotations

import base64
import io
import json
import secrets
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import CLASS_NAMES, free_port, random_images, start_serve
from faultinject import FaultInjector, restarting_server

from craft_sdk import Adapter, BudgetExceededError, ClientError, ConfigError, ImageDataset, TuneConfig, create_client
from craft_sdk.client import MeteredClient, QueryLedger
from craft_sdk.client.http import HTTPClient
from craft_sdk.client.zeroshot import TextOnlyClient, ZeroShotAPIClient, hypothesis_template, split_hypothesis
from craft_sdk.scores import softmax
from craft_sdk.wire import SAFETENSORS, encode, encode_images

pytest.importorskip("torch")
pytest.importorskip("fastapi")
from craft_sdk.serve import BackgroundServer, ServerConfig, create_app  # noqa: E402
from craft_sdk.tuner.train import Tuner  # noqa: E402

KEY = secrets.token_hex(16)
ROUTE = "/v1/zero-shot/tiny-clip"
FAST = dict(backoff=0.02, max_backoff=0.3, max_retries=6, timeout=1.0)
# For tests that count requests without injecting faults: a 1 s timeout fires on a machine whose cores are busy,
# and a timed-out request is retried (sent twice, billed once), which is not what those tests count.
PATIENT = {**FAST, "timeout": 120.0}
NAMES = list(CLASS_NAMES)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path):  # noqa: ANN201
    from craft_sdk.client.openclip import OpenCLIPClient

    return OpenCLIPClient(f"local-dir:{tiny_model_dir}")


@pytest.fixture(scope="module")
def server(model):  # noqa: ANN001, ANN201
    app = create_app(model, {"alice": KEY})
    with BackgroundServer(app) as srv:
        yield srv


def used(app: Any) -> int:
    return app.state.craft.store.usage("alice")["used"]


def local_probs(client: Any, imgs: list, names: list[str], template: str = "a photo of a") -> np.ndarray:
    """What the server computes: one image per request (a batch may differ in the last bits)."""
    return np.concatenate([softmax(client.predict([im], names, template)) for im in imgs])


def test_hypothesis_template_round_trip() -> None:
    assert hypothesis_template("a photo of a") == "a photo of a {}."
    assert split_hypothesis("a photo of a {}.") == ("a photo of a", "")
    assert split_hypothesis("a photo of a {}, a type of pet.") == ("a photo of a", ", a type of pet")
    for bad in ("{} photo.", "a photo of a {}", "a photo of {} and {}.", "a {x} of {}.", "a photo of a{}."):
        with pytest.raises(ClientError):
            split_hypothesis(bad)
    with pytest.raises(ClientError, match="braces"):
        hypothesis_template("a {bad} template")


def test_scores_equal_the_local_model_in_class_order(model, tiny_client, server) -> None:  # noqa: ANN001
    imgs = random_images(7, seed=11)
    app = server.app
    before = used(app)
    with ZeroShotAPIClient(server.url + ROUTE, api_key=KEY, max_concurrency=3) as zs:
        assert zs.capabilities().soft_prompts is False and zs.capabilities().output == "probs"
        probs = zs.predict(zs.upload(imgs), NAMES, "a sketch of a")
        assert zs.provider_requests == zs.provider_answers == 7
        with pytest.raises(ClientError, match="text-only"):
            zs.predict(imgs, NAMES, "a photo of a", np.zeros((4, 32), np.float32))
    assert probs.shape == (7, len(NAMES)) and np.array_equal(probs, local_probs(tiny_client, imgs, NAMES, "a sketch of a"))
    assert np.allclose(probs, softmax(tiny_client.predict(imgs, NAMES, "a sketch of a")), atol=1e-5)  # batched locally
    assert used(app) - before == 7  # one query per request (a prompt scored on a one-image set)


def test_wire_shape_suffix_order_and_errors(tiny_client, server) -> None:  # noqa: ANN001
    im = random_images(1, seed=5)[0]
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    body = {"inputs": b64, "parameters": {"candidate_labels": ["forest", "river"], "hypothesis_template": "a photo of a {}, seen from above."}}
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server.url + "/v1/zero-shot/any/name", json=body, headers=auth)
    assert r.status_code == 200, r.text
    items = r.json()
    assert [i["score"] for i in items] == sorted((i["score"] for i in items), reverse=True)
    want = softmax(tiny_client.predict([im], ["forest, seen from above", "river, seen from above"], "a photo of a"))[0]
    assert {i["label"]: i["score"] for i in items} == {"forest": float(want[0]), "river": float(want[1])}
    bad = [
        ({**body, "inputs": "not base64!"}, 422, "inputs"),
        ({**body, "parameters": {**body["parameters"], "hypothesis_template": "{} only"}}, 422, "hypothesis_template"),
        ({**body, "parameters": {"candidate_labels": ["a", "a"]}}, 422, "class_names"),
    ]
    for payload, status, field in bad:
        r = httpx.post(server.url + "/v1/zero-shot/x", json=payload, headers=auth)
        assert (r.status_code, r.json()["error"]["field"]) == (status, field)
    assert httpx.post(server.url + "/v1/zero-shot/x", json=body).status_code == 401


def test_create_client_and_a_text_only_tune(server, tiny_client) -> None:  # noqa: ANN001
    imgs = random_images(12, seed=21)
    train = ImageDataset(imgs, np.arange(12) % len(NAMES), CLASS_NAMES)
    zs = create_client("zeroshot+" + server.url + ROUTE, api_key=KEY, model_id="tiny-zs", **PATIENT)
    assert isinstance(zs, ZeroShotAPIClient)
    before = used(server.app)
    cfg = TuneConfig(mode="craft", budget=40, seed=0, popsize=4, refiner_hidden=16, protocol="paper")  # 12 images
    result = Tuner(cfg).fit(zs, train)  # certify nothing, so the robust protocol would buy no search (issue 23)  # text-only: craft searches the template's words (tuner/discrete.py)
    zs.close()
    adapter = Adapter.from_result(result)
    spec = adapter.config.prompt  # learned words are deployed only when they beat zero-shot on the check images
    assert result.config.mode == "craft" and (spec is None or spec.kind == "discrete") and result.queries.counts["search"] > 0
    assert adapter.config.model_id == "tiny-zs" and adapter.config.output == "probs"
    assert used(server.app) - before == zs.provider_requests == zs.provider_answers  # every request billed once


def test_a_template_ensemble_over_the_zero_shot_api(server) -> None:  # noqa: ANN001
    """``--mode ensemble`` through the hosted shape: 1 + 6 queries to tune (one request per image each), then every
    prediction sends the k picked contexts; the server bills exactly the requests the client sent."""
    from craft_sdk import CraftClassifier, tune

    imgs = random_images(12, seed=23)
    train = ImageDataset(imgs, np.arange(12) % len(NAMES), CLASS_NAMES)
    zs = create_client("zeroshot+" + server.url + ROUTE, api_key=KEY, model_id="tiny-zs", **PATIENT)
    before = used(server.app)
    adapter = tune(zs, train, mode="ensemble", protocol="paper", template_bank="clip-selected", ensemble_k=2, seed=0)
    spec = adapter.config.prompt
    assert spec is not None and spec.kind == "ensemble" and len(spec.texts) == 2 and adapter.config.provenance["queries_used"] == 7
    assert zs.provider_requests == 7 * 12
    ledger = QueryLedger()
    test = random_images(5, seed=24)
    probs = CraftClassifier.from_adapter(adapter, zs, ledger=ledger).predict_proba(test)
    assert ledger.used == 2 and zs.provider_requests == 7 * 12 + 2 * 5 and probs.shape == (5, len(NAMES))
    assert used(server.app) - before == zs.provider_requests == zs.provider_answers
    zs.close()


# ----------------------------------------------------------------------------------------- faults


def ZeroShotFaults(app: Any, faults: dict[int, str], on_die: Any = None, slow_s: float = 1.5) -> FaultInjector:  # noqa: N802
    """The shared fault injector (tests/faultinject.py) in front of the zero-shot route."""
    return FaultInjector(app, faults, on_die=on_die, slow_s=slow_s, path="/v1/zero-shot/")


@pytest.mark.parametrize("concurrency", [1, 4])
def test_every_transient_fault_is_retried_and_billed_once(model, tiny_client, concurrency: int, caplog) -> None:  # noqa: ANN001
    imgs = random_images(14, seed=31)
    faults = {2: "500", 3: "429", 5: "slow", 7: "truncate", 9: "short", 10: "short-nosum", 12: "lost", 13: "503"}
    app = create_app(model, {"alice": KEY})
    injector = ZeroShotFaults(app, faults)
    with BackgroundServer(injector) as srv, ZeroShotAPIClient(srv.url + ROUTE, api_key=KEY, max_concurrency=concurrency, **FAST) as zs:
        with caplog.at_level("WARNING", logger="craft_sdk.client.http"):
            probs = zs.predict(imgs, NAMES, "a photo of a")
        time.sleep(FAST["timeout"])  # let the slow request reach the app (it is replayed or refused, never billed)
        assert sorted(injector.fired) == sorted(faults.values())
        assert np.array_equal(probs, local_probs(tiny_client, imgs, NAMES))
        assert zs.provider_answers == 14 and zs.provider_requests == 14 + len(faults)  # one retry per fault
        assert used(app) == 14  # "lost" and "slow" were computed once: their retries were replayed, not billed
    for cause in ("HTTP 500", "HTTP 429", "HTTP 503", "timed out", "connection failed", "does not match", "corrupt response body"):
        assert cause in caplog.text, cause


def test_tune_through_faults_gives_the_same_adapter(model, tmp_path: Path) -> None:  # noqa: ANN001
    imgs = random_images(12, seed=23)
    train = ImageDataset(imgs, np.arange(12) % len(NAMES), CLASS_NAMES)
    cfg = TuneConfig(mode="pr", budget=20, seed=1, refiner_hidden=16)
    out = []
    for faults in ({}, {2: "500", 5: "lost", 8: "slow", 11: "truncate", 13: "429"}):
        app = create_app(model, {"alice": KEY})
        injector = ZeroShotFaults(app, faults)
        with BackgroundServer(injector) as srv, ZeroShotAPIClient(srv.url + ROUTE, api_key=KEY, model_id="zs", max_concurrency=3, **FAST) as zs:
            result = Tuner(cfg).fit(zs, train)
            time.sleep(FAST["timeout"])
            assert sorted(injector.fired) == sorted(faults.values())
            assert used(app) == zs.provider_answers == result.queries.used * len(train)  # each image billed once per query
            assert zs.provider_requests == zs.provider_answers + len(faults)
        out.append(Adapter.from_result(result).save_pretrained(tmp_path / f"a{len(faults)}"))
    assert (out[0] / "adapter_model.safetensors").read_bytes() == (out[1] / "adapter_model.safetensors").read_bytes()
    configs = [json.loads((d / "adapter_config.json").read_text()) for d in out]
    usages = [c["provenance"].pop("provider_usage") for c in configs]  # the retried requests were sent: counted
    assert configs[0] == configs[1] and usages[1]["requests"] == usages[0]["requests"] + 5


def test_server_restart_mid_prediction(model, tiny_client) -> None:  # noqa: ANN001
    """A restart loses the idempotency cache and meters: the request cut off is retried on the new server."""
    imgs = random_images(8, seed=41)
    srv, apps, die_and_restart = restarting_server(lambda: create_app(model, {"alice": KEY}))

    srv.start(ZeroShotFaults(apps[0], {4: "die"}, on_die=die_and_restart))
    try:
        with ZeroShotAPIClient(srv.url + ROUTE, api_key=KEY, max_concurrency=1, **FAST) as zs:
            probs = zs.predict(imgs, NAMES, "a photo of a")
    finally:
        srv.stop()
    assert len(apps) == 2 and np.array_equal(probs, local_probs(tiny_client, imgs, NAMES))
    assert used(apps[0]) + used(apps[1]) == 8 == zs.provider_answers  # the request cut off was never computed
    assert zs.provider_requests >= 9


def test_outage_gives_up_with_a_clear_error(model) -> None:  # noqa: ANN001
    srv = BackgroundServer(create_app(model, {"alice": KEY})).start()
    url = srv.url + ROUTE
    srv.stop()
    for concurrency in (1, 4):
        with ZeroShotAPIClient(url, api_key=KEY, backoff=0.01, max_backoff=0.05, max_retries=2, timeout=0.5, max_concurrency=concurrency) as zs:
            metered = MeteredClient(zs, QueryLedger())
            with pytest.raises(ClientError, match=r"POST zero-shot .* failed after 3 attempts: connection failed"):
                metered.predict(random_images(6, seed=0), NAMES)
            sent = zs.provider_requests  # the first failure stops the others; nothing stays in flight
            assert (sent == 3 if concurrency == 1 else 3 <= sent <= 3 * 4) and zs.provider_answers == 0
            assert metered.ledger.used == 0  # nothing ever connected: the query is refunded
            time.sleep(0.2)
            assert zs.provider_requests == sent


def test_spent_budget_is_final_and_never_overrun(model, caplog) -> None:  # noqa: ANN001
    app = create_app(model, {"alice": KEY}, ServerConfig(budget_per_key=5))
    with BackgroundServer(app) as srv, ZeroShotAPIClient(srv.url + ROUTE, api_key=KEY, max_concurrency=2, **FAST) as zs:
        metered = MeteredClient(zs, QueryLedger())
        with caplog.at_level("WARNING"), pytest.raises(BudgetExceededError, match="budget of this API key is spent"):
            metered.predict(random_images(9, seed=2), NAMES)
        assert metered.ledger.used == 1  # 5 of its 9 requests were answered and billed: the query stays charged
        with pytest.raises(BudgetExceededError):
            metered.predict(random_images(3, seed=3), NAMES)
        assert metered.ledger.used == 1 and zs.provider_answers == 5  # refused before computing: refunded
        with pytest.raises(ClientError, match="text-only") as err:
            metered.predict(random_images(3, seed=3), NAMES, "a photo of a", np.zeros((4, 32), np.float32))
        assert err.value.unbilled and metered.ledger.used == 1
    assert used(app) == 5 and "retry" not in caplog.text


def test_client_config_errors() -> None:
    with pytest.raises(ConfigError, match="http"):
        ZeroShotAPIClient("ftp://x/y", api_key=KEY)
    with pytest.raises(ConfigError, match="unknown ZeroShotAPIClient option"):
        ZeroShotAPIClient("http://127.0.0.1:1/v1/zero-shot/x", api_key=KEY, concurrency=3)


# ------------------------------------------------------------------------------------- text only


def test_text_only_server_refuses_offsets(model, tiny_client) -> None:  # noqa: ANN001
    app = create_app(TextOnlyClient(model), {"alice": KEY})
    imgs = random_images(3, seed=7)
    with BackgroundServer(app) as srv, HTTPClient(srv.url, api_key=KEY) as c:
        caps = c.capabilities()
        assert caps.soft_prompts is False and caps.model_id == tiny_client.capabilities().model_id
        assert np.array_equal(c.predict(imgs, NAMES), tiny_client.predict(imgs, NAMES))  # plain templates still work
        auth = {"Authorization": f"Bearer {KEY}"}
        up = httpx.post(srv.url + "/v1/image-sets", content=encode_images(imgs), headers={**auth, "Content-Type": SAFETENSORS})
        meta = {"request": json.dumps({"handle": up.json()["handle"], "class_names": NAMES})}
        body = encode({"offsets": np.zeros((4, 32), np.float32)}, meta)
        r = httpx.post(srv.url + "/v1/predict", content=body, headers={**auth, "Content-Type": SAFETENSORS})
        assert r.status_code == 422 and r.json()["error"]["field"] == "offsets" and "text-only" in r.json()["error"]["message"]
        assert c.usage()["used"] == 1  # the refused request was not billed


def test_serve_text_only_flag(tiny_model_dir: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"alice {KEY}\n")
    port = free_port()
    proc, _ = start_serve(["--model", f"local-dir:{tiny_model_dir}", "--api-key-file", str(keys), "--text-only", "--no-budget"],
                          port=port, stdout=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        with HTTPClient(url, api_key=KEY, max_retries=0) as c:
            assert c.capabilities().soft_prompts is False
        with ZeroShotAPIClient(url + ROUTE, api_key=KEY, max_retries=0) as zs:
            assert zs.predict(random_images(2, seed=0), ["a", "b"]).shape == (2, 2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
