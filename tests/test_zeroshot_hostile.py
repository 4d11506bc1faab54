"""ZeroShotAPIClient against a hostile or buggy endpoint on loopback (issue 20, defect 8): every malformed
answer is one one-line ClientError, never a TypeError/RecursionError/ValueError, and never accepted scores."""

from __future__ import annotations

import gzip
import json
import secrets
from typing import Any

import numpy as np
import pytest
from faultinject import Hostile

from craft_sdk import ClientError
from craft_sdk.client.zeroshot import ZeroShotAPIClient

pytest.importorskip("fastapi")
from craft_sdk.serve import BackgroundServer  # noqa: E402

KEY = secrets.token_hex(16)
NAMES = ["cat", "dog"]
FAST = dict(backoff=0.01, max_backoff=0.05, max_retries=2, timeout=10.0)
IMAGES = [np.zeros((8, 8, 3), np.uint8)]


@pytest.fixture(scope="module")
def hostile():  # noqa: ANN201
    app = Hostile()
    with BackgroundServer(app) as srv:
        yield app, srv


def answer(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def pairs(*scores: Any, labels: tuple = ("cat", "dog")) -> bytes:
    return answer([{"label": lab, "score": s} for lab, s in zip(labels, scores)])


DEEP = b"[" * 10_000 + b"]" * 10_000
LONG = "0." + "5" * 5000
# (answer body, headers, what the one-line error says); none of them is retried: the endpoint would say it again
CASES = {
    "list label": (answer([{"label": ["cat"], "score": 0.5}, {"label": "dog", "score": 0.5}]), [], "unexpected label"),
    "dict label": (answer([{"label": {"a": 1}, "score": 0.5}, {"label": "dog", "score": 0.5}]), [], "unexpected label"),
    "unknown label": (pairs(0.5, 0.5, labels=("cat", "cow")), [], "unexpected label"),
    "deep nesting": (DEEP, [], "nests JSON deeper"),
    "5,000-digit score": (b'[{"label": "cat", "score": ' + LONG.encode() + b'}, {"label": "dog", "score": 0.5}]', [], "longer than 64"),
    "5,000-digit integer": (b'[{"label": "cat", "score": 1' + b"0" * 5000 + b'}]', [], "longer than 64"),
    "boolean score": (pairs(True, False), [], "not a number in"),
    "string score": (pairs("0.5", "0.5"), [], "not a number in"),
    "NaN score": (b'[{"label": "cat", "score": NaN}, {"label": "dog", "score": 0.5}]', [], "not a number in"),
    "negative score": (pairs(-0.5, 1.5), [], "not a number in"),
    "sum of 2": (pairs(1.0, 1.0), [], "summing to 2"),
    "sum of 0.5": (pairs(0.25, 0.25), [], "summing to 0.5"),
    "duplicate label": (pairs(0.5, 0.5, labels=("cat", "cat")), [], "twice"),
    "duplicate label, same sum": (answer([{"label": "cat", "score": 0.5}, {"label": "cat", "score": 0.0}, {"label": "dog", "score": 0.5}]), [], "twice"),
    "missing label": (pairs(1.0, labels=("cat",)), [], "no score for"),
    "object, not list": (answer({"label": "cat", "score": 1.0}), [], "not a JSON list"),
    "list of lists": (answer([["cat", 1.0]]), [], "not a JSON list"),
    "huge body": (answer([{"label": "cat", "score": 0.5, "pad": "x" * (4 << 20)}, {"label": "dog", "score": 0.5}]), [], "more than"),
    "gzip bomb": (gzip.compress(b"[" + b" " * (16 << 20) + b"]"), [(b"content-encoding", b"gzip")], "more than"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_hostile_answer_is_one_line_client_error_not_retried(hostile, case: str) -> None:  # noqa: ANN001
    app, srv = hostile
    body, headers, match = CASES[case]
    app.answer, app.calls = (200, [(b"content-type", b"application/json"), *headers], body), 0
    with ZeroShotAPIClient(f"{srv.url}/v1/zero-shot/x", api_key=KEY, **FAST) as client:
        with pytest.raises(ClientError, match=match) as err:
            client.predict(IMAGES, NAMES, "a photo of a")
    assert type(err.value) is ClientError
    assert "\n" not in str(err.value) and len(str(err.value)) < 600
    assert app.calls == 1  # a shape error is final: retrying would pay the provider again for the same answer


def test_truncated_json_is_retried_then_a_client_error(hostile) -> None:  # noqa: ANN001
    app, srv = hostile
    app.answer, app.calls = (200, [], pairs(0.5, 0.5)[:-7]), 0
    with ZeroShotAPIClient(f"{srv.url}/v1/zero-shot/x", api_key=KEY, **FAST) as client:
        with pytest.raises(ClientError, match="failed after 3 attempts: corrupt response body") as err:
            client.predict(IMAGES, NAMES, "a photo of a")
    assert "\n" not in str(err.value) and app.calls == 3


def test_a_valid_answer_still_parses(hostile) -> None:  # noqa: ANN001
    app, srv = hostile
    app.answer = (200, [], pairs(0.25, 0.75, labels=("dog", "cat")))
    with ZeroShotAPIClient(f"{srv.url}/v1/zero-shot/x", api_key=KEY, **FAST) as client:
        probs = client.predict(IMAGES, NAMES, "a photo of a")
    np.testing.assert_allclose(probs, [[0.75, 0.25]])
    app.answer = (200, [(b"content-encoding", b"gzip")], gzip.compress(pairs(0.5, 0.5)))
    with ZeroShotAPIClient(f"{srv.url}/v1/zero-shot/x", api_key=KEY, **FAST) as client:
        np.testing.assert_allclose(client.predict(IMAGES, NAMES, "a photo of a"), [[0.5, 0.5]])


def test_a_long_error_page_is_cut_and_its_status_still_retried(hostile) -> None:  # noqa: ANN001
    app, srv = hostile
    app.answer, app.calls = (503, [(b"retry-after", b"0")], b"<html>" + b"busy " * 200_000 + b"</html>"), 0
    with ZeroShotAPIClient(f"{srv.url}/v1/zero-shot/x", api_key=KEY, **FAST) as client:
        with pytest.raises(ClientError, match="failed after 3 attempts: HTTP 503") as err:
            client.predict(IMAGES, NAMES, "a photo of a")
    assert "\n" not in str(err.value) and app.calls == 3
