"""Batch-prediction throughput: images/s of the shipped digits adapter over the demo VLM, four ways.

The same ``--images`` PNG files (the demo digits test split, cycled, 32x32) are classified

* in process: ``predict_stream`` (the engine of ``craft-sdk predict``) with the local demo client;
* over HTTP at concurrency 1 and 8: a loopback ``craft-sdk serve --model demo`` in a separate
  process, reached through ``HTTPClient`` (one upload + one predict request per batch);
* with Ray Data on 2 workers: ``map_batches(CraftPredictor, ActorPoolStrategy(size=2))``.

For each it reports images/s (wall time of the whole pass, after the model is loaded) and the
per-image cost split into decode (file -> RGB), black box (the client call, including HTTP) and
refiner, summed over batches (with prefetching and concurrency these overlap, so they can add up to
more than the wall time per image). All labels are checked against the in-process pass.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/bench_predict.py [--images 5000] [--batch-size 64]
        [--out benchmarks/results/bench_predict.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _loopback import free_port, start_server  # noqa: E402  (benchmarks/ is the script's folder)

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = ROOT / "adapters" / "digits"


def write_images(folder: Path, n: int) -> list[str]:
    from craft_sdk.demo import load_demo_task

    test = load_demo_task("digits").test
    assert test is not None
    paths = []
    for i in range(n):
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"{i:06d}.png"
        test.images[i % len(test)].save(path)
        paths.append(str(path))
    return paths


def run_stream(clf: Any, paths: list[str], batch_size: int, concurrency: int) -> dict[str, Any]:
    from craft_sdk.deploy.stream import predict_stream

    seconds = {"decode": 0.0, "black_box": 0.0, "refiner": 0.0}
    labels: list[str] = []
    t0 = time.perf_counter()
    for res in predict_stream(clf, paths, batch_size=batch_size, prefetch=2, concurrency=concurrency):
        for k in seconds:
            seconds[k] += res.seconds.get(k, 0.0)
        labels += [str(x) for x in res.predictions.labels]
    wall = time.perf_counter() - t0
    return row(len(paths), wall, seconds, clf.ledger.used, labels)


def row(n: int, wall: float, seconds: dict[str, float], queries: int, labels: list[str]) -> dict[str, Any]:
    return {"images": n, "wall_s": round(wall, 3), "images_per_s": round(n / wall, 1), "queries": queries,
            **{f"{k}_ms_per_image": round(1000 * v / n, 3) for k, v in seconds.items()}, "labels": labels}


def bench_http(paths: list[str], batch_size: int, levels: list[int], tmp: Path) -> dict[str, Any]:
    from craft_sdk import ClassifierConfig, CraftClassifier, QueryLedger
    from craft_sdk.client.http import HTTPClient

    key = secrets.token_hex(16)
    (tmp / "keys.txt").write_text(f"bench {key}\n")
    out = {}
    for c in levels:  # a fresh server per level: its feature cache must not carry over between levels
        port = free_port()
        server = start_server(port, tmp / "keys.txt", ["--model", "demo", "--cache-size", "64"], ROOT)
        try:
            client = HTTPClient(f"http://127.0.0.1:{port}", api_key=key, max_concurrency=c)
            clf = CraftClassifier.from_pretrained(ADAPTER, client, config=ClassifierConfig(batch_size=batch_size))
            clf.predict([np.full((32, 32, 3), 7, np.uint8)])  # warm-up on an image outside the run
            clf.ledger = QueryLedger()
            out[f"http_c{c}"] = run_stream(clf, paths, batch_size, concurrency=c)
            client.close()
        finally:
            server.terminate()
            server.wait(timeout=30)
    return out


class TimedPredictor:
    """CraftPredictor that also reports per-batch decode / black box / refiner seconds as columns."""

    def __init__(self, **kwargs: Any) -> None:
        from craft_sdk.integrations.ray import CraftPredictor

        self.inner = CraftPredictor(**kwargs)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from craft_sdk.images import to_pil

        t0 = time.perf_counter()
        images = [to_pil(str(p)) for p in batch["path"]]
        decode = time.perf_counter() - t0
        out = self.inner.classifier.predict_all(images)
        n = len(images)
        return {"path": batch["path"], "label": out.labels, "decode_s": np.full(n, decode / n),
                "black_box_s": np.full(n, out.seconds["black_box"] / n), "refiner_s": np.full(n, out.seconds["refiner"] / n),
                "worker": np.full(n, os.getpid()), "done_at": np.full(n, time.time())}


def bench_ray(paths: list[str], batch_size: int, workers: int) -> dict[str, Any]:
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    init_s = time.perf_counter() - t0
    try:
        ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=4 * workers)
        kwargs = {"adapter": str(ADAPTER), "model": "demo", "batch_size": batch_size}
        t0 = time.perf_counter()
        rows = ds.map_batches(TimedPredictor, fn_constructor_kwargs=kwargs, batch_size=batch_size,
                              compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1).take_all()
        wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    by_path = {r["path"]: str(r["label"]) for r in rows}
    seconds = {k: float(sum(r[f"{k}_s"] for r in rows)) for k in ("decode", "black_box", "refiner")}
    out = row(len(paths), wall, seconds, -1, [by_path[p] for p in paths])
    done = sorted(float(r["done_at"]) for r in rows)
    first = sum(1 for d in done if d == done[0])  # rows of the first finished batch: startup ends there
    steady = (len(done) - first) / max(done[-1] - done[0], 1e-9)
    out.update(ray_init_s=round(init_s, 2), workers_seen=len({r["worker"] for r in rows}),
               steady_images_per_s=round(steady, 1),
               note="wall includes starting the actors and loading the model in each; steady = after the first batch")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--ray-workers", type=int, default=2)
    ap.add_argument("--skip", nargs="*", default=[], choices=["http", "ray"])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_predict.json")
    args = ap.parse_args()

    import craft_sdk

    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp_name:
        tmp = Path(tmp_name)
        paths = write_images(tmp / "images", args.images)
        global ADAPTER  # a copy with a refiner.onnx exported by this craft-sdk (a shipped one may predate it)
        from craft_sdk.adapter.export import export_onnx

        ADAPTER = craft_sdk.load_adapter(str(ADAPTER)).save_pretrained(tmp / "adapter")
        export_onnx(ADAPTER)
        client = craft_sdk.create_client("demo")
        clf = craft_sdk.CraftClassifier.from_pretrained(
            ADAPTER, client, config=craft_sdk.ClassifierConfig(batch_size=args.batch_size))
        clf.predict([np.full((32, 32, 3), 7, np.uint8)])  # warm-up on an image outside the run
        clf.ledger = craft_sdk.QueryLedger()
        results = {"in_process": run_stream(clf, paths, args.batch_size, concurrency=1)}
        if "http" not in args.skip:
            results.update(bench_http(paths, args.batch_size, args.concurrency, tmp))
        if "ray" not in args.skip:
            results[f"ray_{args.ray_workers}_workers"] = bench_ray(paths, args.batch_size, args.ray_workers)
    reference = results["in_process"]["labels"]
    for r in results.values():
        r["labels_match_in_process"] = r.pop("labels") == reference
    meta = {"date": dt.date.today().isoformat(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "machine": platform.machine(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "loadavg_before": round(load0, 2), "loadavg_after": round(os.getloadavg()[0], 2),
            "images": args.images, "batch_size": args.batch_size, "adapter": "adapters/digits", "model": "demo",
            "command": "python benchmarks/bench_predict.py " + " ".join(sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    head = "| run | images/s | wall s | decode ms/img | black box ms/img | refiner ms/img | queries | labels = in-process |"
    print(head)
    print("|---|---:|---:|---:|---:|---:|---:|:---:|")
    for name, r in results.items():
        print(f"| {name} | {r['images_per_s']} | {r['wall_s']} | {r['decode_ms_per_image']} | "
              f"{r['black_box_ms_per_image']} | {r['refiner_ms_per_image']} | {r['queries'] if r['queries'] >= 0 else 'per worker'} | "
              f"{'yes' if r['labels_match_in_process'] else 'NO'} |")
    for name, r in results.items():
        if "steady_images_per_s" in r:
            print(f"{name}: {r['steady_images_per_s']} images/s after the first batch (Ray start {r['ray_init_s']} s)")
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
