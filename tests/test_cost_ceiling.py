"""``--max-cost`` is a hard ceiling per send attempt: under 429 storms with Retry-After, 5xx, four threads and a
crash + resume from a checkpoint whose ledger journal holds spent cost, what reached the provider (counted by the
fault injector in front of a real ``craft-sdk serve`` app on loopback) never passes the ceiling. Retries are
paid too, so each attempt reserves its upper bound before it is sent and is refused (never sent) when it
would pass the ceiling."""

from __future__ import annotations

import json
import secrets
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import CLASS_NAMES, random_images

from craft_sdk import BudgetExceededError, ImageDataset, PriceTable, ProviderUsage, TuneConfig, create_client
from craft_sdk.client import MeteredClient, QueryLedger
from craft_sdk.client.usage import attempt_bound, before_send, send_gate
from craft_sdk.client.zeroshot import ZeroShotAPIClient

pytest.importorskip("torch")
pytest.importorskip("fastapi")
pytest.importorskip("openai")
from craft_sdk.serve import BackgroundServer, create_app  # noqa: E402
from craft_sdk.tuner.train import Tuner  # noqa: E402


KEY = secrets.token_hex(16)
NAMES = list(CLASS_NAMES)
ZS_ROUTE = "/v1/zero-shot/tiny-clip"
FAST = dict(backoff=0.02, max_backoff=0.3, max_retries=6, timeout=30.0)
PATHS = {"zeroshot": ZS_ROUTE, "chat": "/v1/chat/completions", "embed": "/v1/embeddings", "serve": "/v1/predict"}


