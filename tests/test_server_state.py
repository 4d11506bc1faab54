"""Meters that survive restarts and are shared by several server processes (issue 15): the Store contract on
memory, SQLite and a real redis-server; SIGKILL mid-tune and resume; concurrent processes never overspend a budget."""

from __future__ import annotations

import concurrent.futures
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import CLASS_NAMES, free_port, random_images, start_serve

from craft_sdk import ClientError, ImageDataset, TuneConfig
from craft_sdk.client.http import HTTPClient
from craft_sdk.wire import encode

pytest.importorskip("fastapi")
from craft_sdk.serve.store import MemoryStore, SQLiteStore, Store, open_store  # noqa: E402

KEY = secrets.token_hex(16)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a loopback port, started for these tests."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run installs it)")
    pytest.importorskip("redis", reason="the redis client is not installed (pip install 'craft-sdk[redis]')")
    port = free_port()
    d = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(d)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    deadline = time.monotonic() + 60
    while True:
        try:
            redis.Redis(port=port).ping()
            break
        except redis.ConnectionError:
            assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store_spec(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return "memory"
    if request.param == "sqlite":
        return str(tmp_path / "state.db")
    url = request.getfixturevalue("redis_url")
    import redis

    redis.Redis.from_url(url).flushdb()
    return url


def test_store_contract(store_spec: str) -> None:
    store: Store = open_store(store_spec, default_budget=10, lease_s=0.5)
    assert store.begin("alice", "r1", "h1", 4, "me").status == "charged"
    assert store.begin("alice", "r1", "h1", 4, "me").status == "pending"  # the same owner is still computing it
    assert store.begin("alice", "r1", "other body", 4, "me").status == "mismatch"
    store.finish("alice", "r1", "d1")
    again = store.begin("alice", "r1", "h1", 4, "you")
    assert (again.status, again.digest) == ("replay", "d1")
    assert store.begin("alice", "r2", "h2", 7, "me").status == "refused"  # 4 + 7 > 10: nothing recorded
    assert store.begin("alice", None, "", 6, "me").status == "charged"
    store.abort("alice", None, 6)  # exact refund
    assert store.usage("alice") == {"used": 4, "budget": 10, "remaining": 6, "uploads": 0}
    # a pending request of an owner whose lease lapsed (killed) is taken over, not charged again
    store.beat("dead")
    assert store.begin("alice", "r3", "h3", 2, "dead").status == "charged"
    assert store.begin("alice", "r3", "h3", 2, "me").status == "pending"  # its owner is alive
    time.sleep(0.7)
    assert store.begin("alice", "r3", "h3", 2, "me").status == "takeover"
    assert store.usage("alice")["used"] == 6
    # operations
    store.top_up("alice", 5)
    store.count_upload("alice")
    assert store.usage("alice") == {"used": 6, "budget": 15, "remaining": 9, "uploads": 1}
    store.reset("alice")
    store.set_budget("bob", 3)
    assert store.usage("alice")["used"] == 0 and store.usage("bob")["budget"] == 3 and "alice" in store.keys()
    store.set_budget("bob", None)
    assert store.usage("bob")["budget"] == 10 and store.secret() == store.secret() and len(store.secret()) == 32
    store.close()


def test_sqlite_state_persists_across_opens(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    a = SQLiteStore(path, default_budget=100)
    assert a.begin("alice", "k", "h", 30, "one").status == "charged"
    a.finish("alice", "k", "d")
    secret = a.secret()
    a.close()
    b = SQLiteStore(path, default_budget=100)  # a restart
    assert b.usage("alice")["used"] == 30 and b.secret() == secret
    assert b.begin("alice", "k", "h", 30, "two").status == "replay"  # remembered: never billed twice
    assert MemoryStore(5).usage("x")["remaining"] == 5


# ---------------------------------------------------------------- real server processes


class Server:
    """``craft-sdk serve`` in a subprocess on the tiny model."""

    def __init__(self, model_dir: Path, key_file: Path, state: str, budget: int, port: int | None = None, workers: int = 1) -> None:
        self.port = port or free_port()
        args = ["--model", f"local-dir:{model_dir}", "--api-key-file", str(key_file), "--budget-per-key", str(budget),
                "--state", state, "--workers", str(workers)]
        self.proc, self.url = start_serve(args, port=self.port, new_session=True)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # the whole group: uvicorn's workers too
        self.proc.wait(timeout=30)

    def stop(self) -> str:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        _, err = self.proc.communicate(timeout=30)
        return err.decode()


@pytest.fixture()
def key_file(tmp_path: Path) -> Path:
    f = tmp_path / "keys.txt"
    f.write_text(f"alice {KEY}\n")
    return f


def hammer(urls: list[str], n_requests: int = 50, p: int = 3) -> list[int]:
    """``n_requests`` predictions of ``p`` queries each, 10 at a time, round-robin over ``urls``; the status of each."""
    caps = httpx.get(f"{urls[0]}/v1/capabilities", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    offsets = np.zeros((p, caps["n_ctx"], caps["ctx_dim"]), np.float32)
    pixels = encode({"images": np.zeros((2, 32, 32, 3), np.uint8)})

    def one(i: int) -> int:
        with httpx.Client(base_url=f"{urls[i % len(urls)]}/v1", headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
            handle = c.post("/image-sets", content=pixels).json()["handle"]  # on this connection's process
            body = encode({"offsets": offsets}, {"request": json.dumps({"handle": handle, "class_names": ["a", "b"]})})
            return c.post("/predict", content=body, headers={"Idempotency-Key": f"req-{i}"}).status_code

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        return list(pool.map(one, range(n_requests)))


def check_hammer(statuses: list[int], used: int, budget: int, p: int = 3) -> None:
    assert set(statuses) <= {200, 429}, statuses
    answered = statuses.count(200) * p
    assert answered == used <= budget  # never overspent, and every answered query billed exactly once
    assert answered > budget - p  # and the budget was actually used up


def in_process(tiny_client: Any, state: str, budget: int) -> Any:
    """A server in this test process (a second process next to the subprocess) on the same state."""
    from craft_sdk.serve import BackgroundServer, ServerConfig, create_app

    config = ServerConfig(budget_per_key=budget)
    return BackgroundServer(create_app(tiny_client, {"alice": KEY}, config, open_store(state, budget))).start()


def usage(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/v1/usage", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()


def test_workers_and_another_process_share_one_sqlite_budget_exactly(tiny_model_dir: Path, tiny_client: Any, key_file: Path,
                                                                     tmp_path: Path) -> None:
    """``serve --workers 2`` plus this test process, three processes on one SQLite file, hammered past the budget."""
    budget, state = 100, str(tmp_path / "state.db")  # 50 requests x 3 queries = 150 > 100
    server = Server(tiny_model_dir, key_file, state, budget, workers=2)
    local = in_process(tiny_client, state, budget)
    try:
        statuses = hammer([server.url, local.url])
        used = usage(server.url)["used"]
        assert usage(local.url)["used"] == used
    finally:
        local.stop()
        err = server.stop()
    check_hammer(statuses, used, budget)
    assert err.count("Started server process") == 2, err[-2000:]  # two uvicorn workers served


def test_two_processes_share_one_redis_budget_exactly(tiny_model_dir: Path, tiny_client: Any, key_file: Path,
                                                      redis_url: str) -> None:
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    budget = 100
    server = Server(tiny_model_dir, key_file, redis_url, budget)
    local = in_process(tiny_client, redis_url, budget)
    try:
        statuses = hammer([server.url, local.url])
        used = usage(server.url)["used"]
    finally:
        local.stop()
        server.stop()
    check_hammer(statuses, used, budget)


def test_sigkill_mid_tune_then_resume_within_the_key_budget(tiny_model_dir: Path, key_file: Path, tmp_path: Path) -> None:
    from craft_sdk.tuner.checkpoint import LEDGER_FILE
    from craft_sdk.tuner.train import Tuner

    imgs = random_images(24, seed=9)
    labels = np.arange(24) % len(CLASS_NAMES)
    train, val = ImageDataset(imgs[:18], labels[:18], CLASS_NAMES), ImageDataset(imgs[18:], labels[18:], CLASS_NAMES)
    key_budget = 60  # the tune's budget too: it ends by itself, within what the key may spend
    cfg = TuneConfig(mode="craft", budget=key_budget, seed=1, intrinsic_dim=8, popsize=4, refiner_hidden=16, max_generations=30,
                     protocol="paper")  # 6 validation images certify nothing: the robust protocol would buy no search
    state, ckpt, port = str(tmp_path / "state.db"), tmp_path / "ckpt", free_port()
    server = Server(tiny_model_dir, key_file, state, key_budget, port=port)
    killed: list[int] = []

    def kill_at_generation_2(progress: Any) -> None:
        if progress.generation == 2 and not killed:
            server.kill()
            killed.append(progress.queries_used)

    fast = dict(backoff=0.01, max_backoff=0.05, max_retries=2, timeout=30)
    try:
        with HTTPClient(server.url, api_key=KEY, **fast) as client, pytest.raises(ClientError, match="connection failed"):
            Tuner(cfg, checkpoint_dir=ckpt, on_progress=kill_at_generation_2).fit(client, train, val)
        journal = sum(json.loads(line).get("n", 0) for line in (ckpt / LEDGER_FILE).read_text().splitlines())  # usage lines carry no "n"
        server = Server(tiny_model_dir, key_file, state, key_budget, port=port)  # restarted on the same state file
        with HTTPClient(server.url, api_key=KEY, **fast) as client:
            assert killed and client.usage()["used"] == journal == killed[0]  # continues from the billed count
            result = Tuner(cfg, checkpoint_dir=ckpt, resume=True).fit(client, train, val)
            final = client.usage()
    finally:
        server.stop()
    assert result.n_generations > 2  # resumed past the kill
    assert "budget of this API key is spent" not in str(result.metrics.stopped_early or "")  # never refused
    assert final["used"] == result.queries.used <= key_budget  # the server's total equals the client's ledger


def test_serve_keys_lists_tops_up_and_resets(tmp_path: Path, key_file: Path) -> None:
    from typer.testing import CliRunner

    from craft_sdk.cli import app

    state = tmp_path / "keys.txt.state.db"
    store = SQLiteStore(state, default_budget=50)
    assert store.begin("alice", None, "", 20, "x").status == "charged"
    store.close()
    run = CliRunner().invoke
    res = run(app, ["serve-keys", "list", "--api-key-file", str(key_file), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == {"alice": {"used": 20, "budget": 50, "remaining": 30, "uploads": 0}}
    assert json.loads(run(app, ["serve-keys", "top-up", "alice", "25", "--state", str(state)]).stdout)["alice"]["remaining"] == 55
    assert json.loads(run(app, ["serve-keys", "reset", "alice", "--state", str(state)]).stdout)["alice"]["used"] == 0
    assert json.loads(run(app, ["serve-keys", "reset", "alice", "--state", str(state), "--json"]).stdout)["alice"]["used"] == 0
    assert json.loads(run(app, ["serve-keys", "set-budget", "alice", "default", "--state", str(state)]).stdout)["alice"]["budget"] == 50
    bad = run(app, ["serve-keys", "list"])
    assert bad.exit_code != 0 and "--state" in bad.output and len(bad.output.strip().splitlines()) == 1
