"""The hosted-VLM shapes end to end on loopback: ChatVLMClient and EmbeddingClient (the real openai client)
against ``craft-sdk serve``'s /v1/chat/completions, /v1/embeddings and /v1/embed, and against canned bodies
shaped like the providers' documented examples (no logprobs, a refusal, content_filter, 429 + Retry-After)."""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import CLASS_NAMES, random_images

from craft_sdk import BudgetExceededError, ClientError, ConfigError, create_client
from craft_sdk.client.chat import ChatVLMClient, answer_letter, build_question, groups_of, parse_question
from craft_sdk.client.embed import EmbeddingClient
from craft_sdk.scores import softmax

pytest.importorskip("openai")
pytest.importorskip("torch")
pytest.importorskip("fastapi")
from craft_sdk.serve import BackgroundServer, ServerConfig, create_app  # noqa: E402
from craft_sdk.serve.openai_compat import image_embedding_counts  # noqa: E402

KEY = secrets.token_hex(16)
NAMES = list(CLASS_NAMES)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path):  # noqa: ANN201
    from craft_sdk.client.openclip import OpenCLIPClient

    return OpenCLIPClient(f"local-dir:{tiny_model_dir}")


@pytest.fixture(scope="module")
def server(model):  # noqa: ANN001, ANN201
    with BackgroundServer(create_app(model, {"alice": KEY})) as srv:
        yield srv


def used(srv: Any) -> int:
    return srv.app.state.craft.store.usage("alice")["used"]


def local(model: Any, imgs: list, names: list[str], template: str = "a photo of a") -> np.ndarray:
    return np.concatenate([model.predict([im], names, template) for im in imgs])  # one image per request, as served


# ---------------------------------------------------------------------- the question


def test_question_round_trip_and_answer_letters() -> None:
    q = build_question("a satellite photo of", NAMES)
    assert parse_question(q) == ("a satellite photo of", NAMES)
    assert parse_question("A. cat\nB. dog") == ("a photo of a", ["cat", "dog"])
    with pytest.raises(ClientError, match="options"):
        parse_question("what is this?")
    assert [answer_letter(t) for t in ("B", " B.", "(C)", "D: forest", "Answer", "b", "", None)] == ["B", "B", "C", "D", None, None, None, None]
    assert groups_of(20) == [list(range(20))]
    g = groups_of(45)
    assert [len(x) for x in g] == [20, 20, 7] and all(x[0] == 0 for x in g) and sorted({c for x in g for c in x}) == list(range(45))


# ---------------------------------------------------------------------- chat over craft-sdk serve


def test_chat_logprobs_equal_the_served_model_and_usage_is_counted(model, server) -> None:  # noqa: ANN001
    imgs = random_images(5, seed=3)
    before = used(server)
    chat = create_client(f"chat+{server.url}/v1?model=tiny", api_key=KEY)
    assert isinstance(chat, ChatVLMClient) and not chat.capabilities().soft_prompts
    out = chat.predict(imgs, NAMES, "a photo of a")
    np.testing.assert_allclose(softmax(out), softmax(local(model, imgs, NAMES)), atol=1e-5)
    assert used(server) - before == 5  # one query per request
    est = chat.estimate_usage(5, NAMES, "a photo of a")
    assert chat.usage.to_dict() == est.to_dict()  # the server bills tokens by the same documented rule
    assert chat.usage.requests == 5 and chat.usage.images == 5 and chat.usage.output_tokens == 5
    assert sum(chat.problems.values()) == 0


def test_chat_more_classes_than_top_logprobs_is_exact(model, server) -> None:  # noqa: ANN001
    names = [f"class number {i}" for i in range(45)]
    imgs = random_images(2, seed=4)
    chat = create_client(f"chat+{server.url}/v1?model=tiny", api_key=KEY)
    out = chat.predict(imgs, names, "a photo of a")
    np.testing.assert_allclose(softmax(out), softmax(local(model, imgs, names)), atol=1e-5)
    assert chat.usage.requests == 2 * 3 == chat.estimate_usage(2, names).requests


def test_chat_sampled_answers_are_smoothed_frequencies(model, server) -> None:  # noqa: ANN001
    imgs = random_images(4, seed=5)
    n = 24
    chat = create_client(f"chat+{server.url}/v1?model=tiny&samples={n}", api_key=KEY)
    probs = softmax(chat.predict(imgs, NAMES))
    counts = probs * (n + len(NAMES)) - 1.0  # add-one smoothing undone: whole numbers of answers summing to n
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-4)
    np.testing.assert_allclose(counts.sum(1), n, atol=1e-3)
    assert chat.usage.requests == 4 and chat.usage.output_tokens == 4 * n  # one request with n=24 per image
    assert chat.estimate_usage(4, NAMES).output_tokens == 4 * n
    truth = softmax(local(model, imgs, NAMES))
    assert (probs.argmax(1) == truth.argmax(1)).mean() >= 0.5


