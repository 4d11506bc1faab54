"""Hosted zero-shot API shape end to end on loopback: tune and predict through ``ZeroShotAPIClient``.

A ``craft-sdk serve --model demo --text-only`` server runs in a *separate process* on 127.0.0.1;
the client speaks the hosted zero-shot classification JSON shape (``POST /v1/zero-shot/demo``,
one request per image). For each client concurrency (``--concurrency``, default 1 8 32) it runs

* ``predict``: zero-shot probabilities of ``--test-images`` test images of the demo digits task
  (1 query, N requests);
* ``tune craft``: ``craft_sdk.tune(mode="craft")`` on the ``--shots``-shot training set: the
  tuner's discrete prompt space (a text-only client: :class:`~craft_sdk.tuner.prompts.DiscretePrompts`,
  ``--generations`` x ``--popsize`` candidate contexts) with the refiner, robust protocol; then
  ``craft_sdk.evaluate`` of the adapter (its learned template and refiner) on the test images;
* ``select ensemble`` / ``predict ensemble`` (at the last concurrency only): greedy forward selection
  of ``--ensemble-k`` of CLIP's selected templates on the training set, then their log-probability
  average on the test images (K queries per image set);
* ``tune pr``: ``craft_sdk.tune(mode="pr")`` (the refiner on the zero-shot prompt, no search)
  and ``craft_sdk.evaluate`` of the adapter on the test images;

and reports per phase: queries (the ledger's unit: one prompt scored on one image set),
provider requests (HTTP requests sent, what a hosted service bills), wall time and requests/s.
It checks that every concurrency gives bitwise-identical probabilities and that the server billed
exactly the requests answered (``GET /v1/usage``).

Usage:
    python benchmarks/bench_zeroshot_api.py [--concurrency 1 8 32] [--shots 4] [--test-images 300]
        [--generations 4] [--popsize 8] [--craft-budget 200] [--ensemble-k 3] [--out benchmarks/results/bench_zeroshot_api.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import secrets
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _loopback import free_port, start_server  # noqa: E402  (benchmarks/ is the script's folder)

ROOT = Path(__file__).resolve().parents[1]


class Phase:
    """Queries, provider requests and wall time of one phase (deltas of the ledger and the client's counters)."""

    def __init__(self, name: str, client: Any, ledger: Any) -> None:
        self.name, self.client, self.ledger = name, client, ledger

    def __enter__(self) -> Phase:
        self.q0, self.r0, self.a0, self.t0 = self.ledger.used, self.client.provider_requests, self.client.provider_answers, time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.perf_counter() - self.t0
        self.queries = self.ledger.used - self.q0
        self.requests = self.client.provider_requests - self.r0
        self.answers = self.client.provider_answers - self.a0

    def row(self, **extra: Any) -> dict[str, Any]:
        return {"phase": self.name, "queries": self.queries, "provider_requests": self.requests, "provider_answers": self.answers,
                "wall_s": round(self.wall_s, 3), "requests_per_s": round(self.requests / self.wall_s, 1), **extra}


def run_concurrency(url: str, key: str, c: int, splits: Any, test: Any, args: argparse.Namespace) -> tuple[list[dict[str, Any]], np.ndarray]:
    import craft_sdk
    from craft_sdk.client import MeteredClient, QueryLedger, ZeroShotAPIClient
    from craft_sdk.tuner.templates import CLIP_SELECTED, ensemble_log_probs, greedy_templates, score_templates

    names = list(test.class_names)
    rows = []
    with ZeroShotAPIClient(url, api_key=key, model_id="craft-demo-vlm/zeroshot-api", max_concurrency=c) as client:
        ledger = QueryLedger()
        metered = MeteredClient(client, ledger)
        h_test, h_train = metered.upload(test.images), metered.upload(splits.train.images)
        with Phase("predict", client, ledger) as ph:
            probs = metered.predict(h_test, names, "a photo of a", category="eval")
        rows.append(ph.row(accuracy=round(float((probs.argmax(-1) == test.labels).mean()), 4), prompt="a photo of a"))

        with Phase("tune craft", client, ledger) as ph:  # the tuner's discrete prompt space + the refiner
            crafted = craft_sdk.tune(client, splits.train, mode="craft", budget=args.craft_budget, popsize=args.popsize,
                                     max_generations=args.generations, seed=0, ledger=ledger)
        rows.append(ph.row(prompt=crafted.config.template))
        with Phase("eval craft", client, ledger) as ph:
            res = craft_sdk.evaluate(crafted, client, test, ledger=ledger)
        rows.append(ph.row(accuracy=round(res["accuracy"], 4), zero_shot_accuracy=round(res["zero_shot_accuracy"], 4),
                           prompt=crafted.config.template))

        if c == args.concurrency[-1]:  # the template-ensemble baseline, once
            bank = list(CLIP_SELECTED)
            with Phase("select ensemble", client, ledger) as ph:
                picked = greedy_templates(score_templates(metered, h_train, names, bank), splits.train.labels, args.ensemble_k)
            chosen = [bank[i] for i in picked]
            rows.append(ph.row(prompt=" | ".join(chosen)))
            with Phase("predict ensemble", client, ledger) as ph:
                ens = ensemble_log_probs(score_templates(metered, h_test, names, chosen, category="eval"))
            rows.append(ph.row(accuracy=round(float((ens.argmax(-1) == test.labels).mean()), 4), prompt=" | ".join(chosen)))

        with Phase("tune pr", client, ledger) as ph:
            adapter = craft_sdk.tune(client, splits.train, mode="pr", budget=args.pr_budget, seed=0, ledger=ledger)
        rows.append(ph.row())
        with Phase("eval pr", client, ledger) as ph:
            res = craft_sdk.evaluate(adapter, client, test, ledger=ledger)
        rows.append(ph.row(accuracy=round(res["accuracy"], 4), zero_shot_accuracy=round(res["zero_shot_accuracy"], 4)))
    for r in rows:
        r["concurrency"] = c
    return rows, probs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--test-images", type=int, default=300)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--popsize", type=int, default=8)
    ap.add_argument("--pr-budget", type=int, default=200)
    ap.add_argument("--craft-budget", type=int, default=200)
    ap.add_argument("--ensemble-k", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_zeroshot_api.json")
    args = ap.parse_args()

    import craft_sdk
    from craft_sdk.client.http import HTTPClient

    splits = craft_sdk.load_data("demo:digits", shots=args.shots, seed=0)
    test = splits.test.subset(np.random.default_rng(0).permutation(len(splits.test))[: args.test_images])
    load_before = os.getloadavg()
    key = secrets.token_hex(24)
    rows: list[dict[str, Any]] = []
    outputs: list[np.ndarray] = []
    with tempfile.TemporaryDirectory() as tmp:
        key_file = Path(tmp) / "keys"
        key_file.write_text(key + "\n")
        port = free_port()
        server = start_server(port, key_file, ["--model", "demo", "--text-only"], Path(tmp))
        try:
            base = f"http://127.0.0.1:{port}"
            for c in args.concurrency:
                got, probs = run_concurrency(f"{base}/v1/zero-shot/demo", key, c, splits, test, args)
                rows += got
                outputs.append(probs)
                print(f"concurrency {c}: done", file=sys.stderr, flush=True)
            with HTTPClient(base, api_key=key) as admin:
                billed = admin.usage()["used"]
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    result = {
        "benchmark": "bench_zeroshot_api",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "command": "python benchmarks/bench_zeroshot_api.py " + " ".join(sys.argv[1:]),
        "task": {"data": "demo:digits", "shots": args.shots, "n_train": len(splits.train), "n_test": len(test),
                 "generations": args.generations, "popsize": args.popsize, "pr_budget": args.pr_budget,
                 "craft_budget": args.craft_budget,
                 "ensemble_k": args.ensemble_k},
        "identical_across_concurrency": all(np.array_equal(outputs[0], o) for o in outputs),
        "server_billed_queries": billed,
        "client_provider_answers": sum(r["provider_answers"] for r in rows),
        "client_provider_requests": sum(r["provider_requests"] for r in rows),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"\nwrote {args.out}")


def print_table(result: dict[str, Any]) -> None:
    m, t = result["machine"], result["task"]
    print(f"demo VLM, zero-shot API shape, {m['cpus']} CPUs, load {m['load_avg_before'][0]:.1f} -> {m['load_avg_after'][0]:.1f}; "
          f"train {t['n_train']} images, test {t['n_test']}")
    head = f"{'conc':>4} {'phase':<17} {'queries':>7} {'requests':>8} {'wall s':>7} {'req/s':>6} {'acc':>6}  prompt"
    print(head)
    print("-" * (len(head) + 20))
    for r in result["rows"]:
        acc = f"{r['accuracy']:.3f}" if "accuracy" in r else "-"
        print(f"{r['concurrency']:>4} {r['phase']:<17} {r['queries']:>7} {r['provider_requests']:>8} {r['wall_s']:>7.2f} "
              f"{r['requests_per_s']:>6.1f} {acc:>6}  {r.get('prompt', '')}")
    print(f"identical probabilities across concurrency: {result['identical_across_concurrency']}; server billed "
          f"{result['server_billed_queries']} queries = requests answered {result['client_provider_answers']} "
          f"(sent {result['client_provider_requests']})")


if __name__ == "__main__":
    main()
