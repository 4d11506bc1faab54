"""Hostile input on both sides of the wire (issue 11): malformed headers, unbounded answers, tenants
hurting each other, slow connections, key files, and servers that lie to the client."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import socket
import struct
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from faultinject import Hostile

from craft_sdk import CallableClient, Capabilities, ClientError, ConfigError
from craft_sdk.client.http import HTTPClient, _RemoteSet
from craft_sdk.wire import SAFETENSORS, WireError, encode, loads_json, parse, read

pytest.importorskip("fastapi")
from craft_sdk._lru import LRU  # noqa: E402
from craft_sdk.serve import BackgroundServer, ServerConfig, create_app, load_api_keys  # noqa: E402
from craft_sdk.serve.state import FairScheduler  # noqa: E402

ALICE, BOB = secrets.token_hex(16), secrets.token_hex(16)
N_CTX, DIM = 4, 8
CAPS = Capabilities("toy-model", n_ctx=N_CTX, ctx_dim=DIM, ctx_rms=0.5, logit_scale=100.0)


def toy(images: list, names: list, template: str, offsets: Any) -> np.ndarray:
    x = np.stack([np.asarray(im, np.float32).mean(axis=(0, 1)) for im in images])
    base = x[:, :1] * np.arange(1, len(names) + 1)[None]
    p = 1 if offsets is None else offsets.shape[0]
    shift = np.zeros(p) if offsets is None else offsets.reshape(p, -1).sum(1)
    return (base[None] + shift[:, None, None]).astype(np.float32)


class CountingClient(CallableClient):
    """The toy model, counting how often image features are computed."""

    def __init__(self) -> None:
        super().__init__(toy, CAPS, cache_size=64)
        self.prepared = 0

    def _prepare(self, images: list) -> Any:
        self.prepared += 1
        return images


def start(config: ServerConfig | None = None, client: Any = None) -> BackgroundServer:
    return BackgroundServer(create_app(client or CountingClient(), {"alice": ALICE, "bob": BOB}, config or ServerConfig())).start()


@pytest.fixture(scope="module")
def server():  # noqa: ANN201
    srv = start(ServerConfig(max_image_sets=1, max_answer_bytes=4 * 3 * 2 * 4, max_prompts=8, budget_per_key=1000))
    yield srv
    srv.stop()


def http(server: BackgroundServer, key: str = ALICE) -> httpx.Client:
    return httpx.Client(base_url=f"{server.url}/v1", headers={"Authorization": f"Bearer {key}"}, timeout=20)


def images_body(n: int = 2, seed: int = 0) -> bytes:
    return encode({"images": np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3)).astype(np.uint8)})


def upload(server: BackgroundServer, key: str = ALICE, seed: int = 0) -> str:
    with http(server, key) as c:
        r = c.post("/image-sets", content=images_body(seed=seed))
    assert r.status_code == 201, r.text
    return r.json()["handle"]


def raw_body(header: str | bytes, data: bytes = b"\x00") -> bytes:
    h = header.encode() if isinstance(header, str) else header
    return struct.pack("<Q", len(h)) + h + data


DEEP = "[" * 100_000 + "]" * 100_000
HUGE = "9" * 5000
HEADERS = {
    "dtype list": '{"t": {"dtype": ["U8"], "shape": [1], "data_offsets": [0, 1]}}',
    "dtype dict": '{"t": {"dtype": {"U8": 1}, "shape": [1], "data_offsets": [0, 1]}}',
    "shape 2^63": '{"t": {"dtype": "U8", "shape": [9223372036854775808, 0], "data_offsets": [0, 0]}}',
    "shape 2^64 x 0": '{"t": {"dtype": "F32", "shape": [0, 18446744073709551616], "data_offsets": [0, 0]}}',
    "nested 100,000": '{"t": ' + DEEP + "}",
    "integer 5,000 digits": '{"t": {"dtype": "U8", "shape": [' + HUGE + '], "data_offsets": [0, 1]}}',
    "request nested 100,000": json.dumps({"__metadata__": {"request": DEEP}}),
}


@pytest.mark.parametrize("route", ["/image-sets", "/predict"])
@pytest.mark.parametrize("case", sorted(HEADERS))
def test_malformed_headers_are_422_not_500(server, route: str, case: str, caplog) -> None:  # noqa: ANN001
    with caplog.at_level(logging.ERROR), http(server) as c:
        before = c.get("/usage").json()["used"]
        r = c.post(route, content=raw_body(HEADERS[case]), headers={"Content-Type": SAFETENSORS})
        assert c.get("/usage").json()["used"] == before
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid" and len(err["message"]) < 300 and "\n" not in err["message"]
    assert "Traceback" not in caplog.text and "internal error" not in caplog.text


def test_request_metadata_with_a_huge_integer_is_422(server) -> None:  # noqa: ANN001
    handle = upload(server)
    body = encode({}, {"request": '{"handle": "' + handle + '", "class_names": ["a"], "x": ' + HUGE + "}"})
    with http(server) as c:
        r = c.post("/predict", content=body)
    assert r.status_code == 422 and r.json()["error"]["field"] == "request"


# ------------------------------------------------------------------ the codec, fuzzed

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)
entries = st.fixed_dictionaries(
    {"dtype": st.sampled_from(["U8", "F32", "F16", "I64", "X9"]) | json_values,
     "shape": st.lists(st.integers(-2, 2**70), max_size=4) | json_values,
     "data_offsets": st.lists(st.integers(-2, 2**70), min_size=2, max_size=2) | json_values}
)
headers = st.dictionaries(st.text(min_size=1, max_size=6), entries | json_values, max_size=3)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=headers, data=st.binary(max_size=64))
def test_codec_fuzz_structured_headers_raise_only_wire_errors(header: dict, data: bytes) -> None:
    body = raw_body(json.dumps(header), data)
    try:
        found, _ = parse(body)
    except WireError:
        return
    for name, entry in found.items():
        try:
            arr = read(body, entry, name)
        except WireError:
            continue
        assert arr.nbytes == entry.end - entry.start


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=256))
def test_codec_fuzz_arbitrary_bytes_raise_only_wire_errors(body: bytes) -> None:
    try:
        parse(body)
    except WireError:
        pass


@settings(max_examples=100, deadline=None)
@given(
    arrays=st.dictionaries(
        st.text(alphabet="abcxyz_.", min_size=1, max_size=8),
        st.tuples(st.sampled_from([np.uint8, np.float32, np.float16]), st.lists(st.integers(0, 4), max_size=3)),
        max_size=4,
    ),
    meta=st.dictionaries(st.text(max_size=5), st.text(max_size=20), max_size=3),
)
def test_codec_fuzz_round_trip(arrays: dict, meta: dict) -> None:
    rng = np.random.default_rng(0)
    tensors = {k: (rng.random(shape) * 200).astype(dt) for k, (dt, shape) in arrays.items()}
    body = encode(tensors, meta or None)
    found, got_meta = parse(body)
    assert got_meta == meta and set(found) == set(tensors)
    for k, v in tensors.items():
        assert np.array_equal(read(body, found[k], k), v)


def test_loads_json_bounds() -> None:
    assert loads_json('{"a": [1, [2]]}') == {"a": [1, [2]]}
    assert loads_json('"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["') == "[" * 40  # brackets inside strings do not nest
    for bad in (DEEP, HUGE, b"\xff\xfe", "{"):
        with pytest.raises(WireError):
            loads_json(bad)


# ------------------------------------------------------------------ bounded answers


def test_answer_size_is_limited_advertised_and_the_client_splits(server) -> None:  # noqa: ANN001
    """Limit 96 bytes: 2 images x 3 classes x 4 bytes = 24 per candidate (and 8 prompts): 2 candidates per request."""
    handle = upload(server)
    offsets = np.random.default_rng(1).normal(size=(5, N_CTX, DIM)).astype(np.float32)
    body = encode({"offsets": offsets}, {"request": json.dumps({"handle": handle, "class_names": ["a", "b", "c"]})})
    with http(server) as c:
        assert c.get("/limits").json()["max_answer_bytes"] == 96
        before = c.get("/usage").json()["used"]
        r = c.post("/predict", content=body)
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large" and "answer" in r.json()["error"]["message"]
        assert c.get("/usage").json()["used"] == before  # refused before billing
    imgs = [np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(np.uint8) for _ in range(2)]
    with HTTPClient(server.url, api_key=ALICE) as client:
        got = client.predict(imgs, ["a", "b", "c"], offsets=offsets)
        assert client.usage()["used"] == before + 5
    want = toy(imgs, ["a", "b", "c"], "", offsets)
    assert np.array_equal(got, want)


def test_prompt_cap_is_413_and_the_client_splits(server) -> None:  # noqa: ANN001
    """max_prompts 8: 3 candidates x 3 classes = 9 prompts is one request too many."""
    handle = upload(server)
    offsets = np.zeros((3, N_CTX, DIM), np.float32)
    body = encode({"offsets": offsets}, {"request": json.dumps({"handle": handle, "class_names": ["a", "b", "c"]})})
    with http(server) as c:
        r = c.post("/predict", content=body)
    assert r.status_code == 413 and "prompts" in r.json()["error"]["message"]
    with HTTPClient(server.url, api_key=ALICE) as client:
        assert client.predict([np.zeros((8, 8, 3), np.uint8)], ["a", "b", "c"], offsets=offsets).shape == (3, 1, 3)
        with pytest.raises(ClientError, match="one candidate's answer"):  # 9 classes > 8 prompts: cannot split further
            client.predict([np.zeros((8, 8, 3), np.uint8)], list("abcdefghi"))


def test_idempotency_cache_is_bounded_in_bytes() -> None:
    cache: LRU[str, bytes] = LRU(10, max_size=100)
    cache.put("big", b"x" * 101, 101)
    assert len(cache) == 0 and cache.size == 0  # an answer over the whole bound is not kept
    for i in range(5):
        cache.put(str(i), b"x" * 40, 40)
    assert len(cache) == 2 and cache.size == 80


# ------------------------------------------------------------------ tenants


def test_one_keys_uploads_never_evict_anothers(server) -> None:  # noqa: ANN001
    alice = upload(server, ALICE, seed=5)
    for seed in range(3):
        upload(server, BOB, seed=10 + seed)  # a quota of one set per key: Bob evicts only his own
    body = encode({}, {"request": json.dumps({"handle": alice, "class_names": ["a", "b"]})})
    with http(server, ALICE) as c:
        assert c.post("/predict", content=body).status_code == 200


def test_another_keys_traffic_never_makes_a_retry_billed_twice() -> None:
    """Bob's requests push Alice's answer out of the (shared, bounded) answer cache; her retry is still not billed."""
    srv = start(ServerConfig(idempotency_entries=2))
    try:
        bodies = {k: encode({}, {"request": json.dumps({"handle": upload(srv, k), "class_names": ["a", "b"]})}) for k in (ALICE, BOB)}
        with http(srv, ALICE) as alice, http(srv, BOB) as bob:
            first = alice.post("/predict", content=bodies[ALICE], headers={"Idempotency-Key": "alice-1"})
            for i in range(5):
                assert bob.post("/predict", content=bodies[BOB], headers={"Idempotency-Key": f"bob-{i}"}).status_code == 200
            retry = alice.post("/predict", content=bodies[ALICE], headers={"Idempotency-Key": "alice-1"})
            assert alice.get("/usage").json()["used"] == 1
        assert retry.status_code == 200 and retry.headers["Idempotent-Replayed"] == "true" and retry.content == first.content
    finally:
        srv.stop()


def test_no_cross_key_deduplication() -> None:
    """The same images uploaded by two keys are prepared twice: upload time reveals nothing about other keys."""
    model = CountingClient()
    srv = start(client=model)
    try:
        upload(srv, ALICE, seed=7)
        upload(srv, ALICE, seed=7)  # the same key again: its own set, kept
        assert model.prepared == 1
        upload(srv, BOB, seed=7)
        assert model.prepared == 2
    finally:
        srv.stop()


def test_fair_scheduler_gives_turns_round_robin() -> None:
    async def scenario() -> list[str]:
        sched, order = FairScheduler(), []

        async def job(key: str, i: int) -> None:
            async with sched.turn(key):
                order.append(f"{key}{i}")
                await asyncio.sleep(0.01)

        tasks = [asyncio.create_task(job("a", i)) for i in range(5)]
        await asyncio.sleep(0)  # a0 holds the model, a1..a4 wait
        tasks.append(asyncio.create_task(job("b", 0)))
        await asyncio.gather(*tasks)
        return order

    order = asyncio.run(scenario())
    assert order.index("b0") == 1, order  # right after the request holding the model; FIFO would run it last


def test_a_big_request_does_not_starve_another_key() -> None:
    """Key A queues 4 slow requests; key B's single request is served after at most one of them.

    Asserted on the order in which the model ran the requests (A's name "a", B's "b"), not on wall time, so a
    machine whose cores are busy cannot fail it.
    """
    delay = 0.3
    calls: list[str] = []

    def slow(images: list, names: list, template: str, offsets: Any) -> np.ndarray:
        calls.append(names[0])
        time.sleep(delay)
        return toy(images, names, template, offsets)

    srv = start(client=CallableClient(slow, CAPS))
    try:
        handles = {k: upload(srv, k) for k in (ALICE, BOB)}
        names = {ALICE: "a", BOB: "b"}
        bodies = {k: encode({}, {"request": json.dumps({"handle": h, "class_names": [names[k]]})}) for k, h in handles.items()}

        async def run() -> None:
            async with httpx.AsyncClient(base_url=f"{srv.url}/v1", timeout=30) as c:
                def post(key: str) -> Any:
                    return c.post("/predict", content=bodies[key], headers={"Authorization": f"Bearer {key}"})

                a = [asyncio.create_task(post(ALICE)) for _ in range(4)]
                while calls.count("a") < 1:  # A's first request holds the model, the other three queue behind it
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.1)
                rb = await post(BOB)
                assert rb.status_code == 200 and all(r.status_code == 200 for r in await asyncio.gather(*a))

        asyncio.run(run())
    finally:
        srv.stop()
    assert sorted(calls) == ["a", "a", "a", "a", "b"], calls
    assert calls.index("b") <= 1, calls  # round-robin: right after A's current request; FIFO would run it last


# ------------------------------------------------------------------ connections and secrets


def test_slow_headers_and_bodies_are_cut_off() -> None:
    srv = start(ServerConfig(header_timeout_s=1, body_timeout_s=1))
    try:
        socks = []
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=60)
            s.sendall(b"POST /v1/image-sets HTTP/1.1\r\nHost: x\r\n")  # headers never finish
            socks.append(s)
        body_sock = socket.create_connection(("127.0.0.1", srv.port), timeout=60)
        body_sock.sendall(f"POST /v1/image-sets HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE}\r\nContent-Length: 1000\r\n\r\nab".encode())
        t0 = time.monotonic()
        for s in socks:
            assert s.recv(100) == b""  # closed by the server
        # the header timeout (1 s) closed them, not the client's 60 s socket timeout (which would raise); the
        # bound leaves room for a machine whose cores are busy
        assert time.monotonic() - t0 < 30
        answer = b""
        while chunk := body_sock.recv(4096):  # the server closes the connection after its answer
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408") and b'"timeout"' in answer
        for s in [*socks, body_sock]:
            s.close()
    finally:
        srv.stop()


def test_key_file_collisions_are_refused_and_errors_never_show_a_key(tmp_path: Path) -> None:
    f = tmp_path / "keys"
    cases = {
        f"alice {ALICE}\nalice {BOB}\n": "reuses the key name of line 1",
        f"key-2 {ALICE}\n{BOB}\n": "reuses the key name of line 1",  # the bare key would be named key-2
        f"{ALICE} {BOB}\nshort\n": "shorter than",
        f"{ALICE}\n{ALICE[:10]}\n": "shorter than",
    }
    for text, match in cases.items():
        f.write_text(text)
        with pytest.raises(ConfigError, match=match) as err:
            load_api_keys(f)
        assert ALICE not in str(err.value) and BOB not in str(err.value) and ALICE[:10] not in str(err.value)
    f.write_text(f"alice {ALICE}\n{BOB}\n")
    assert load_api_keys(f) == {"alice": ALICE, "key-2": BOB}


# ------------------------------------------------------------------ hostile servers


@pytest.fixture(scope="module")
def hostile():  # noqa: ANN201
    app = Hostile()
    with BackgroundServer(app) as srv:
        yield app, srv


def caps_body(**over: Any) -> bytes:
    return json.dumps({"model_id": "m", "n_ctx": 4, "ctx_dim": 8, "output": "logits", "ctx_rms": 0.1, "logit_scale": 100.0, **over}).encode()


@pytest.mark.parametrize(
    "answer, match",
    [
        ((200, [], caps_body(ctx_dim=100_000)), "ctx_dim must be null or an integer from 1 to 8192"),
        ((200, [], caps_body(n_ctx=200, ctx_dim=8000)), "n_ctx x ctx_dim must be at most 262144"),
        ((200, [], caps_body(n_ctx="4")), "n_ctx must be"),
        ((200, [], caps_body(ctx_rms=float("inf")).replace(b"Infinity", b"1e999")), "ctx_rms must be"),
        ((200, [], caps_body(model_id=["m"])), "model_id must be"),
        ((200, [], b'{"model_id": "m", "n_ctx": ' + HUGE.encode() + b"}"), "not valid JSON"),
        ((200, [], DEEP.encode()), "nests JSON deeper"),
        ((422, [], b'{"error": ' + DEEP.encode() + b"}"), "HTTP 422"),
        ((422, [], b'{"error": {"code": ["x"], "message": {"a": 1}, "field": 7}}'), "HTTP 422"),
        ((503, [(b"retry-after", b"nan")], b"{}"), "failed after 2 attempts: HTTP 503"),
        ((503, [(b"retry-after", b"1e999")], b"{}"), "failed after 2 attempts: HTTP 503"),
    ],
)
def test_hostile_answers_become_one_line_client_errors(hostile, answer: tuple, match: str) -> None:  # noqa: ANN001
    app, srv = hostile
    app.answer = answer
    with HTTPClient(srv.url, api_key=ALICE, max_retries=1, backoff=0.01, max_backoff=0.05) as c:
        with pytest.raises(ClientError, match=match) as err:
            c.capabilities()
    assert "\n" not in str(err.value) and len(str(err.value)) < 600


def test_hostile_limits_and_logits_are_refused(hostile) -> None:  # noqa: ANN001
    app, srv = hostile
    app.answer = (200, [], b'{"max_images": "5", "max_population": -3, "max_answer_bytes": 1e999, "max_classes": 4}')
    with HTTPClient(srv.url, api_key=ALICE) as c:
        assert c.limits() == {"max_classes": 4}
    logits = raw_body('{"logits": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}', b"\x00" * 4)
    app.answer = (200, [], logits)
    with HTTPClient(srv.url, api_key=ALICE, max_retries=1, backoff=0.01) as c:
        c._caps["a photo of a"], c._limits = CAPS, {}
        with pytest.raises(ClientError, match="corrupt response body") as err:
            c._predict_chunk(_RemoteSet([], "h"), ["a"], "a photo of a", None)
    assert "\n" not in str(err.value)


def test_a_two_line_key_file_is_refused_without_showing_either_key(tmp_path: Path) -> None:
    from PIL import Image
    from typer.testing import CliRunner

    from craft_sdk.cli import app

    key_file = tmp_path / "my.key"
    key_file.write_text(f"{ALICE}\n{BOB}\n")
    data = tmp_path / "data"
    for cls in ("a", "b"):
        (data / cls).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(data / cls / f"{i}.png")
    res = CliRunner().invoke(app, ["tune", str(data), "--model", "http://127.0.0.1:9", "--api-key-file", str(key_file),
                                   "--shots", "2", "--budget", "10", "--out", str(tmp_path / "out")])
    assert res.exit_code != 0
    assert ALICE not in res.output and BOB not in res.output
    assert "exactly one key" in res.output and len(res.output.strip().splitlines()) == 1
