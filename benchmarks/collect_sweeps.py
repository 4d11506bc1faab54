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
    (dest / "pivot.md").write_text(pivot_markdown(json.loads((src / "summary.json").read_text())["rows"]), encoding="utf-8")
    return dest


def pivot_markdown(rows: list[dict]) -> str:
    """One table per task: a row per mode/hyperparameters, a column per shot count; best mean in bold."""
    out = []
    tasks = sorted({r["task"] for r in rows}, key=lambda t: (t == "mean over tasks", t))
    shots = sorted({r["shots"] for r in rows})
    for task in tasks:
        cells: dict[str, dict[int, dict]] = {}
        for r in rows:
            if r["task"] == task:
                label = r["mode"] + (f" ({r['combo']})" if r["combo"] else "")
                cells.setdefault(label, {})[r["shots"]] = r
        best = {k: max((c[k]["test_accuracy_mean"] for c in cells.values() if k in c), default=None) for k in shots}
        out += [f"**{task}** (test accuracy %, mean ± std over seeds)", "",
                "| | " + " | ".join(f"{k} shot" + ("s" if k > 1 else "") for k in shots) + " |",
                "|---|" + "---:|" * len(shots)]
        for label, by_shot in cells.items():
            line = []
            for k in shots:
                r = by_shot.get(k)
                if r is None:
                    line.append("–")
                    continue
                txt = f"{100 * r['test_accuracy_mean']:.1f}"
                if r["n_seeds"] > 1:
                    txt += f" ± {100 * r['test_accuracy_std']:.1f}"
                line.append(f"**{txt}**" if r["test_accuracy_mean"] == best[k] else txt)
            out.append(f"| {label} | " + " | ".join(line) + " |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweeps", nargs="+", type=Path)
    ap.add_argument("--dest", type=Path, default=Path("benchmarks/results/sweeps"))
    args = ap.parse_args()
    for src in args.sweeps:
        print(collect(src, args.dest))


if __name__ == "__main__":
    main()
