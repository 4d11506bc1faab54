"""Cost in the provider's units: clients' usage and estimates, the ledger's record and journal, the price
table, ``--max-cost`` as a hard ceiling (also under concurrency), ``tune --dry-run``'s plan against what the same
run then used, and the cost in the adapter's provenance, its model card and ``predict``'s summary.
Everything runs against real ``craft-sdk serve`` apps on loopback."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import CLASS_NAMES, random_images

from craft_sdk import BudgetExceededError, ConfigError, ImageDataset, PriceTable, ProviderUsage, TuneConfig
from craft_sdk.client import MeteredClient, QueryLedger
from craft_sdk.client.hosted import IMAGE_TOKENS
from craft_sdk.client.http import HTTPClient
from craft_sdk.client.usage import usage_of
from craft_sdk.client.zeroshot import ZeroShotAPIClient
from craft_sdk.tuner.plan import plan_tune

pytest.importorskip("torch")
pytest.importorskip("fastapi")
from craft_sdk.serve import BackgroundServer, create_app  # noqa: E402
from craft_sdk.tuner.train import Tuner  # noqa: E402

KEY = secrets.token_hex(16)
ROUTE = "/v1/zero-shot/tiny-clip"
FAST = dict(backoff=0.02, max_backoff=0.3, max_retries=6, timeout=5.0)
NAMES = list(CLASS_NAMES)
CLI = [sys.executable, "-m", "craft_sdk.cli"]


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path):  # noqa: ANN201
    from craft_sdk.client.openclip import OpenCLIPClient

    return OpenCLIPClient(f"local-dir:{tiny_model_dir}")


@pytest.fixture()
def server(model):  # noqa: ANN001, ANN201
    """A fresh server per test: its meter starts at zero."""
    with BackgroundServer(create_app(model, {"alice": KEY})) as srv:
        yield srv


def meter(srv: Any) -> dict[str, Any]:
    return srv.app.state.craft.store.usage("alice")


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([*CLI, *args], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    if check and out.returncode != 0:
        raise AssertionError(f"exit {out.returncode}: {out.stderr[-2000:]}")
    return out


# ---------------------------------------------------------------------- price table


def test_price_table_parses_costs_and_refuses_bad_values() -> None:
    price = PriceTable.parse("input_per_1m=2, output_per_1m=10,per_image=0.5,per_request=0.001")
    assert price == PriceTable(2.0, 10.0, 0.5, 0.001)
    usage = ProviderUsage(requests=1000, images=4, input_tokens=1_000_000, output_tokens=100_000)
    assert price.cost(usage) == pytest.approx(2.0 + 1.0 + 2.0 + 1.0)
    assert PriceTable.parse("per_request=0.25").cost(ProviderUsage(requests=8, images=8)) == 2.0
    assert PriceTable.from_dict(price.to_dict()) == price
    for bad, why in (("per_image=-1", ">= 0"), ("per_image=x", "number"), ("cents=1", "NAME=VALUE"),
                     ("per_image=1,per_image=2", "twice"), ("per_image=nan", ">= 0"), ("per_image", "NAME=VALUE")):
        with pytest.raises(ConfigError, match=why):
            PriceTable.parse(bad)
    with pytest.raises(ConfigError, match="price"):
        QueryLedger(max_cost=1.0)
    with pytest.raises(ConfigError, match="max_cost"):
        QueryLedger(price=price, max_cost=-1)


# ---------------------------------------------------------------------- clients


def test_zeroshot_client_counts_requests_and_images_as_estimated(server) -> None:  # noqa: ANN001
    imgs = random_images(7, seed=3)
    with ZeroShotAPIClient(server.url + ROUTE, api_key=KEY, **FAST) as zs:
        estimate = zs.estimate_usage(7, NAMES, "a photo of a")
        assert estimate == ProviderUsage(requests=7, images=7) and zs.estimate_upload(7) == ProviderUsage()
        handle = zs.upload(imgs)
        assert zs.usage == ProviderUsage()  # an upload sends nothing
        zs.predict(handle, NAMES, "a photo of a")
        assert zs.usage == estimate and zs.provider_requests == 7 and usage_of(zs) is zs.usage
    assert meter(server)["used"] == 7


def test_http_client_counts_uploads_and_predictions_as_estimated(server, model) -> None:  # noqa: ANN001
    imgs = random_images(6, seed=4)
    caps = model.capabilities()
    offsets = np.zeros((3, caps.n_ctx, caps.ctx_dim), np.float32)
    with HTTPClient(server.url, api_key=KEY, **FAST) as c, HTTPClient(server.url, api_key=KEY, max_batch=2, **FAST) as split:
        handle = c.upload(imgs)
        assert c.provider_usage == c.estimate_upload(6) == ProviderUsage(requests=1, images=6)
        c.predict(handle, NAMES, "a photo of a", offsets)
        assert c.provider_usage == ProviderUsage(requests=2, images=6) and c.estimate_usage(6, NAMES, "a photo of a", 3).requests == 1
        split.predict(split.upload(imgs), NAMES, "a photo of a", offsets)  # 3 candidates in requests of 2
        assert split.estimate_usage(6, NAMES, "a photo of a", 3) == ProviderUsage(requests=2)
        assert split.provider_usage == ProviderUsage(requests=3, images=6)
        assert usage_of(c) is c.provider_usage and c.usage()["used"] == 6  # the server's own meter is still usage()


# ---------------------------------------------------------------------- ledger


def test_ledger_records_usage_per_category_and_its_journal_keeps_it(server, tmp_path: Path) -> None:  # noqa: ANN001
    price = PriceTable(per_request=0.01, per_image=0.002)
    journal = tmp_path / "ledger.jsonl"
    imgs = random_images(5, seed=5)
    with ZeroShotAPIClient(server.url + ROUTE, api_key=KEY, **FAST) as zs:
        ledger = QueryLedger(100, journal=journal, price=price)
        metered = MeteredClient(zs, ledger)
        handle = metered.upload(imgs)
        metered.predict(handle, NAMES, "a photo of a", category="search")
        metered.predict(handle, NAMES, "a sketch of a", category="eval")
    five = {"requests": 5, "images": 5, "input_tokens": 0, "output_tokens": 0}
    summary = ledger.to_dict()
    assert summary["usage"] == {"requests": 10, "images": 10, "input_tokens": 0, "output_tokens": 0}
    assert summary["usage_by_category"] == {"search": five, "eval": five}
    assert summary["cost"] == pytest.approx(10 * 0.012) and summary["price"] == price.to_dict()
    again = QueryLedger(100, journal=journal, price=price)  # what a resumed run replays
    assert again.usage == ledger.usage and again.usage_by_category == ledger.usage_by_category and again.used == 2
    assert again.cost == pytest.approx(ledger.cost)


def test_max_cost_refuses_a_call_before_sending_it(server) -> None:  # noqa: ANN001
    imgs = random_images(5, seed=6)
    with ZeroShotAPIClient(server.url + ROUTE, api_key=KEY, **FAST) as zs:
        ledger = QueryLedger(price=PriceTable(per_request=1.0), max_cost=12)
        metered = MeteredClient(zs, ledger)
        handle = metered.upload(imgs)
        metered.predict(handle, NAMES, "a photo of a")
        metered.predict(handle, NAMES, "a photo of a")
        with pytest.raises(BudgetExceededError, match="max-cost") as refused:
            metered.predict(handle, NAMES, "a photo of a")
        assert refused.value.unbilled
        assert zs.provider_requests == 10 and meter(server)["used"] == 10  # the refused call never left
    assert ledger.used == 2 and ledger.cost == 10.0


def test_max_cost_holds_under_concurrency(server) -> None:  # noqa: ANN001
    imgs = random_images(3, seed=7)
    with ZeroShotAPIClient(server.url + ROUTE, api_key=KEY, max_concurrency=4, **FAST) as zs:
        ledger = QueryLedger(price=PriceTable(per_request=0.5, per_image=0.5), max_cost=40)
        handle = MeteredClient(zs, ledger).upload(imgs)
        refusals: list[BudgetExceededError] = []

        def worker() -> None:
            metered = MeteredClient(zs, ledger)  # one per thread, one ledger: the classifier's pattern
            while True:
                try:
                    metered.predict(handle, NAMES, "a photo of a")
                except BudgetExceededError as exc:
                    refusals.append(exc)
                    return

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert len(refusals) == 8
        assert zs.usage.requests == meter(server)["used"] == ledger.usage.requests  # every unit recorded once
        assert ledger.cost == zs.usage.requests * 1.0 <= 40  # 13 calls of 3 requests fit, the 14th would pass 40
        assert ledger.cost == 39.0 and ledger.used == 13


# ---------------------------------------------------------------------- the plan


def test_plan_equals_what_a_full_budget_run_uses(server, tmp_path: Path) -> None:  # noqa: ANN001
    """Paper protocol (no early stop) through the zero-shot API: planned queries, requests and images equal the run's."""
    imgs = random_images(12, seed=8)
    train = ImageDataset(imgs, np.arange(12) % len(NAMES), CLASS_NAMES)
    config = TuneConfig(mode="pg", protocol="paper", budget=25, popsize=4, seed=0)
    price = PriceTable(per_request=0.001, per_image=0.0005)
    with ZeroShotAPIClient(server.url + ROUTE, api_key=KEY, **FAST) as zs:
        plan = plan_tune(config, zs, train, price=price)
        assert zs.usage == ProviderUsage() and meter(server)["used"] == 0  # planning sent nothing
        result = Tuner(config, price=price).fit(zs, train)
    assert plan.generations == result.n_generations == 4 and plan.queries_per_generation == 5
    assert plan.planned_queries == result.queries.used == 21
    assert plan.planned_requests == result.queries.usage["requests"] == zs.usage.requests == 21 * 12
    assert plan.planned_images == zs.usage.images and not plan.upper_bound and plan.refused == []
    assert plan.estimated_cost == pytest.approx(result.queries.cost) == pytest.approx(21 * 12 * 0.0015)
    assert plan.splits == {n: {"train": 12 // len(NAMES), "check": 0, "test": 0} for n in NAMES}


def test_plan_splits_and_refusals(tiny_client) -> None:  # noqa: ANN001
    imgs = random_images(16, seed=9)
    labels = np.arange(16) % 4
    train = ImageDataset(imgs, labels, NAMES[:4])
    # issue 23: 4 shots of 4 classes leave 2 certify images, so the robust plan buys no search and holds nothing out
    plan = plan_tune(TuneConfig(budget=40, popsize=40), tiny_client, train)
    assert plan.splits == {n: {"train": 4, "check": 0, "test": 0} for n in NAMES[:4]} and plan.upper_bound
    assert plan.generations == 0 and plan.planned_queries == 1 and plan.refused == []
    assert plan.certification["search"] is False and "no search is bought" in plan.certification["reason"]
    held = plan_tune(TuneConfig(budget=40, popsize=40, protocol="paper", max_generations=None), tiny_client, train)
    assert any("pays no generation" in r and "at least 42" in r for r in held.refused)
    ok = plan_tune(TuneConfig(budget=100, popsize=8, protocol="paper"), tiny_client, train)
    assert ok.refused == [] and ok.generations == 11 and ok.planned_queries == 1 + 11 * 9
    assert ok.planned_requests == 0 and ok.estimated_cost is None  # an in-process model bills nothing
    canary = plan_tune(TuneConfig(budget=100, popsize=8, canary=16, protocol="paper"), tiny_client, train)  # 2 probe scorings kept back
    assert canary.generations == 10 and canary.planned_queries == 1 + 10 * 9 + 2


def test_dry_run_sends_nothing_and_estimates_the_run_within_10_percent(server, folder: Path, tmp_path: Path) -> None:  # noqa: ANN001
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    zs_model = "zeroshot+" + server.url + ROUTE
    common = [str(folder), "--model", zs_model, "--api-key-file", str(key_file), "--shots", "4", "--budget", "30",
              "--popsize", "4", "--protocol", "paper", "--price", "per_request=0.001,per_image=0.0005"]
    plan = json.loads(cli("tune", *common, "--dry-run", "--json").stdout)
    assert meter(server) == {"used": 0, "budget": None, "remaining": None, "uploads": 0}
    assert plan["planned_queries"] == 26 and plan["planned_requests"] == plan["planned_images"] == 26 * 12
    assert plan["estimated_input_tokens"] == 0 and plan["estimated_cost"] == pytest.approx(26 * 12 * 0.0015)
    assert plan["splits"]["forest"] == {"train": 4, "check": 0, "test": 5}
    human = cli("tune", *common, "--dry-run").stdout
    assert "provider requests    312" in human and "nothing sent" in human and meter(server)["used"] == 0
    out = tmp_path / "adapter"
    run = json.loads(cli("tune", *common, "--out", str(out), "--json").stdout)
    assert run["queries_used"] == plan["planned_queries"] and run["provider_requests"] == meter(server)["used"]
    assert abs(run["provider_requests"] - plan["planned_requests"]) <= 0.1 * run["provider_requests"]
    assert run["cost"] == pytest.approx(plan["estimated_cost"], rel=0.1) and run["input_tokens"] == run["output_tokens"] == 0
    prov = json.loads((out / "adapter_config.json").read_text())["provenance"]["provider_usage"]
    assert prov["requests"] == run["provider_requests"] and prov["cost"] == pytest.approx(run["cost"])
    card = (out / "README.md").read_text()
    assert f"provider usage to tune: {run['provider_requests']} requests, {run['provider_requests']} images" in card
    before = meter(server)["used"]
    images = [str(p) for p in sorted((folder / "test").rglob("*.png"))]
    pred = json.loads(cli("predict", str(out), *images, "--model", zs_model, "--api-key-file", str(key_file),
                          "--price", "per_request=0.001", "--json").stdout)
    n_contexts = meter(server)["used"] - before
    assert pred["provider_usage"]["requests"] == n_contexts and n_contexts % 15 == 0
    assert pred["per_1000_images"]["requests"] == pytest.approx(1000 * n_contexts / 15)
    assert pred["per_1000_images"]["cost"] == pytest.approx(n_contexts / 15)


def test_dry_run_reports_refusals_and_usage_errors(server, folder: Path, tmp_path: Path) -> None:  # noqa: ANN001
    model = "zeroshot+" + server.url + ROUTE
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    base = [str(folder), "--model", model, "--api-key-file", str(key_file)]
    few = cli("tune", *base, "--shots", "16", "--dry-run", check=False)
    assert few.returncode == 1 and "refused:" in few.stdout and "--shots" in few.stdout
    # issue 23: at 4 shots the robust plan can certify no prompt, so it buys no search (and says so); the paper
    # protocol still plans one, and is refused or capped as before
    robust = cli("tune", *base, "--shots", "4", "--budget", "40", "--dry-run", check=False)
    assert robust.returncode == 0 and "certification        no achievable prompt gain" in robust.stdout
    poor = json.loads(cli("tune", *base, "--shots", "4", "--budget", "40", "--protocol", "paper", "--dry-run", "--json", check=False).stdout)
    assert poor["generations"] == 0 and "pays no generation" in poor["refused"][0]
    capped = json.loads(cli("tune", *base, "--shots", "4", "--budget", "200", "--popsize", "4", "--price", "per_request=1",
                            "--max-cost", "100", "--protocol", "paper", "--dry-run", "--json").stdout)
    assert not capped["upper_bound"] and any("exceeds --max-cost 100" in w for w in capped["warnings"])
    assert capped["planned_requests"] == capped["planned_queries"] * 0 + capped["planned_images"]
    no_price = cli("tune", *base, "--max-cost", "5", "--dry-run", check=False)
    assert no_price.returncode == 2 and "--price" in no_price.stderr
    bad = cli("tune", *base, "--price", "per_token=1", "--dry-run", check=False)
    assert bad.returncode == 2 and "NAME=VALUE" in bad.stderr
    assert meter(server)["used"] == 0


def test_dry_run_on_a_prediction_server_uploads_nothing_and_matches_the_run(server, folder: Path, tmp_path: Path) -> None:  # noqa: ANN001
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    common = [str(folder), "--model", server.url, "--api-key-file", str(key_file), "--shots", "4", "--budget", "40",
              "--popsize", "4", "--intrinsic-dim", "8", "--protocol", "paper", "--val-shots", "1", "--val-every", "3"]
    plan = json.loads(cli("tune", *common, "--dry-run", "--json").stdout)
    assert meter(server)["used"] == 0 and meter(server)["uploads"] == 0  # only the free capabilities were asked
    assert plan["soft_prompts"] and plan["planned_uploads"] == 2  # the training shots and the validation set
    run = json.loads(cli("tune", *common, "--out", str(tmp_path / "a"), "--json").stdout)
    assert run["queries_used"] == plan["planned_queries"] == meter(server)["used"]
    assert run["provider_requests"] == plan["planned_requests"] and run["provider_images"] == plan["planned_images"] == 12 + 3


def test_http_estimate_on_raw_images_includes_their_upload(server, model) -> None:  # noqa: ANN001
    """A prediction on raw images uploads them first (1 request carrying them): the estimate, and so --max-cost,
    count it; a ceiling that pays the prediction but not the upload refuses the call before anything is sent."""
    from craft_sdk.client.usage import estimate_call

    imgs = random_images(6, seed=12)
    with HTTPClient(server.url, api_key=KEY, **FAST) as c:
        assert estimate_call(c, 6, NAMES, "a photo of a", uploaded=False) == ProviderUsage(requests=2, images=6)
        assert estimate_call(c, 6, NAMES, "a photo of a", uploaded=True) == ProviderUsage(requests=1)
        ledger = QueryLedger(price=PriceTable(per_request=1.0, per_image=1.0), max_cost=7.5)
        with pytest.raises(BudgetExceededError, match="max-cost") as refused:
            MeteredClient(c, ledger).predict(imgs, NAMES, "a photo of a")
        assert refused.value.unbilled and c.provider_usage == ProviderUsage() and meter(server)["used"] == 0
        MeteredClient(c, QueryLedger(price=PriceTable(per_request=1.0, per_image=1.0), max_cost=8)).predict(imgs, NAMES, "a photo of a")
        assert c.provider_usage == ProviderUsage(requests=2, images=6)


@pytest.mark.parametrize("shape", ["chat", "embed"])
def test_plan_of_the_hosted_shapes(server, shape: str) -> None:  # noqa: ANN001
    """The plan is within 10 % of the run in every unit: chat (same token rule as the server); embeddings (images and
    class prompts are embedded once per client: the plan leaves out the contexts the word search scores again)."""
    pytest.importorskip("openai")
    from craft_sdk import create_client

    train = ImageDataset(random_images(12, seed=10), np.arange(12) % 3, NAMES[:3])
    config = TuneConfig(mode="pg", protocol="paper", budget=30, popsize=4)
    price = PriceTable(input_per_1m=1.0, per_request=0.001)
    client = create_client(f"{shape}+{server.url}/v1?model=tiny", api_key=KEY)
    plan = plan_tune(config, client, train, price=price)
    assert usage_of(client) == ProviderUsage() and meter(server)["used"] == 0
    result = Tuner(config, price=price).fit(client, train)
    used = result.queries.usage
    assert plan.planned_queries == result.queries.used == 26 and used == usage_of(client).to_dict()
    pairs = [(plan.planned_requests, used["requests"]), (plan.planned_images, used["images"]),
             (plan.estimated_input_tokens, used["input_tokens"]), (plan.estimated_cost, result.queries.cost)]
    for planned, actual in pairs:
        assert actual > 0
        assert abs(planned - actual) <= 0.1 * actual, (planned, actual)


def test_evaluate_and_the_classifier_report_cost_per_1000_predictions(server) -> None:  # noqa: ANN001
    """``evaluate(..., price=)`` and ``CraftClassifier`` (``ClassifierConfig(price=)``) report the provider usage of the
    adapter's predictions and their cost per 1,000, as ``predict --price`` does: the zero-shot API costs one request per image."""
    import craft_sdk
    from craft_sdk.deploy.classifier import ClassifierConfig, CraftClassifier

    price = PriceTable(per_request=0.01, per_image=0.002)
    train = ImageDataset(random_images(6, seed=13), np.arange(6) % 3, NAMES[:3])
    test = ImageDataset(random_images(5, seed=14), np.arange(5) % 3, NAMES[:3])
    with ZeroShotAPIClient(server.url + ROUTE, api_key=KEY, **FAST) as zs:
        adapter = craft_sdk.tune(zs, train, mode="zero-shot")
        ev = craft_sdk.evaluate(adapter, zs, test, price=price)
        assert ev["provider_usage"] == {"requests": 5, "images": 5, "input_tokens": 0, "output_tokens": 0}  # the zero-shot reference is not counted twice
        assert ev["cost"] == pytest.approx(5 * 0.012) and ev["per_1000_images"]["cost"] == pytest.approx(12.0)
        assert ev["per_1000_images"]["requests"] == 1000
        assert craft_sdk.evaluate(adapter, zs, test)["cost"] is None  # no price: usage only
        clf = CraftClassifier.from_adapter(adapter, zs, config=ClassifierConfig(price=price, batch_size=2))
        clf.predict(test.images)
        clf.predict(test.images[:3])
        report = clf.provider_cost()
        assert report["provider_usage"]["requests"] == 8 and report["per_1000_images"]["requests"] == 1000
        assert report["cost"] == pytest.approx(8 * 0.012) and report["per_1000_images"]["cost"] == pytest.approx(12.0)
        with pytest.raises(ConfigError, match="ledger"):
            CraftClassifier.from_adapter(adapter, zs, config=ClassifierConfig(price=price), ledger=QueryLedger())


def test_the_plan_prices_the_word_search_s_candidates_at_their_length(server, tmp_path) -> None:  # noqa: ANN001
    """Candidates swap template words for vocabulary words: with a vocabulary of long words their texts are longer than
    the template, and the plan's text tokens follow. Measured: 301 planned for 347 used (priced at the template's
    length: 288, 17 % short); the rest is the incumbent itself taking long words, which no plan can know."""
    pytest.importorskip("openai")
    from craft_sdk import create_client

    words = tmp_path / "words.txt"
    words.write_text("\n".join(["photograph", "illustration", "rendering", "snapshot", "depiction", "a", "photo", "of"]))
    train = ImageDataset(random_images(12, seed=11), np.arange(12) % 3, NAMES[:3])
    config = TuneConfig(mode="pg", protocol="paper", budget=30, popsize=4, vocabulary=str(words))
    client = create_client(f"embed+{server.url}/v1?model=tiny", api_key=KEY)
    plan = plan_tune(config, client, train)
    result = Tuner(config).fit(client, train)
    used = result.queries.usage["input_tokens"]
    image_tokens = result.queries.usage["images"] * IMAGE_TOKENS  # the texts are the part the candidates change
    planned, actual = plan.estimated_input_tokens - image_tokens, used - image_tokens
    assert actual > 0 and abs(planned - actual) <= 0.15 * actual, (planned, actual)
