"""A population that the HTTP client splits into several requests (``max_batch``) and that fails part-way is
billed for the requests the server answered: the local query ledger keeps exactly those queries (neither refunding
the whole call as unbilled nor keeping the refused requests' queries), so it equals what the server billed (a real ``craft-sdk serve`` app on loopback)."""

from __future__ import annotations

import secrets
from typing import Any

import numpy as np
import pytest
from conftest import random_images

from craft_sdk import BudgetExceededError
from craft_sdk.client import CallableClient, MeteredClient, QueryLedger
from craft_sdk.client.base import Capabilities
from craft_sdk.client.http import HTTPClient

pytest.importorskip("fastapi")
from craft_sdk.serve import BackgroundServer, ServerConfig, create_app  # noqa: E402

pytestmark = pytest.mark.server

KEY = secrets.token_hex(16)
N_CTX, DIM = 2, 4
NAMES = ["cat", "dog"]


def model(images: list, names: list, template: str, offsets: Any) -> np.ndarray:
    x = np.stack([np.asarray(im, np.float32).mean(axis=(0, 1)) for im in images])
    p = 1 if offsets is None else offsets.shape[0]
    shift = np.zeros(p) if offsets is None else offsets.reshape(p, -1).sum(1)
    return (x[:, :1] * np.arange(1, len(names) + 1)[None] + shift[:, None, None]).astype(np.float32)


def test_a_split_population_refused_part_way_keeps_the_queries_the_server_billed() -> None:
    caps = Capabilities("toy-model", n_ctx=N_CTX, ctx_dim=DIM, ctx_rms=0.5, logit_scale=100.0)
    app = create_app(CallableClient(model, caps), {"alice": KEY}, ServerConfig(budget_per_key=3))
    offsets = np.random.default_rng(0).normal(0, 0.1, (4, N_CTX, DIM)).astype(np.float32)
    with BackgroundServer(app) as srv, HTTPClient(srv.url, api_key=KEY, max_batch=2, max_concurrency=1,
                                                  backoff=0.02, max_backoff=0.3, timeout=30.0) as client:
        ledger = QueryLedger()
        metered = MeteredClient(client, ledger)
        handle = metered.upload(random_images(3, seed=5))
        with pytest.raises(BudgetExceededError):  # 2 + 2 queries, 3 allowed: the second request is refused
            metered.predict(handle, NAMES, "a photo of a", offsets)
        billed = client.usage()["used"]
    assert billed == 2
    assert ledger.used == billed  # the answered request stays charged, the refused one is refunded (was 0, then 4)