class Storm:
    """ASGI middleware: the first ``faults`` attempts of every request (by its Idempotency-Key) under ``path`` are
    answered 429, then 503, each with ``Retry-After``, without reaching the app; the next attempt passes.
    ``sent`` counts every request that arrived: the provider's own count of what was sent to it."""

    def __init__(self, app: Any, path: str, faults: int = 2, retry_after: str = "0.01") -> None:
        self.app, self.path, self.faults, self.retry_after = app, path, faults, retry_after
        self.sent, self.images, self.seen = 0, 0, {}
        self.lock = threading.Lock()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.path):
            return await self.app(scope, receive, send)
        key = dict(scope["headers"]).get(b"idempotency-key", b"")
        with self.lock:
            self.sent += 1
            self.seen[key] = attempt = self.seen.get(key, 0) + 1
        if attempt > self.faults:
            return await self.app(scope, receive, send)
        body = json.dumps({"error": {"message": "Rate limit reached", "code": "rate_limit_exceeded"}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"retry-after", self.retry_after.encode())]
        await send({"type": "http.response.start", "status": 429 if attempt == 1 else 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class Crash(Exception):
    pass


class CrashAt:
    """Delegates to a client; raises :class:`Crash` inside its ``at``-th predict call (charged, never answered)."""

    def __init__(self, client: Any, at: int) -> None:
        self.client, self.at, self.calls = client, at, 0

    def capabilities(self, template: str = "a photo of a") -> Any:
        return self.client.capabilities(template)

    def upload(self, images: Any) -> Any:
        return self.client.upload(images)

    def predict(self, images: Any, names: Any, template: str = "a photo of a", offsets: Any = None) -> Any:
        self.calls += 1
        if self.calls == self.at:
            raise Crash()
        return self.client.predict(images, names, template, offsets)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path):  # noqa: ANN201
    from craft_sdk.client.openclip import OpenCLIPClient

    return OpenCLIPClient(f"local-dir:{tiny_model_dir}")


def shape_client(shape: str, url: str) -> Any:
    if shape == "serve":
        from craft_sdk.client.http import HTTPClient

        return HTTPClient(url, api_key=KEY, max_concurrency=4, **FAST)
    if shape == "zeroshot":
        return ZeroShotAPIClient(url + ZS_ROUTE, api_key=KEY, max_concurrency=4, **FAST)
    return create_client(f"{shape}+{url}/v1?model=tiny", api_key=KEY, max_concurrency=4, timeout=30.0)


def sent_cost(storm: Storm, price: PriceTable, ledger: QueryLedger) -> float:
    """What the provider saw, priced: requests counted by the storm (plus a prediction server's one upload, which
    is not under the storm's path); images and tokens as the ledger recorded them (faulted answers bill no tokens)."""
    outside = ledger.usage_by_category["upload"].requests if storm.path == "/v1/predict" else 0
    assert storm.sent + outside == ledger.usage.requests  # every request that arrived was counted once
    return price.cost(ProviderUsage(storm.sent + outside, ledger.usage.images, ledger.usage.input_tokens, ledger.usage.output_tokens))


PRICES = {
    "zeroshot": PriceTable(per_request=1.0),
    "chat": PriceTable(per_request=1.0, per_image=0.5, input_per_1m=2000.0, output_per_1m=5000.0),
    "embed": PriceTable(per_request=1.0, per_image=0.5, input_per_1m=2000.0),
    "serve": PriceTable(per_request=3.0, per_image=0.1),  # uploads carry images; each prediction is one request
}


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["zeroshot", "chat", "embed", "serve"])
def test_max_cost_holds_per_attempt_under_a_429_storm_and_four_threads(model, shape: str) -> None:  # noqa: ANN001
    """Every request needs three attempts (429, 503, then answered). The call-level estimate covers one: before
    this rule the retries of the calls in flight passed the ceiling (39 + 4 x 9 requests on 40)."""
    imgs = random_images(3, seed=40)
    price, max_cost = PRICES[shape], 40.0
    storm = Storm(create_app(model, {"alice": KEY}), PATHS[shape])
    with BackgroundServer(storm) as srv:
        client = shape_client(shape, srv.url)
        ledger = QueryLedger(price=price, max_cost=max_cost)
        handle = MeteredClient(client, ledger).upload(imgs)
        caps = client.capabilities()
        offsets = np.zeros((1, caps.n_ctx, caps.ctx_dim), np.float32) if shape == "serve" else None
        refusals: list[BudgetExceededError] = []
        calls = iter(range(10_000))

        def worker() -> None:
            metered = MeteredClient(client, ledger)
            for _ in range(60):  # a bound, so a broken ceiling fails the test instead of hanging it
                try:  # a new context per call: the embedding client caches the texts it embedded
                    template = "a photo of a" if offsets is not None else f"a photo number {next(calls)} of a"
                    metered.predict(handle, NAMES, template, offsets)
                except BudgetExceededError as exc:
                    refusals.append(exc)
                    return

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        client.close()
    assert len(refusals) == 4 and all("max-cost" in str(e) for e in refusals)
    spent = sent_cost(storm, price, ledger)
    assert spent <= max_cost and ledger.cost <= max_cost
    assert spent >= max_cost / 2  # it did spend: the ceiling refused late, not at once
    assert storm.sent > ledger.used  # the storm did force retries (each answered request took three attempts)


def test_an_attempt_refused_at_the_gate_is_never_sent(model) -> None:  # noqa: ANN001
    """The ceiling falls between a call's first attempt and its retry: the retry is refused and not sent."""
    storm = Storm(create_app(model, {"alice": KEY}), ZS_ROUTE, faults=1)
    with BackgroundServer(storm) as srv, ZeroShotAPIClient(srv.url + ZS_ROUTE, api_key=KEY, max_concurrency=1, **FAST) as zs:
        ledger = QueryLedger(price=PriceTable(per_request=1.0), max_cost=1.5)
        with pytest.raises(BudgetExceededError, match="not sent") as refused:
            MeteredClient(zs, ledger).predict(random_images(1, seed=41), NAMES)
    assert storm.sent == 1 and zs.usage.requests == 1 and ledger.cost == 1.0
    assert not refused.value.unbilled and ledger.used == 1  # the first attempt went out: the query stays charged


