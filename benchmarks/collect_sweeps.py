"""Copy a finished sweep's summary, plots and a per-run CSV into ``benchmarks/results/sweeps/<name>/``.

The full per-run JSON records (histories, checkpoints; ~5 MB for Table 3) stay in the sweep's
own folder; the CSV keeps what the tables need, one line per run.

    python benchmarks/collect_sweeps.py sweeps/table3 sweeps/figure3_quick ...
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

FIELDS = ("run_id", "task", "shots", "mode", "combo", "seed", "test_accuracy", "zero_shot_accuracy",
          "train_accuracy", "queries_used", "selected_generation", "n_generations", "wall_time_s")


def collect(src: Path, dest_root: Path) -> Path:
    name = json.loads((src / "summary.json").read_text())["name"]
    dest = dest_root / name
    (dest / "plots").mkdir(parents=True, exist_ok=True)
    for f in ("summary.md", "summary.json", "sweep.json"):
        shutil.copyfile(src / f, dest / f)
    for png in sorted((src / "plots").glob("*.png")):
        shutil.copyfile(png, dest / "plots" / png.name)
    with open(dest / "runs.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(FIELDS)
        for rec_path in sorted((src / "runs").glob("*.json")):
            rec = json.loads(rec_path.read_text())
            combo = ", ".join(f"{k}={v}" for k, v in sorted((rec.get("combo") or {}).items()))
            w.writerow([combo if k == "combo" else rec.get(k) for k in FIELDS])
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweeps", nargs="+", type=Path)
    ap.add_argument("--dest", type=Path, default=Path("benchmarks/results/sweeps"))
    args = ap.parse_args()
    for src in args.sweeps:
        print(collect(src, args.dest))


if __name__ == "__main__":
    main()
