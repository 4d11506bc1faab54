"""Why does the refiner lose to zero-shot on some demo tasks? Test accuracy of ``pr`` along its training.

For each demo task and shot count, trains the refiner alone (``mode="pr"``, the paper's
3-layer residual MLP and a linear one) on the zero-shot logits of the demo VLM, and scores
the held-out test split at chosen generations through ``on_progress`` (observation only,
never fed back). Also reports zero-shot accuracy on the training images, to tell overfitting
from a train/test shift, and white-box linear probes (image features; the 10 logits) as a
diagnosis of how much class information the demo VLM carries at all. Prints a table and writes ``benchmarks/results/diag_refiner.json``.

    python benchmarks/diag_refiner.py
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from craft_sdk import create_client, load_data, tune

AT = (0, 5, 10, 25, 50, 100, 195)


def white_box_probe(client, splits) -> dict[str, float]:  # noqa: ANN001
    """Diagnosis only, outside the black-box setting: how much class information do the demo VLM's
    image features (512-d) and its 10 zero-shot logits carry? L2-regularised logistic regression
    (scikit-learn) fitted on the training shots, scored on the test split."""
    from sklearn.linear_model import LogisticRegression

    feats = {k: client._prepare(list(getattr(splits, k).images)).numpy() for k in ("train", "test")}  # private: diagnosis
    names = list(splits.train.class_names)
    logits = {k: np.asarray(client.predict(client.upload(getattr(splits, k).images), names, "a photo of a", None))
              for k in ("train", "test")}
    out = {}
    for label, x in (("features", feats), ("logits", logits)):
        clf = LogisticRegression(C=1.0, max_iter=5000).fit(x["train"], splits.train.labels)
        out[f"probe_{label}"] = float((clf.predict(x["test"]) == splits.test.labels).mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["digits", "digits-on-texture", "noisy-shapes"])
    ap.add_argument("--shots", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--layers", nargs="+", type=int, default=[3, 1])
    ap.add_argument("--out", default="benchmarks/results/diag_refiner.json")
    ap.add_argument("--probe-shots", type=int, default=16, help="shots of the white-box linear probes")
    args = ap.parse_args()
    client = create_client("demo")
    rows = []
    for task in args.tasks:
        for shots in args.shots:
            splits = load_data(f"demo:{task}", shots=shots, seed=0)
            names = list(splits.train.class_names)
            test_h = client.upload(splits.test.images)
            train_h = client.upload(splits.train.images)
            zs_test = np.asarray(client.predict(test_h, names, "a photo of a", None))
            zs_train = np.asarray(client.predict(train_h, names, "a photo of a", None))
            for layers in args.layers:
                curve: dict[int, float] = {}
                train_curve: dict[int, float] = {}

                def observe(p, curve=curve, train_curve=train_curve) -> None:  # noqa: ANN001
                    if p.generation in AT and p.refine is not None:
                        curve[p.generation] = float((p.refine(zs_test).argmax(-1) == splits.test.labels).mean())
                        train_curve[p.generation] = p.train_accuracy

                t0 = time.perf_counter()
                tune(client, splits.train, mode="pr", budget=8000, seed=0, refiner_layers=layers, on_progress=observe)
                row = {
                    "task": task,
                    "shots": shots,
                    "refiner_layers": layers,
                    "zero_shot_train": float((zs_train.argmax(-1) == splits.train.labels).mean()),
                    "zero_shot_test": float((zs_test.argmax(-1) == splits.test.labels).mean()),
                    "test_at": {str(k): v for k, v in sorted(curve.items())},
                    "train_at": {str(k): v for k, v in sorted(train_curve.items())},
                    "seconds": round(time.perf_counter() - t0, 1),
                }
                rows.append(row)
                print(
                    f"{task:18s} {shots:2d} shots  layers={layers}  zs train {100 * row['zero_shot_train']:5.1f}"
                    f"  zs test {100 * row['zero_shot_test']:5.1f}  test@gen "
                    + "  ".join(f"{k}:{100 * v:4.1f}" for k, v in sorted(curve.items()))
                    + "  train@gen "
                    + "  ".join(f"{k}:{100 * v:4.0f}" for k, v in sorted(train_curve.items())),
                    flush=True,
                )
    probes = []
    for task in args.tasks:
        probe = {"task": task, "shots": args.probe_shots, **white_box_probe(client, load_data(f"demo:{task}", shots=args.probe_shots, seed=0))}
        probes.append(probe)
        print(f"{task:18s} {args.probe_shots:2d} shots  linear probe on image features {100 * probe['probe_features']:5.1f}"
              f"  on zero-shot logits {100 * probe['probe_logits']:5.1f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"at_generations": AT, "rows": rows, "probes": probes}, indent=2) + "\n")


if __name__ == "__main__":
    main()
