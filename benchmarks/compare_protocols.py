"""Issue 10's table: the robust protocol (new default) next to the paper protocol, per task and shots.

Reads finished sweeps (one JSON record per run) and Table 3's collected runs (the paper protocol:
same seeds, shots and budgets), writes ``benchmarks/results/sweeps/robust/{runs.csv, compare.md,
compare.json}`` and prints the markdown table.

    python benchmarks/compare_protocols.py --robust sweeps/robust [--full sweeps/robust_full] \\
        [--paper benchmarks/results/sweeps/table3/runs.csv] [--population sweeps/refiner_data] \\
        [--previous benchmarks/results/sweeps/robust/runs_issue10.csv]

``--previous``: a runs.csv of an earlier robust default (issue 10's rule), compared run by run
(accuracy, queries) on the runs both have; the calibration summary (issue 23) is always printed.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

FIELDS = ("run_id", "task", "shots", "seed", "test_accuracy", "zero_shot_accuracy", "queries_used", "budget",
          "deployed", "stopped", "ece", "ece_uncalibrated", "combo")


def load_runs(folder: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted((folder / "runs").glob("*.json")):
        rec = json.loads(path.read_text())
        rec["budget"] = rec["config"]["budget"]
        rows.append(rec)
    return rows


def load_paper(csv_path: Path) -> dict[tuple[str, int], list[float]]:
    out: dict[tuple[str, int], list[float]] = defaultdict(list)
    with open(csv_path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["mode"] == "craft":
                out[(row["task"], int(row["shots"]))].append(float(row["test_accuracy"]))
    return out


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    m = 100 * statistics.mean(values)
    s = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.1f} ± {s:.1f}"


def by_cell(rows: list[dict[str, Any]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    cells: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        cells[(r["task"], int(r["shots"]))].append(r)
    return cells


def table(robust: list[dict], paper: dict, full: list[dict], population: list[dict]) -> tuple[str, dict[str, Any]]:
    cells, full_cells, pop_cells = by_cell(robust), by_cell(full), by_cell(population)
    header = ("| task | shots | zero-shot | paper protocol | **new default** | queries used (median, % of budget) | "
              "deployed (3 seeds) | same config, full budget | refiner on population logits | ECE T=1 → calibrated |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    out: dict[str, Any] = {"cells": []}
    tasks = sorted({t for t, _ in cells})
    shots_list = sorted({s for _, s in cells})
    for task in tasks + ["mean over tasks"]:
        for shots in shots_list:
            if task == "mean over tasks":
                rows = [r for (t, s), rs in cells.items() if s == shots for r in rs]
                per_seed = defaultdict(list)
                for r in rows:
                    per_seed[r["seed"]].append(r)
                acc = [statistics.mean(x["test_accuracy"] for x in rs) for rs in per_seed.values()]
                zero = [statistics.mean(x["zero_shot_accuracy"] for x in rs) for rs in per_seed.values()]
                paper_vals = [statistics.mean(v) for v in zip(*[paper.get((t, shots), []) for t in tasks])]
                full_rows = [r for (t, s), rs in full_cells.items() if s == shots for r in rs]
                full_vals = _seed_means(full_rows) if len(full_rows) == len(rows) else []
                pop_rows = [r for (t, s), rs in pop_cells.items() if s == shots for r in rs]
                pop_vals = _seed_means(pop_rows) if len({r["task"] for r in pop_rows}) == len(tasks) else []
            else:
                rows = cells.get((task, shots), [])
                acc = [r["test_accuracy"] for r in rows]
                zero = [r["zero_shot_accuracy"] for r in rows]
                paper_vals = paper.get((task, shots), [])
                full_vals = [r["test_accuracy"] for r in full_cells.get((task, shots), [])]
                pop_vals = [r["test_accuracy"] for r in pop_cells.get((task, shots), [])]
            if not rows:
                continue
            frac = [r["queries_used"] / r["budget"] for r in rows]
            used = [r["queries_used"] for r in rows]
            deployed = ", ".join(f"{k} ×{v}" for k, v in sorted(_count(r["deployed"] for r in rows).items()))
            ece = [r["ece"] for r in rows if r.get("ece") is not None]
            ece0 = [r["ece_uncalibrated"] for r in rows if r.get("ece_uncalibrated") is not None]
            ece_text = f"{statistics.mean(ece0):.3f} → {statistics.mean(ece):.3f}" if ece else "–"
            name = f"**{task}**" if task == "mean over tasks" else task
            lines.append(
                f"| {name} | {shots} | {mean_std(zero)} | {mean_std(paper_vals)} | **{mean_std(acc)}** | "
                f"{statistics.median(used):,.0f} ({100 * statistics.median(frac):.0f} %) | {deployed} | "
                f"{_with_n(full_vals, len(acc))} | {_with_n(pop_vals, len(acc))} | {ece_text} |"
            )
            out["cells"].append({
                "task": task, "shots": shots, "zero_shot": _m(zero), "paper": _m(paper_vals), "robust": _m(acc),
                "robust_full_budget": _m(full_vals), "population": _m(pop_vals), "median_queries": statistics.median(used),
                "median_budget_fraction": statistics.median(frac), "ece": _m(ece), "ece_uncalibrated": _m(ece0),
                "deployed": _count(r["deployed"] for r in rows), "n_runs": len(rows),
            })
    all_frac = [r["queries_used"] / r["budget"] for r in robust]
    out["median_budget_fraction_all_runs"] = statistics.median(all_frac)
    return "\n".join(lines) + "\n", out


def _with_n(values: list[float], n: int) -> str:
    """mean ± std, saying how many runs when fewer than the row's (e.g. a one-seed comparison)."""
    return mean_std(values) if len(values) in (0, n) else f"{mean_std(values)} (n={len(values)})"


