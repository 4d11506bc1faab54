"""Meter integrity: does a key's budget hold when the server or its state store misbehaves?

Each scenario runs real ``craft-sdk serve`` processes (``--model demo``) on loopback, a real SQLite file or a
real ``redis-server``, and asks for about three times a key's budget through ``POST /v1/predict`` (raw HTTP, no
client retries, a fresh idempotency key per request, ``--popsize`` queries each, 4 at a time). It counts the
queries answered (200) against the budget:

* restart without flags: ``serve --budget-per-key B``, half the budget's worth of requests, stop, ``serve``
  again *without* the flag on the same state, the rest;
* ``--workers 2`` on each store (``memory`` must be refused at start);
* Redis ``FLUSHALL`` once half the budget is spent, and a Redis restart there, without persistence or with AOF;
* store outages: the SQLite file write-locked by another process for ``--outage`` seconds, Redis stopped for as
  long, while requests and ``/v1/health`` keep coming (its slowest answer is reported);
* a flushed Redis restarted without ``--budget-per-key`` (it must refuse to start, not serve unlimited);
* one long request (the largest population, P x C = 16,384 prompts) under ``--max-request-s 1``, and the same
  request abandoned by its client after 1 s: the queries billed for it, and the model time it kept using.

"held" means answered <= budget. Prints a table and writes JSON.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/bench_meter_integrity.py [--budget 40] [--popsize 4] [--outage 6]
        [--only flushed-restart,long-request] [--out benchmarks/results/bench_meter_integrity.json]
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import datetime as dt
import json
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from _loopback import free_port  # noqa: E402  (benchmarks/ is the script's folder)

ROOT = Path(__file__).resolve().parents[1]
KEY = secrets.token_hex(16)
AUTH = {"Authorization": f"Bearer {KEY}"}


class Serve:
    """``craft-sdk serve --model demo`` in a subprocess (its own process group, so --workers die with it)."""

    def __init__(self, key_file: Path, state: str, *extra: str) -> None:
        self.port, self.error = free_port(), ""
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "craft_sdk.cli", "serve", "--model", "demo", "--port", str(self.port),
               "--api-key-file", str(key_file), "--state", state, *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
        deadline = time.monotonic() + 300
        while self.proc.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        err = self.stop().strip().splitlines()
        self.error = err[-1][:200] if err else "no output"
        print(f"server did not come up: {self.error}", file=sys.stderr)

    @property
    def up(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> str:
        if self.proc.stderr is None or self.proc.stderr.closed:
            return ""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.communicate(timeout=30)[1].decode()
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.communicate()[1].decode()


class RedisServer:
    def __init__(self, directory: Path, *args: str, port: int | None = None) -> None:
        import redis

        directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.args, self.dir = args, directory
        self.proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--dir", str(directory), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        for _ in range(400):
            try:
                redis.Redis(port=self.port).ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)

    def restart(self) -> RedisServer:
        self.stop()
        return RedisServer(self.dir, *self.args, port=self.port)


def ask(url: str, n_requests: int, p: int) -> collections.Counter:
    """``n_requests`` predictions of ``p`` queries, 4 at a time; the count of each status (0: no server answered)."""
    try:
        with httpx.Client(timeout=60) as c:
            caps = c.get(f"{url}/v1/capabilities", headers=AUTH).json()
    except httpx.TransportError:
        return collections.Counter({0: n_requests})
    offsets = np.full((p, caps["n_ctx"], caps["ctx_dim"]), 0.01, np.float32)
    from craft_sdk.wire import encode

    pixels = encode({"images": np.zeros((2, 32, 32, 3), np.uint8)})

    def one(i: int) -> int:
        with httpx.Client(base_url=f"{url}/v1", headers=AUTH, timeout=60) as c:
            try:
                up = c.post("/image-sets", content=pixels)
            except httpx.TransportError:
                return 0
            if up.status_code != 201:
                return up.status_code
            body = encode({"offsets": offsets}, {"request": json.dumps({"handle": up.json()["handle"], "class_names": ["a", "b"]})})
            try:
                return c.post("/predict", content=body, headers={"Idempotency-Key": secrets.token_hex(8)}).status_code
            except httpx.TransportError:
                return 0

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        return collections.Counter(pool.map(one, range(n_requests)))


def row(scenario: str, store: str, budget: int, p: int, parts: list[collections.Counter], note: str = "", **extra: Any) -> dict[str, Any]:
    total = sum(parts, collections.Counter())
    answered = total.get(200, 0) * p
    return {"scenario": scenario, "store": store, "budget": budget, "asked": sum(total.values()) * p, "answered": answered,
            "held": answered <= budget, "statuses": {str(k): v for k, v in sorted(total.items())}, "note": note, **extra}


def half(a: argparse.Namespace) -> int:
    """Requests that spend half the budget."""
    return a.budget // (2 * a.popsize)


def restart_without_flags(key_file: Path, store: str, spec: str, a: argparse.Namespace) -> dict[str, Any]:
    n = 3 * a.budget // a.popsize
    first = Serve(key_file, spec, "--budget-per-key", str(a.budget))
    parts = [ask(first.url, half(a), a.popsize)]
    first.stop()
    second = Serve(key_file, spec)  # the same state, no --budget-per-key
    parts.append(ask(second.url, n - half(a), a.popsize))
    second.stop()
    return row("restart without --budget-per-key", store, a.budget, a.popsize, parts)


def workers(key_file: Path, store: str, spec: str, a: argparse.Namespace) -> dict[str, Any]:
    server = Serve(key_file, spec, "--budget-per-key", str(a.budget), "--workers", "2")
    if not server.up:
        return row("--workers 2", store, a.budget, a.popsize, [], f"refused at start (exit {server.proc.returncode}): {server.error[:90]}")
    parts = [ask(server.url, 3 * a.budget // a.popsize, a.popsize)]
    server.stop()
    return row("--workers 2", store, a.budget, a.popsize, parts)


def redis_loss(key_file: Path, work: Path, how: str, a: argparse.Namespace) -> dict[str, Any]:
    import redis

    args = ("--appendonly", "yes", "--appendfsync", "always") if how == "restart with AOF" else ("--save", "", "--appendonly", "no")
    rs = RedisServer(work / f"redis-{how.replace(' ', '-')}", *args)
    server = Serve(key_file, rs.url, "--budget-per-key", str(a.budget))
    n = 3 * a.budget // a.popsize
    parts = [ask(server.url, half(a), a.popsize)]
    if how == "FLUSHALL":
        redis.Redis(port=rs.port).flushall()
    else:
        rs = rs.restart()
    health = httpx.get(f"{server.url}/v1/health", timeout=30)
    parts.append(ask(server.url, n - half(a), a.popsize))
    server.stop()
    rs.stop()
    return row(f"Redis {how} mid-run", "redis", a.budget, a.popsize, parts, f"health after: {health.status_code} {health.json().get('store', '')[:60]}")


def outage(key_file: Path, store: str, spec: str, a: argparse.Namespace, rs: RedisServer | None = None) -> dict[str, Any]:
    server = Serve(key_file, spec, "--budget-per-key", str(a.budget))
    n = 3 * a.budget // a.popsize
    parts = [ask(server.url, half(a), a.popsize)]
    lock = None
    if store == "sqlite":
        lock = sqlite3.connect(spec, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    else:
        rs.stop()  # type: ignore[union-attr]
    t_end, health_s, during = time.monotonic() + a.outage, [], []
    runner = threading.Thread(target=lambda: during.append(ask(server.url, n // 3, a.popsize)))
    runner.start()
    while time.monotonic() < t_end:
        t0 = time.monotonic()
        try:
            httpx.get(f"{server.url}/v1/health", timeout=60)
        except httpx.TransportError:
            pass
        health_s.append(time.monotonic() - t0)
        time.sleep(0.5)
    if lock is not None:
        lock.execute("ROLLBACK")
        lock.close()
    else:
        rs = rs.restart()  # type: ignore[union-attr]
    runner.join()
    parts += during + [ask(server.url, n - half(a) - n // 3, a.popsize)]
    server.stop()
    what = "SQLite write-locked" if store == "sqlite" else "Redis stopped"
    return row(f"store outage ({what} {a.outage:g} s)", store, a.budget, a.popsize, parts,
               f"during: {dict(during[0]) if during else {}}", health_max_s=round(max(health_s), 2))


def flushed_restart(key_file: Path, work: Path, a: argparse.Namespace) -> dict[str, Any]:
    import redis

    rs = RedisServer(work / "redis-flushed", "--appendonly", "yes")
    first = Serve(key_file, rs.url, "--budget-per-key", str(a.budget))
    parts = [ask(first.url, half(a), a.popsize)]
    first.stop()
    redis.Redis(port=rs.port).flushall()  # the data is gone; the operator restarts the server as usual
    second = Serve(key_file, rs.url)
    note = f"restart refused (exit {second.proc.returncode}): {second.error[:80]}" if not second.up else "restart served"
    if second.up:
        parts.append(ask(second.url, 3 * a.budget // a.popsize - half(a), a.popsize))
    second.stop()
    rs.stop()
    return row("flushed Redis, restart without --budget-per-key", "redis", a.budget, a.popsize, parts, note)


def _long_body(url: str, p: int, n_classes: int) -> tuple[bytes, str]:
    from craft_sdk.wire import encode

    caps = httpx.get(f"{url}/v1/capabilities", headers=AUTH, timeout=60).json()
    handle = httpx.post(f"{url}/v1/image-sets", content=encode({"images": np.zeros((2, 32, 32, 3), np.uint8)}), headers=AUTH,
                        timeout=60).json()["handle"]
    offsets = np.full((p, caps["n_ctx"], caps["ctx_dim"]), 0.01, np.float32)
    names = [f"class {i}" for i in range(n_classes)]
    return encode({"offsets": offsets}, {"request": json.dumps({"handle": handle, "class_names": names})}), str(caps.get("max_request_s"))


def long_request(key_file: Path, work: Path, a: argparse.Namespace, leave: bool) -> dict[str, Any]:
    """One request of P = 256 candidates x 64 classes (16,384 prompts): under --max-request-s 1 (when the server has
    it), or abandoned by its client after 1 s. Billed queries and the model time it used (a small request's wait)."""
    help_text = subprocess.run([sys.executable, "-m", "craft_sdk.cli", "serve", "--help"], capture_output=True, text=True).stdout
    extra = ["--max-request-s", "1"] if ("--max-request-s" in help_text and not leave) else []
    server = Serve(key_file, str(work / f"long-{leave}.db"), "--budget-per-key", "100000", *extra)
    body, limit = _long_body(server.url, 256, 64)
    t0, status = time.monotonic(), 0
    try:
        status = httpx.post(f"{server.url}/v1/predict", content=body, headers={**AUTH, "Idempotency-Key": "long"},
                            timeout=1.0 if leave else 600).status_code
    except httpx.TimeoutException:
        status = 0  # the client left
    after_s = time.monotonic() - t0
    probe = _long_body(server.url, 1, 2)[0]
    t1 = time.monotonic()
    httpx.post(f"{server.url}/v1/predict", content=probe, headers={**AUTH, "Idempotency-Key": "probe"}, timeout=600)
    busy_s = after_s + time.monotonic() - t1  # until the model was free for the next request
    time.sleep(2)
    billed = int(httpx.get(f"{server.url}/v1/usage", headers=AUTH, timeout=60).json()["used"]) - 1
    server.stop()
    what = "client left after 1 s" if leave else f"max_request_s {limit}"
    return row(f"one long request (16,384 prompts), {what}", "sqlite", 256, 256, [collections.Counter({status: 1})],
               f"status {status or 'none (client left)'}; billed {billed} of 256; model busy {busy_s:.1f} s", billed=billed,
               model_busy_s=round(busy_s, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=40)
    ap.add_argument("--popsize", type=int, default=4)
    ap.add_argument("--outage", type=float, default=6.0)
    ap.add_argument("--only", default="", help="comma-separated: flushed-restart, long-request (default: every scenario)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_meter_integrity.json")
    a = ap.parse_args()
    if a.only:
        _only(a)
        return
    work = Path(tempfile.mkdtemp(prefix="bench_meter_integrity_"))
    key_file = work / "keys.txt"
    key_file.write_text(f"alice {KEY}\n")
    rows = []
    redis_ok = shutil.which("redis-server") is not None
    rs = RedisServer(work / "redis", "--appendonly", "yes") if redis_ok else None
    stores = {"sqlite": lambda tag: str(work / f"{tag}.db"), **({"redis": lambda tag: _fresh(rs)} if rs else {})}
    for store, spec in stores.items():
        rows.append(restart_without_flags(key_file, store, spec("restart"), a))
    for store, spec in {"memory": lambda tag: "memory", **stores}.items():
        rows.append(workers(key_file, store, spec("workers"), a))
    if rs is not None:
        for how in ("FLUSHALL", "restart without persistence", "restart with AOF"):
            rows.append(redis_loss(key_file, work, how, a))
    rows.append(outage(key_file, "sqlite", str(work / "outage.db"), a))
    if rs is not None:
        rs.stop()
        down = RedisServer(work / "redis-outage", "--appendonly", "yes", "--appendfsync", "always")
        rows.append(outage(key_file, "redis", down.url, a, down))
    print(f"{'scenario':<46} {'store':<7} {'budget':>6} {'asked':>6} {'answered':>8} {'held':>5}  note")
    for r in rows:
        print(f"{r['scenario']:<46} {r['store']:<7} {r['budget']:>6} {r['asked']:>6} {r['answered']:>8} {'yes' if r['held'] else 'NO':>5}  "
              f"{r['note']}{'; health max ' + str(r['health_max_s']) + ' s' if 'health_max_s' in r else ''}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "budget": a.budget, "popsize": a.popsize,
            "outage_s": a.outage, "machine": f"{os.cpu_count()} CPUs (shared)"}
    a.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {a.out}")


def _only(a: argparse.Namespace) -> None:
    """Run the named scenarios and add (or replace) their rows in ``--out``."""
    work = Path(tempfile.mkdtemp(prefix="bench_meter_integrity_"))
    key_file = work / "keys.txt"
    key_file.write_text(f"alice {KEY}\n")
    rows = []
    for name in a.only.split(","):
        if name == "flushed-restart":
            rows.append(flushed_restart(key_file, work, a))
        elif name == "long-request":
            rows += [long_request(key_file, work, a, leave=False), long_request(key_file, work, a, leave=True)]
        else:
            raise SystemExit(f"unknown scenario {name!r}")
    for r in rows:
        print(f"{r['scenario']:<52} {r['store']:<7} {r['budget']:>6} {r['answered']:>8}  {r['note']}")
    old = json.loads(a.out.read_text()) if a.out.exists() else {"meta": {}, "rows": []}
    names = {r["scenario"] for r in rows}
    old["rows"] = [r for r in old["rows"] if r["scenario"] not in names] + rows
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(old, indent=1))
    print(f"wrote {a.out}")


def _fresh(rs: RedisServer) -> str:
    import redis

    redis.Redis(port=rs.port).flushall()
    return rs.url


if __name__ == "__main__":
    main()
