"""Cost of one black-box query on the local open_clip client, against the reference style.

Measures, for the ViT-B-32 text tower (random weights: cost does not depend on
them), 10 EuroSAT-style class names and a population of 40 candidates:

* ``reference``: what the official CraFT code does — candidates one at a time,
  full 77-token sequences (our ``full`` path with a population of 1);
* ``cut``: the population batched, sequences cut after the last end-of-text token;
* ``prefix``: the default — shared context prefix computed once per candidate,
  class suffixes bucketed by length (no padding);

and reports ms/query, achieved GFLOP/s on the *useful* FLOPs (the minimal
computation: prefix once + each class's own tokens) against this machine's
measured fp32 matmul peak, plus the CMA-ES ask/tell overhead per generation.
With ``--tune`` it also times a full 8,000-query ``craft`` tune of 16 shots x 10
classes through the same client.

Usage:
    python benchmarks/bench_query.py [--classes 10 100 1000] [--tune] [--out benchmarks/results/bench_query.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

EUROSAT = [
    "annual crop land", "forest", "herbaceous vegetation land", "highway or road", "industrial buildings",
    "pasture land", "permanent crop land", "residential buildings", "river", "sea or lake",
]


def class_names(n: int) -> list[str]:
    if n <= len(EUROSAT):
        return EUROSAT[:n]
    return [f"{EUROSAT[i % 10]} type {i}" for i in range(n)]


def matmul_peak(size: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * size**3 / min(times) / 1e9


def useful_flops(client, names: list[str]) -> float:  # noqa: ANN001
    """Matmul FLOPs of the minimal exact computation for one candidate."""
    tower = client._tower
    width = tower.token_embedding.weight.shape[1]
    layers = len(tower.transformer.resblocks)
    pr = client._prompts(names, "a photo of a")
    lp = pr.n_ctx + 1
    tokens = lp + int((pr.eot - lp + 1).sum())
    per_token_layer = 24 * width * width  # qkv 6w², out 2w², mlp 16w²
    # attention: each token attends to the prefix + its own earlier suffix tokens (scores + weighted sum)
    attn = sum(4 * width * (lp + i + 1) for s in (pr.eot - lp + 1) for i in range(s)) + sum(4 * width * (i + 1) for i in range(lp))
    proj = 2 * width * client.model.text_projection.shape[1] * len(names)
    return float(layers * (tokens * per_token_layer + attn) + proj)


def time_mode(client, names: list[str], mode: str, population: int, reps: int) -> float:  # noqa: ANN001
    """Median seconds per candidate."""
    client.mode = mode
    caps = client.capabilities()
    rng = np.random.default_rng(0)
    off = rng.normal(0, caps.ctx_rms, (population, caps.n_ctx, caps.ctx_dim)).astype(np.float32)
    with torch.inference_mode():
        client.encode_text(names, "a photo of a", off[: min(2, population)])
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            client.encode_text(names, "a photo of a", off)
            times.append(time.perf_counter() - t)
    return statistics.median(times) / population


def cma_overhead(dim: int = 512, popsize: int = 40, gens: int = 30) -> float:
    from craft_sdk.tuner.search import PromptSearch

    s = PromptSearch(dim, popsize, 1.0, 0)
    t = time.perf_counter()
    for _ in range(gens):
        z = s.ask()
        s.tell(z, (z**2).sum(1))
    return (time.perf_counter() - t) / gens


def full_tune(client, budget: int) -> dict:  # noqa: ANN001
    from PIL import Image

    from craft_sdk import ImageDataset, TuneConfig
    from craft_sdk.tuner.train import Tuner

    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in range(160)]
    ds = ImageDataset(imgs, np.repeat(np.arange(10), 16), tuple(EUROSAT))
    client.mode = "prefix"
    t = time.perf_counter()
    r = Tuner(TuneConfig(mode="craft", budget=budget)).fit(client, ds)
    return {"wall_s": time.perf_counter() - t, "queries_used": r.queries.used, "generations": r.n_generations}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--population", type=int, default=40)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tune", action="store_true", help="also time a full 8,000-query craft tune (10 classes)")
    ap.add_argument("--budget", type=int, default=8000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_query.json"))
    args = ap.parse_args()

    from craft_sdk.client.openclip import OpenCLIPClient

    client = OpenCLIPClient("ViT-B-32", pretrained=None, device=args.device)
    peak = matmul_peak() if args.device == "cpu" else float("nan")
    rows = []
    for n in args.classes:
        names = class_names(n)
        flops = useful_flops(client, names)
        pop = args.population if n <= 100 else max(4, args.population // 10)
        ref = time_mode(client, names, "full", 1, max(1, args.reps if n <= 100 else 1))
        for mode in ("reference", "cut", "prefix"):
            sec = ref if mode == "reference" else time_mode(client, names, mode, pop, args.reps)
            rows.append({
                "classes": n, "mode": mode, "population": 1 if mode == "reference" else pop,
                "ms_per_query": sec * 1e3, "speedup_vs_reference": ref / sec,
                "useful_gflops": flops / sec / 1e9, "pct_of_peak": 100 * flops / sec / 1e9 / peak,
            })
    result = {
        "machine": {"processor": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(), "device": args.device},
        "matmul_peak_gflops": peak,
        "cma_ms_per_generation": cma_overhead() * 1e3,
        "rows": rows,
    }
    if args.tune:
        result["tune"] = full_tune(client, args.budget)
    print(f"fp32 matmul peak: {peak:.1f} GFLOP/s   CMA-ES ask+tell (D=512, P=40): {result['cma_ms_per_generation']:.1f} ms/generation")
    print(f"{'classes':>7} {'mode':>9} {'pop':>4} {'ms/query':>9} {'speedup':>8} {'GFLOP/s':>8} {'% peak':>7}")
    for r in rows:
        print(f"{r['classes']:>7} {r['mode']:>9} {r['population']:>4} {r['ms_per_query']:>9.2f} {r['speedup_vs_reference']:>8.1f} {r['useful_gflops']:>8.1f} {r['pct_of_peak']:>7.1f}")
    if "tune" in result:
        t = result["tune"]
        print(f"full craft tune: {t['queries_used']} queries, {t['generations']} generations, {t['wall_s']:.1f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
