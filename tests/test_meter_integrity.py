"""Meters you can bill on (issue 20, defects 1-6 and the state-store weaknesses): budgets survive restarts
without flags, --workers never multiplies a budget, foreign files are refused untouched, Redis keys never
collide, top-ups are validated whole, lost or unreachable stores fail closed with 503, never unlimited.
Real SQLite files, real redis-server processes, real `craft-sdk serve` processes on loopback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import free_port, start_serve, suite_env
from test_server_state import KEY, hammer, key_file, redis_url  # noqa: F401  (fixtures)
from typer.testing import CliRunner

from craft_sdk.errors import ConfigError
from craft_sdk.wire import encode

pytest.importorskip("fastapi")
from craft_sdk.cli import app as cli  # noqa: E402
from craft_sdk.serve import BackgroundServer, ServerConfig, create_app  # noqa: E402
from craft_sdk.serve.store import SQLiteStore, open_store  # noqa: E402

AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BUDGET = 10**15


class Redis:
    """A redis-server of its own on a loopback port (for tests that stop, restart or configure it)."""

    def __init__(self, directory: Path, *args: str, port: int | None = None) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed")
        redis = pytest.importorskip("redis")
        directory.mkdir(parents=True, exist_ok=True)
        self.port, self.dir, self.args = port or free_port(), directory, args
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(directory), *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        deadline = time.monotonic() + 60
        while True:
            try:
                redis.Redis(port=self.port).ping()
                break
            except redis.AuthenticationError:
                break
            except redis.ConnectionError:
                assert self.proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)


@pytest.fixture()
def redis_dir(tmp_path: Path) -> Iterator[list[Redis]]:
    started: list[Redis] = []
    yield started
    for r in started:
        r.stop()


def spec_for(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if kind == "memory":
        return "memory"
    if kind == "sqlite":
        return str(tmp_path / "state.db")
    url = request.getfixturevalue("redis_url")
    import redis

    redis.Redis.from_url(url).flushdb()
    return url


# ------------------------------------------------------------------ servers


def serving(client: Any, store: Any, **config: Any) -> BackgroundServer:
    return BackgroundServer(create_app(client, {"alice": KEY}, ServerConfig(**config), store)).start()


def upload(url: str) -> str:
    pixels = encode({"images": np.zeros((2, 32, 32, 3), np.uint8)})
    return httpx.post(f"{url}/v1/image-sets", content=pixels, headers=AUTH, timeout=30).json()["handle"]


def predict(url: str, handle: str, idem: str, p: int = 2, timeout: float = 60) -> httpx.Response:
    caps = httpx.get(f"{url}/v1/capabilities", headers=AUTH, timeout=timeout).json()
    offsets = np.full((p, caps["n_ctx"], caps["ctx_dim"]), 0.01, np.float32)
    body = encode({"offsets": offsets}, {"request": json.dumps({"handle": handle, "class_names": ["a", "b"]})})
    return httpx.post(f"{url}/v1/predict", content=body, headers={**AUTH, "Idempotency-Key": idem}, timeout=timeout)


def serve_cli(model_dir: Path, key_file: Path, state: str, *extra: str) -> tuple[subprocess.Popen, str]:
    """``craft-sdk serve`` in a subprocess, up and answering /v1/health."""
    args = ["--model", f"local-dir:{model_dir}", "--api-key-file", str(key_file), "--state", state, *extra]
    return start_serve(args, new_session=True)


def stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    return err.decode()


# ------------------------------------------------------------------ defect 1: a restart without --budget-per-key


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_reopening_without_a_budget_keeps_the_stored_budget(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    spec = spec_for(kind, tmp_path, request)
    first = open_store(spec, default_budget=100)
    assert first.begin("alice", None, "", 60, "one").status == "charged"
    second = open_store(spec)  # a server restarted (or a second one started) without --budget-per-key
    assert second.usage("alice") == {"used": 60, "budget": 100, "remaining": 40, "uploads": 0}
    assert first.begin("alice", None, "", 50, "one").status == "refused"
    assert second.begin("alice", None, "", 40, "two").status == "charged"
    first.close()
    second.close()


def test_a_second_server_without_the_budget_flag_keeps_the_budget(tiny_model_dir: Path, key_file: Path, tmp_path: Path) -> None:
    state, budget = str(tmp_path / "state.db"), 6
    first, url = serve_cli(tiny_model_dir, key_file, state, "--budget-per-key", str(budget))
    second = None
    try:
        second, url2 = serve_cli(tiny_model_dir, key_file, state)  # no flag: must keep the stored budget
        statuses = hammer([url, url2], n_requests=8, p=3)  # 24 queries asked on a budget of 6
        used = httpx.get(f"{url}/v1/usage", headers=AUTH, timeout=10).json()
    finally:
        stop(first)
        if second is not None:
            stop(second)
    assert statuses.count(200) * 3 == used["used"] <= budget and used["budget"] == budget, (statuses, used)
    assert statuses.count(429) >= 6


# ------------------------------------------------------------------ defect 2: --workers on a memory state


def test_workers_on_a_memory_state_are_refused_in_one_line(tiny_model_dir: Path, key_file: Path) -> None:
    cmd = [sys.executable, "-m", "craft_sdk.cli", "serve", "--model", f"local-dir:{tiny_model_dir}", "--port", str(free_port()),
           "--api-key-file", str(key_file), "--state", "memory", "--workers", "2", "--budget-per-key", "20"]
    proc = subprocess.Popen(cmd, env=suite_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("serve --workers 2 --state memory started serving (each worker would hold its own budget)")
    assert proc.returncode == 2 and "--workers" in err.decode() and len(err.decode().strip().splitlines()) == 1, err.decode()


# ------------------------------------------------------------------ defect 3: foreign and versioned SQLite files


def test_a_foreign_file_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    app_db = tmp_path / "app.db"
    db = sqlite3.connect(app_db)
    db.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    db.execute("INSERT INTO customers VALUES (1, 'ada')")
    db.commit()
    db.close()
    text = tmp_path / "notes.txt"
    text.write_text("not a database at all\n" * 100)
    original = app_db.read_bytes()
    for path, reason in ((app_db, "not a craft-sdk state database"), (text, "not a SQLite database")):
        before = path.read_bytes()
        with pytest.raises(ConfigError, match=reason):
            open_store(str(path), default_budget=10)
        assert path.read_bytes() == before and not Path(f"{path}-wal").exists() and not Path(f"{path}-shm").exists()
    assert sqlite3.connect(app_db).execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # not switched to WAL
    res = CliRunner().invoke(cli, ["serve-keys", "list", "--state", str(app_db)])
    assert res.exit_code == 2 and "not a craft-sdk state" in res.output and app_db.read_bytes() == original



def test_foreign_files_shaped_like_a_state_are_refused_untouched(tmp_path: Path) -> None:
    """A database of views only (no table), and one with our old table names but other columns."""
    views = tmp_path / "views.db"
    db = sqlite3.connect(views)
    db.execute("CREATE VIEW report AS SELECT 1 AS x")
    db.commit()
    db.close()
    lookalike = tmp_path / "lookalike.db"
    db = sqlite3.connect(lookalike)
    for table in ("usage", "idempotency", "instances", "settings"):
        db.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, data TEXT)")
    db.commit()
    db.close()
    for path in (views, lookalike):
        before = path.read_bytes()
        with pytest.raises(ConfigError, match="not a craft-sdk state database"):
            open_store(str(path), default_budget=10)
        assert path.read_bytes() == before and sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "delete"


OLD_SCHEMA = """
CREATE TABLE usage (key TEXT PRIMARY KEY, used INTEGER NOT NULL DEFAULT 0, uploads INTEGER NOT NULL DEFAULT 0, budget INTEGER);
CREATE TABLE idempotency (key TEXT NOT NULL, idem TEXT NOT NULL, request TEXT NOT NULL, status TEXT NOT NULL, owner TEXT NOT NULL,
                          digest TEXT, created REAL NOT NULL, PRIMARY KEY (key, idem));
