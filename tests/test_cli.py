"""The command line, run as users run it: a real subprocess of the installed console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from craft_sdk.api import pretrained_kwargs
from craft_sdk.cli import app
from craft_sdk.cli._app import _UsageError, exit_code, guarded
from craft_sdk.errors import AdapterError, BudgetExceededError, ConfigError, DataError
from conftest import suite_env  # noqa: E402

pytest.importorskip("torch")

CLI = [sys.executable, "-m", "craft_sdk.cli"]


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = suite_env()
    out = subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=300)
    if check and out.returncode != 0:
        raise AssertionError(f"exit {out.returncode}: {out.stderr[-2000:]}")
    return out


def test_tune_eval_inspect(folder: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    model = f"local-dir:{tiny_model_dir}"
    out = tmp_path / "adapter"
    res = run("tune", str(folder), "--model", model, "--shots", "4", "--budget", "200", "--popsize", "8",
              "--intrinsic-dim", "16", "--out", str(out), "--json")
    summary = json.loads(res.stdout)
    assert {"queries_used", "budget", "mode", "adapter"} <= set(summary)
    assert summary["mode"] == "craft" and summary["budget"] == 200 and 0 < summary["queries_used"] <= 200
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    ev = json.loads(run("eval", str(out), str(folder), "--model", model, "--json").stdout)
    assert {"accuracy", "zero_shot_accuracy", "n_test", "queries_used"} <= set(ev)
    has_prompt = json.loads((out / "adapter_config.json").read_text())["prompt"] is not None
    assert summary["deployed"] in ("zero-shot", "prompt", "prompt+refiner", "refiner") and has_prompt == ("prompt" in summary["deployed"])
    assert ev["n_test"] == 15 and ev["queries_used"] == (2 if has_prompt else 1) and 0.0 <= ev["accuracy"] <= 1.0
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from craft_sdk.cli import app\n"
        f"app(['inspect', {str(out)!r}, '--json'])\n"
    )
    ins = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    info = json.loads(ins.stdout)
    assert info["n_classes"] == 3 and info["provenance"]["queries_used"] == summary["queries_used"]
    assert info["classes"] == ["annual crop", "forest", "river"]


def test_tune_human_output(folder: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    res = run("tune", str(folder), "--model", f"local-dir:{tiny_model_dir}", "--shots", "2", "--budget", "60",
              "--popsize", "6", "--intrinsic-dim", "8", "--mode", "pg", "--out", str(tmp_path / "a"))
    assert "adapter written to" in res.stdout
    assert "zero-shot train accuracy" in res.stdout and "queries used" in res.stdout  # the headline table: stdout


def test_tune_refiner_options_reach_the_adapter(folder: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "lin"
    run("tune", str(folder), "--model", f"local-dir:{tiny_model_dir}", "--shots", "2", "--budget", "40",
        "--popsize", "4", "--intrinsic-dim", "8", "--refiner-layers", "1", "--no-residual", "--lam", "0.05",
        "--beta", "0.02", "--lr", "0.01", "--protocol", "paper", "--out", str(out), "--json")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["refiner"]["layers"] == 1 and cfg["refiner"]["residual"] is False
    assert cfg["provenance"]["kl_weights"] == {"lambda": 0.05, "beta": 0.02}
    bad = run("tune", str(folder), "--model", f"local-dir:{tiny_model_dir}", "--lam", "-1", "--out", str(tmp_path / "x"),
              check=False)
    assert bad.returncode == 2 and "lam must be" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "args, message, code",
    [  # exit 2: a bad option value or combination (usage); exit 1: anything else (data, adapter, client...)
        (["tune", "/no/such/data"], "does not exist", 1),
        (["tune", "{folder}", "--shots", "50", "--model", "{model}"], "lower --shots", 1),
        (["tune", "{folder}", "--shots", "2", "--model", "ViT-B-32"], "pretrained=None", 2),
        (["tune", "{folder}", "--shots", "2", "--model", "{model}", "--mode", "bbt"], "mode must be one of", 2),
        (["tune", "{folder}", "--shots", "2", "--model", "{model}", "--budget", "0"], "budget must be", 2),
        (["eval", "/no/adapter", "{folder}"], "missing", 1),
        (["inspect", "{folder}"], "missing", 1),
    ],
)
def test_errors_are_one_line_without_traceback(folder: Path, tiny_model_dir: Path, args: list[str], message: str, code: int) -> None:
    filled = [a.format(folder=folder, model=f"local-dir:{tiny_model_dir}") for a in args]
    res = run(*filled, check=False)
    assert res.returncode == code, res.stderr
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], res.stderr


def test_resume_needs_checkpoint_dir(folder: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    res = run("tune", str(folder), "--model", f"local-dir:{tiny_model_dir}", "--shots", "2", "--resume", "--out", str(tmp_path / "x"), check=False)
    assert res.returncode == 2 and "pass its --checkpoint-dir" in res.stderr and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "exc, code",
    [
        (ConfigError("bad option"), 2),
        (typer.BadParameter("bad value"), 2),  # typer's (vendored) click classes: what typer raises
        (_UsageError("bad combination"), 2),
        (DataError("no images"), 1),
        (AdapterError("missing"), 1),
        (BudgetExceededError("spent"), 1),
        (OSError("disk full"), 1),
    ],
)
def test_guarded_exit_codes(exc: Exception, code: int) -> None:
    @guarded
    def command() -> None:
        raise exc

    with pytest.raises(typer.Exit) as info:
        command()
    assert info.value.exit_code == code == exit_code(exc)


def test_pretrained_none_is_parsed_once() -> None:
    assert pretrained_kwargs(None) == {}  # not given: the model name decides
    assert pretrained_kwargs("none") == pretrained_kwargs("None") == {"pretrained": None}
    assert pretrained_kwargs("laion2b_s34b_b79k") == {"pretrained": "laion2b_s34b_b79k"}


def test_every_command_that_prints_results_takes_json() -> None:
    root = typer.main.get_command(app)
    commands: dict[str, Any] = {}
    for name, cmd in root.commands.items():  # type: ignore[attr-defined]
        subs = getattr(cmd, "commands", None)
        commands.update({f"{name} {s}": c for s, c in subs.items()} if subs else {name: cmd})
    lacking = sorted(name for name, cmd in commands.items() if not any("--json" in p.opts for p in cmd.params))
    assert lacking == ["serve"]  # a long-running server, not a command that prints results


def test_demo_list_json() -> None:
    from craft_sdk.demo import demo_task_info, list_demo_tasks

    res = CliRunner().invoke(app, ["demo", "--list", "--json"])
    assert res.exit_code == 0, res.output
    tasks = json.loads(res.stdout)["tasks"]
    assert [t["name"] for t in tasks] == list(list_demo_tasks())
    digits = demo_task_info("digits")
    assert tasks[0]["n_classes"] == len(tasks[0]["class_names"]) and {"name": "digits", "license": digits.license}.items() <= next(
        t for t in tasks if t["name"] == "digits").items()
    text = CliRunner().invoke(app, ["demo", "--list"])
    assert text.exit_code == 0 and text.stdout.splitlines()[0].startswith(tasks[0]["name"])


def test_unknown_demo_task_is_a_usage_error() -> None:
    res = CliRunner().invoke(app, ["demo", "--task", "nope", "--out", "unused"])
    assert res.exit_code == 2 and "unknown demo task 'nope'" in res.output and "tuning" not in res.output
