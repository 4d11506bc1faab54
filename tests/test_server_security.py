"""The service's boundary: authentication, key-scoped handles, limits, malformed bodies, budgets, no leaks."""

from __future__ import annotations

import json
import secrets
import struct
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from craft_sdk import BudgetExceededError, CallableClient, Capabilities, ClientError, ConfigError
from craft_sdk.client.http import HTTPClient
from craft_sdk.wire import CHECKSUM_HEADER, SAFETENSORS, encode, parse, read, sha256_hex

pytest.importorskip("fastapi")
from craft_sdk.serve import BackgroundServer, ServerConfig, create_app, load_api_keys  # noqa: E402
from craft_sdk.serve.state import KeyRing  # noqa: E402

ALICE, BOB, CAROL, DAVE = (secrets.token_hex(16) for _ in range(4))
N_CTX, DIM = 4, 8
LIMITS = ServerConfig(max_body_bytes=64 << 10, max_images=5, max_image_side=48, max_classes=4, max_population=3,
                      max_class_name_chars=20, max_template_chars=30)
FAIL_CLASS = "explode"


def model(images: list, names: list, template: str, offsets: Any) -> np.ndarray:
    if FAIL_CLASS in names:
        raise RuntimeError(f"secret internal state {ALICE}")  # must never reach the caller
    x = np.stack([np.asarray(im, np.float32).mean(axis=(0, 1)) for im in images])  # [N, 3]
    base = x[:, :1] * np.arange(1, len(names) + 1)[None]
    p = 1 if offsets is None else offsets.shape[0]
    shift = np.zeros(p) if offsets is None else offsets.reshape(p, -1).sum(1)
    return (base[None] + shift[:, None, None]).astype(np.float32)


@pytest.fixture(scope="module")
def server():  # noqa: ANN201
    caps = Capabilities("toy-model", n_ctx=N_CTX, ctx_dim=DIM, ctx_rms=0.5, logit_scale=100.0)
    keys = {"alice": ALICE, "bob": BOB, "carol": CAROL, "dave": DAVE}
    app = create_app(CallableClient(model, caps), keys, ServerConfig(**{**LIMITS.__dict__, "budget_per_key": 10}))
    with BackgroundServer(app) as srv:
        yield srv


def http(server, key: str | None = ALICE) -> httpx.Client:  # noqa: ANN001
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    return httpx.Client(base_url=f"{server.url}/v1", headers=headers, timeout=10)


def images_body(n: int = 2, side: int = 8, dtype: Any = np.uint8) -> bytes:
    rng = np.random.default_rng(n)
    return encode({"images": rng.integers(0, 256, (n, side, side, 3)).astype(dtype)})


def predict_body(handle: str, names: list | None = None, offsets: Any = None, **extra: Any) -> bytes:
    req = {"handle": handle, "class_names": names or ["cat", "dog"], "template": "a photo of a", **extra}
    return encode({} if offsets is None else {"offsets": offsets}, {"request": json.dumps(req)})


def upload(server, key: str = ALICE) -> str:  # noqa: ANN001
    with http(server, key) as c:
        r = c.post("/image-sets", content=images_body(), headers={"Content-Type": SAFETENSORS})
    assert r.status_code == 201, r.text
    return r.json()["handle"]