def test_chat_route_replays_an_idempotent_request_and_refuses_urls(server) -> None:  # noqa: ANN001
    from craft_sdk.client.chat import data_uri

    question = build_question("a photo of a", NAMES)
    body = {"model": "tiny", "max_tokens": 1, "logprobs": True, "top_logprobs": 3, "n": 2, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "text", "text": question},
                                                      {"type": "image_url", "image_url": {"url": data_uri(random_images(1, 6)[0])}}]}]}
    headers = {"Authorization": f"Bearer {KEY}", "Idempotency-Key": "replay-1"}
    before = used(server)
    a = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    b = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert a.status_code == b.status_code == 200 and a.json() == b.json() and used(server) - before == 1
    answer = a.json()
    assert len(answer["choices"]) == 2 and len(answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 3
    assert answer["usage"]["completion_tokens"] == 2
    body["messages"][0]["content"][1]["image_url"]["url"] = "https://example.com/cat.png"
    bad = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert bad.status_code == 422 and "data: URI" in bad.json()["error"]["message"]


def test_every_route_bills_the_one_query_cost_rule(server) -> None:  # noqa: ANN001
    """Each metered route bills ``wire.query_cost`` of what it scores (no offsets: 1), whatever ``n`` or the number of
    texts, and says so in ``X-Craft-Queries``: the header, the meter and the rule agree."""
    from craft_sdk.client.chat import data_uri
    from craft_sdk.wire import query_cost

    uri = data_uri(random_images(1, 7)[0])
    question = build_question("a photo of a", NAMES)
    bodies = {
        "/v1/chat/completions": {"model": "tiny", "n": 3, "messages": [{"role": "user", "content": [
            {"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": uri}}]}]},
        "/v1/embeddings": {"model": "tiny", "input": ["a cat", "a dog", "an eel"]},
        "/v1/embed": {"model": "tiny", "texts": ["a cat", "a dog"], "embedding_types": ["float"]},
        "/v1/zero-shot/tiny": {"inputs": uri.partition(",")[2], "parameters": {"candidate_labels": NAMES}},
    }
    for path, body in bodies.items():
        before = used(server)
        r = httpx.post(f"{server.url}{path}", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        assert r.status_code == 200, (path, r.text)
        assert int(r.headers["X-Craft-Queries"]) == used(server) - before == query_cost(None), path


def test_budget_exceeded_is_final_not_retried(model) -> None:  # noqa: ANN001
    app = create_app(model, {"alice": KEY}, ServerConfig(budget_per_key=2))
    with BackgroundServer(app) as srv:
        chat = create_client(f"chat+{srv.url}/v1?model=tiny", api_key=KEY, max_concurrency=1)
        with pytest.raises(BudgetExceededError, match="budget"):
            chat.predict(random_images(3, seed=7), NAMES)
        assert chat.usage.requests == 3  # two answered, the third refused once (x-should-retry: false)


# ---------------------------------------------------------------------- embeddings over craft-sdk serve


@pytest.mark.parametrize("profile", ["openai", "cohere"])
def test_embeddings_are_scaled_cosines_and_images_are_embedded_once(model, server, profile: str) -> None:  # noqa: ANN001
    counts = image_embedding_counts(server.app.state.craft)
    imgs = random_images(6, seed=20 if profile == "openai" else 21)
    client = create_client(f"embed+{server.url}/v1?model=tiny&profile={profile}", api_key=KEY)
    assert isinstance(client, EmbeddingClient)
    before = sum(counts.values())
    out = client.predict(imgs, NAMES, "a photo of a")
    scale = model.capabilities().logit_scale
    np.testing.assert_allclose(out, local(model, imgs, NAMES) * 100.0 / scale, atol=2e-3)
    handle = client.upload(imgs[:4])  # a new image set of already-embedded images, then a stream of batches
    client.predict(handle, NAMES, "a satellite photo of")
    for i in range(0, 6, 2):
        client.predict(imgs[i : i + 2], NAMES, "a photo of a")
    assert sum(counts.values()) - before == 6 and max(counts.values()) == 1  # the server's own count
    assert client.image_requests == 6 and client.usage.images == 6
    assert client.usage.requests == 6 + 2  # six images, two contexts' texts (each one request)
    est = client.estimate_usage(6, NAMES, "a photo of a")
    assert (est.requests, est.images) == (7, 6)
    first = client.estimate_usage(6, NAMES, "a photo of a").input_tokens + client.estimate_usage(6, NAMES, "a satellite photo of", images_cached=True).input_tokens
    assert client.usage.input_tokens == first


def test_embeddings_refused_for_a_model_without_features(model) -> None:  # noqa: ANN001
    from craft_sdk.client.base import CallableClient, Capabilities

    logits_only = CallableClient(lambda ims, names, t, o: np.zeros((len(ims), len(names))), Capabilities("plain"))
    with BackgroundServer(create_app(logits_only, {"alice": KEY})) as srv:
        client = create_client(f"embed+{srv.url}/v1?model=plain", api_key=KEY, max_retries=0)
        with pytest.raises(ClientError, match="no embeddings"):
            client.predict(random_images(1, seed=8), NAMES)


def test_bad_class_names_are_refused_unbilled(server) -> None:  # noqa: ANN001
    chat = create_client(f"chat+{server.url}/v1?model=tiny", api_key=KEY)
    with pytest.raises(ClientError, match="line break") as err:
        chat.predict(random_images(1, seed=2), ["cat", "big\ndog"])
    assert err.value.unbilled and chat.usage.requests == 0


def test_model_strings_are_checked() -> None:
    with pytest.raises(ConfigError, match="model=NAME"):
        create_client("chat+http://127.0.0.1:9/v1")
    with pytest.raises(ConfigError, match="unknown option"):
        create_client("embed+http://127.0.0.1:9/v1?model=m&bogus=1")
    with pytest.raises(ConfigError, match="profile"):
        create_client("embed+http://127.0.0.1:9/v1?model=m&profile=jina")
    assert create_client("embed+http://127.0.0.1:9/v1?model=m&scale=18.5&profile=cohere").config.scale == 18.5
    with pytest.raises(ConfigError, match="scale"):
        create_client("embed+http://127.0.0.1:9/v1?model=m&scale=big")
    with pytest.raises(ConfigError, match="samples"):
        create_client("chat+http://127.0.0.1:9/v1?model=m&samples=x")


# ---------------------------------------------------------------------- providers' documented bodies


class Canned:
    """A raw ASGI app answering POSTs with queued (status, headers, body) replies; records request times and headers."""

    def __init__(self, replies: list[tuple[int, dict[str, str], dict[str, Any]]]) -> None:
        self.replies, self.seen = list(replies), []
        self.lock = threading.Lock()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        with self.lock:
            self.seen.append((time.monotonic(), dict((k.decode(), v.decode()) for k, v in scope["headers"])))
            status, headers, body = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        raw = json.dumps(body).encode()
        hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
        hdrs += [(k.encode(), v.encode()) for k, v in headers.items()]
        await send({"type": "http.response.start", "status": status, "headers": hdrs})
        await send({"type": "http.response.body", "body": raw})


def completion(message: dict[str, Any], finish: str = "stop", logprobs: Any = None) -> dict[str, Any]:
    """A chat.completion body as in the OpenAI API reference's example."""
    return {
        "id": "chatcmpl-123", "object": "chat.completion", "created": 1677652288, "model": "gpt-4o-mini",
        "system_fingerprint": "fp_44709d6fcb",
        "choices": [{"index": 0, "message": {"role": "assistant", **message}, "logprobs": logprobs, "finish_reason": finish}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10},
    }


def canned_chat(replies: list, **kwargs: Any) -> tuple[Any, ChatVLMClient, Canned]:
    app = Canned(replies)
    srv = BackgroundServer(app).start()
    return srv, ChatVLMClient(f"{srv.url}/v1", "gpt-4o-mini", api_key="k", **kwargs), app


def test_documented_answer_without_logprobs() -> None:
    body = completion({"content": "B", "refusal": None})
    srv, chat, _ = canned_chat([(200, {}, body)])
    try:
        with pytest.raises(ClientError, match="samples=N"):
            chat.predict(random_images(1, seed=9), NAMES)
        sampled = ChatVLMClient(f"{srv.url}/v1", "gpt-4o-mini", api_key="k", samples=3)
        probs = softmax(sampled.predict(random_images(1, seed=9), NAMES))[0]
        # the endpoint ignores n (one choice per answer): three requests, three answers "B"
        assert sampled.usage.requests == 3 and sampled.usage.input_tokens == 27
        np.testing.assert_allclose(probs, (np.eye(6)[1] * 3 + 1) / (3 + 6), atol=1e-6)
    finally:
        srv.stop()


@pytest.mark.parametrize("case", ["refusal", "content_filter"])
def test_documented_refusal_and_content_filter_are_counted_and_uniform(case: str, caplog: Any) -> None:
    if case == "refusal":
        body = completion({"content": None, "refusal": "I'm sorry, I cannot assist with that request."})
    else:
        body = completion({"content": None}, finish="content_filter")
    srv, chat, _ = canned_chat([(200, {}, body)])
    try:
        with caplog.at_level(logging.WARNING, logger="craft_sdk.client.chat"):
            out = chat.predict(random_images(3, seed=10), NAMES)
        np.testing.assert_allclose(softmax(out), np.full((3, 6), 1 / 6), atol=1e-6)
        assert chat.problems["refused" if case == "refusal" else "filtered"] == 3
        assert "3 refused" in caplog.text or "3 filtered" in caplog.text
    finally:
        srv.stop()


def test_429_retry_after_is_honoured_with_one_idempotency_key() -> None:
    top = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in (("C", -0.2), (" A", -2.5), ("Sure", -4.0))]
    ok = completion({"content": "C", "refusal": None}, logprobs={"content": [{"token": "C", "logprob": -0.1, "bytes": [67], "top_logprobs": top}], "refusal": None})
    assert ok["choices"][0]["logprobs"]["content"][0]["top_logprobs"][0]["logprob"] == -0.2
    limited = {"error": {"message": "Rate limit reached for requests", "type": "requests", "param": None, "code": "rate_limit_exceeded"}}
    srv, chat, app = canned_chat([(429, {"retry-after": "1"}, limited), (200, {}, ok)], max_concurrency=1)
    try:
        probs = softmax(chat.predict(random_images(1, seed=11), ["cat", "dog", "bird"]))[0]
        (t0, h0), (t1, h1) = app.seen[:2]
        assert t1 - t0 >= 0.9  # the server's Retry-After, not the client's shorter default backoff
        assert h0["idempotency-key"] == h1["idempotency-key"]
        assert chat.usage.requests == 2 and chat.usage.images == 2 and chat.usage.input_tokens == 9
        # C listed at e^-0.2, A (" A") at e^-2.5, B unlisted: B gets the unlisted mass, capped at A's probability
        pa, pc = np.exp(-2.5), np.exp(-0.2)
        pb = min(1 - pa - pc - np.exp(-4.0), pa)
        assert 0 < pb < pa
        np.testing.assert_allclose(probs, np.array([pa, pb, pc]) / (pa + pb + pc), atol=1e-6)
    finally:
        srv.stop()


