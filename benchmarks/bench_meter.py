"""Cost of persistent metering: the server's per-request state work (SQLite, Redis) next to in-memory,
as a fraction of one population's compute, measured in the same run.

A metered prediction does three things in the state store: ``begin`` (one atomic transaction that
checks the budget, records the charge and the idempotency record), ``finish`` (marks the record
done) and ``usage`` (the answer's X-Craft-Queries-* headers). This script times exactly that
sequence for each backend (median over ``--ops`` requests, each with a fresh idempotency key), and
the model's compute for one population of ``--popsize`` candidates at each class count
(``Model.predict``, the server's own call, median of ``--reps``), then reports the extra cost of a
persistent store over the in-memory one as a percentage of that compute. End-to-end requests
through the real app on loopback (``BackgroundServer`` + ``HTTPClient``) are timed too, interleaved
across backends, as a check that nothing else changed (these are noisy on a shared machine).

Model: the demo VLM shipped in the package (``create_client("demo")``, the embedded default; a
small CLIP, so its populations are *cheaper* than a real model's and the ratio is conservative).
Redis rows need ``redis-server`` on PATH (started here on a free loopback port) and the ``redis``
client; they are skipped otherwise.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/bench_meter.py [--classes 10 100] [--images 160] [--popsize 40]
        [--ops 300] [--reps 3] [--out benchmarks/results/bench_meter.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from _loopback import free_port  # noqa: E402  (benchmarks/ is the script's folder)

ROOT = Path(__file__).resolve().parents[1]


def start_redis(workdir: Path) -> tuple[Any, str] | None:
    exe = shutil.which("redis-server")
    try:
        import redis
    except ImportError:
        return None
    if exe is None:
        return None
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            redis.Redis(port=port).ping()
            return proc, f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.terminate()
    return None


def time_store_ops(store: Any, ops: int, popsize: int) -> float:
    """Median seconds of one request's store work: begin (charge + record), finish, usage."""
    owner, digest = uuid.uuid4().hex, "0" * 64
    times = []
    for _ in range(ops):
        idem = uuid.uuid4().hex
        t0 = time.perf_counter()
        assert store.begin("bench", idem, digest, popsize, owner).status == "charged"
        store.finish("bench", idem, digest)
        store.usage("bench")
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--images", type=int, default=160)
    ap.add_argument("--popsize", type=int, default=40)
    ap.add_argument("--ops", type=int, default=300)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_meter.json")
    args = ap.parse_args()

    from craft_sdk import create_client
    from craft_sdk.client.http import HTTPClient
    from craft_sdk.serve import BackgroundServer, ServerConfig, create_app, open_store
    from craft_sdk.serve.deps import Model

    work = Path(tempfile.mkdtemp(prefix="bench_meter_"))
    redis = start_redis(work)
    backends = {"memory": "memory", "sqlite": str(work / "state.db")}
    if redis is not None:
        backends["redis"] = redis[1]
    try:
        client = create_client("demo")
        caps = client.capabilities()
        side = 32
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(args.images)]
        model = Model(client)
        from PIL import Image

        prepared = model.prepare([Image.fromarray(a) for a in images])
        offsets = rng.normal(0, caps.ctx_rms, (args.popsize, caps.n_ctx, caps.ctx_dim)).astype(np.float32)

        stores = {name: open_store(spec, default_budget=None) for name, spec in backends.items()}
        store_s = {name: time_store_ops(store, args.ops, args.popsize) for name, store in stores.items()}
        key = secrets.token_hex(16)
        servers = {name: BackgroundServer(create_app(client, {"bench": key}, ServerConfig(), open_store(spec))).start()
                   for name, spec in backends.items()}
        http = {name: HTTPClient(srv.url, api_key=key) for name, srv in servers.items()}
        handles = {name: c.upload(images) for name, c in http.items()}
        rows = []
        for n_classes in args.classes:
            names = [f"class {i}" for i in range(n_classes)]
            compute, e2e = [], {name: [] for name in backends}
            for _ in range(args.reps):
                t0 = time.perf_counter()
                model.predict(prepared, args.images, names, "a photo of a", offsets)
                compute.append(time.perf_counter() - t0)
                for name, c in http.items():  # interleaved: load drifts hit every backend alike
                    t0 = time.perf_counter()
                    c.predict(handles[name], names, offsets=offsets)
                    e2e[name].append(time.perf_counter() - t0)
            pop_s = statistics.median(compute)
            for name in backends:
                extra = store_s[name] - store_s["memory"]
                rows.append({
                    "backend": name, "classes": n_classes, "images": args.images, "popsize": args.popsize,
                    "population_compute_s": pop_s, "store_ms_per_request": 1000 * store_s[name],
                    "extra_vs_memory_ms": 1000 * extra, "extra_pct_of_compute": 100 * extra / pop_s,
                    "http_request_s": statistics.median(e2e[name]),
                })
        for c in http.values():
            c.close()
        for srv in servers.values():
            srv.stop()
        for store in stores.values():
            store.close()
    finally:
        if redis is not None:
            redis[0].terminate()
            redis[0].wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)

    print(f"{'backend':<8} {'classes':>7} {'P':>3} {'compute s/pop':>13} {'store ms/req':>12} {'extra ms':>9} {'extra %':>8} {'HTTP s/req':>10}")
    for r in rows:
        print(f"{r['backend']:<8} {r['classes']:>7} {r['popsize']:>3} {r['population_compute_s']:>13.4f} {r['store_ms_per_request']:>12.3f} "
              f"{r['extra_vs_memory_ms']:>9.3f} {r['extra_pct_of_compute']:>7.3f}% {r['http_request_s']:>10.4f}")
    meta = {
        "date": dt.date.today().isoformat(), "python": platform.python_version(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "load_avg": os.getloadavg(),
        "model": "demo", "ops": args.ops, "reps": args.reps, "redis": redis is not None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
