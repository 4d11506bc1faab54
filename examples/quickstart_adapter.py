"""Classify images with a shipped adapter in a few lines (runs offline)."""

from __future__ import annotations

from pathlib import Path

import craft_sdk
from craft_sdk.demo import load_demo_task

ADAPTER = Path(__file__).resolve().parents[1] / "adapters" / "digits"


def main() -> None:
    client = craft_sdk.create_client("demo")  # the shipped demo VLM, as a local black box
    clf = craft_sdk.CraftClassifier.from_pretrained(ADAPTER, client)  # ONNX Runtime refiner
    test = load_demo_task("digits").test
    images, truth = test.images[:8], [test.class_names[i] for i in test.labels[:8]]
    pred = clf.predict_all(images)  # one black-box query: labels, probabilities, raw and refined logits
    for label, true, p in zip(pred.labels, truth, pred.probs.max(1)):
        print(f"predicted {label:>6s} (p={p:.2f})   true {true}")
    print(f"queries used: {clf.ledger.used}")


if __name__ == "__main__":
    main()