CREATE TABLE instances (owner TEXT PRIMARY KEY, beat REAL NOT NULL);
CREATE TABLE settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO settings VALUES ('default_budget', '50'), ('secret', '00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff');
INSERT INTO usage VALUES ('alice', 7, 1, 20);
"""


def test_an_older_state_is_upgraded_and_a_newer_one_refused(tmp_path: Path) -> None:
    old = tmp_path / "old.db"
    db = sqlite3.connect(old)
    db.executescript(OLD_SCHEMA)
    db.close()
    store = SQLiteStore(old)  # the state of the previous craft-sdk: upgraded in place, nothing lost
    assert store.usage("alice") == {"used": 7, "budget": 20, "remaining": 13, "uploads": 1} and store.usage("bob")["budget"] == 50
    assert store.begin("alice", "k", "h", 1, "me").status == "charged"
    store.finish("alice", "k", "d", b"answer")
    assert store.begin("alice", "k", "h", 1, "me").answer == b"answer"
    store.close()
    db = sqlite3.connect(old)
    assert dict(db.execute("SELECT name, value FROM craft_meta").fetchall())["format"] == "1"
    db.execute("UPDATE craft_meta SET value = '99' WHERE name = 'format'")
    db.commit()
    db.close()
    with pytest.raises(ConfigError, match="newer craft-sdk"):
        SQLiteStore(old, default_budget=5)
    assert sqlite3.connect(old).execute("SELECT value FROM settings WHERE name = 'default_budget'").fetchone()[0] == "50"


# ------------------------------------------------------------------ defect 4: Redis key collisions


def test_redis_keys_of_different_tenants_never_collide(redis_url: str) -> None:  # noqa: F811
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    store = open_store(redis_url, default_budget=10)
    assert store.begin("alice", "x:y", "h1", 1, "me").status == "charged"
    assert store.begin("alice:x", "y", "h2", 1, "me").status == "charged"  # another tenant's record, not a 'mismatch'
    names = ["a:b", "{tag}", "two words", "ünïcødé", "100%", "a%3Ab", "usage:x"]
    for i, name in enumerate(names):
        assert store.begin(name, "k:1", f"h-{i}", i + 1, "me").status == "charged"
    assert set(store.keys()) == set(names) | {"alice", "alice:x"}
    assert [store.usage(n)["used"] for n in names] == list(range(1, len(names) + 1))
    raw = redis.Redis.from_url(redis_url, decode_responses=True).keys("craft:*")
    assert all(k.isascii() and not set("{} ") & set(k) for k in raw), raw  # no hash tag, space or non-ASCII reaches Redis
    store.close()


# ------------------------------------------------------------------ defect 5: huge top-ups


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis"])
def test_a_huge_or_fractional_top_up_is_refused_before_writing(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    store = open_store(spec_for(kind, tmp_path, request), default_budget=10)
    store.set_budget("bob", 10)
    for n in (10**17, MAX_BUDGET, 2.5, True, 0, -3):
        with pytest.raises(ConfigError):
            store.top_up("bob", n)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        store.set_budget("bob", 10**17)
    assert store.usage("bob") == {"used": 0, "budget": 10, "remaining": 10, "uploads": 0}
    store.top_up("bob", MAX_BUDGET - 10)  # the largest budget there is, exactly
    assert store.usage("bob")["budget"] == MAX_BUDGET and store.begin("bob", None, "", 3, "me").status == "charged"
    assert "bob" in store.keys()
    store.close()


def test_serve_keys_huge_top_up_on_redis_leaves_every_key_working(redis_url: str) -> None:  # noqa: F811
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    store = open_store(redis_url, default_budget=100)
    store.set_budget("bob", 100)
    run = CliRunner().invoke
    res = run(cli, ["serve-keys", "top-up", "bob", str(10**17), "--state", redis_url])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    listed = run(cli, ["serve-keys", "list", "--state", redis_url, "--json"])
    assert listed.exit_code == 0 and json.loads(listed.stdout)["bob"]["budget"] == 100, listed.output
    assert store.begin("bob", None, "", 1, "me").status == "charged"
    store.close()


# ------------------------------------------------------------------ defect 6: Redis data loss fails closed


def test_redis_data_loss_fails_closed(tiny_client: Any, redis_url: str) -> None:  # noqa: F811
    import redis

    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    store = open_store(redis_url, default_budget=4)
    server = serving(tiny_client, store, budget_per_key=4)
    try:
        handle = upload(server.url)
        assert predict(server.url, handle, "one").status_code == 200
        r.flushall()  # or a restart without persistence
        res = predict(server.url, handle, "two")
        assert res.status_code == 503 and res.json()["error"]["code"] == "store_unavailable" and "Retry-After" in res.headers
        assert "lost its data" in res.json()["error"]["message"]
        health = httpx.get(f"{server.url}/v1/health", timeout=30)
        assert health.status_code == 503 and "lost its data" in health.json()["store"]
        assert httpx.get(f"{server.url}/v1/usage", headers=AUTH, timeout=30).status_code == 503
    finally:
        server.stop()
    from craft_sdk.errors import StoreError

    with pytest.raises(StoreError):
        store.begin("alice", None, "", 1, "me")
    with pytest.raises(ConfigError, match="holds no craft-sdk state"):
        open_store(redis_url, create=False)  # serve-keys on a flushed Redis says so


def test_redis_persistence_is_checked_at_start(tmp_path: Path, redis_dir: list[Redis]) -> None:
    volatile = Redis(tmp_path / "a", "--save", "", "--appendonly", "no")
    aof = Redis(tmp_path / "b", "--appendonly", "yes")
    hidden = Redis(tmp_path / "c", "--save", "", "--appendonly", "no", "--rename-command", "CONFIG", "")
    evicting = Redis(tmp_path / "d", "--appendonly", "yes", "--maxmemory-policy", "allkeys-lru")
    redis_dir += [volatile, aof, hidden, evicting]
    assert any("persists nothing" in w for w in open_store(volatile.url, default_budget=5).warnings)  # type: ignore[attr-defined]
    assert open_store(aof.url, default_budget=5).warnings == []  # type: ignore[attr-defined]
    assert open_store(hidden.url, default_budget=5).warnings == []  # type: ignore[attr-defined]  # CONFIG disabled: tolerated
    assert any("noeviction" in w for w in open_store(evicting.url, default_budget=5).warnings)  # type: ignore[attr-defined]


# ------------------------------------------------------------------ weaknesses: outages, files, passwords, serve-keys, replays


def test_a_locked_sqlite_state_gives_503_and_health_answers(tiny_client: Any, tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = SQLiteStore(path, default_budget=100)
    server = serving(tiny_client, store, budget_per_key=100)  # store_timeout_s: 5 s
    try:
        handle = upload(server.url)
        assert predict(server.url, handle, "before").status_code == 200
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        answers: list[httpx.Response] = []
        blocked = threading.Thread(target=lambda: answers.append(predict(server.url, handle, "during")))
        blocked.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        health = httpx.get(f"{server.url}/v1/health", timeout=20)  # the event loop is not blocked by the locked store
        health_s = time.monotonic() - t0
        blocked.join(timeout=60)
        assert health.status_code == 503 and "did not answer" in health.json()["store"], health.text
        assert health_s < 15
        assert answers and answers[0].status_code == 503 and answers[0].headers.get("Retry-After"), answers
        time.sleep(1.5)
        other.execute("ROLLBACK")
        other.close()
        assert httpx.get(f"{server.url}/v1/health", timeout=30).json()["store"] == "ok"
        assert predict(server.url, handle, "after").status_code == 200
        deadline = time.monotonic() + 40  # a charge the store recorded after the 503 is refunded
        while httpx.get(f"{server.url}/v1/usage", headers=AUTH, timeout=30).json()["used"] != 4:
            assert time.monotonic() < deadline, httpx.get(f"{server.url}/v1/usage", headers=AUTH).json()
            time.sleep(0.5)
    finally:
        server.stop()


def test_a_stopped_redis_gives_503_then_resumes_from_its_aof(tiny_client: Any, tmp_path: Path, redis_dir: list[Redis]) -> None:
    r = Redis(tmp_path / "r", "--appendonly", "yes", "--appendfsync", "always")
    redis_dir.append(r)
    server = serving(tiny_client, open_store(r.url, default_budget=100), budget_per_key=100)
    try:
        handle = upload(server.url)
        assert predict(server.url, handle, "one").status_code == 200
        r.stop()
        res = predict(server.url, handle, "two", timeout=30)
        assert res.status_code == 503 and res.json()["error"]["code"] == "store_unavailable"
        assert httpx.get(f"{server.url}/v1/health", timeout=30).status_code == 503
        redis_dir.append(Redis(tmp_path / "r", "--appendonly", "yes", port=r.port))  # restarted, with its data
        deadline = time.monotonic() + 30
        while (res := predict(server.url, handle, "two", timeout=30)).status_code != 200:
            assert res.status_code == 503 and time.monotonic() < deadline, res.text
            time.sleep(0.5)
        assert httpx.get(f"{server.url}/v1/usage", headers=AUTH, timeout=30).json()["used"] == 4
    finally:
        server.stop()


def test_state_files_are_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        store = SQLiteStore(tmp_path / "s.db", default_budget=5)
        store.begin("alice", "k", "h", 1, "me")
        for suffix in ("", "-wal", "-shm"):
            assert (os.stat(f"{tmp_path / 's.db'}{suffix}").st_mode & 0o777) == 0o600, suffix
        store.close()
        loose = tmp_path / "loose.db"
        SQLiteStore(loose).close()
        loose.chmod(0o644)
        SQLiteStore(loose).close()  # an existing state is made private again when opened
        assert loose.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_the_redis_password_comes_from_the_environment(tmp_path: Path, redis_dir: list[Redis], key_file: Path,  # noqa: F811
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "pw-" + KEY
    r = Redis(tmp_path / "r", "--save", "", "--requirepass", secret)
    redis_dir.append(r)
    monkeypatch.delenv("CRAFT_REDIS_PASSWORD", raising=False)
    monkeypatch.delenv("CRAFT_REDIS_PASSWORD_FILE", raising=False)
    with pytest.raises(ConfigError, match="cannot reach"):
        open_store(r.url, default_budget=5)
    monkeypatch.setenv("CRAFT_REDIS_PASSWORD", secret)
    assert open_store(r.url, default_budget=5).usage("alice")["budget"] == 5
    monkeypatch.delenv("CRAFT_REDIS_PASSWORD")
    pw_file = tmp_path / "redis.pw"
    pw_file.write_text(secret + "\n")
    monkeypatch.setenv("CRAFT_REDIS_PASSWORD_FILE", str(pw_file))
    assert open_store(r.url).usage("alice")["budget"] == 5
    run = CliRunner().invoke
    res = run(cli, ["serve", "--api-key-file", str(key_file), "--state", f"redis://:{secret}@127.0.0.1:{r.port}/0"])
    assert res.exit_code == 2 and "CRAFT_REDIS_PASSWORD" in res.output and secret not in res.output
    assert "CRAFT_REDIS_PASSWORD" in " ".join(run(cli, ["serve", "--help"]).output.split())


def test_serve_keys_refuses_unknown_names_missing_states_and_memory(tmp_path: Path, key_file: Path) -> None:  # noqa: F811
    state = tmp_path / "keys.txt.state.db"
    store = SQLiteStore(state)
    store.begin("alice", None, "", 1, "me")
    store.close()
    run = CliRunner().invoke

    def refused(args: list[str], *words: str) -> None:
        res = run(cli, ["serve-keys", *args])
        assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, (args, res.output)
        assert all(w in res.output for w in words), (args, res.output)

    refused(["reset", "nosuchkey", "--api-key-file", str(key_file)], "nosuchkey")
    refused(["top-up", "mallory", "5", "--state", str(state)], "mallory")
    refused(["set-budget", "mallory", "5", "--state", str(state)], "mallory")
    typo = tmp_path / "kyes.txt.state.db"
    refused(["list", "--state", str(typo)], "does not exist")
    assert not typo.exists()
    refused(["list", "--state", "memory"], "memory")
    refused(["top-up", "alice", "5", "--state", str(state)], "serve-keys set-budget alice")  # unlimited: the real command
    assert "--set-budget" not in run(cli, ["serve-keys", "top-up", "alice", "5", "--state", str(state)]).output
    ok = run(cli, ["serve-keys", "set-budget", "alice", "9", "--api-key-file", str(key_file)])
    assert ok.exit_code == 0 and json.loads(ok.stdout)["alice"]["budget"] == 9


def test_replays_beyond_the_memory_cache_are_answered_from_the_store(tiny_client: Any, tmp_path: Path) -> None:
    path = tmp_path / "state.db"

    def counted(server: BackgroundServer) -> list[int]:
        model, calls = server.app.state.craft.model, []
        real = model.predict
        model.predict = lambda *a: calls.append(1) or real(*a)
        return calls

    server = serving(tiny_client, SQLiteStore(path, default_budget=100), idempotency_entries=1)
    try:
        calls = counted(server)
        handle = upload(server.url)
        first = [predict(server.url, handle, f"k{i}") for i in range(4)]  # more keys than the memory cache holds
        assert [r.status_code for r in first] == [200] * 4 and len(calls) == 4
        again = predict(server.url, handle, "k0")
        assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true" and again.content == first[0].content
        assert len(calls) == 4  # answered from the store: not computed again
    finally:
        server.stop()
    restarted = serving(tiny_client, SQLiteStore(path), idempotency_entries=1)  # a restart: memory is gone, the store is not
    try:
        calls = counted(restarted)
        again = predict(restarted.url, upload(restarted.url), "k1")
        assert again.status_code == 200 and again.content == first[1].content and calls == []
        assert httpx.get(f"{restarted.url}/v1/usage", headers=AUTH, timeout=30).json()["used"] == 8
    finally:
        restarted.stop()


# ------------------------------------------------------------------ issue 20 leftovers: fail closed, legacy values, upgrades


def refused_to_start(args: list[str]) -> str:
    """``craft-sdk serve ARGS`` must exit at once (before serving); its stderr."""
    cmd = [sys.executable, "-m", "craft_sdk.cli", "serve", "--port", str(free_port()), *args]
    proc = subprocess.Popen(cmd, env=suite_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"serve {args} started serving")
    assert proc.returncode == 2, err.decode()
    return err.decode()


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_store_without_meters_needs_a_budget_or_no_budget(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    spec = spec_for(kind, tmp_path, request)  # a new file, or a flushed Redis
    with pytest.raises(ConfigError, match="--budget-per-key N, or --no-budget"):
        open_store(spec, budget_required=True)
    if kind == "sqlite":
        assert not Path(spec).exists()  # nothing written: a second start without the flag is refused too
    else:
        import redis

        assert redis.Redis.from_url(spec).dbsize() == 0
    with pytest.raises(ConfigError, match="--no-budget"):
        open_store(spec, budget_required=True)
    open_store(spec, budget_required=True, unlimited=True).close()  # the explicit opt-out, stored
    again = open_store(spec, budget_required=True)  # an intact store: a restart without flags keeps what it holds
    assert again.usage("alice")["budget"] is None
    again.close()
    open_store(spec, 30, budget_required=True).close()
    assert open_store(spec, budget_required=True).usage("alice")["budget"] == 30  # defect 1 still held
    with pytest.raises(ConfigError, match="not both"):
        open_store(spec, 5, unlimited=True)


def test_serve_on_a_flushed_redis_without_the_budget_flag_refuses_to_start(tiny_model_dir: Path, key_file: Path,  # noqa: F811
                                                                          redis_url: str) -> None:  # noqa: F811
    import redis

    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    open_store(redis_url, default_budget=40).close()  # served with --budget-per-key 40 before
    r.flushall()  # the data is gone (or a Redis restarted without persistence)
    err = refused_to_start(["--model", f"local-dir:{tiny_model_dir}", "--api-key-file", str(key_file), "--state", redis_url])
    assert len(err.strip().splitlines()) == 1 and "--budget-per-key N, or --no-budget" in err, err
    assert r.dbsize() == 0  # not "starting a new one" unlimited
    both = refused_to_start(["--model", f"local-dir:{tiny_model_dir}", "--api-key-file", str(key_file), "--state", redis_url,
                             "--budget-per-key", "5", "--no-budget"])
    assert "not both" in both and len(both.strip().splitlines()) == 1


def test_legacy_float_budgets_never_break_the_listing(redis_url: str, tmp_path: Path) -> None:  # noqa: F811
    import redis

    r = redis.Redis.from_url(redis_url, decode_responses=True)
    r.flushdb()
    store = open_store(redis_url, default_budget=100)
    for name in ("alice", "bob", "carol", "dave"):
        store.begin(name, None, "", 2, "me")
    r.hset("craft:usage:bob", "budget", "150.0")  # what an older craft-sdk wrote: an integral float
    r.hset("craft:usage:carol", "budget", "1e+17")  # the float a huge top-up left behind
    r.hset("craft:usage:dave", "budget", "7.5")
    sqlite_state = tmp_path / "state.db"
    lite = SQLiteStore(sqlite_state, default_budget=100)
    for name in ("alice", "bob", "carol"):
        lite.begin(name, None, "", 2, "me")
    db = sqlite3.connect(sqlite_state)
    db.execute("UPDATE usage SET budget = 150.0 WHERE key = 'bob'")
    db.execute("UPDATE usage SET budget = 1e17 WHERE key = 'carol'")
    db.commit()
    db.close()
    run = CliRunner().invoke
    for state, broken in ((redis_url, ("carol", "dave")), (str(sqlite_state), ("carol",))):
        listed = run(cli, ["serve-keys", "list", "--state", state, "--json"])
        assert listed.exit_code == 0, listed.output
        rows = json.loads(listed.stdout)
        assert rows["alice"] == {"used": 2, "budget": 100, "remaining": 98, "uploads": 0}
        assert rows["bob"] == {"used": 2, "budget": 150, "remaining": 148, "uploads": 0}  # read as the integer it is
        for name in broken:
            assert f"serve-keys set-budget {name} N" in rows[name]["error"], rows[name]  # that key only, with the fix
        table = run(cli, ["serve-keys", "list", "--state", state])
        assert table.exit_code == 0 and "150" in table.stdout and "set-budget carol" in table.stdout
    store.top_up("bob", 10)  # a legacy integral float tops up to an integer
    assert r.hget("craft:usage:bob", "budget") == "160" and store.begin("bob", None, "", 1, "me").status == "charged"
    from craft_sdk.errors import StoreError

    with pytest.raises(StoreError, match="set-budget carol"):
        store.begin("carol", None, "", 1, "me")  # refused for that key, never an unlimited budget
    store.set_budget("carol", 50)
    assert store.usage("carol")["budget"] == 50 and store.begin("carol", None, "", 1, "me").status == "charged"
    store.close()


def test_an_old_format_redis_with_percent_names_upgrades_without_mixing_tenants(redis_url: str) -> None:  # noqa: F811
    import redis

    r = redis.Redis.from_url(redis_url, decode_responses=True)
    for attempt in range(2):  # either order of the two old names in Redis' scan
        r.flushdb()
        r.hset("craft:settings", mapping={"default_budget": "10", "secret": "00" * 32})  # format 0: no 'format' field
        first, second = ("a:b", "a%3Ab") if attempt == 0 else ("a%3Ab", "a:b")
        r.hset(f"craft:usage:{first}", mapping={"used": "3", "uploads": "0"})
        r.hset(f"craft:usage:{second}", mapping={"used": "5", "uploads": "0"})
        r.hset("craft:idem:a%3Ab:k", mapping={"request": "h-old", "status": "done", "owner": "x", "digest": "d"})  # old tenant 'a%3Ab'
        store = open_store(redis_url)
        assert set(store.keys()) == {"a:b", "a%3Ab"}
        assert store.usage(first)["used"] == 3 and store.usage(second)["used"] == 5
        assert store.begin("a:b", "k", "h-new", 1, "me").status == "charged"  # not the old tenant's record
        assert r.hget("craft:settings", "format") == "1" and not r.keys("craft:migrating:*")
        store.close()


def test_serve_store_timeout_option(tiny_model_dir: Path, key_file: Path, tmp_path: Path) -> None:  # noqa: F811
    state = tmp_path / "state.db"
    assert "--store-timeout" in CliRunner().invoke(cli, ["serve", "--help"]).output
    proc, url = serve_cli(tiny_model_dir, key_file, str(state), "--budget-per-key", "10", "--store-timeout", "2")
    try:
        other = sqlite3.connect(state, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # the store is locked from outside
        health = httpx.get(f"{url}/v1/health", timeout=60)
        other.execute("ROLLBACK")
        other.close()
    finally:
        stop(proc)
    assert health.status_code == 503 and "within 2 s" in health.json()["store"], health.text


def test_httpclient_counts_a_store_outage_as_unbilled(tiny_client: Any, tmp_path: Path) -> None:
    """A 503 store_unavailable was refused before computing: HTTPClient marks it unbilled, so the client's own
    ledger refunds it and equals the server's meter (it counted the refused queries as spent)."""
    from craft_sdk.client.http import HTTPClient, HTTPClientConfig
    from craft_sdk.client.ledger import MeteredClient, QueryLedger
    from craft_sdk.errors import ClientError

    path = tmp_path / "state.db"
    server = serving(tiny_client, SQLiteStore(path, default_budget=100), budget_per_key=100, store_timeout_s=1)
    config = HTTPClientConfig(max_retries=1, backoff=0.05, max_backoff=0.1, timeout=120)
    try:
        with HTTPClient(server.url, api_key=KEY, config=config) as http:
            ledger = QueryLedger(budget=100)
            client = MeteredClient(http, ledger)
            images = [np.zeros((32, 32, 3), np.uint8)] * 2
            handle = http.upload(images)
            caps = http.capabilities()
            offsets = np.full((3, caps.n_ctx, caps.ctx_dim), 0.01, np.float32)
            client.predict(handle, ["a", "b"], offsets=offsets)
            other = sqlite3.connect(path, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")  # the store is stalled: every charge times out (503 store_unavailable)
            try:
                with pytest.raises(ClientError) as failed:
                    client.predict(handle, ["a", "b"], offsets=offsets * 2)
            finally:
                other.execute("ROLLBACK")
                other.close()
            assert failed.value.unbilled, str(failed.value)
            deadline = time.monotonic() + 60  # a charge the store recorded late is refunded by the server
            while http.usage()["used"] != 3:
                assert time.monotonic() < deadline, http.usage()
                time.sleep(0.5)
            assert ledger.used == 3, ledger.used
    finally:
        server.stop()


# ------------------------------------------------------------------ a per-request compute budget; leases lapsing in a store stall


class SlowModel:
    """The tiny model, taking ``delay`` seconds per model call (a big model on a busy machine), counting its calls."""

    def __new__(cls, model: Any, delay: float) -> Any:
        from craft_sdk.client.base import BaseClient

        class Slow(BaseClient):
            def __init__(self) -> None:
                super().__init__()
                self.calls: list[int] = []

            def capabilities(self, template: str = "a photo of a") -> Any:
                return model.capabilities(template)

            def _prepare(self, images: list[Any]) -> Any:
                return model._prepare(images)

            def _predict_images(self, prepared: Any, class_names: list[str], template: str, offsets: Any) -> np.ndarray:
                time.sleep(delay)
                self.calls.append(0 if offsets is None else len(offsets))
                return model._predict_images(prepared, class_names, template, offsets)

        return Slow()


def used(url: str) -> int:
    return int(httpx.get(f"{url}/v1/usage", headers=AUTH, timeout=60).json()["used"])


def test_a_request_over_its_time_budget_stops_and_bills_only_what_was_computed(tiny_client: Any) -> None:
    slow = SlowModel(tiny_client, 0.6)
    server = serving(slow, None, budget_per_key=100, max_request_s=1, chunk_prompts=2)  # 1 candidate a chunk (2 classes)
    try:
        caps = httpx.get(f"{server.url}/v1/capabilities", headers=AUTH, timeout=60).json()
        assert caps["max_request_s"] == 1 and caps["max_prompts"] == 16_384
        assert httpx.get(f"{server.url}/v1/limits", headers=AUTH, timeout=60).json()["max_request_s"] == 1
        handle = upload(server.url)
        res = predict(server.url, handle, "long", p=8)  # 8 chunks of 0.6 s on a budget of 1 s
        assert res.status_code == 413 and res.json()["error"]["code"] == "compute_budget", res.text
        assert "max_request_s" in res.json()["error"]["message"]
        computed = sum(slow.calls)  # stopped between chunks: the candidates computed are billed, the rest refunded
        assert 2 <= len(slow.calls) < 8 and used(server.url) == computed and res.headers["X-Craft-Queries"] == str(computed)
        assert predict(server.url, handle, "short", p=1).status_code == 200 and used(server.url) == computed + 1
        slow.calls.clear()
        again = predict(server.url, handle, "long", p=8)  # not remembered as answered: computed and billed part-way again
        assert again.status_code == 413 and used(server.url) == computed + 1 + sum(slow.calls)
    finally:
        server.stop()


def test_httpclient_records_the_queries_billed_for_a_request_over_its_time_budget(tiny_client: Any) -> None:
    """A 413 compute_budget bills the chunks computed (X-Craft-Queries): the client's ledger records exactly those."""
    from craft_sdk.client.http import HTTPClient, HTTPClientConfig
    from craft_sdk.client.ledger import MeteredClient, QueryLedger
    from craft_sdk.errors import ClientError

    slow = SlowModel(tiny_client, 0.6)
    server = serving(slow, None, budget_per_key=100, max_request_s=1, chunk_prompts=2)
    try:
        with HTTPClient(server.url, api_key=KEY, config=HTTPClientConfig(max_retries=0, timeout=120)) as http:
            ledger = QueryLedger(budget=100)
            client = MeteredClient(http, ledger)
            client.max_splits = 0  # not sent again in halves: the 413 reaches the caller
            handle = http.upload([np.zeros((32, 32, 3), np.uint8)] * 2)
            caps = http.capabilities()
            slow.calls.clear()
            with pytest.raises(ClientError) as stopped:
                client.predict(handle, ["a", "b"], offsets=np.full((8, caps.n_ctx, caps.ctx_dim), 0.01, np.float32))
            computed = sum(slow.calls)
            assert 2 <= computed < 8 and stopped.value.billed == computed and not stopped.value.unbilled
            assert ledger.used == computed == used(server.url), (ledger.used, used(server.url))
    finally:
        server.stop()


def test_a_request_whose_client_left_mid_computation_stops_and_bills_only_what_was_computed(tiny_client: Any) -> None:
    slow = SlowModel(tiny_client, 0.5)
    server = serving(slow, None, budget_per_key=100, chunk_prompts=2)
    try:
        handle = upload(server.url)
        predict(server.url, handle, "warm", p=1)
        slow.calls.clear()
        with pytest.raises(httpx.ReadTimeout):
            predict(server.url, handle, "abandoned", p=10, timeout=1.2)  # the client gives up after about 2 chunks
        deadline = time.monotonic() + 60
        while used(server.url) == 11:  # the abandoned request's queries not computed are refunded
            assert time.monotonic() < deadline, used(server.url)
            time.sleep(0.3)
        time.sleep(1.5)
        assert len(slow.calls) < 10, slow.calls  # it stopped computing, and does not start again
        assert used(server.url) == 1 + sum(slow.calls), (used(server.url), slow.calls)  # the candidates computed are billed
    finally:
        server.stop()


def test_a_lease_lapsing_in_a_redis_stall_never_leaves_an_answer_unbilled(tmp_path: Path, redis_dir: list[Redis]) -> None:
    """Process A charges a request; Redis stalls (SIGSTOP) longer than A's lease; process B takes the request over,
    fails and refunds it; A then delivers its answer. The answer is billed once and its record stays whole."""
    import redis

    r = Redis(tmp_path / "r", "--save", "", "--appendonly", "no")
    redis_dir.append(r)
    a = open_store(r.url, default_budget=100, lease_s=1)
    b = open_store(r.url, lease_s=1)
    raw = redis.Redis.from_url(r.url, decode_responses=True)

    def stall(seconds: float) -> None:
        os.kill(r.proc.pid, signal.SIGSTOP)
        time.sleep(seconds)  # no lease renewal reaches Redis meanwhile
        os.kill(r.proc.pid, signal.SIGCONT)

    a.beat("A")
    assert a.begin("alice", "k", "h", 2, "A").status == "charged"
    stall(2.5)
    assert b.begin("alice", "k", "h", 2, "B").status == "takeover"  # A's lease lapsed in the stall
    b.abort("alice", "k", 2, "B")  # B's computation failed: it refunds
    assert a.usage("alice")["used"] == 0
    a.finish("alice", "k", "h", b"answer of A", 2)  # A delivers its answer: billed again, the record whole
    assert a.usage("alice")["used"] == 2
    record = raw.hgetall("craft:idem:alice:k")
    assert record["request"] == "h" and record["status"] == "done", record
    replay = b.begin("alice", "k", "h", 2, "C")
    assert replay.status == "replay" and replay.answer == b"answer of A" and a.usage("alice")["used"] == 2

    a.beat("A")  # the other order: A fails after B took over; A refunds nothing, B's answer is billed once
    assert a.begin("alice", "k2", "h2", 3, "A").status == "charged"
    stall(2.5)
    assert b.begin("alice", "k2", "h2", 3, "B").status == "takeover"
    a.abort("alice", "k2", 3, "A")
    assert a.usage("alice")["used"] == 5
    b.finish("alice", "k2", "h2", b"answer of B", 3)
    a.finish("alice", "k2", "h2", b"late answer of A", 3)  # a record already done is kept, not billed again
    assert a.usage("alice")["used"] == 5 and b.begin("alice", "k2", "h2", 3, "C").answer == b"answer of B"
    a.close()
    b.close()


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_finish_never_recreates_a_partial_record(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    store = open_store(spec_for(kind, tmp_path, request), default_budget=100, lease_s=1)
    assert store.begin("alice", "k", "h", 4, "A").status == "charged"
    time.sleep(1.2)  # A never beat: its lease is lapsed
    assert store.begin("alice", "k", "h", 4, "B").status == "takeover"
    store.abort("alice", "k", 4, "B")
    store.finish("alice", "k", "h", b"answer", 4)
    assert store.usage("alice")["used"] == 4
    replay = store.begin("alice", "k", "h", 4, "C")
    assert replay.status == "replay" and replay.answer == b"answer"
    store.close()


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis"])
def test_finish_never_recharges_past_the_budget(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A refunded record's answer is charged again only within the budget; past it, nothing is written (False)."""
    store = open_store(spec_for(kind, tmp_path, request), default_budget=5, lease_s=1)
    assert store.begin("alice", "k", "h", 4, "A").status == "charged"
    assert store.begin("alice", "k", "h", 4, "B").status == "takeover"  # A never beat: its lease is lapsed
    store.abort("alice", "k", 4, "B")
    assert store.begin("alice", "other", "h2", 3, "C").status == "charged"  # the key spends its budget meanwhile
    assert store.finish("alice", "k", "h", b"answer", 4) is False  # 3 + 4 > 5: refused, nothing written
    assert store.usage("alice")["used"] == 3
    assert store.begin("alice", "k", "h", 4, "D").status == "refused"  # no record was re-created: a plain request
    assert store.finish("alice", "other", "h2", b"fine", 3) is True and store.usage("alice")["used"] == 3
    store.close()


def test_an_answer_whose_charge_was_refunded_is_not_delivered_past_the_budget(tiny_client: Any, tmp_path: Path) -> None:
    """While the server computes, the request's record is refunded (as a failed takeover does) and the key spends its
    budget elsewhere: the answer is refused with 429 before it is sent, and the meter never passes the budget."""
    slow = SlowModel(tiny_client, 1.5)
    path = tmp_path / "state.db"
    server = serving(slow, SQLiteStore(path, default_budget=5), budget_per_key=5)
    other = SQLiteStore(path)
    try:
        handle = upload(server.url)
        result: dict[str, httpx.Response] = {}
        thread = threading.Thread(target=lambda: result.update(res=predict(server.url, handle, "k", p=4)))
        thread.start()
        deadline = time.monotonic() + 60
        while other.usage("alice")["used"] != 4:  # charged; now computing
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.05)
        other.abort("alice", "k", 4)  # refunded meanwhile
        assert other.begin("alice", None, "x", 3, "Z").status == "charged"
        thread.join(120)
        res = result["res"]
        assert res.status_code == 429 and res.json()["error"]["code"] == "budget_exceeded", res.text
        assert used(server.url) == 3 <= 5
    finally:
        server.stop()
        other.close()


@pytest.mark.parametrize("budget", [100, 9])
def test_a_metered_population_stopped_at_the_compute_budget_is_sent_again_in_halves(tiny_client: Any, budget: int) -> None:
    """A tune against a slow server does not abort on 413 compute_budget: the population is split in halves and sent
    again, each half charged first; the queries billed for the partial work count, the ledger equals the meter."""
    from craft_sdk.client.http import HTTPClient, HTTPClientConfig
    from craft_sdk.client.ledger import MeteredClient, QueryLedger
    from craft_sdk.errors import BudgetExceededError

    slow = SlowModel(tiny_client, 0.6)
    server = serving(slow, None, budget_per_key=1000, max_request_s=1, chunk_prompts=2)  # 1 candidate a chunk
    try:
        with HTTPClient(server.url, api_key=KEY, config=HTTPClientConfig(max_retries=0, timeout=120)) as http:
            ledger = QueryLedger(budget=budget)
            client = MeteredClient(http, ledger)
            handle = http.upload([np.zeros((32, 32, 3), np.uint8)] * 2)
            caps = http.capabilities()
            offsets = np.full((8, caps.n_ctx, caps.ctx_dim), 0.01, np.float32)
            try:
                logits = client.predict(handle, ["a", "b"], offsets=offsets)
            except BudgetExceededError:
                assert budget < 100  # the budget is held: a half that does not fit is refused before it is sent
            else:
                assert logits.shape == (8, 2, 2) and np.isfinite(logits).all()
                assert np.allclose(logits, logits[0], atol=1e-4)  # the same candidate everywhere: the same scores
            assert ledger.used == used(server.url) == sum(slow.calls) <= budget, (ledger.used, used(server.url), slow.calls)
            assert ledger.used > 8 if budget == 100 else True  # the partial work of the stopped request is billed
    finally:
        server.stop()
