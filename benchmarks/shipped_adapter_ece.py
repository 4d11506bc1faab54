"""Calibration of the shipped adapters on data they never saw: ECE at temperature 1 vs calibrated.

Issue 23's target: for every adapter in ``adapters/``, the calibrated ECE (its deployed temperature) is
at most the temperature-1 ECE + 0.005 on fresh data. ``noisy-shapes`` and ``digits-on-texture`` are
procedural, so fresh images are rendered from random streams no split uses (``(23, 2, task, class, i)``;
the test split uses ``(key, 0, ...)``, training ``(key, 1, ...)``); ``digits`` are the 1,797 real UCI
images, so its fresh data is its test split (every image not in the 16 training shots: never trained,
selected or calibrated on). Prints a table and writes ``benchmarks/results/shipped_adapter_ece.json``.

    python benchmarks/shipped_adapter_ece.py [--adapters adapters] [--per-class 100]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import craft_sdk
from craft_sdk import ImageDataset
from craft_sdk.demo import load_demo_task
from craft_sdk.demo.synth import make_rng
from craft_sdk.demo.tasks import render_digit_on_texture, render_noisy_shape

RENDER = {"noisy-shapes": render_noisy_shape, "digits-on-texture": render_digit_on_texture}
TASK_INDEX = {"noisy-shapes": 1, "digits-on-texture": 2}


def fresh_images(task: str, per_class: int, shots: int, seed: int) -> tuple[ImageDataset, str]:
    """(dataset, what it is): freshly rendered images for a procedural task, else the test split."""
    test = load_demo_task(task, shots=shots, seed=seed).test
    if task not in RENDER:
        return test, f"test split ({len(test)} real images, none trained on)"
    images, labels = [], []
    for c in range(len(test.class_names)):
        for i in range(per_class):
            images.append(RENDER[task](c, make_rng(23, 2, TASK_INDEX[task], c, i)))
            labels.append(c)
    return ImageDataset(images, np.asarray(labels, np.int64), test.class_names), f"{len(images)} freshly rendered images"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=Path, default=Path("adapters"))
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/shipped_adapter_ece.json"))
    args = ap.parse_args()
    manifest = json.loads((args.adapters / "manifest.json").read_text())["adapters"]
    client = craft_sdk.create_client("demo")
    rows = []
    for entry in manifest:
        adapter = craft_sdk.load_adapter(str(args.adapters / entry["task"]))
        data, what = fresh_images(entry["task"], args.per_class, entry["shots"], entry["seed"])
        scores = craft_sdk.evaluate(adapter, client, data)
        cal = adapter.config.calibration
        rows.append({
            "task": entry["task"], "data": what, "deployed": entry["deployed"], "temperature": 1.0 if cal is None else cal.temperature,
            "accuracy": round(scores["accuracy"], 4), "zero_shot_accuracy": round(scores["zero_shot_accuracy"], 4),
            "ece_t1": round(scores["ece_uncalibrated"], 4), "ece_calibrated": round(scores["ece"], 4),
            "target_met": scores["ece"] <= scores["ece_uncalibrated"] + 0.005,
        })
    print("| adapter | data | deployed | T | accuracy | ECE T=1 | ECE calibrated | ≤ T=1 + 0.005 |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['task']} | {r['data']} | {r['deployed']} | {r['temperature']:.3f} | {100 * r['accuracy']:.1f} % | "
              f"{r['ece_t1']:.4f} | {r['ece_calibrated']:.4f} | {'yes' if r['target_met'] else '**no**'} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": "python benchmarks/shipped_adapter_ece.py", "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
