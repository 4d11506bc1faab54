"""Resumable tuning: checkpoints survive SIGKILL, resumed runs equal uninterrupted ones, the budget holds."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import CLASS_NAMES, random_images, suite_env

from craft_sdk import Adapter, CraftError, ImageDataset, TuneConfig
from craft_sdk.client.ledger import repair_journal
from craft_sdk.tuner.checkpoint import CHECKPOINT_FILE, LEDGER_FILE, load_checkpoint, save_checkpoint

pytest.importorskip("torch")
pytest.importorskip("cma")
import craft_sdk.tuner.loop as loop_mod  # noqa: E402
from craft_sdk.tuner.train import Tuner  # noqa: E402

TESTS = Path(__file__).resolve().parent
P = 6
# max_generations leaves budget slack, so a resumed run can redo the generation lost at a crash
# the paper protocol (validation queries every val_every generations); the robust protocol resumes in test_robust.py and below
CFG = TuneConfig(mode="craft", budget=400, seed=5, intrinsic_dim=16, popsize=P, refiner_hidden=32, val_every=3, max_generations=12,
                 protocol="paper")


def make_task() -> tuple[ImageDataset, ImageDataset]:
    imgs = random_images(36, seed=11)
    labels = np.arange(36) % len(CLASS_NAMES)
    return ImageDataset(imgs[:24], labels[:24], CLASS_NAMES), ImageDataset(imgs[24:], labels[24:], CLASS_NAMES)


@pytest.fixture(scope="module")
def task() -> tuple[ImageDataset, ImageDataset]:
    return make_task()


class Crash(Exception):
    """Stands for a process killed at this point."""


class CrashingClient:
    """Delegates to a client; raises :class:`Crash` inside the ``crash_at``-th population call, i.e. after
    the ledger charged it and before its result came back: the queries are billed and lost."""

    def __init__(self, client: Any, crash_at: int) -> None:
        self.client, self.crash_at, self.calls = client, crash_at, 0

    def capabilities(self, template: str = "a photo of a") -> Any:
        return self.client.capabilities(template)

    def upload(self, images: Any) -> Any:
        return self.client.upload(images)

    def predict(self, images: Any, names: Any, template: str = "a photo of a", offsets: Any = None) -> Any:
        if offsets is not None and np.ndim(offsets) == 3:
            self.calls += 1
            if self.calls == self.crash_at:
                raise Crash()
        return self.client.predict(images, names, template, offsets)


def save(result: Any, path: Path) -> Path:
    return Adapter.from_result(result).save_pretrained(path)


def journal_used(directory: Path) -> int:
    lines = (directory / LEDGER_FILE).read_text().splitlines()
    return sum(json.loads(line).get("n", 0) for line in lines if line.strip())  # usage lines carry no "n"


def split_accounting(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config without query accounting, the accounting) of a saved adapter."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    prov = cfg["provenance"]
    acc = {"used": prov.pop("queries_used"), "counts": prov.pop("queries"), "history": [h.pop("queries_used") for h in prov["history"]]}
    return cfg, acc


def assert_same_adapter(a: Path, b: Path, extra_queries: int = 0) -> None:
    """Tensors byte-identical; config identical except that ``b`` honestly records ``extra_queries`` more."""
    assert (a / "adapter_model.safetensors").read_bytes() == (b / "adapter_model.safetensors").read_bytes()
    if extra_queries == 0:
        assert (a / "adapter_config.json").read_bytes() == (b / "adapter_config.json").read_bytes()
        return
    (cfg_a, acc_a), (cfg_b, acc_b) = split_accounting(a), split_accounting(b)
    assert cfg_a == cfg_b
    assert acc_b["used"] == acc_a["used"] + extra_queries
    assert sum(acc_b["counts"].values()) == sum(acc_a["counts"].values()) + extra_queries
    diffs = [hb - ha for ha, hb in zip(acc_a["history"], acc_b["history"])]
    assert set(diffs) <= {0, extra_queries} and diffs[-1] == extra_queries


# ------------------------------------------------------------------ checkpoint file


def test_checkpoint_round_trip_and_atomic_replace(tmp_path: Path) -> None:
    tensors = {"a": np.arange(6, dtype=np.float64).reshape(2, 3), "b": np.ones(4, np.float32)}
    state = {"generation": 3, "rng": {"state": 2**100 + 7, "inc": 3}, "x": [1.5, None, "s"]}
    save_checkpoint(tmp_path, tensors, state)
    got_t, got_s = load_checkpoint(tmp_path)
    assert got_s == state and set(got_t) == set(tensors)
    for k, v in tensors.items():
        assert got_t[k].dtype == v.dtype and np.array_equal(got_t[k], v)
    save_checkpoint(tmp_path, {"a": np.zeros(1)}, {"generation": 4})
    assert load_checkpoint(tmp_path)[1] == {"generation": 4}
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE]  # no temp file left behind


def test_corrupt_checkpoint_is_a_one_line_error(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, {"a": np.zeros(100)}, {"generation": 1})
    path = tmp_path / CHECKPOINT_FILE
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(CraftError, match="unreadable") as err:
        load_checkpoint(tmp_path)
    assert "\n" not in str(err.value)


def test_torn_journal_line_is_isolated(tmp_path: Path) -> None:
    from craft_sdk import QueryLedger

    journal = tmp_path / LEDGER_FILE
    journal.write_text('{"n": 6, "category": "search"}\n{"n": 1, "cat')  # killed mid-append: never sent
    repair_journal(journal)
    ledger = QueryLedger(100, journal=journal)
    ledger.charge(2, "refine")
    assert QueryLedger(100, journal=journal).counts == {**ledger.counts} and ledger.used == 8


# ---------------------------------------------------------------- in-process resumes


@pytest.mark.parametrize("mode, every, crash_after, protocol", [
    ("craft", 1, 5, "paper"), ("craft", 3, 2, "paper"), ("pg", 1, 4, "paper"), ("pg+pr", 2, 3, "paper"), ("pr", 1, 1, "paper"),
    ("craft", 1, 4, "robust"), ("pr", 1, 1, "robust"),
])
def test_resume_after_checkpoint_is_byte_identical(tiny_client, task, tmp_path: Path, monkeypatch, mode: str, every: int, crash_after: int, protocol: str) -> None:  # noqa: ANN001
    train, val = task
    cfg = TuneConfig(**{**CFG.to_dict(), "mode": mode, "protocol": protocol})
    ref = save(Tuner(cfg).fit(tiny_client, train, val), tmp_path / "ref")
    saves = []
    real = loop_mod.save_checkpoint

    def crashing_save(*args: Any) -> Any:
        out = real(*args)
        saves.append(args[2]["generation"])
        if len(saves) == crash_after:
            raise Crash()
        return out

    ckpt = tmp_path / "ckpt"
    monkeypatch.setattr(loop_mod, "save_checkpoint", crashing_save)
    with pytest.raises(Crash):
        Tuner(cfg, checkpoint_dir=ckpt, checkpoint_every=every).fit(tiny_client, train, val)
    monkeypatch.setattr(loop_mod, "save_checkpoint", real)
    if mode != "pr":
        assert saves[-1] == (crash_after - 1) * every  # generation 0, then every `every`
    resumed = Tuner(cfg, checkpoint_dir=ckpt, checkpoint_every=every, resume=True).fit(tiny_client, train, val)
    assert_same_adapter(ref, save(resumed, tmp_path / "resumed"))
    assert journal_used(ckpt) == resumed.queries.used


def test_crash_mid_generation_costs_only_the_generation_in_flight(tiny_client, task, tmp_path: Path) -> None:  # noqa: ANN001
    train, val = task
    ref_result = Tuner(CFG).fit(tiny_client, train, val)
    ref = save(ref_result, tmp_path / "ref")
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Crash):
        Tuner(CFG, checkpoint_dir=ckpt).fit(CrashingClient(tiny_client, crash_at=7), train, val)
    assert load_checkpoint(ckpt)[1]["generation"] == 6
    resumed = Tuner(CFG, checkpoint_dir=ckpt, resume=True).fit(tiny_client, train, val)
    assert resumed.metrics.stopped_early is None
    assert resumed.queries.used == ref_result.queries.used + P  # the 6 candidates of generation 7, billed and lost
    assert_same_adapter(ref, save(resumed, tmp_path / "resumed"), extra_queries=P)


def test_resume_without_slack_stops_early_within_budget(tiny_client, task, tmp_path: Path, caplog) -> None:  # noqa: ANN001
    train, _ = task
    cfg = TuneConfig(**{**CFG.to_dict(), "budget": 71, "max_generations": None})  # 1 + 10 x 7: the plan uses it all
    ref = Tuner(cfg).fit(tiny_client, train)
    assert ref.queries.used == 71 and ref.n_generations == 10
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Crash):
        Tuner(cfg, checkpoint_dir=ckpt).fit(CrashingClient(tiny_client, crash_at=4), train)
    with caplog.at_level(logging.WARNING):
        resumed = Tuner(cfg, checkpoint_dir=ckpt, resume=True).fit(tiny_client, train)
    assert "stopping early" in caplog.text and resumed.metrics.stopped_early is not None
    assert resumed.queries.used <= 71 and journal_used(ckpt) == resumed.queries.used
    assert resumed.history[-1].generation == 9  # generation 10 no longer fits: not started, no query wasted
    assert resumed.queries.used == 71 - P - 1 + P  # 9 generations + the lost 6


def test_resume_refuses_a_different_run(tiny_client, task, tmp_path: Path, tiny_model_dir: Path) -> None:  # noqa: ANN001
    from conftest import save_tiny_model

    from craft_sdk.client.openclip import OpenCLIPClient

    train, val = task
    ckpt = tmp_path / "ckpt"
    cfg = TuneConfig(**{**CFG.to_dict(), "max_generations": 2})
    Tuner(cfg, checkpoint_dir=ckpt).fit(tiny_client, train, val)
    before = (ckpt / LEDGER_FILE).read_bytes()
    with pytest.raises(CraftError, match="different configuration"):
        Tuner(TuneConfig(**{**cfg.to_dict(), "seed": 6}), checkpoint_dir=ckpt, resume=True).fit(tiny_client, train, val)
    other = ImageDataset(random_images(24, seed=99), train.labels, CLASS_NAMES)
    with pytest.raises(CraftError, match="different training data"):
        Tuner(cfg, checkpoint_dir=ckpt, resume=True).fit(tiny_client, other, val)
    other_model = OpenCLIPClient(f"local-dir:{save_tiny_model(tmp_path / 'other-model', seed=1)}")
    with pytest.raises(CraftError, match="checkpoint is for model"):
        Tuner(cfg, checkpoint_dir=ckpt, resume=True).fit(other_model, train, val)
    with pytest.raises(CraftError, match="already holds a run"):
        Tuner(cfg, checkpoint_dir=ckpt).fit(tiny_client, train, val)
    assert (ckpt / LEDGER_FILE).read_bytes() == before  # refusals spend nothing


def test_resume_of_a_run_killed_before_its_first_checkpoint(tiny_client, task, tmp_path: Path) -> None:  # noqa: ANN001
    train, val = task
    cfg = TuneConfig(**{**CFG.to_dict(), "max_generations": 3})
    ref = Tuner(cfg).fit(tiny_client, train, val)
    fresh = Tuner(cfg, checkpoint_dir=tmp_path / "empty", resume=True).fit(tiny_client, train, val)  # nothing to resume: starts
    assert Adapter.from_result(fresh).fingerprint() == Adapter.from_result(ref).fingerprint()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / LEDGER_FILE).write_text('{"n": 1, "category": "refine"}\n')  # the baseline was billed, then the kill
    resumed = Tuner(cfg, checkpoint_dir=ckpt, resume=True).fit(tiny_client, train, val)
    assert resumed.queries.used == ref.queries.used + 1
    assert np.array_equal(resumed.z, ref.z)


# ----------------------------------------------------------------- SIGKILL, for real

SCRIPT = """
import sys, time
from pathlib import Path
import numpy as np
sys.path.insert(0, {tests!r})
import craft_sdk
# the parent compares this run's checkpoint with its own runs: both must execute the same craft_sdk
assert craft_sdk.__file__ == {package!r}, f"child imports {{craft_sdk.__file__}}, parent {package!r}"
from test_resume import CFG, KILL_AT, make_task
from craft_sdk.client.openclip import OpenCLIPClient
from craft_sdk.tuner.train import Tuner