def error(r: httpx.Response, status: int, code: str, field: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and (field is None or err["field"] == field), err
    return err


def test_missing_or_wrong_key_is_401_and_says_nothing(server) -> None:  # noqa: ANN001
    bodies = []
    for key in (None, "", "x" * 32, ALICE[:-1], ALICE + "0", f"Basic {ALICE}"):
        with http(server, None) as c:
            headers = {} if key is None else {"Authorization": key if key.startswith("Basic") else f"Bearer {key}".strip()}
            r = c.get("/usage", headers=headers)
        error(r, 401, "unauthorized")
        assert r.headers["WWW-Authenticate"] == "Bearer"
        bodies.append(r.content)
    assert len(set(bodies)) == 1  # the same answer whatever was wrong
    text = bodies[0].decode()
    assert all(s not in text for s in (ALICE, BOB, "alice", "bob", "carol"))
    for path, method in (("/capabilities", "GET"), ("/limits", "GET"), ("/image-sets", "POST"), ("/predict", "POST")):
        with http(server, None) as c:
            assert c.request(method, path, content=b"x" if method == "POST" else None).status_code == 401
    with http(server, None) as c:
        assert c.get("/health").json()["status"] == "ok"  # health is public and holds nothing


def test_key_ring_compares_every_key() -> None:
    ring = KeyRing({"a": ALICE, "b": BOB})
    assert ring.identify(f"Bearer {BOB}") == "b" and ring.identify(f"bearer  {ALICE} ") == "a"
    assert ring.identify(None) is None and ring.identify("Bearer ") is None and ring.identify(ALICE) is None


def test_handles_are_scoped_to_their_key(server) -> None:  # noqa: ANN001
    handle = upload(server, ALICE)
    with http(server, ALICE) as c:
        assert c.post("/predict", content=predict_body(handle)).status_code == 200
    with http(server, BOB) as c:
        foreign = c.post("/predict", content=predict_body(handle))
        unknown = c.post("/predict", content=predict_body("0" * 32))
    error(foreign, 404, "unknown_handle", "handle")
    assert foreign.content == unknown.content  # another key's handle is indistinguishable from no handle
    assert upload(server, BOB) != handle  # same images, different key: a different handle


@pytest.mark.parametrize(
    "case, status, field",
    [
        ("not safetensors", 422, "body"),
        ("header length lies", 422, "body"),
        ("offsets float64", 422, "offsets"),
        ("offsets float16", 422, "offsets"),
        ("offsets wrong shape", 422, "offsets"),
        ("offsets NaN", 422, "offsets"),
        ("offsets inf", 422, "offsets"),
        ("offsets truncated", 422, "offsets"),
        ("population over limit", 413, "offsets"),
        ("extra tensor", 422, "offsets"),
        ("no request metadata", 422, "request"),
        ("request not an object", 422, "request"),
        ("too many classes", 413, "class_names"),
        ("duplicate classes", 422, "class_names"),
        ("class name too long", 422, "class_names"),
        ("class names not strings", 422, "class_names"),
        ("template too long", 422, "template"),
        ("bad logits dtype", 422, "logits_dtype"),
    ],
)
def test_malformed_predictions_are_rejected_unbilled(server, case: str, status: int, field: str) -> None:  # noqa: ANN001
    handle = upload(server, CAROL)
    ok = np.zeros((2, N_CTX, DIM), np.float32)
    bodies = {
        "not safetensors": b"\x00" * 40,
        "header length lies": struct.pack("<Q", 10**9) + b"{}",
        "offsets float64": predict_body(handle, offsets=ok.astype(np.float64)),
        "offsets float16": predict_body(handle, offsets=ok.astype(np.float16)),
        "offsets wrong shape": predict_body(handle, offsets=np.zeros((2, N_CTX, DIM + 1), np.float32)),
        "offsets NaN": predict_body(handle, offsets=np.full((N_CTX, DIM), np.nan, np.float32)),
        "offsets inf": predict_body(handle, offsets=np.full((1, N_CTX, DIM), np.inf, np.float32)),
        "offsets truncated": predict_body(handle, offsets=ok)[:-16],
        "population over limit": predict_body(handle, offsets=np.zeros((4, N_CTX, DIM), np.float32)),
        "extra tensor": encode({"offsets": ok, "features": ok}, {"request": json.dumps({"handle": handle, "class_names": ["a"]})}),
        "no request metadata": encode({"offsets": ok}),
        "request not an object": encode({}, {"request": "[1, 2]"}),
        "too many classes": predict_body(handle, names=list("abcde")),
        "duplicate classes": predict_body(handle, names=["a", "a"]),
        "class name too long": predict_body(handle, names=["a" * 21]),
        "class names not strings": predict_body(handle, names=[1, 2]),
        "template too long": predict_body(handle, template="x" * 31),
        "bad logits dtype": predict_body(handle, logits_dtype="float64"),
    }
    with http(server, CAROL) as c:
        before = c.get("/usage").json()["used"]
        r = c.post("/predict", content=bodies[case], headers={"Content-Type": SAFETENSORS})
        err = error(r, status, r.json()["error"]["code"], field)
        assert c.get("/usage").json()["used"] == before
    assert "Traceback" not in r.text and len(err["message"]) < 300


@pytest.mark.parametrize(
    "case, status",
    [("too many images", 413), ("image too large", 413), ("float pixels", 422), ("grey pixels", 422), ("bad names", 422), ("empty", 422)],
)
def test_malformed_uploads_are_rejected(server, case: str, status: int) -> None:  # noqa: ANN001
    bodies = {
        "too many images": images_body(n=6),
        "image too large": images_body(side=49),
        "float pixels": images_body(dtype=np.float32),
        "grey pixels": encode({"images": np.zeros((2, 8, 8), np.uint8)}),
        "bad names": encode({"image.000000": np.zeros((8, 8, 3), np.uint8), "image.000002": np.zeros((8, 8, 3), np.uint8)}),
        "empty": encode({}),
    }
    with http(server) as c:
        error(c.post("/image-sets", content=bodies[case]), status, "too_large" if status == 413 else "invalid", "images")


def test_oversized_bodies_are_413_before_being_read(server) -> None:  # noqa: ANN001
    big = b"\x00" * ((64 << 10) + 1)
    with http(server) as c:
        error(c.post("/image-sets", content=big), 413, "too_large", "body")

        def chunks():  # no Content-Length: the server counts as it reads
            for _ in range(20):
                yield b"\x00" * (8 << 10)

        error(c.post("/predict", content=chunks()), 413, "too_large", "body")


def test_response_holds_only_logits(server) -> None:  # noqa: ANN001
    handle = upload(server, BOB)
    offsets = np.random.default_rng(0).normal(size=(3, N_CTX, DIM)).astype(np.float32)
    with http(server, BOB) as c:
        r = c.post("/predict", content=predict_body(handle, ["cat", "dog", "eel"], offsets), headers={"Idempotency-Key": "k1"})
        caps = c.get("/capabilities").json()
    assert r.status_code == 200 and r.headers["content-type"] == SAFETENSORS
    assert r.headers[CHECKSUM_HEADER] == sha256_hex(r.content)
    entries, meta = parse(r.content)
    assert list(entries) == ["logits"] and entries["logits"].shape == (3, 2, 3) and meta == {"queries": "3"}
    images = np.random.default_rng(2).integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    want = model([im for im in images], ["cat", "dog", "eel"], "", offsets)
    assert np.array_equal(read(r.content, entries["logits"], "logits"), want)
    assert set(caps) == {"model_id", "n_ctx", "ctx_dim", "output", "ctx_rms", "logit_scale",
                         "max_abs_offset", "max_population", "max_prompts", "max_request_s"}  # what one request may ask


def test_idempotency_replays_without_billing(server) -> None:  # noqa: ANN001
    handle = upload(server, BOB)
    body = predict_body(handle, offsets=np.zeros((2, N_CTX, DIM), np.float32))
    with http(server, BOB) as c:
        before = c.get("/usage").json()["used"]
        first = c.post("/predict", content=body, headers={"Idempotency-Key": "same-key"})
        again = c.post("/predict", content=body, headers={"Idempotency-Key": "same-key"})
        assert first.content == again.content and again.headers["Idempotent-Replayed"] == "true"
        assert c.get("/usage").json()["used"] == before + 2
        other = predict_body(handle, offsets=np.ones((2, N_CTX, DIM), np.float32))
        error(c.post("/predict", content=other, headers={"Idempotency-Key": "same-key"}), 422, "idempotency_key_reused")
        error(c.post("/predict", content=body, headers={"Idempotency-Key": "no spaces"}), 422, "invalid", "Idempotency-Key")
    with http(server, CAROL) as c:  # idempotency keys are per API key too
        assert c.post("/predict", content=body, headers={"Idempotency-Key": "same-key"}).status_code == 404


def test_budget_per_key_is_a_hard_ceiling(server) -> None:  # noqa: ANN001
    imgs, names = [np.full((8, 8, 3), 9, np.uint8)] * 2, ["a", "b"]
    with HTTPClient(server.url, api_key=DAVE, backoff=0.01) as c:
        for _ in range(3):
            c.predict(imgs, names, offsets=np.zeros((3, N_CTX, DIM), np.float32))
        assert c.usage()["remaining"] == 1
        with pytest.raises(BudgetExceededError, match="budget of this API key is spent"):
            c.predict(imgs, names, offsets=np.zeros((2, N_CTX, DIM), np.float32))  # 2 > 1 left: refused whole
        c.predict(imgs, names)
        with pytest.raises(BudgetExceededError):
            c.predict(imgs, names)
        assert c.usage() == {"used": 10, "budget": 10, "remaining": 0, "uploads": 1}
        with pytest.raises(BudgetExceededError):
            c.predict(imgs, names, offsets=np.zeros((4, N_CTX, DIM), np.float32))  # over max_population: split, then refused


def test_internal_errors_leak_nothing_and_are_refunded(server) -> None:  # noqa: ANN001
    handle = upload(server, BOB)
    with http(server, BOB) as c:
        before = c.get("/usage").json()["used"]
        r = c.post("/predict", content=predict_body(handle, names=["cat", FAIL_CLASS]))
        assert c.get("/usage").json()["used"] == before
    assert r.status_code == 500 and r.json() == {"error": {"code": "internal", "message": "internal server error", "field": None}}
    assert ALICE not in r.text
    with http(server) as c:
        assert c.get("/no-such-route").status_code == 404 and c.delete("/usage").status_code == 405


def test_limits_are_published_and_enforced_client_side(server) -> None:  # noqa: ANN001
    with HTTPClient(server.url, api_key=BOB) as c:
        assert c.limits()["max_images"] == 5
        with pytest.raises(ClientError, match="exceed the server's limit of 5"):
            c.upload([np.zeros((8, 8, 3), np.uint8)] * 6)


def test_api_key_file(tmp_path: Path) -> None:
    f = tmp_path / "keys"
    f.write_text(f"# comment\n\n{ALICE}\nbob {BOB}\n")
    assert load_api_keys(f) == {"key-1": ALICE, "bob": BOB}
    for text, match in ((f"{ALICE}\n{ALICE}\n", "repeats the key"), ("short\n", "shorter than"), ("# nothing\n", "no API key"), ("a b c\n", "expected KEY")):
        f.write_text(text)
        with pytest.raises(ConfigError, match=match):
            load_api_keys(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_api_keys(tmp_path / "missing")
    with pytest.raises(ConfigError, match="max_classes"):
        ServerConfig(max_classes=0)


def test_openapi_documents_the_api(server) -> None:  # noqa: ANN001
    with http(server, None) as c:
        doc = c.get("/openapi.json").json()
        assert c.get("/docs").status_code == 404 and httpx.get(f"{server.url}/docs").status_code == 404
    paths = doc["paths"]
    assert {"/v1/health", "/v1/limits", "/v1/usage", "/v1/capabilities", "/v1/image-sets", "/v1/predict"} <= set(paths)
    assert SAFETENSORS in paths["/v1/predict"]["post"]["requestBody"]["content"]
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert paths["/v1/predict"]["post"]["security"] == [{"HTTPBearer": []}] and "security" not in paths["/v1/health"]["get"]
