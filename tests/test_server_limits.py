"""What one request may ask of the service (issue 20): offsets in range (defect 7), model faults that are final,
per-route body limits, and no computation for a client that left while its request waited for the model."""

from __future__ import annotations

import json
import secrets
import threading
import time
from typing import Any

import httpx
import numpy as np
import pytest

from craft_sdk import CallableClient, Capabilities, ClientError
from craft_sdk.client.http import HTTPClient
from craft_sdk.wire import SAFETENSORS, encode

pytest.importorskip("fastapi")
from craft_sdk.serve import BackgroundServer, ServerConfig, create_app  # noqa: E402

ALICE, BOB = secrets.token_hex(16), secrets.token_hex(16)
CAPS = Capabilities("toy-model", n_ctx=4, ctx_dim=8, ctx_rms=0.5, logit_scale=100.0)
TEMPLATE = "a photo of a"


class Toy(CallableClient):
    """Scores = image mean x class index + the offsets' sum (so a 1e38 offset overflows to inf); counts calls."""

    def __init__(self, nan: bool = False) -> None:
        super().__init__(self.score, CAPS, cache_size=64)
        self.calls, self.nan, self.gate = 0, nan, threading.Event()
        self.gate.set()

    def score(self, images: list, names: list, template: str, offsets: Any) -> np.ndarray:
        self.calls += 1
        self.gate.wait(30)
        x = np.stack([np.asarray(im, np.float32).mean() for im in images])
        p = 1 if offsets is None else offsets.shape[0]
        shift = np.zeros(p, np.float32) if offsets is None else offsets.reshape(p, -1).sum(1)
        out = x[None, :, None] * np.arange(1, len(names) + 1)[None, None] + shift[:, None, None]
        return np.full_like(out, np.nan) if self.nan else out.astype(np.float32)


def serve(model: Toy, **config: Any) -> BackgroundServer:
    cfg = ServerConfig(budget_per_key=100, **config)
    return BackgroundServer(create_app(model, {"alice": ALICE, "bob": BOB}, cfg)).start()


def http(srv: BackgroundServer, key: str = ALICE, timeout: float = 20) -> httpx.Client:
    return httpx.Client(base_url=f"{srv.url}/v1", headers={"Authorization": f"Bearer {key}"}, timeout=timeout)


def upload(c: httpx.Client) -> str:
    r = c.post("/image-sets", content=encode({"images": np.full((2, 8, 8, 3), 9, np.uint8)}))
    assert r.status_code == 201, r.text
    return r.json()["handle"]


def predict_body(handle: str, offsets: np.ndarray) -> bytes:
    request = {"handle": handle, "class_names": ["a", "b"], "template": TEMPLATE}
    return encode({"offsets": offsets.astype(np.float32)}, {"request": json.dumps(request)})


@pytest.fixture(scope="module")
def toy_server():  # noqa: ANN201
    model = Toy()
    srv = serve(model)
    yield srv, model
    srv.stop()


# ------------------------------------------------------------------ defect 7: offsets in range, model faults final


@pytest.mark.parametrize("value", [1e20, 3e38, -3e38, 10_000.5])
def test_out_of_range_offsets_are_422_naming_the_limit_and_never_computed(toy_server, value: float) -> None:  # noqa: ANN001
    srv, model = toy_server
    with http(srv) as c:
        handle = upload(c)
        used, calls = c.get("/usage").json()["used"], model.calls
        offsets = np.zeros((3, 4, 8), np.float32)
        offsets[1, 2, 5] = value
        r = c.post("/predict", content=predict_body(handle, offsets), headers={"Content-Type": SAFETENSORS})
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["code"] == "out_of_range" and err["field"] == "offsets" and "10000" in err["message"]
        assert c.get("/usage").json()["used"] == used and model.calls == calls
        offsets[1, 2, 5] = 10_000.0  # the limit itself is valid
        ok = c.post("/predict", content=predict_body(handle, offsets))
        assert ok.status_code == 200 and c.get("/usage").json()["used"] == used + 3


def test_the_limit_is_advertised_in_capabilities_and_limits(toy_server) -> None:  # noqa: ANN001
    srv, _ = toy_server
    with http(srv) as c:
        caps, limits = c.get("/capabilities").json(), c.get("/limits").json()
    assert caps["max_abs_offset"] == limits["max_abs_offset"] == 10_000
    assert caps["max_prompts"] == limits["max_prompts"] == 16_384 and caps["max_population"] == 256
    with HTTPClient(srv.url, api_key=ALICE) as client:
        assert client.capabilities() == CAPS  # the extra fields do not disturb the client
        assert client.limits()["max_abs_offset"] == 10_000