def test_unparseable_logprobs_answer_is_counted() -> None:
    top = [{"token": "The", "logprob": -0.2, "bytes": [84, 104, 101]}, {"token": "I", "logprob": -1.9, "bytes": [73]}]
    body = completion({"content": "The", "refusal": None}, logprobs={"content": [{"token": "The", "logprob": -0.2, "bytes": [84, 104, 101], "top_logprobs": top}], "refusal": None})
    srv, chat, _ = canned_chat([(200, {}, body)])
    try:
        out = chat.predict(random_images(2, seed=12), NAMES)
        assert chat.problems["unparseable"] == 2 and np.allclose(softmax(out), 1 / 6)
    finally:
        srv.stop()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings"])
def test_transient_faults_are_retried_and_billed_once(model, path: str) -> None:  # noqa: ANN001
    """429, 500, a lost answer (computed and billed, then 500) and a truncated body: the openai client retries with the
    same Idempotency-Key, the server replays what it computed, so the scores equal a fault-free run and each image is
    billed exactly once."""
    from faultinject import FaultInjector

    imgs = random_images(4, seed=30)
    app = create_app(model, {"alice": KEY})
    faulty = FaultInjector(app, {1: "429", 2: "500", 3: "lost", 5: "truncate"}, path=path)
    kind = "chat" if "chat" in path else "embed"
    with BackgroundServer(faulty) as srv:
        client = create_client(f"{kind}+{srv.url}/v1?model=tiny", api_key=KEY, max_concurrency=1, timeout=30.0)
        out = client.predict(imgs, NAMES)
    assert sorted(faulty.fired) == ["429", "500", "lost", "truncate"]
    with BackgroundServer(create_app(model, {"alice": KEY})) as clean:
        again = create_client(f"{kind}+{clean.url}/v1?model=tiny", api_key=KEY).predict(imgs, NAMES)
    np.testing.assert_allclose(out, again, atol=1e-5)
    billed = app.state.craft.store.usage("alice")["used"]
    assert billed == (4 if kind == "chat" else 5)  # one query per image (+ one text request for embeddings), none twice
    assert client.usage.requests == billed + 4  # every attempt counted: the four faulted ones too