client = OpenCLIPClient("local-dir:" + sys.argv[1])
marker = Path(sys.argv[3])

class Blocking:  # a black box that hangs inside the KILL_AT-th population call: the kill lands there, always
    calls = 0
    def capabilities(self, template="a photo of a"):
        return client.capabilities(template)
    def upload(self, images):
        return client.upload(images)
    def predict(self, images, names, template="a photo of a", offsets=None):
        if offsets is not None and np.ndim(offsets) == 3:
            Blocking.calls += 1
            if Blocking.calls == KILL_AT:  # billed (journalled) already: these queries are lost at the kill
                marker.write_text("in flight")
                time.sleep(3600)
        return client.predict(images, names, template, offsets)

train, val = make_task()
Tuner(CFG, checkpoint_dir=sys.argv[2]).fit(Blocking(), train, val)
print("finished")
"""
KILL_AT = 5  # the population call of generation 5: generation 4 is checkpointed, its P queries are billed


def test_sigkill_mid_run_then_resume(tiny_client, task, tiny_model_dir: Path, tmp_path: Path) -> None:  # noqa: ANN001
    import craft_sdk

    train, val = task
    ref_result = Tuner(CFG).fit(tiny_client, train, val)
    ref = save(ref_result, tmp_path / "ref")
    ckpt, marker = tmp_path / "ckpt", tmp_path / "in-flight"
    script = tmp_path / "tune.py"
    script.write_text(SCRIPT.format(tests=str(TESTS), package=craft_sdk.__file__))
    package_root = str(Path(craft_sdk.__file__).resolve().parent.parent)
    env = suite_env(PYTHONPATH=os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, str(script), str(tiny_model_dir), str(ckpt), str(marker)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # the child writes the marker inside generation 5's population call, after the ledger journalled its
    # charge, and then blocks: the kill lands at that instant however slowly either process is scheduled
    deadline = time.monotonic() + 600
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
        assert time.monotonic() < deadline, "the tune did not progress"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    used_at_kill = journal_used(ckpt)
    state = load_checkpoint(ckpt)[1]
    lost = used_at_kill - state["history"][-1]["queries_used"]
    assert state["generation"] == KILL_AT - 1 and lost == P  # exactly the candidates of the generation in flight
    resumed = Tuner(CFG, checkpoint_dir=ckpt, resume=True).fit(tiny_client, train, val)
    assert journal_used(ckpt) == resumed.queries.used == ref_result.queries.used + lost
    assert_same_adapter(ref, save(resumed, tmp_path / "resumed"), extra_queries=lost)


# ------------------------------------------------------------------------------ CLI


def test_cli_checkpoint_every_resume_and_refusal(tiny_model_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from craft_sdk.cli import app

    root = tmp_path / "data"
    for k, cls in enumerate(("annual_crop", "forest", "river")):
        (root / "train" / cls).mkdir(parents=True)
        for i, im in enumerate(random_images(4, seed=20 + k)):
            im.save(root / "train" / cls / f"{i}.png")
    ckpt, out1, out2 = tmp_path / "ckpt", tmp_path / "a1", tmp_path / "a2"
    base = ["tune", str(root), "--model", f"local-dir:{tiny_model_dir}", "--shots", "3", "--budget", "60", "--popsize", "6",
            "--intrinsic-dim", "8", "--checkpoint-dir", str(ckpt), "--json",
            "--protocol", "paper"]  # issue 23: 3 shots of 3 classes certify nothing, so a robust run would not search
    runner = CliRunner()
    first = runner.invoke(app, [*base, "--checkpoint-every", "4", "--out", str(out1)])
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    state = load_checkpoint(ckpt)[1]
    assert state["generation"] == summary["n_generations"] == 8 and journal_used(ckpt) == summary["queries_used"]
    again = runner.invoke(app, [*base, "--out", str(out2)])
    assert again.exit_code == 2 and "already holds a run" in again.output
    refused = runner.invoke(app, [*base, "--resume", "--popsize", "5", "--out", str(out2)])
    assert refused.exit_code == 2 and "different configuration" in refused.output
    assert len([ln for ln in refused.output.splitlines() if ln.startswith("error:")]) == 1
    resumed = runner.invoke(app, [*base, "--resume", "--out", str(out2)])
    assert resumed.exit_code == 0, resumed.output
    assert_same_adapter(out1, out2)  # a finished run resumes to the same adapter, spending nothing
    assert journal_used(ckpt) == summary["queries_used"]


def test_resume_can_match_is_the_budget_rule() -> None:
    from craft_sdk.tuner.checkpoint import planned_total, resume_can_match

    cfg = TuneConfig(**{**CFG.to_dict(), "budget": 71, "max_generations": None, "protocol": "paper"})
    assert planned_total(cfg, 10, has_val=False) == 71  # 1 + 10 x (P + 1): the whole budget
    assert not resume_can_match(ledger_used=41, checkpoint_used=35, planned_total=71, budget=71)  # 6 lost, no slack
    assert resume_can_match(ledger_used=35, checkpoint_used=35, planned_total=71, budget=71)  # nothing lost
    assert resume_can_match(ledger_used=41, checkpoint_used=35, planned_total=71, budget=77)
    assert resume_can_match(ledger_used=41, checkpoint_used=35, planned_total=71, budget=None)
    # paper protocol: the baseline and generations 3, 6, 9, 12 also score the validation set
    assert planned_total(CFG, 12, has_val=True) == 1 + 12 * (P + 1) + (0 if CFG.robust else 1 + 4)


@pytest.mark.parametrize("budget, can", [(60, False), (63, True)])
def test_cli_resume_says_whether_the_result_can_equal_the_uninterrupted_run(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget: int, can: bool
) -> None:
    from typer.testing import CliRunner

    import craft_sdk.cli._tune as tune_cli
    from craft_sdk.cli import app

    root = tmp_path / "data"
    for k, cls in enumerate(("annual_crop", "forest", "river")):
        (root / cls).mkdir(parents=True)
        for i, im in enumerate(random_images(8, seed=30 + k)):
            im.save(root / cls / f"{i}.png")
    ckpt = tmp_path / "ckpt"
    base = ["tune", str(root), "--model", f"local-dir:{tiny_model_dir}", "--shots", "3", "--budget", str(budget),
            "--popsize", str(P), "--intrinsic-dim", "8", "--protocol", "paper", "--checkpoint-dir", str(ckpt), "--json"]
    real = tune_cli._client
    monkeypatch.setattr(tune_cli, "_client", lambda *a: CrashingClient(real(*a), crash_at=3))  # killed in generation 3
    runner = CliRunner()
    assert runner.invoke(app, [*base, "--out", str(tmp_path / "a")]).exit_code != 0
    monkeypatch.setattr(tune_cli, "_client", real)
    resumed = runner.invoke(app, [*base, "--resume", "--out", str(tmp_path / "a")])
    assert resumed.exit_code == 0, resumed.output
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["resume_can_match"] is can  # 8 generations = 57 queries planned; 6 lost: 63 fits 63, not 60
    assert ("the result can equal the uninterrupted run's" in resumed.stderr) is can
    assert ("will differ from the uninterrupted run's" in resumed.stderr) is not can
    assert summary["queries_used"] <= budget