def test_http_client_does_not_retry_a_huge_offset(toy_server) -> None:  # noqa: ANN001
    srv, model = toy_server
    images = [np.full((8, 8, 3), 9, np.uint8)]
    with HTTPClient(srv.url, api_key=ALICE, max_retries=3, backoff=0.01) as client:
        client.predict(images, ["a", "b"], TEMPLATE)  # upload + caps: what follows is the offsets alone
        calls = model.calls
        with pytest.raises(ClientError, match=r"HTTP 422.*within \+-10000") as err:
            client.predict(images, ["a", "b"], TEMPLATE, np.full((2, 4, 8), 3e38, np.float32))
    assert err.value.unbilled and model.calls == calls


def test_non_finite_scores_for_a_valid_request_are_a_final_refunded_500() -> None:
    model = Toy(nan=True)
    srv = serve(model)
    try:
        with http(srv) as c:
            r = c.post("/predict", content=predict_body(upload(c), np.zeros((2, 4, 8), np.float32)))
            assert r.status_code == 500 and r.json()["error"]["code"] == "model_fault"
            assert c.get("/usage").json()["used"] == 0  # refunded
        calls = model.calls
        with HTTPClient(srv.url, api_key=ALICE, max_retries=4, backoff=0.01) as client:
            with pytest.raises(ClientError, match="model_fault") as err:
                client.predict([np.zeros((8, 8, 3), np.uint8)], ["a", "b"], TEMPLATE, np.zeros((2, 4, 8), np.float32))
        assert model.calls == calls + 1  # computed once, never retried
        assert err.value.unbilled and "\n" not in str(err.value)
    finally:
        srv.stop()


# ------------------------------------------------------------------ per-route body limits


def test_zero_shot_reads_no_more_than_a_valid_request(toy_server) -> None:  # noqa: ANN001
    srv, _ = toy_server
    limit = ServerConfig().zero_shot_body_bytes
    assert 4 << 20 < limit < 16 << 20  # a 1024 x 1024 image plus 1,000 labels fit; 200 MB does not
    with http(srv) as c:
        assert c.get("/limits").json()["max_zero_shot_body_bytes"] == limit
        declared = c.post("/zero-shot/x", content=b"{" + b" " * (limit + 1) + b"}")
        assert declared.status_code == 413 and str(limit) in declared.json()["error"]["message"]

        def chunks() -> Any:  # no Content-Length: refused once more than the limit has arrived
            for _ in range(200):
                yield b" " * (1 << 20)

        streamed = c.post("/zero-shot/x", content=chunks())
        assert streamed.status_code == 413 and str(limit) in streamed.json()["error"]["message"]
        big_predict = c.post("/predict", content=b" " * (limit + 1))  # other routes keep max_body_bytes
        assert big_predict.status_code == 422


# ------------------------------------------------------------------ a client that left is not computed


def test_a_request_whose_client_left_while_queued_is_not_computed_nor_billed() -> None:
    model = Toy()
    srv = serve(model)
    try:
        with http(srv, ALICE) as a, http(srv, BOB) as b:
            ha, hb = upload(a), upload(b)
            b.get("/capabilities")  # capabilities cached: bob's request waits for the model only
            model.gate.clear()
            body = predict_body(ha, np.zeros((1, 4, 8)))
            first = threading.Thread(target=lambda: a.post("/predict", content=body))
            first.start()
            deadline = time.monotonic() + 20
            while model.calls == 0 and time.monotonic() < deadline:  # alice's request holds the model
                time.sleep(0.02)
            with http(srv, BOB, timeout=1.0) as impatient, pytest.raises(httpx.ReadTimeout):
                impatient.post("/predict", content=predict_body(hb, np.zeros((5, 4, 8))))
            model.gate.set()
            first.join(30)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and srv.app.state.craft.pending:
                time.sleep(0.05)
            time.sleep(0.3)
            assert model.calls == 1  # bob's request got its turn after he left: not computed
            assert b.get("/usage").json()["used"] == 0 and a.get("/usage").json()["used"] == 1
    finally:
        model.gate.set()
        srv.stop()
