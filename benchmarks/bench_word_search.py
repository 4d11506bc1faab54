"""Word search recovery (issue 22 item 5): does the text-only search find a planted strong word?

A planted box is a numpy text-only black box (a :class:`~craft_sdk.client.CallableClient` reporting
``soft_prompts`` false, as a hosted zero-shot API does): image k's class logits are fixed N(0, 1)
noise, every vocabulary word of the context shifts the class logits a little (N(0, ``jitter``²)
per word and class: a real model is never blind to a word), and one *planted* word, anywhere in
the context, lifts the true class's logit by ``margin`` (the strength). The planted word is drawn
per seed from the vocabulary (not a template word); a vocabulary of V words is "a photo of", the
default vocabulary's words, then filler words (``--vocab 0``: tune's default vocabulary, no option).

Each run is one ``craft_sdk.tune(client, train, budget=B, seed=s, vocabulary=FILE, word_search=S)``:
the default ``tune`` (mode ``craft``, robust protocol: early stopping, check images, selection), with
``word_search`` ``halving`` (the default) or ``pg`` (the earlier policy gradient). *Recovered*: the
deployed adapter's template contains the planted word (the robust protocol deploys a context only
when it beats zero-shot beyond noise on the check images); *found*: the search's context held it at
some generation (``on_progress``), deployed or not. 5 classes × 16 shots (12 search + 4 check
images per class).

    nice -n 10 python benchmarks/bench_word_search.py [--seeds 10] [--budgets 500 1000 2000]
        [--vocab 100 400 1000] [--margins 0.5 1.0 2.0] [--searches halving pg] [--workers 2]

Writes ``benchmarks/results/bench_word_search.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

RESULTS = Path(__file__).resolve().parent / "results"
C, SHOTS = 5, 16
TEMPLATE_WORDS = ("a", "photo", "of")


def vocabulary(size: int) -> list[str]:
    """``size`` words: the template's, the default vocabulary's, then filler words ``w0000``…; 0: the default vocabulary."""
    from craft_sdk.tuner.discrete import VOCABULARY

    if size == 0:
        return list(VOCABULARY)
    words = list(dict.fromkeys(TEMPLATE_WORDS + VOCABULARY))[:size]
    words += [f"w{i:04d}" for i in range(size - len(words))]
    return words


def planted_box(words: list[str], planted: str | None, margin: float, jitter: float, seed: int) -> Any:
    """A text-only CallableClient: fixed noise, a small shift per word, +margin on the true class when ``planted`` is said."""
    from craft_sdk.client import CallableClient, Capabilities

    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 1, (256, C))
    said_it = [0]  # contexts holding the planted word that were scored (candidates and means)
    shift = {w: np.random.default_rng([seed, zlib.crc32(w.encode())]).normal(0, jitter, C) for w in words}

    def fn(ims: list[Image.Image], names: list[str], template: str, offsets: object) -> np.ndarray:
        said_it[0] += planted in template.split()  # per call: one per query here, one per image over chat (not reported)
        pix = np.array([im.getpixel((0, 0))[:2] for im in ims])
        y, k = pix[:, 0] // 40, pix[:, 1]
        said = template.split()
        logits = noise[k] + sum((shift[w] for w in said if w in shift), np.zeros(C))
        if planted in said:
            logits[np.arange(len(ims)), y] += margin
        return logits

    client = CallableClient(fn, Capabilities("planted-words"))
    client.said_it = said_it  # type: ignore[attr-defined]
    return client


def train_set(shots: int = SHOTS) -> Any:
    from craft_sdk import ImageDataset

    labels = np.arange(C * shots) % C
    images = [Image.new("RGB", (2, 2), (int(y) * 40, k, 0)) for k, y in enumerate(labels)]
    return ImageDataset(images, labels, tuple(f"class{i}" for i in range(C)))


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    words = vocabulary(job["vocab"])
    rng = np.random.default_rng([job["seed"], job["vocab"], 7])
    planted = str(rng.choice([w for w in words if w not in TEMPLATE_WORDS]))
    options = {**job.get("options", {}), "_found": [False]}
    if job["vocab"]:  # 0: tune's default vocabulary, no option
        vocab_file = Path(job["tmp"]) / f"vocab-{job['vocab']}-{os.getpid()}.txt"  # one writer per file
        vocab_file.write_text("\n".join(words) + "\n")
        options["vocabulary"] = str(vocab_file)
    box = planted_box(words, planted, job["margin"], job["jitter"], job["seed"])
    t0 = time.perf_counter()
    if job.get("shape") == "chat":
        adapter, requests = _over_chat(job, box, planted, options)
    else:
        adapter, requests = _tune(job, box, planted, options), None
    prov = adapter.config.provenance
    return {**{k: v for k, v in job.items() if k != "tmp"}, "planted": planted, "template": adapter.config.template,
            "recovered": planted in adapter.config.template.split(), "found": options["_found"][0],
            "provider_requests": requests, "scored_with_word": box.said_it[0] if requests is None else None,
            "queries_used": prov.get("queries_used"), "wall_s": round(time.perf_counter() - t0, 2)}


def _tune(job: dict[str, Any], client: Any, planted: str, options: dict[str, Any]) -> Any:
    """The default tune (options aside); ``options["_found"]``: whether the search's context ever held the word."""
    import craft_sdk

    found = options["_found"]

    def seen(p: Any) -> None:  # the tuner's progress reports carry the search's current context
        found[0] = found[0] or planted in (p.contexts or ("",))[0].split()

    kwargs = {k: v for k, v in options.items() if k != "_found"}
    return craft_sdk.tune(client, train_set(job["shots"]), budget=job["budget"], seed=job["seed"], word_search=job["search"],
                          on_progress=seen, **kwargs)


