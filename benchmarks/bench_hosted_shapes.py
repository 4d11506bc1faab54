"""Hosted VLM shapes on loopback: accuracy and provider units through each shape, vs the same model in process.

One ``craft-sdk serve`` app (in this process, on 127.0.0.1, over ``text-only:demo``) answers every shape;
for each demo task and seed it tunes ``--mode`` (default ``pr``: the refiner on the zero-shot prompt, the
mode affordable over a chat VLM) on the ``--shots``-shot training set through each shape, then evaluates
the adapter on the first ``--test-images`` test images:

* ``in-process``: ``text-only:demo`` (no HTTP), the reference;
* ``zero-shot API``: ``zeroshot+http://.../v1/zero-shot/demo``;
* ``chat (logprobs)``: ``chat+http://.../v1?model=demo``;
* ``chat (sampled, n=N)``: ``...&samples=N``;
* ``embeddings``: ``embed+http://.../v1?model=demo`` (logits = 100 x cosine), and, with ``--embed-scale``,
  the same at the demo model's own logit scale.

Per shape it reports accuracy, and the provider's units (requests incl. retries, images, input and output
tokens; the zero-shot client counts requests only) per adapter (the tune) and per 1,000 predictions (the
evaluation, scaled), with a cost at one example price (``--price-in``/``--price-out`` per 1M tokens). For the
embedding shape it checks, from the server's own count (``image_embedding_counts``), that no image was
embedded twice within a run (tune, evaluation and a second CraftClassifier stream over the test images).

Usage:
    nice -n 10 python benchmarks/bench_hosted_shapes.py [--tasks digits noisy-shapes digits-on-texture]
        [--seeds 0 1 2] [--shots 16] [--test-images 300] [--samples 8] [--mode pr]
        [--out benchmarks/results/bench_hosted_shapes.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import secrets
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

import craft_sdk
from craft_sdk.client.usage import usage_of
from craft_sdk.serve import BackgroundServer, create_app
from craft_sdk.serve.openai_compat import image_embedding_counts

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("requests", "images", "input_tokens", "output_tokens")


def units(client: Any) -> dict[str, int]:
    """The provider units a client has counted (the zero-shot client: requests only)."""
    if hasattr(client, "provider_requests"):
        return {"requests": client.provider_requests, "images": client.provider_requests, "input_tokens": 0, "output_tokens": 0}
    return usage_of(client).to_dict()


def minus(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a[k] - b[k] for k in FIELDS}


def one_run(name: str, model: str, key: str, splits: Any, test: Any, args: argparse.Namespace, seed: int, server: Any) -> dict[str, Any]:
    client = craft_sdk.create_client(model, **({} if model.startswith("text-only:") else {"api_key": key}))
    counts = image_embedding_counts(server.app.state.craft)
    before_counts, u0, t0 = Counter(counts), units(client), time.perf_counter()
    adapter = craft_sdk.tune(client, splits.train, mode=args.mode, budget=args.budget, seed=seed)
    u1 = units(client)
    ev = craft_sdk.evaluate(adapter, client, test)
    u2 = units(client)
    row: dict[str, Any] = {"shape": name, "accuracy": ev["accuracy"], "zero_shot_accuracy": ev["zero_shot_accuracy"],
                           "tune": minus(u1, u0), "eval": minus(u2, u1),
                           "per_1000": {k: round(v * 1000 / len(test), 1) for k, v in minus(u2, u1).items()},
                           "wall_s": round(time.perf_counter() - t0, 1)}
    if model.startswith("embed+"):
        craft_sdk.CraftClassifier.from_adapter(adapter, client).predict_all(test.images)  # a second stream, batches
        delta = Counter({d: counts[d] - before_counts.get(d, 0) for d in counts}) - Counter()
        row["server_image_embeddings"] = sum(delta.values())
        row["max_embeddings_per_image"] = max(delta.values()) if delta else 0
        row["distinct_images"] = len(set(map(craft_sdk.images.image_digest, splits.train.images + test.images)))
    if hasattr(client, "close"):
        client.close()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["digits", "noisy-shapes", "digits-on-texture"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--test-images", type=int, default=300)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--mode", default="pr")
    ap.add_argument("--budget", type=int, default=50)
    ap.add_argument("--embed-scale", type=float, default=None, help="also run the embedding shape at this logit scale")
    ap.add_argument("--only", nargs="+", default=None, help="run only the shapes whose name contains one of these words")
    ap.add_argument("--price-in", type=float, default=0.15, help="example price, $ per 1M input tokens")
    ap.add_argument("--price-out", type=float, default=0.60, help="example price, $ per 1M output tokens")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_hosted_shapes.json"))
    args = ap.parse_args()
    key = secrets.token_hex(16)
    server = BackgroundServer(create_app(craft_sdk.create_client("text-only:demo"), {"bench": key})).start()
    url = server.url
    shapes = {"in-process text-only:demo": "text-only:demo", "zero-shot API": f"zeroshot+{url}/v1/zero-shot/demo",
              "chat (logprobs)": f"chat+{url}/v1?model=demo", f"chat (sampled, n={args.samples})": f"chat+{url}/v1?model=demo&samples={args.samples}",
              "embeddings": f"embed+{url}/v1?model=demo"}
    if args.embed_scale:
        shapes[f"embeddings (scale {args.embed_scale:g})"] = f"embed+{url}/v1?model=demo&scale={args.embed_scale}"
    if args.only:
        shapes = {k: v for k, v in shapes.items() if any(w in k for w in args.only)}
    rows: list[dict[str, Any]] = []
    try:
        for seed in args.seeds:  # seed-major: an interrupted run still covers every task
            for task in args.tasks:
                splits = craft_sdk.load_data(f"demo:{task}", shots=args.shots, seed=seed)
                test = splits.test.subset(np.arange(min(args.test_images, len(splits.test))))
                for name, model in shapes.items():
                    row = {"task": task, "seed": seed, **one_run(name, model, key, splits, test, args, seed, server)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                write(rows, args)  # the JSON is complete after every task
    finally:
        server.stop()
    print_table(write(rows, args))


def write(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    summary = summarize(rows, args)
    out = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": f"{platform.machine()} 2-core shared VM",
           "args": vars(args), "rows": rows, "summary": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    return summary


def summarize(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        mine = [r for r in rows if r["shape"] == shape]
        mean = {part: {k: float(np.mean([r[part][k] for r in mine])) for k in FIELDS} for part in ("tune", "per_1000")}
        cost = {part: (mean[part]["input_tokens"] * args.price_in + mean[part]["output_tokens"] * args.price_out) / 1e6 for part in mean}
        ref = [r["accuracy"] for r in rows if r["shape"] == "in-process text-only:demo"]
        out.append({"shape": shape, "runs": len(mine), "accuracy": float(np.mean([r["accuracy"] for r in mine])),
                    "vs_in_process_points": 100 * float(np.mean([r["accuracy"] for r in mine]) - np.mean(ref)) if ref else None,
                    **mean, "cost_usd": cost,
                    "max_embeddings_per_image": max((r.get("max_embeddings_per_image", 0) for r in mine), default=0)})
    return out


def print_table(summary: list[dict[str, Any]]) -> None:
    print(f"{'shape':28s} {'runs':>4s} {'acc':>6s} {'vs ref':>7s} | per adapter: {'req':>6s} {'img':>6s} {'in tok':>9s} {'out tok':>8s} {'$':>8s}"
          f" | per 1k pred: {'req':>6s} {'in tok':>9s} {'out tok':>8s} {'$':>8s} | max emb/img")
    for s in summary:
        t, p = s["tune"], s["per_1000"]
        print(f"{s['shape']:28s} {s['runs']:4d} {s['accuracy']:6.3f} {s['vs_in_process_points'] or 0:+7.2f} | {'':13s}{t['requests']:6.0f} "
              f"{t['images']:6.0f} {t['input_tokens']:9.0f} {t['output_tokens']:8.0f} {s['cost_usd']['tune']:8.4f} | {'':13s}{p['requests']:6.0f} "
              f"{p['input_tokens']:9.0f} {p['output_tokens']:8.0f} {s['cost_usd']['per_1000']:8.4f} | {s['max_embeddings_per_image']}")


if __name__ == "__main__":
    main()