def test_the_gate_reserves_attempt_bounds_and_releases_them_when_the_call_ends() -> None:
    price = PriceTable(per_request=1.0, input_per_1m=1e6)  # one unit per token
    ledger = QueryLedger(price=price, max_cost=30.0)
    bound = attempt_bound(texts=["héllo"], images=1, image_tokens=4, output_tokens=1, overhead=2)
    assert bound == ProviderUsage(1, 1, 6 + 2 + 4, 1)  # bytes, not characters: 'é' is two bytes
    spend = ledger.reserve(ProviderUsage(requests=1, input_tokens=5), "a call")
    assert spend.held == 6.0
    with send_gate(spend.gate):
        before_send(ProviderUsage(requests=1, input_tokens=11))  # draws the estimate's 6, reserves 6 more
        before_send(ProviderUsage(requests=1, input_tokens=11))  # 12 more: 24 of 30 reserved
        with pytest.raises(BudgetExceededError, match="not sent"):
            before_send(ProviderUsage(requests=1, input_tokens=11))
    assert spend.held == 24.0 and spend.attempts == 2
    before_send(ProviderUsage(requests=100))  # outside the call: no gate
    ledger.release(spend)
    assert ledger.reserve(ProviderUsage(requests=30), "the next").held == 30.0


@pytest.mark.slow
def test_max_cost_holds_across_a_crash_and_resume_with_retries(model, tmp_path: Path) -> None:  # noqa: ANN001
    """A tune through a 429 storm crashes in its second generation (charged, lost); the resumed run replays the
    ledger journal's spent cost and may only spend what is left: the storm's count of every request that reached
    the provider, over both runs, stays under the ceiling."""
    imgs = random_images(12, seed=42)
    train = ImageDataset(imgs, np.arange(12) % len(NAMES), CLASS_NAMES)
    config = TuneConfig(mode="pg", protocol="paper", budget=25, popsize=4, seed=0)
    price, max_cost = PriceTable(per_request=0.01), 3.2  # 320 requests; the full run would send 21 x 12 x 3
    storm = Storm(create_app(model, {"alice": KEY}), ZS_ROUTE)
    ckpt = tmp_path / "ckpt"
    with BackgroundServer(storm) as srv, ZeroShotAPIClient(srv.url + ZS_ROUTE, api_key=KEY, max_concurrency=4, **FAST) as zs:
        with pytest.raises(Crash):
            Tuner(config, checkpoint_dir=ckpt, price=price, max_cost=max_cost).fit(CrashAt(zs, 8), train)
        first = storm.sent
        assert 0 < first * 0.01 < max_cost
        result = Tuner(config, checkpoint_dir=ckpt, resume=True, price=price, max_cost=max_cost).fit(zs, train)
    assert "cost ceiling" in (result.metrics.stopped_early or "")
    assert storm.sent > first and storm.sent == zs.usage.requests
    assert storm.sent * 0.01 <= max_cost + 1e-9  # the provider's count over both runs
    assert result.queries.cost == pytest.approx(storm.sent * 0.01) and result.queries.cost <= max_cost


def test_a_call_whose_usage_cannot_be_journaled_still_releases_its_reservation(tmp_path: Path) -> None:
    """Recording a call's usage fails (the journal cannot be written): the error is raised, the usage stays
    counted in memory, and the call's reservation is released, so the ceiling does not stay blocked by it."""
    journal = tmp_path / "queries.jsonl"
    ledger = QueryLedger(price=PriceTable(per_request=1.0), max_cost=10.0, journal=journal)
    meter = ProviderUsage()
    spend = ledger.reserve(ProviderUsage(requests=4), "a call")
    ledger.open_call(meter)
    meter.add(requests=2)
    journal.mkdir()  # appending to it now fails
    with pytest.raises(OSError):
        ledger.close_call(meter, "predict", spend)
    assert spend.held == 0.0 and ledger.cost == 2.0
    assert ledger.reserve(ProviderUsage(requests=8), "the next call").held == 8.0  # 2 spent + 8 fits under 10
