"""Planted-solution recovery on real CLIP architectures: how fast prompt generation (PG) finds a hidden prompt.

For each architecture (random-init open_clip ViT-B-32 and RN50: real text towers, so
the real query cost and the real prompt → logits geometry), the labels of a pool of
structured images are produced by the black box itself under a hidden context offset
A z*, in the tuner's own subspace (same seed, intrinsic dim D and
``std = prompt_scale · ctx_rms / sqrt(D)`` as ``craft_sdk/tuner/train.py``), with
z* ~ N(0, I) — a draw from CMA-ES's own starting distribution (mean 0, sigma0 1).
Images are kept so that zero-shot (z = 0) is near chance. Then ``mode="pg"`` runs
for every (D, population) and its test accuracy is tracked against queries through
``on_progress`` (``Progress.offset``, scored on the held-out half; evaluation only,
charged to a separate ledger). z* itself scores 100% by construction.

Two choices make random-init towers usable, both on the *image* side only:

* images are 4×4 random colour blocks upscaled to 224 px (structured, not noise);
* image features are centred by the mean feature of a fixed reference set before
  normalisation (random-init towers map all images to nearly one direction: mean
  pairwise cosine 0.84 for ViT-B-32 and 1.00 for RN50 without it), and the logit
  scale is set to 100 as in trained CLIP. The text tower — where the prompt acts and
  all query cost lies — is untouched.

Usage:
    python benchmarks/bench_planted.py [--archs ViT-B-32 RN50] [--dims 128 512 2048]
        [--pops 20 40 80] [--budget 2000] [--pool 500] [--workers 2]

Writes ``benchmarks/results/bench_planted.json`` and ``bench_planted.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CLASSES = (
    "annual crop land", "forest", "herbaceous vegetation land", "highway or road", "industrial buildings",
    "pasture land", "permanent crop land", "residential buildings", "river", "sea or lake",
)  # fmt: skip
RESULTS = Path(__file__).resolve().parent / "results"
PLANT_SEED = 6
TUNE_SEED = 0


def block_images(n: int, seed: int, size: int = 224, grid: int = 4) -> list[Image.Image]:
    """``n`` images of grid × grid random colour blocks, upscaled to ``size`` px."""
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (grid, grid, 3), dtype=np.uint8)).resize((size, size), Image.NEAREST)
        for _ in range(n)
    ]


def make_client(arch: str) -> Any:
    """A random-init open_clip black box whose image features are centred (see module doc)."""
    import torch

    from craft_sdk.client.openclip import OpenCLIPClient

    class CentredCLIP(OpenCLIPClient):
        """Image features centred on a reference mean; each distinct image is encoded once."""

        centre: Any = None
        memo: dict[bytes, Any] = {}

        def _prepare(self, images: list[Image.Image]) -> Any:
            keys = [hashlib.sha1(im.tobytes()).digest() for im in images]
            todo = list({k: im for k, im in zip(keys, images) if k not in self.memo}.items())
            if todo:
                feats = super()._prepare([im for _, im in todo])
                self.memo.update({k: f for (k, _), f in zip(todo, feats)})
            feats = torch.stack([self.memo[k] for k in keys])
            if self.centre is None:
                return feats
            return torch.nn.functional.normalize(feats - self.centre, dim=-1)

    client = CentredCLIP(arch, pretrained=None)
    with torch.no_grad():
        client.model.logit_scale.fill_(math.log(100.0))
    return client


def diversity(feats: Any) -> dict[str, float]:
    """Mean pairwise cosine and effective rank (of the centred features) of normalised features [N, E]."""
    import torch

    f = torch.nn.functional.normalize(feats.float(), dim=-1)
    n = len(f)
    mean_cos = float(((f @ f.T).sum() - n) / (n * (n - 1)))
    s = torch.linalg.svdvals(f - f.mean(0))
    return {"mean_cos": round(mean_cos, 4), "effective_rank": round(float(s.sum() ** 2 / (s**2).sum()), 1)}


def setup_images(client: Any, pool: int) -> tuple[list[Image.Image], Any, dict[str, Any]]:
    """Centre the client on a reference set, upload the pool; report feature diversity before/after."""
    ref = block_images(64, seed=1)
    raw = client._prepare(ref)  # centre is None yet: raw normalised features
    client.centre = raw.mean(0, keepdim=True)
    images = block_images(pool, seed=0)
    t = time.perf_counter()
    handle = client.upload(images)
    upload_s = time.perf_counter() - t
    info = {"raw": diversity(raw), "centred": diversity(client._prepare(ref)), "upload_ms_per_image": 1000 * upload_s / pool}
    return images, handle, info


def plant(client: Any, images: list[Image.Image], handle: Any, dim: int) -> dict[str, Any]:
    """Labels under the hidden offset A z* (tuner's subspace for ``dim``); keep images so zero-shot ≈ chance."""
    from craft_sdk import ImageDataset, TuneConfig
    from craft_sdk.projection import project, projection_matrix

    cfg = TuneConfig(mode="pg", seed=TUNE_SEED, intrinsic_dim=dim)
    caps = client.capabilities(cfg.template)
    std = cfg.prompt_scale * caps.ctx_rms / math.sqrt(dim)
    a = projection_matrix(cfg.seed, caps.n_ctx * caps.ctx_dim, dim, std)
    z_star = np.random.default_rng(PLANT_SEED).normal(0.0, 1.0, dim)
    names = list(CLASSES)
    y_star = client.predict(handle, names, cfg.template, project(a, z_star, caps.n_ctx, caps.ctx_dim)).argmax(-1)
    y_zero = client.predict(handle, names, cfg.template).argmax(-1)
    disagree = np.flatnonzero(y_star != y_zero)
    agree = np.flatnonzero(y_star == y_zero)[: len(disagree) // (len(names) - 1)]
    keep = np.random.default_rng(0).permutation(np.concatenate([disagree, agree]))
    half = len(keep) // 2
    train = ImageDataset([images[i] for i in keep[:half]], y_star[keep[:half]], CLASSES)
    test = ImageDataset([images[i] for i in keep[half:]], y_star[keep[half:]], CLASSES)
    counts = np.bincount(y_star[keep], minlength=len(names))
    return {
        "train": train, "test": test, "z_star": z_star,
        "info": {"pool_disagreement": round(float(len(disagree) / len(images)), 4), "n_train": half,
                 "n_test": len(keep) - half, "label_counts": counts.tolist(),
                 "majority_rate": round(float(counts.max() / counts.sum()), 4)},
    }  # fmt: skip


def run_setting(client: Any, task: dict[str, Any], dim: int, pop: int, budget: int) -> dict[str, Any]:
    """PG on the planted task; test accuracy of the CMA-ES mean prompt after every ``every`` generations."""
    from craft_sdk import MeteredClient, QueryLedger, TuneConfig, tune

    cfg = TuneConfig(mode="pg", seed=TUNE_SEED, intrinsic_dim=dim, popsize=pop, budget=budget)
    test, names = task["test"], list(CLASSES)
    metered = MeteredClient(client, QueryLedger())
    handle = metered.upload(test.images)
    n_gen = (budget - 1) // (pop + 1)
    every = max(1, n_gen // 25)
    curve: list[dict[str, float]] = []

    def observe(p: Any) -> None:
        if p.generation % every and p.generation != p.n_generations:
            return
        scores = metered.predict(handle, names, cfg.template, p.offset, category="eval")
        acc = float((scores.argmax(-1) == test.labels).mean())
        curve.append({"generation": p.generation, "queries": p.queries_used, "test_accuracy": acc,
                      "train_accuracy": p.train_accuracy})  # fmt: skip

    t = time.perf_counter()
    adapter = tune(client, task["train"], config=cfg, on_progress=observe)
    wall = time.perf_counter() - t
    z = np.asarray(adapter.z)
    z_star = task["z_star"]
    return {
        "dim": dim, "popsize": pop, "budget": budget, "queries_used": adapter.config.provenance["queries_used"],
        "n_generations": adapter.config.provenance["n_generations"], "zero_shot": curve[0]["test_accuracy"],
        "final": curve[-1]["test_accuracy"], "best": max(c["test_accuracy"] for c in curve),
        "queries_to": {f"{int(100 * t)}%": next((c["queries"] for c in curve if c["test_accuracy"] >= t), None)
                       for t in (0.5, 0.8, 0.9)},
        "cos_z_zstar": round(float(z @ z_star / (np.linalg.norm(z) * np.linalg.norm(z_star) + 1e-12)), 4),
        "norm_ratio": round(float(np.linalg.norm(z) / np.linalg.norm(z_star)), 4),
        "wall_s": round(wall, 1),
        "ms_per_query": round(1000 * wall / (adapter.config.provenance["queries_used"] + metered.ledger.counts["eval"]), 2),
        "eval_queries": metered.ledger.counts["eval"], "curve": curve,
    }  # fmt: skip


def bench_arch(arch: str, dims: list[int], pops: list[int], budget: int, pool: int, threads: int) -> dict[str, Any]:
    """All (D, population) settings for one architecture (runs in its own process)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    import cma  # noqa: F401  (imported here so no run's timing pays for it)

    import craft_sdk.tuner.refiner  # noqa: F401
    import craft_sdk.tuner.search  # noqa: F401

    t0 = time.perf_counter()
    client = make_client(arch)
    images, handle, features = setup_images(client, pool)
    runs, tasks = [], {}
    for dim in dims:
        task = plant(client, images, handle, dim)
        tasks[dim] = task["info"]
        for pop in pops:
            res = run_setting(client, task, dim, pop, budget)
            print(f"{arch} D={dim} P={pop}: zero-shot {res['zero_shot']:.3f} -> final {res['final']:.3f} "
                  f"(best {res['best']:.3f}) in {res['queries_used']} queries, {res['wall_s']:.0f} s", flush=True)  # fmt: skip
            runs.append({"arch": arch, **res})
    return {"arch": arch, "model_id": client.model_id, "features": features, "tasks": tasks, "runs": runs,
            "threads": threads, "wall_s": round(time.perf_counter() - t0, 1)}  # fmt: skip


def table(results: list[dict[str, Any]]) -> str:
    """Markdown table of every run."""
    head = "| arch | D | pop | gens | zero-shot | final | best | q→50% | q→80% | q→90% | cos(z, z*) | ms/query |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for arch in results:
        for r in arch["runs"]:
            q = r["queries_to"]
            lines.append(
                f"| {r['arch']} | {r['dim']} | {r['popsize']} | {r['n_generations']} | {100 * r['zero_shot']:.1f} | "
                f"{100 * r['final']:.1f} | {100 * r['best']:.1f} | {q['50%'] or '-'} | {q['80%'] or '-'} | "
                f"{q['90%'] or '-'} | {r['cos_z_zstar']:.2f} | {r['ms_per_query']:.0f} |"
            )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Accuracy vs queries: one row per architecture, one column per D, one line per population."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dims = sorted({r["dim"] for a in results for r in a["runs"]})
    fig = Figure(figsize=(4.2 * len(dims), 3.3 * len(results)), dpi=110)
    FigureCanvasAgg(fig)
    for i, arch in enumerate(results):
        for j, dim in enumerate(dims):
            ax = fig.add_subplot(len(results), len(dims), i * len(dims) + j + 1)
            for r in (r for r in arch["runs"] if r["dim"] == dim):
                ax.plot([c["queries"] for c in r["curve"]], [100 * c["test_accuracy"] for c in r["curve"]],
                        marker="o", markersize=2, label=f"pop {r['popsize']}")  # fmt: skip
            ax.axhline(100.0, color="grey", linestyle=":", linewidth=1)
            ax.set_ylim(0, 102)
            ax.set_title(f"{arch['arch']}, D = {dim}")
            ax.set_xlabel("training queries")
            ax.set_ylabel("test accuracy (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("PG recovering a planted prompt (z* ~ N(0, I)); dotted: accuracy of z*")
    fig.tight_layout()
    fig.savefig(path, format="png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["ViT-B-32", "RN50"])
    parser.add_argument("--dims", nargs="+", type=int, default=[128, 512, 2048])
    parser.add_argument("--pops", nargs="+", type=int, default=[20, 40, 80])
    parser.add_argument("--budget", type=int, default=2000, help="training queries per run")
    parser.add_argument("--pool", type=int, default=500, help="images labelled by the planted prompt")
    parser.add_argument("--workers", type=int, default=2, help="architectures benchmarked in parallel processes")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_planted")
    args = parser.parse_args()
    t0 = time.perf_counter()
    workers = max(1, min(args.workers, len(args.archs)))
    threads = max(1, (os.cpu_count() or 1) // workers)
    jobs = [(a, args.dims, args.pops, args.budget, args.pool, threads) for a in args.archs]
    if workers == 1:
        results = [bench_arch(*job) for job in jobs]
    else:
        import multiprocessing

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(bench_arch, *zip(*jobs)))
    import torch

    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.platform(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()},
        "wall_s": round(time.perf_counter() - t0, 1), "plant_seed": PLANT_SEED, "tune_seed": TUNE_SEED,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(table(results))
    for a in results:
        print(f"{a['arch']}: features {a['features']}, tasks {a['tasks']}")
    print(f"total wall time {meta['wall_s']:.0f} s; wrote {args.out.with_suffix('.json')} and .png")


if __name__ == "__main__":
    main()
