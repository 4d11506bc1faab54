"""Sweeps: spec validation, grid expansion, local runs (in process and in worker processes), resume, Ray, CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from craft_sdk import ConfigError
from craft_sdk.sweep import RunSpec, SweepSpec, budget_for_shots, checkpoint_curves, load_spec, run_sweep, summarize
from conftest import suite_env  # noqa: E402

FOLDER_CLASSES = ("forest", "river", "sea_or_lake")
FAST = {"popsize": 4, "intrinsic_dim": 8, "refiner_hidden": 16, "protocol": "paper"}  # sweep mechanics: the paper protocol deploys the last generation


@pytest.fixture(scope="module")
def folder_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ImageFolder task (train/ + test/) of 4x4 colour-block images."""
    root = tmp_path_factory.mktemp("task") / "blocks"
    rng = np.random.default_rng(0)
    for part, n in (("train", 4), ("test", 8)):
        for name in FOLDER_CLASSES:
            (root / part / name).mkdir(parents=True)
            for i in range(n):
                block = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
                Image.fromarray(block).resize((32, 32), Image.NEAREST).save(root / part / name / f"{i}.png")
    return root


@pytest.fixture()
def spec_dict(tiny_model_dir: Path, folder_task: Path) -> dict[str, Any]:
    return {
        "name": "tiny",
        "model": f"local-dir:{tiny_model_dir}",
        "tasks": [str(folder_task)],
        "shots": [1, 2],
        "modes": ["pg", "craft"],
        "seeds": [0, 1],
        "budget": 40,
        "params": FAST,
        "eval_at": [10, 25],
    }


