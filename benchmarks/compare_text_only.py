"""Issue 13's table: prompt learning for a text-only black box (the demo VLM behind ``text-only:demo``).

Reads the finished sweeps ``text_only.yaml`` (robust protocol: zero-shot, pg, pr, craft, ensemble) and
``text_only_paper.yaml`` (paper protocol: pg, craft), and Table 3's collected runs for the continuous
``pg`` (paper protocol, same tasks, seeds, shots and budget), writes
``benchmarks/results/sweeps/text_only/{runs.csv, compare.md, compare.json}`` and prints the table.

    python benchmarks/compare_text_only.py --robust sweeps/text_only --paper sweeps/text_only_paper \\
        [--continuous benchmarks/results/sweeps/table3/runs.csv]
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TASKS = ("digits", "noisy-shapes", "digits-on-texture")
FIELDS = ("run_id", "protocol", "task", "shots", "mode", "seed", "test_accuracy", "zero_shot_accuracy", "queries_used", "deployed", "stopped")


def load(folder: Path, protocol: str) -> list[dict[str, Any]]:
    rows = []
    for path in sorted((folder / "runs").glob("*.json")):
        rec = json.loads(path.read_text())
        rec["protocol"] = protocol
        rows.append(rec)
    return rows


def continuous_pg(csv_path: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = defaultdict(list)
    with open(csv_path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["mode"] == "pg" and row["shots"] == "16":
                out[row["task"]].append(float(row["test_accuracy"]))
    return out


def pct(values: list[float]) -> float:
    return 100 * statistics.mean(values)


def cell(values: list[float]) -> str:
    if not values:
        return "–"
    s = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{pct(values):.1f} ± {s:.1f}"


def table(rows: list[dict[str, Any]], cont: dict[str, list[float]]) -> tuple[str, dict[str, Any]]:
    acc: dict[tuple[str, str], list[float]] = defaultdict(list)
    queries: dict[tuple[str, str], list[int]] = defaultdict(list)
    for r in rows:
        key = f"{r['mode']} ({r['protocol']})"
        acc[(key, r["task"])].append(r["test_accuracy"])
        queries[(key, r["task"])].append(r["queries_used"])
    for task, values in cont.items():
        acc[("continuous pg (paper, soft prompts)", task)] = values
    order = ["zero-shot (robust)", "ensemble (robust)", "pg (robust)", "pg (paper)", "pr (robust)", "craft (robust)",
             "craft (paper)", "continuous pg (paper, soft prompts)"]
    lines = ["| behaviour | " + " | ".join(TASKS) + " | mean over tasks | median queries |", "|---|" + "---|" * (len(TASKS) + 2)]
    summary: dict[str, Any] = {}
    for key in order:
        cells = [acc.get((key, t), []) for t in TASKS]
        if not any(cells):
            continue
        mean = statistics.mean(pct(c) for c in cells) if all(cells) else float("nan")
        q = [x for t in TASKS for x in queries.get((key, t), [])]
        lines.append(f"| {key} | " + " | ".join(cell(c) for c in cells) + f" | {mean:.1f} | {statistics.median(q) if q else '–'} |")
        summary[key] = {"per_task": {t: round(pct(c), 1) for t, c in zip(TASKS, cells) if c}, "mean": round(mean, 1)}
    return "\n".join(lines), summary


def targets(summary: dict[str, Any]) -> list[str]:
    zs = summary["zero-shot (robust)"]
    out = []
    for key in ("pg (robust)", "pg (paper)"):
        if key in summary:
            gain = summary[key]["mean"] - zs["mean"]
            out.append(f"discrete {key}: mean {gain:+.1f} over zero-shot (target +3: {'met' if gain >= 3 else 'missed'})")
    cont = summary.get("continuous pg (paper, soft prompts)")
    if cont and "pg (paper)" in summary:
        gaps = ", ".join(f"{t} {summary['pg (paper)']['per_task'][t] - cont['per_task'][t]:+.1f}" for t in TASKS)
        out.append(f"discrete pg (paper) minus continuous pg (paper), per task: {gaps}")
    craft, pr = summary.get("craft (robust)"), summary.get("pr (robust)")
    if craft and pr:
        bar = max(zs["mean"], pr["mean"]) + 1
        worst = min(craft["per_task"][t] - zs["per_task"][t] for t in TASKS)
        out.append(f"text-only craft (robust): mean {craft['mean']:.1f} vs max(zero-shot, pr) + 1 = {bar:.1f} "
                   f"({'met' if craft['mean'] >= bar else 'missed'}); worst task vs zero-shot {worst:+.1f} "
                   f"(floor -1: {'met' if worst >= -1 else 'missed'})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--robust", type=Path, required=True)
    ap.add_argument("--paper", type=Path)
    ap.add_argument("--continuous", type=Path, default=HERE / "results" / "sweeps" / "table3" / "runs.csv")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "sweeps" / "text_only")
    args = ap.parse_args()
    rows = load(args.robust, "robust") + (load(args.paper, "paper") if args.paper else [])
    md, summary = table(rows, continuous_pg(args.continuous) if args.continuous.is_file() else {})
    notes = targets(summary)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "runs.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in sorted(rows, key=lambda r: (r["protocol"], r["task"], r["mode"], r["seed"])):
            w.writerow({**r, "test_accuracy": round(r["test_accuracy"], 6), "zero_shot_accuracy": round(r["zero_shot_accuracy"], 6)})
    (args.out / "compare.md").write_text(md + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    (args.out / "compare.json").write_text(json.dumps({"summary": summary, "targets": notes}, indent=2) + "\n")
    print(md)
    print()
    print("\n".join(notes))


if __name__ == "__main__":
    main()
