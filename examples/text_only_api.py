"""Adapt a text-only black box (what hosted zero-shot classification APIs offer) with the shipped demo VLM.

``text-only:demo`` puts the demo model behind a text-only view: it takes class names and a
context template, never a prompt offset. Three adapters are tuned on 16 shots of the demo digits
task and compared on its test images:

* ``ensemble``: CLIP's 41 contexts scored once, 4 picked greedily, their log-probabilities averaged
  (adapter ``prompt.kind: ensemble``; 4 queries per prediction);
* ``pg``: the context *words* searched by successive halving over words (``prompt.kind: discrete`` when the
  robust protocol finds them better than zero-shot beyond noise; else the template as given);
* ``craft``: the word search together with the residual refiner.

Each adapter is saved, loaded back and evaluated; the script prints what each deployed, its
prompt kind, its queries and its test accuracy next to zero-shot.

Usage:
    python examples/text_only_api.py [--shots 16] [--budget 2000] [--popsize 10] [--test-images 400]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import craft_sdk
from craft_sdk import ImageDataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--budget", type=int, default=2000)
    ap.add_argument("--popsize", type=int, default=10)
    ap.add_argument("--test-images", type=int, default=400)
    args = ap.parse_args()

    client = craft_sdk.create_client("text-only:demo")
    assert not client.capabilities().soft_prompts  # no offsets: prompts are words
    splits = craft_sdk.load_data("demo:digits", shots=args.shots, seed=0)
    assert splits.test is not None
    n = min(args.test_images, len(splits.test))
    test = ImageDataset(list(splits.test.images[:n]), splits.test.labels[:n], splits.test.class_names)
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("ensemble", "pg", "craft"):
            adapter = craft_sdk.tune(client, splits.train, mode=mode, budget=args.budget, popsize=args.popsize, seed=0)
            adapter.save_pretrained(Path(tmp) / mode)
            loaded = craft_sdk.load_adapter(str(Path(tmp) / mode))
            res = craft_sdk.evaluate(loaded, client, test)
            prov = loaded.config.provenance
            kind = loaded.config.prompt.kind if loaded.config.prompt is not None else "none"
            print(
                f"{mode:8s} deployed {prov['selection']['deployed']:14s} prompt.kind {kind:8s} "
                f"contexts {list(loaded.contexts)}  queries {prov['queries_used']:5d}  "
                f"test accuracy {res['accuracy']:.3f} (zero-shot {res['zero_shot_accuracy']:.3f})"
            )


if __name__ == "__main__":
    main()
