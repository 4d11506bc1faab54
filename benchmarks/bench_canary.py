"""Drift canaries (issue 25): does the canary fire, and do the drifts it fires on matter?

Tunes one CraFT adapter on a demo task with the demo VLM (robust protocol, ``--canary 16``), then
builds changed copies of the black box (a local-dir copy of the demo model) and, for each kind of
drift, reports

* the detection rate: the share of checks that say "drifted", over ``--canary-seeds`` canaries
  (probe seeds; each recorded on the unchanged box like ``tune`` records one: 2 queries) times the
  drift's variants (perturbation seeds);
* the adapter's test accuracy through the unchanged box and through the changed one (mean over variants);
* the canary's estimate of the effect: agreement of the adapter's predictions on the probes then vs now.

Drift kinds: none (the same weights loaded again: the false-alarm rate), weights perturbed by a
relative amount eps (each tensor += eps x its std x N(0, 1)), bfloat16 weights (a precision change:
the demo's float16 weights rounded to 8 significant bits),
another checkpoint (a fresh random init), normalisation mean/std, resize interpolation
(bicubic -> bilinear) and resize mode (centre crop -> squash). A finer sweep finds the smallest
detected perturbation.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/bench_canary.py [--task digits] [--budget 400] [--canary-seeds 5]
        [--out benchmarks/results/bench_canary.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import platform
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from craft_sdk import Adapter, ClassifierConfig, CraftClassifier, TuneConfig, check_canary
from craft_sdk.client.openclip import OpenCLIPClient
from craft_sdk.demo.tasks import load_demo_task
from craft_sdk.client.canary import record_canary
from craft_sdk.tuner.train import Tuner

DEMO_DIR = Path(__file__).resolve().parents[1] / "craft_sdk" / "demo" / "assets" / "demo-vlm"
WEIGHTS, CONFIG = "open_clip_model.safetensors", "open_clip_config.json"


def bfloat16(v: np.ndarray) -> np.ndarray:
    """``v`` rounded to bfloat16 (8 significant bits, round to nearest even), as float32."""
    u = v.astype(np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)).view(np.float32)


def make_box(root: Path, name: str, *, eps: float = 0.0, seed: int = 0, bf16: bool = False, reinit: bool = False,
             preprocess: dict[str, Any] | None = None) -> OpenCLIPClient:
    """A local-dir copy of the demo model with one change."""
    from safetensors.numpy import load_file, save_file

    target = root / name
    shutil.copytree(DEMO_DIR, target)
    (target / "checksum.sha256").unlink(missing_ok=True)
    if preprocess:
        cfg = json.loads((target / CONFIG).read_text())
        cfg["preprocess_cfg"].update(preprocess)
        (target / CONFIG).write_text(json.dumps(cfg))
    if eps or bf16 or reinit:  # changed weights are written as float32 (the demo's are float16, too coarse for small eps)
        state = load_file(str(DEMO_DIR / WEIGHTS))
        rng = np.random.default_rng(seed)
        for k, v in state.items():
            if v.dtype.kind != "f":
                continue
            v = v.astype(np.float32)
            if v.size < 2:
                state[k] = v
            elif reinit:  # another checkpoint: same shapes, fresh values at each tensor's own scale
                state[k] = (v.mean() + v.std() * rng.standard_normal(v.shape)).astype(np.float32)
            elif bf16:
                state[k] = bfloat16(v)
            else:
                state[k] = v + (eps * v.std() * rng.standard_normal(v.shape)).astype(np.float32)
        save_file(state, str(target / WEIGHTS))
    return OpenCLIPClient(f"local-dir:{target}")


def accuracy(adapter: Adapter, box: Any, test: Any) -> float:
    clf = CraftClassifier.from_adapter(adapter, box, config=ClassifierConfig(batch_size=256, allow_model_mismatch=True))
    return float(np.mean(clf.predict(test.images) == np.asarray(adapter.config.class_names)[test.labels]))


def canaries(adapter: Adapter, box: Any, n_seeds: int) -> list[Adapter]:
    """The adapter with ``n_seeds`` canaries (probe seeds 0..n-1), each recorded on ``box`` as tune does."""
    out = []
    for seed in range(n_seeds):
        rec = record_canary(box, adapter.config.class_names, adapter.contexts, adapter.offset, adapter.config.output, 16, seed)
        config = dataclasses.replace(adapter.config, canary=rec.spec)
        out.append(Adapter(config, adapter.z, adapter.offset, adapter.refiner, rec.scores))
    return out


def kinds(variants: int) -> dict[str, list[dict[str, Any]]]:
    v = range(variants)
    return {
        "none (same weights, reloaded)": [{}],
        "weights eps=1e-3": [{"eps": 1e-3, "seed": s} for s in v],
        "weights eps=1e-2": [{"eps": 1e-2, "seed": s} for s in v],
        "weights eps=1e-1": [{"eps": 1e-1, "seed": s} for s in v],
        "bfloat16 weights (precision)": [{"bf16": True}],
        "another checkpoint (random init)": [{"reinit": True, "seed": s} for s in v],
        "normalisation mean/std": [{"preprocess": {"mean": [0.48, 0.46, 0.41], "std": [0.27, 0.26, 0.28]}}],
        "resize interpolation bilinear": [{"preprocess": {"interpolation": "bilinear"}}],
        "resize mode squash": [{"preprocess": {"resize_mode": "squash"}}],
    }


def run_kind(root: Path, name: str, changes: list[dict[str, Any]], checked: list[Adapter], test: Any) -> dict[str, Any]:
    hits, distances, agreements, accs = [], [], [], []
    for i, change in enumerate(changes):
        box = make_box(root, f"{re.sub(r'[^a-z0-9]+', '-', name)}{i}", **change)
        for adapter in checked:
            report = check_canary(adapter, box)
            hits.append(report.drifted)
            distances.append(report.distance)
            agreements.append(report.agreement)
        accs.append(accuracy(checked[0], box, test))
    return {"kind": name, "checks": len(hits), "detection_rate": float(np.mean(hits)), "distance_median": float(np.median(distances)),
            "agreement_mean": float(np.mean(agreements)), "accuracy_after": float(np.mean(accs))}


def smallest_detected(root: Path, adapter: Adapter, grid: list[float]) -> list[dict[str, Any]]:
    rows = []
    for eps in grid:
        report = check_canary(adapter, make_box(root, f"sweep-{eps}", eps=eps))
        rows.append({"eps": eps, "distance": report.distance, "drifted": report.drifted})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="digits")
    ap.add_argument("--budget", type=int, default=400)
    ap.add_argument("--canary-seeds", type=int, default=5)
    ap.add_argument("--variants", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "bench_canary.json")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    t0 = time.perf_counter()
    splits = load_demo_task(args.task, shots=16, seed=0)
    base = OpenCLIPClient("demo")
    cfg = TuneConfig(mode="craft", budget=args.budget, seed=0, popsize=20, intrinsic_dim=64, refiner_hidden=128, canary=16)
    result = Tuner(cfg).fit(base, splits.train, None)
    tuned = Adapter.from_result(result)
    checked = canaries(tuned, base, args.canary_seeds)
    before = accuracy(tuned, base, splits.test)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, changes in kinds(args.variants).items():
            rows.append({**run_kind(root, name, changes, checked, splits.test), "accuracy_before": before})
            print(f"{name}: {rows[-1]}", flush=True)
        sweep = smallest_detected(root, checked[0], [1e-4, 3e-4, 5e-4, 7e-4, 1e-3, 1.5e-3, 2e-3, 3e-3])
    found = [r["eps"] for r in sweep if r["drifted"]]
    record = {
        "date": dt.date.today().isoformat(), "machine": f"{platform.machine()}, 2-core shared VM", "task": args.task,
        "budget": args.budget, "deployed": result.metrics.deployed, "queries": result.queries.to_dict(),
        "canary_spec": tuned.config.canary.to_dict() if tuned.config.canary else None,
        "rows": rows, "perturbation_sweep": sweep, "smallest_detected_eps": min(found) if found else None,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\ndeployed: {record['deployed']}; canary queries at tune time: {result.queries.counts['canary']}")
    print("| drift | checks | detected | median distance (noise units) | canary agreement | test acc before | test acc after |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['kind']} | {r['checks']} | {100 * r['detection_rate']:.0f}% | {r['distance_median']:.1f} | "
              f"{100 * r['agreement_mean']:.0f}% | {100 * r['accuracy_before']:.1f} | {100 * r['accuracy_after']:.1f} |")
    print("\nperturbation sweep (probe seed 0): " + ", ".join(f"eps {r['eps']:g}: {r['distance']:.2f}{' *' if r['drifted'] else ''}" for r in sweep))
    print(f"smallest detected relative perturbation: {record['smallest_detected_eps']}; wall {record['wall_s']} s")


if __name__ == "__main__":
    main()