def _over_chat(job: dict[str, Any], box: Any, planted: str, options: dict[str, Any]) -> tuple[Any, int]:
    """The same run through the chat shape: the box served by ``craft-sdk serve``'s /v1/chat/completions on
    loopback, tuned through ``chat+http://…`` (the real openai client; one request per image per query)."""
    import secrets

    import craft_sdk
    from craft_sdk.serve import BackgroundServer, create_app

    key = secrets.token_hex(16)
    with BackgroundServer(create_app(box, {"bench": key})) as srv:
        client = craft_sdk.create_client(f"chat+{srv.url}/v1?model=planted", api_key=key)
        adapter = _tune(job, client, planted, options)
        client.close()
    return adapter, client.usage.requests


def table(rows: list[dict[str, Any]]) -> str:
    keys = sorted({(r["margin"], r["vocab"], r["budget"]) for r in rows})
    searches = sorted({r["search"] for r in rows})
    out = ["| strength (margin) | vocabulary | budget | " + " | ".join(f"{s}: deployed (found)" for s in searches) + " | " +
           " | ".join(f"{s}: queries used (mean)" for s in searches) + " |",
           "|---|---|---|" + "---|" * (2 * len(searches))]
    for m, v, b in keys:
        cells, used = [], []
        for s in searches:
            sel = [r for r in rows if (r["margin"], r["vocab"], r["budget"], r["search"]) == (m, v, b, s)]
            cells.append(f"{sum(r['recovered'] for r in sel)}/{len(sel)} ({sum(bool(r['found']) for r in sel)})" if sel else "–")
            used.append(f"{np.mean([r['queries_used'] for r in sel]):.0f}" if sel else "–")
        out.append(f"| {m} | {v or 'default (250)'} | {b} | " + " | ".join(cells) + " | " + " | ".join(used) + " |")
    return "\n".join(out)


def strengths(margins: list[float], jitter: float) -> str:
    """Accuracy on the training images with and without the planted word, per margin (what 'strength' means)."""
    labels = np.arange(C * SHOTS) % C
    noise = np.random.default_rng(0).normal(0, 1, (256, C))[: len(labels)]
    lines = []
    for m in margins:
        lifted = noise.copy()
        lifted[np.arange(len(labels)), labels] += m
        lines.append(f"margin {m}: accuracy {100 * (noise.argmax(1) == labels).mean():.0f} % without the word, "
                     f"{100 * (lifted.argmax(1) == labels).mean():.0f} % with it (seed 0's noise)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--budgets", type=int, nargs="+", default=[500, 1000, 2000])
    parser.add_argument("--vocab", type=int, nargs="+", default=[100, 400, 1000])
    parser.add_argument("--margins", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument("--searches", nargs="+", default=["halving", "pg"])
    parser.add_argument("--jitter", type=float, default=0.1)
    parser.add_argument("--mode", default=None, help="TuneConfig mode (default: tune's default, craft)")
    parser.add_argument("--popsize", type=int, default=None, help="TuneConfig popsize (default: tune's, 40)")
    parser.add_argument("--shots", type=int, default=SHOTS, help="training images per class")
    parser.add_argument("--shape", choices=("callable", "chat"), default="callable",
                        help="chat: serve each box on loopback and tune through chat+http (slow: one request per image)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_word_search.json")
    args = parser.parse_args()
    import tempfile

    tmp = tempfile.mkdtemp(prefix="words-")
    options = {k: v for k, v in (("mode", args.mode), ("popsize", args.popsize)) if v}
    jobs = [{"search": s, "margin": m, "vocab": v, "budget": b, "seed": seed, "jitter": args.jitter, "tmp": tmp, "options": options,
             "shape": args.shape, "shots": args.shots}
            for s, m, v, b, seed in itertools.product(args.searches, args.margins, args.vocab, args.budgets, range(args.seeds))]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        rows = list(pool.map(run_one, jobs, chunksize=4))
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cpus (2-core shared VM)", "wall_s": round(time.perf_counter() - t0, 1),
            "classes": C, "shots": args.shots, "shape": args.shape, "popsize": args.popsize or 40, "jitter": args.jitter, "mode": args.mode or "craft (tune's default)",
            "strengths": strengths(args.margins, args.jitter)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs = ",\n".join("  " + json.dumps(r) for r in rows)  # one run per line
    args.out.write_text(f'{{"meta": {json.dumps(meta)},\n "runs": [\n{runs}\n ]}}\n')
    print(meta["strengths"])
    print(table(rows))
    print(f"total wall time {meta['wall_s']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
