"""``tune --dry-run`` against the run it plans: planned vs used provider units, per shape, on loopback.

One ``craft-sdk serve`` app (in this process, on 127.0.0.1, over the demo VLM) answers every shape. For each
shape it computes :func:`craft_sdk.tuner.plan.plan_tune` (what ``--dry-run`` prints; nothing is sent), then runs
the same tune at its full budget (``--protocol paper``, no early stop) and compares queries, provider requests,
images, input/output tokens and the cost at one example price (``--price``). Shapes:

* ``serve (soft prompts)``: ``http://...`` (a population per request; uploads carry the images);
* ``zero-shot API``: ``zeroshot+http://.../v1/zero-shot/demo`` (one request per image and prompt);
* ``chat (logprobs)`` / ``chat (sampled, n=N)``: ``chat+http://.../v1?model=demo[&samples=N]``;
* ``embeddings``: ``embed+http://.../v1?model=demo`` (images embedded once per client: the plan is near an upper bound).

Usage:
    nice -n 10 python benchmarks/bench_dry_run.py [--task digits] [--shots 4] [--budget 90] [--popsize 8]
        [--samples 4] [--price input_per_1m=0.5,output_per_1m=1.5,per_request=0.0001]
        [--only embeddings ...] [--out benchmarks/results/bench_dry_run.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import secrets
import time
from pathlib import Path
from typing import Any

import craft_sdk
from craft_sdk import PriceTable, TuneConfig
from craft_sdk.client.usage import usage_of
from craft_sdk.serve import BackgroundServer, create_app
from craft_sdk.tuner.plan import plan_tune
from craft_sdk.tuner.train import Tuner

ROOT = Path(__file__).resolve().parents[1]
UNITS = ("queries", "requests", "images", "input_tokens", "output_tokens", "cost")


def shapes(url: str, samples: int) -> dict[str, str]:
    return {
        "serve (soft prompts)": url,
        "zero-shot API": f"zeroshot+{url}/v1/zero-shot/demo",
        "chat (logprobs)": f"chat+{url}/v1?model=demo",
        f"chat (sampled, n={samples})": f"chat+{url}/v1?model=demo&samples={samples}",
        "embeddings": f"embed+{url}/v1?model=demo",
    }


def one(model: str, key: str, config: TuneConfig, train: Any, price: PriceTable) -> dict[str, Any]:
    client = craft_sdk.create_client(model, api_key=key)
    plan = plan_tune(config, client, train, price=price)
    assert usage_of(client).is_zero(), "planning sent something"
    t0 = time.perf_counter()
    result = Tuner(config, price=price).fit(client, train)
    used = {**result.queries.usage, "queries": result.queries.used, "cost": result.queries.cost}
    planned = {"queries": plan.planned_queries, "requests": plan.planned_requests, "images": plan.planned_images,
               "input_tokens": plan.estimated_input_tokens, "output_tokens": plan.estimated_output_tokens,
               "cost": plan.estimated_cost}
    error = {u: (None if not used[u] else round((planned[u] - used[u]) / used[u], 4)) for u in UNITS}
    return {"planned": planned, "used": used, "relative_error": error, "generations": result.n_generations,
            "wall_s": round(time.perf_counter() - t0, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="digits")
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--budget", type=int, default=90)
    ap.add_argument("--popsize", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--price", default="input_per_1m=0.5,output_per_1m=1.5,per_request=0.0001")
    ap.add_argument("--only", nargs="+", default=None, help="run only the shapes whose name contains one of these words, in this order")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/bench_dry_run.json")
    args = ap.parse_args()
    price = PriceTable.parse(args.price)
    splits = craft_sdk.load_data(f"demo:{args.task}", shots=args.shots, seed=0)
    config = TuneConfig(mode="pg", protocol="paper", budget=args.budget, popsize=args.popsize, seed=0)
    key = secrets.token_hex(16)
    rows: dict[str, Any] = {}
    with BackgroundServer(create_app(craft_sdk.create_client("demo"), {"bench": key})) as srv:
        every = shapes(srv.url, args.samples)
        chosen = every if not args.only else {k: every[k] for w in args.only for k in every if w in k}  # in --only's order
        for name, model in chosen.items():
            rows[name] = one(model, key, config, splits.train, price)
            err = rows[name]["relative_error"]
            print(f"{name:<22} " + "  ".join(f"{u} {rows[name]['used'][u]!s:>8} ({'n/a' if err[u] is None else f'{100 * err[u]:+.1f}%'})"
                                              for u in UNITS), flush=True)
            out = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
                   "args": {k: str(v) for k, v in vars(args).items()}, "config": config.to_dict(), "shapes": rows}
            args.out.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")  # complete after every shape
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