def _seed_means(rows: list[dict[str, Any]]) -> list[float]:
    per_seed: dict[int, list[float]] = defaultdict(list)
    for r in rows:
        per_seed[r["seed"]].append(r["test_accuracy"])
    return [statistics.mean(v) for v in per_seed.values()]


def _m(values: list[float]) -> float | None:
    return statistics.mean(values) if values else None


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for i in items:
        out[str(i)] += 1
    return dict(out)


def calibration_summary(rows: list[dict[str, Any]], slack: float = 0.005) -> dict[str, Any]:
    """Issue 23's calibration targets: runs whose calibrated test ECE is <= the temperature-1 ECE + ``slack``,
    and the largest rise."""
    pairs = [(r["ece"], r["ece_uncalibrated"]) for r in rows if r.get("ece") is not None and r.get("ece_uncalibrated") is not None]
    ok = [e <= e0 + slack for e, e0 in pairs]
    rises = [e - e0 for e, e0 in pairs]
    return {"n": len(pairs), "within_slack": sum(ok), "fraction_within_slack": sum(ok) / len(ok) if ok else None,
            "max_rise": max(rises) if rises else None, "kept_t1": sum(abs(e - e0) < 1e-12 for e, e0 in pairs)}


def load_previous(csv_path: Path) -> dict[tuple[str, int, int], dict[str, Any]]:
    with open(csv_path, newline="", encoding="utf-8") as fh:
        return {(r["task"], int(r["shots"]), int(r["seed"])): r for r in csv.DictReader(fh) if r["combo"].startswith("robust:")}


def previous_summary(robust: list[dict[str, Any]], previous: dict[tuple[str, int, int], dict[str, Any]]) -> dict[str, Any]:
    """Per shots: mean accuracy and median budget fraction, now and before, over the runs both have."""
    out: dict[str, Any] = {}
    for shots in sorted({int(r["shots"]) for r in robust}):
        both = [(r, previous[(r["task"], int(r["shots"]), int(r["seed"]))]) for r in robust
                if int(r["shots"]) == shots and (r["task"], int(r["shots"]), int(r["seed"])) in previous]
        if not both:
            continue
        out[str(shots)] = {
            "n": len(both),
            "accuracy_now": statistics.mean(r["test_accuracy"] for r, _ in both),
            "accuracy_before": statistics.mean(float(p["test_accuracy"]) for _, p in both),
            "median_fraction_now": statistics.median(r["queries_used"] / r["budget"] for r, _ in both),
            "median_fraction_before": statistics.median(int(p["queries_used"]) / int(p["budget"]) for _, p in both),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--robust", type=Path, required=True)
    ap.add_argument("--full", type=Path)
    ap.add_argument("--population", type=Path)
    ap.add_argument("--paper", type=Path, default=Path("benchmarks/results/sweeps/table3/runs.csv"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/sweeps/robust"))
    ap.add_argument("--previous", type=Path)
    args = ap.parse_args()
    robust = load_runs(args.robust)
    full = load_runs(args.full) if args.full and (args.full / "runs").is_dir() else []
    population = load_runs(args.population) if args.population and (args.population / "runs").is_dir() else []
    md, data = table(robust, load_paper(args.paper), full, population)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "runs.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(FIELDS)
        for group, rows in (("robust", robust), ("robust_full", full), ("population", population)):
            for r in rows:
                combo = f"{group}: " + ", ".join(f"{k}={v}" for k, v in sorted((r.get("combo") or {}).items()))
                w.writerow([combo if k == "combo" else r.get(k) for k in FIELDS])
    data["calibration"] = calibration_summary(robust)
    if args.previous is not None:
        data["previous"] = previous_summary(robust, load_previous(args.previous))
    (args.out / "compare.md").write_text(md, encoding="utf-8")
    (args.out / "compare.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    print(md)
    print(f"median queries used over all {len(robust)} robust runs: {100 * data['median_budget_fraction_all_runs']:.0f} % of the budget")
    cal = data["calibration"]
    if cal["n"]:
        print(f"calibrated ECE <= T=1 ECE + 0.005: {cal['within_slack']} of {cal['n']} runs; largest rise {cal['max_rise']:+.4f}; T kept at 1: {cal['kept_t1']}")
    for shots, p in data.get("previous", {}).items():
        print(f"{shots} shots vs previous ({p['n']} runs): accuracy {100 * p['accuracy_now']:.1f} (was {100 * p['accuracy_before']:.1f}), "
              f"median queries {100 * p['median_fraction_now']:.1f} % (was {100 * p['median_fraction_before']:.1f} %)")


if __name__ == "__main__":
    main()