@pytest.fixture()
def one_thread():  # noqa: ANN201
    """Runs in this process set torch threads; put the previous value back afterwards."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------ spec


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"modez": ["pg"]}, "unknown sweep key(s) ['modez']"),
        ({"modes": ["pg", "bbt"]}, "'modes[1]' is 'bbt'; use one of"),
        ({"shots": [1, 0]}, "'shots[1]' must be an integer >= 1"),
        ({"seeds": []}, "'seeds' is an empty list"),
        ({"seeds": [0, 0]}, "'seeds' has duplicate values"),
        ({"budget": "by-shot"}, "'budget' must be a positive integer or 'by-shots'"),
        ({"params": {"seed": 3}}, "'seed' is a grid axis; set it with the top-level 'seeds' key"),
        ({"params": {"popsise": 3}}, "unknown tuning option 'popsise'"),
        ({"params": {"popsize": 1}}, "popsize must be >= 2"),
        ({"grid": {"lam": [0.0, -1.0]}}, "lam must be None or a non-negative number"),
        ({"grid": [{"lr": [0.001]}], "params": {"lr": 0.01}}, "'lr' is also in 'params'"),
        ({"tasks": ["digitz"]}, "'tasks[0]' 'digitz' is neither a demo task"),
        ({"eval_at": [0]}, "'eval_at[0]' must be an integer >= 1"),
    ],
)
def test_spec_errors_are_one_line_and_name_the_key(change: dict[str, Any], message: str) -> None:
    data = {"tasks": ["digits"], "modes": ["pg"], **change}
    with pytest.raises(ConfigError) as info:
        SweepSpec.from_dict(data)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_tasks_and_bad_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="has no 'tasks'"):
        SweepSpec.from_dict({"modes": ["pg"]})
    bad = tmp_path / "grid.yaml"
    bad.write_text("tasks: [digits\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_spec(bad)
    (tmp_path / "grid.txt").write_text("tasks: [digits]\n")
    with pytest.raises(ConfigError, match="must end in .yaml"):
        load_spec(tmp_path / "grid.txt")
    with pytest.raises(ConfigError, match="does not exist"):
        load_spec(tmp_path / "missing.yaml")


def test_grid_expansion_budgets_and_ids() -> None:
    spec = SweepSpec.from_dict(
        {
            "tasks": ["digits", "demo:noisy-shapes"],
            "shots": [1, 2, 4, 8, 16],
            "modes": ["zero-shot", "craft"],
            "seeds": [0, 1, 2],
            "budget": "by-shots",
            "grid": [{"lam": [0.0, 0.01]}, {"beta": [0.0, 0.01, 0.03]}],
        }
    )
    runs = spec.runs()
    assert len(spec.combos()) == 5
    assert len(runs) == 2 * 5 * 1 * 3 + 2 * 5 * 5 * 3  # zero-shot runs once per task/shots/seed, not per combination
    assert all(r.combo == {} for r in runs if r.mode == "zero-shot")
    assert {r.shots: r.config["budget"] for r in runs} == {1: 2000, 2: 4000, 4: 4000, 8: 8000, 16: 8000}
    assert [budget_for_shots(k) for k in (1, 3, 32)] == [2000, 4000, 8000]
    assert {r.task for r in runs} == {"digits", "noisy-shapes"}
    ids = [r.run_id for r in runs]
    assert len(set(ids)) == len(ids)
    assert ids == [r.run_id for r in spec.runs()]  # stable
    lam_run = next(r for r in runs if r.combo == {"lam": 0.0})
    assert lam_run.config["lam"] == 0.0 and lam_run.config["beta"] is None
    assert RunSpec.from_dict(json.loads(json.dumps(lam_run.to_dict()))) == lam_run


def test_yaml_toml_json_give_the_same_runs(tmp_path: Path, folder_task: Path) -> None:
    (tmp_path / "g.yaml").write_text(
        f"tasks: [digits, {folder_task.name}]\nshots: [1, 4]\nmodes: [pg, craft]\nparams: {{popsize: 8}}\n"
        "grid:\n  - {lam: [0.0, 0.01]}\n"
    )
    (tmp_path / "g.toml").write_text(
        f'tasks = ["digits", "{folder_task.name}"]\nshots = [1, 4]\nmodes = ["pg", "craft"]\n'
        "params = {popsize = 8}\n[[grid]]\nlam = [0.0, 0.01]\n"
    )
    data = {
        "tasks": ["digits", folder_task.name],
        "shots": [1, 4],
        "modes": ["pg", "craft"],
        "params": {"popsize": 8},
        "grid": [{"lam": [0.0, 0.01]}],
    }
    (tmp_path / "g.json").write_text(json.dumps(data))
    link = tmp_path / folder_task.name  # relative task folders resolve against the spec's folder
    link.symlink_to(folder_task)
    ids = [[r.run_id for r in load_spec(tmp_path / f"g.{ext}").runs()] for ext in ("yaml", "toml", "json")]
    assert ids[0] == ids[1] == ids[2] and len(ids[0]) == 2 * 2 * 2 * 2


# ------------------------------------------------------------------ runs


def _check_record(rec: dict[str, Any]) -> None:
    cfg = rec["config"]
    assert 0.0 <= rec["test_accuracy"] <= 1.0 and 0.0 <= rec["zero_shot_accuracy"] <= 1.0
    assert rec["queries_used"] <= cfg["budget"]
    assert rec["queries_used"] == sum(rec["queries"]["training"].values())
    assert rec["queries"]["training"]["eval"] == 0  # the test set never touches the training ledger
    assert rec["queries"]["eval"] == len(rec["checkpoints"]) + 2  # checkpoints + final zero-shot and adapter
    assert rec["history"][-1]["queries_used"] == rec["queries_used"]
    gens = [p["generation"] for p in rec["checkpoints"]]
    assert gens == sorted(gens) and len(gens) == len(set(gens))
    for p, at in zip(rec["checkpoints"], [10, 25]):
        assert p["queries_used"] >= at


def test_local_sweep_records_summary_and_plots(spec_dict: dict[str, Any], tmp_path: Path, one_thread: None) -> None:
    result = run_sweep(spec_dict, tmp_path / "out", workers=1, threads_per_run=1)
    assert (result.ran, result.skipped, result.failed) == (8, 0, {})
    files = sorted((tmp_path / "out" / "runs").glob("*.json"))
    assert len(files) == 8
    for f in files:
        rec = json.loads(f.read_text())
        assert f.stem == rec["run_id"]
        _check_record(rec)
    rows = json.loads((tmp_path / "out" / "summary.json").read_text())["rows"]
    assert len(rows) == 4 and all(r["n_seeds"] == 2 for r in rows)
    row = next(r for r in rows if r["mode"] == "craft" and r["shots"] == 2)
    accs = [r["test_accuracy"] for r in result.records if r["mode"] == "craft" and r["shots"] == 2]
    assert row["test_accuracy_mean"] == pytest.approx(np.mean(accs))
    assert row["test_accuracy_std"] == pytest.approx(np.std(accs, ddof=1))
    assert rows == summarize(result.records)
    assert "| blocks | 2 | craft |" in (tmp_path / "out" / "summary.md").read_text()
    umask = os.umask(0)
    os.umask(umask)
    for written in (tmp_path / "out" / "summary.json", tmp_path / "out" / "summary.md", files[0]):
        assert written.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    names = sorted(p.name for p in result.plots)
    assert names == ["accuracy_vs_queries.png", "accuracy_vs_shots.png"]
    curve = next(c for c in checkpoint_curves(result.records) if c["mode"] == "craft" and c["shots"] == 2)
    zs = [r["zero_shot_accuracy"] for r in result.records if r["mode"] == "craft" and r["shots"] == 2]
    assert curve["zero_shot"] == pytest.approx(np.mean(zs))  # the plot's zero-shot line
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000 for p in result.plots)


def test_task_average_rows_need_every_task_per_seed() -> None:
    from craft_sdk.sweep import AVERAGE_TASK, task_average_records

    def rec(task: str, seed: int, acc: float) -> dict[str, Any]:
        return {"task": task, "shots": 4, "mode": "craft", "combo": {"lam": 0.0}, "seed": seed, "test_accuracy": acc,
                "zero_shot_accuracy": 0.25, "queries_used": 100 * (seed + 1), "wall_time_s": 2.0}

    records = [rec("a", 0, 0.5), rec("b", 0, 0.7), rec("a", 1, 0.6), rec("b", 1, 0.9), rec("a", 2, 0.1)]
    avg = task_average_records(records)
    assert sorted((r["seed"], round(r["test_accuracy"], 6)) for r in avg) == [(0, 0.6), (1, 0.75)]  # seed 2 lacks b
    rows = summarize(records + avg)
    assert rows[-1]["task"] == AVERAGE_TASK and rows[-1]["combo"] == "lam=0.0"
    assert rows[-1]["test_accuracy_mean"] == pytest.approx(0.675)
    assert rows[-1]["test_accuracy_std"] == pytest.approx(np.std([0.6, 0.75], ddof=1))
    assert rows[-1]["gain_mean"] == pytest.approx(0.425) and rows[-1]["queries_used_mean"] == pytest.approx(150)
    assert task_average_records([r for r in records if r["task"] == "a"]) == []
    assert task_average_records(records + avg) == avg  # average rows are never re-averaged


def test_test_set_probe_does_not_change_training(spec_dict: dict[str, Any], one_thread: None) -> None:
    from craft_sdk.sweep import execute_run

    run = SweepSpec.from_dict(spec_dict).runs()[-1]  # craft, 2 shots, budget 40: 1 + 7 x (4 + 1) = 36 queries
    plain = execute_run({**run.to_dict(), "eval_at": []}, threads=1)
    probed = execute_run({**run.to_dict(), "eval_at": [10, 25, 36]}, threads=1)
    assert plain["checkpoints"] == [] and len(probed["checkpoints"]) == 3
    assert plain["history"] == probed["history"]
    assert plain["test_accuracy"] == probed["test_accuracy"]
    assert plain["queries"]["training"] == probed["queries"]["training"]
    assert (plain["queries"]["eval"], probed["queries"]["eval"]) == (2, 5)
    last = probed["checkpoints"][-1]  # the last generation's model (prompt + refiner) is the final adapter
    assert (last["generation"], last["queries_used"]) == (7, 36) == (probed["n_generations"], probed["queries_used"])
    assert last["test_accuracy"] == pytest.approx(probed["test_accuracy"])


def test_demo_task_by_name(tiny_model_dir: Path, tmp_path: Path, one_thread: None) -> None:
    spec = {
        "model": f"local-dir:{tiny_model_dir}",
        "tasks": ["digits"],
        "shots": [1],
        "modes": ["zero-shot", "pg"],
        "budget": 30,
        "params": FAST,
        "eval_at": [1],
    }
    result = run_sweep(spec, tmp_path / "out", workers=1, threads_per_run=1, plots=False)
    by_mode = {r["mode"]: r for r in result.records}
    assert by_mode["zero-shot"]["queries_used"] == 1 and by_mode["zero-shot"]["n_train"] == 10
    assert by_mode["zero-shot"]["test_accuracy"] == by_mode["zero-shot"]["zero_shot_accuracy"]
    first = by_mode["pg"]["checkpoints"][0]  # generation 0: the zero offset = zero-shot
    assert first["generation"] == 0 and first["test_accuracy"] == pytest.approx(by_mode["pg"]["zero_shot_accuracy"])
    assert result.plots == []


def test_interrupted_sweep_resumes_and_skips_finished_runs(
    spec_dict: dict[str, Any], tmp_path: Path, one_thread: None
) -> None:
    out = tmp_path / "out"

    def stop_after_two(run: RunSpec, record: Any, error: Any) -> None:
        if len(list((out / "runs").glob("*.json"))) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec_dict, out, workers=1, threads_per_run=1, on_run_done=stop_after_two)
    kept = sorted((out / "runs").glob("*.json"))
    assert len(kept) == 2 and not (out / "summary.json").exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in kept}
    (out / "runs" / ".torn.json.x.tmp").write_text("{")  # what a kill during a write would leave
    ids = [r.run_id for r in SweepSpec.from_dict(spec_dict).runs() if f"{r.run_id}.json" not in stamps]
    (out / "runs" / f"{ids[0]}.json").write_text('{"format": "craft-sdk-sweep-run", "trunc')  # a torn record
    seen: list[str] = []
    result = run_sweep(
        spec_dict, out, workers=1, threads_per_run=1, on_run_done=lambda r, rec, e: seen.append(r.run_id)
    )
    assert (result.ran, result.skipped) == (6, 2)
    assert sorted(seen) == sorted(ids)
    assert {p.name: p.stat().st_mtime_ns for p in kept} == stamps
    assert not list((out / "runs").glob(".*.tmp"))
    assert len(result.records) == 8
    again = run_sweep(spec_dict, out, workers=1, plots=False)
    assert (again.ran, again.skipped) == (0, 8)


def test_killed_cli_sweep_resumes(spec_dict: dict[str, Any], tmp_path: Path, one_thread: None) -> None:
    """SIGKILL a running ``craft-sdk sweep`` after its first record; rerunning finishes only the rest."""
    import signal
    import subprocess
    import sys
    import time

    spec_dict = {**spec_dict, "seeds": [0], "budget": 150, "eval_at": []}
    spec_file, out = tmp_path / "grid.json", tmp_path / "out"
    spec_file.write_text(json.dumps(spec_dict))
    cmd = [
        sys.executable,
        "-m",
        "craft_sdk",
        "sweep",
        str(spec_file),
        "--out",
        str(out),
        "--workers",
        "1",
        "--threads",
        "1",
        "--no-plots",
    ]
    env = suite_env()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    try:
        while not list((out / "runs").glob("*.json")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finished = {p.name: p.read_bytes() for p in (out / "runs").glob("*.json")}
    assert 1 <= len(finished) < 4, "the sweep was not killed mid-way"
    for body in finished.values():
        json.loads(body)  # complete, never torn
    result = run_sweep(spec_dict, out, workers=1, threads_per_run=1, plots=False)
    assert (result.ran, result.skipped) == (4 - len(finished), len(finished))
    assert {n: (out / "runs" / n).read_bytes() for n in finished} == finished


def test_failed_runs_are_reported_not_recorded(spec_dict: dict[str, Any], tmp_path: Path, one_thread: None) -> None:
    spec_dict = {**spec_dict, "shots": [5], "modes": ["pg"], "seeds": [0]}  # the folder has 4 images per class
    result = run_sweep(spec_dict, tmp_path / "out", workers=1, threads_per_run=1)
    assert result.ran == 0 and len(result.failed) == 1
    assert "DataError" in next(iter(result.failed.values()))
    assert json.loads((tmp_path / "out" / "failures.json").read_text()) == result.failed
    assert not list((tmp_path / "out" / "runs").glob("*.json"))


def test_worker_processes_match_in_process_runs(spec_dict: dict[str, Any], tmp_path: Path, one_thread: None) -> None:
    spec_dict = {**spec_dict, "shots": [2], "seeds": [0]}
    local = run_sweep(spec_dict, tmp_path / "a", workers=1, threads_per_run=1, plots=False)
    pooled = run_sweep(spec_dict, tmp_path / "b", workers=2, threads_per_run=1, plots=False)
    assert pooled.ran == 2 and not pooled.failed
    assert len({r["host"]["pid"] for r in pooled.records} - {os.getpid()}) >= 1
    for a, b in zip(local.records, pooled.records):
        assert a["run_id"] == b["run_id"]
        assert a["test_accuracy"] == b["test_accuracy"] and a["history"] == b["history"]


def test_ray_mode_matches_local(spec_dict: dict[str, Any], tmp_path: Path, one_thread: None) -> None:
    ray = pytest.importorskip("ray")
    spec_dict = {**spec_dict, "shots": [2], "seeds": [0]}
    local = run_sweep(spec_dict, tmp_path / "a", workers=1, threads_per_run=1, plots=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = run_sweep(spec_dict, tmp_path / "b", ray_address="local", plots=False)
        assert ray.is_initialized()  # a session the caller started is left running
    finally:
        ray.shutdown()
    assert remote.ran == 2 and not remote.failed
    assert all(r["host"]["pid"] != os.getpid() for r in remote.records)
    for a, b in zip(local.records, remote.records):
        assert a["test_accuracy"] == b["test_accuracy"] and a["history"] == b["history"]


def test_ray_mode_without_ray_says_what_to_install(
    spec_dict: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ConfigError, match="pip install ray"):
        run_sweep(spec_dict, tmp_path / "out", ray_address="local")


# ------------------------------------------------------------------ CLI


def test_cli_sweep_runs_resumes_and_reports_bad_specs(
    spec_dict: dict[str, Any], tmp_path: Path, one_thread: None
) -> None:
    from typer.testing import CliRunner

    from craft_sdk.cli import app

    spec_file = tmp_path / "tiny.json"
    spec_file.write_text(json.dumps({**spec_dict, "seeds": [0], "shots": [1]}))
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "sweep",
            str(spec_file),
            "--out",
            str(tmp_path / "o"),
            "--workers",
            "1",
            "--threads",
            "1",
            "--no-plots",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert (out["ran"], out["skipped"], len(out["summary"])) == (2, 0, 2)
    res = runner.invoke(app, ["sweep", str(spec_file), "--out", str(tmp_path / "o"), "--workers", "1", "--json"])
    assert json.loads(res.stdout.strip().splitlines()[-1])["skipped"] == 2
    res = runner.invoke(app, ["sweep", str(spec_file), "--dry-run", "--json"])
    assert json.loads(res.stdout)["n_runs"] == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [digits]\nmodes: [pg, prr]\n")
    res = runner.invoke(app, ["sweep", str(bad)])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "modes[1]" in lines[0] and "'prr'" in lines[0]


def test_shipped_grid_files_are_valid() -> None:
    grids = Path(__file__).resolve().parents[1] / "benchmarks" / "sweeps"
    counts = {p.stem: len(load_spec(p).runs()) for p in sorted(grids.glob("*.yaml"))}
    assert counts["table3"] == 5 * 5 * 3 * 3
    assert set(counts) >= {"table3", "table5_6", "table7", "figure3"}
