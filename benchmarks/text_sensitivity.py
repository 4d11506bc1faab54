"""How far can the *words* of a prompt move a model? The ceiling of any text-only prompt search.

For each demo task (16-shot training split, seed 0; the first ``--test-images`` test images) it scores
many contexts with the demo VLM: CLIP's 41 ImageNet contexts, ``--random`` random contexts of 1-6 words
from the discrete search's vocabulary, and "a photo of a" with one or two words replaced. It reports the
test-accuracy gain over "a photo of a" of the median, 90th and 99th percentile and best context (the
best is chosen *with test labels*: an oracle no search can reach), and the test gain of the 5 contexts
with the best *training* accuracy (what selecting on the few shots can get).

Usage:
    python benchmarks/text_sensitivity.py [--random 400] [--test-images 600] [--out benchmarks/results/text_sensitivity.json]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np

TASKS = ("digits", "noisy-shapes", "digits-on-texture")
BASE = "a photo of a"


def contexts(n_random: int, seed: int = 0) -> list[str]:
    from craft_sdk.tuner.discrete import VOCABULARY
    from craft_sdk.tuner.templates import CLIP_IMAGENET_CONTEXTS

    rng = np.random.default_rng(seed)
    vocab = list(VOCABULARY)
    out = [BASE, *CLIP_IMAGENET_CONTEXTS]
    for i in range(n_random):
        if i % 2:
            out.append(" ".join(rng.choice(vocab, int(rng.integers(1, 7)))))
        else:  # the seed template with one or two words replaced: where a local search walks
            words = BASE.split()
            for j in rng.choice(4, int(rng.integers(1, 3)), replace=False):
                words[j] = str(rng.choice(vocab))
            out.append(" ".join(words))
    return list(dict.fromkeys(out))


def measure(task: str, ctxs: list[str], n_test: int) -> dict:
    from craft_sdk import create_client
    from craft_sdk.demo.tasks import load_demo_task

    client = create_client("demo")
    splits = load_demo_task(task, 16, 0)
    names = list(splits.class_names)
    assert splits.test is not None
    n = min(n_test, len(splits.test))
    train, test = client.upload(list(splits.train.images)), client.upload(list(splits.test.images[:n]))
    y_train, y_test = splits.train.labels, splits.test.labels[:n]
    tr = np.array([(np.asarray(client.predict(train, names, t)).argmax(-1) == y_train).mean() for t in ctxs])
    te = np.array([(np.asarray(client.predict(test, names, t)).argmax(-1) == y_test).mean() for t in ctxs])
    gain = 100 * (te - te[0])
    by_train = np.argsort(-tr, kind="stable")[:5]
    return {
        "task": task,
        "n_contexts": len(ctxs),
        "n_test": int(n),
        "zero_shot": round(100 * float(te[0]), 1),
        "gain_median": round(float(np.median(gain)), 1),
        "gain_p90": round(float(np.quantile(gain, 0.9)), 1),
        "gain_p99": round(float(np.quantile(gain, 0.99)), 1),
        "gain_best_oracle": round(float(gain.max()), 1),
        "best_oracle_context": ctxs[int(gain.argmax())],
        "gain_top5_by_train": [round(float(gain[i]), 1) for i in by_train],
        "gain_top1_by_train": round(float(gain[by_train[0]]), 1),
        "gain_best_clip_context_oracle": round(float(gain[1 : 1 + 41].max()), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--random", type=int, default=400)
    ap.add_argument("--test-images", type=int, default=600)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "text_sensitivity.json")
    args = ap.parse_args()
    ctxs = contexts(args.random)
    rows = [measure(t, ctxs, args.test_images) for t in TASKS]
    cols = ("task", "zero_shot", "gain_median", "gain_p90", "gain_p99", "gain_best_oracle", "gain_best_clip_context_oracle", "gain_top1_by_train")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    means = {c: round(float(np.mean([r[c] for r in rows])), 1) for c in cols[1:]}
    print("| mean | " + " | ".join(str(means[c]) for c in cols[1:]) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.platform(), "python": platform.python_version(), "rows": rows, "means": means}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
