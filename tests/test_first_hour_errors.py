"""Issue 24, items 8 and 10: every error a new user meets is one line with exit 1 or 2, and the help tells
the truth (busy port, sweep workers, push offline, `| head`, damaged files, long contexts, flags, [redis])."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from conftest import random_images
from craft_sdk.cli import app

pytest.importorskip("torch")

CLI = [sys.executable, "-m", "craft_sdk.cli"]
ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "adapters" / "digits"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _lines(text: str) -> list[str]:
    return [ln for ln in text.strip().splitlines() if ln.strip()]


def test_serve_on_a_busy_port_is_one_line_before_serving(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("alice sk-0123456789abcdef0123\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = CliRunner().invoke(app, ["serve", "--port", str(port), "--api-key-file", str(keys), "--state", "memory"])
    assert res.exit_code == 1, res.output
    assert _lines(res.output) == [f"error: port {port} on 127.0.0.1 is already in use (another server?); pass a free --port"]


def test_sweep_worker_failures_have_no_traceback(tiny_model_dir: Path, tmp_path: Path) -> None:
    task = tmp_path / "task"
    for k, cls in enumerate(("a", "b")):
        (task / "train" / cls).mkdir(parents=True)
        (task / "test" / cls).mkdir(parents=True)
        for i, im in enumerate(random_images(3, seed=k)):
            im.save(task / "train" / cls / f"{i}.png")
            im.save(task / "test" / cls / f"{i}.png")
    spec = tmp_path / "grid.json"
    spec.write_text(json.dumps({"name": "t", "model": f"local-dir:{tiny_model_dir}", "tasks": [str(task)], "shots": [5],
                                "modes": ["pg"], "seeds": [0], "budget": 40, "params": {"popsize": 4, "intrinsic_dim": 8}}))
    res = subprocess.run([*CLI, "sweep", str(spec), "--out", str(tmp_path / "out"), "--workers", "2", "--no-plots"],
                         capture_output=True, text=True, env=ENV, timeout=600)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr and "1 of 1 runs failed" in res.stderr and "DataError" in res.stderr


def test_push_to_hub_offline_is_one_line(tmp_path: Path) -> None:
    pytest.importorskip("huggingface_hub")
    code = ("import craft_sdk\n"
            f"a = craft_sdk.load_adapter({str(SHIPPED)!r})\n"
            "try:\n    a.push_to_hub('org/digits', token='hf_dummy')\n"
            "except craft_sdk.AdapterError as e:\n    print('ERR', e)\n")
    env = {**ENV, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_DISABLE_TELEMETRY": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert _lines(res.stdout) == ["ERR cannot push the adapter to org/digits on the Hugging Face Hub: the Hub is "
                                  "unreachable (offline, or HF_HUB_OFFLINE=1); push again when online"]


def test_inspect_into_a_closed_pipe_says_nothing(tmp_path: Path) -> None:
    proc = subprocess.Popen([*CLI, "inspect", str(SHIPPED), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader leaves before anything is written, as `| head -0` would
    stderr = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "BrokenPipe" not in stderr and "Traceback" not in stderr and stderr.strip() == ""


def test_damaged_files_get_clear_one_line_errors(tmp_path: Path) -> None:
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    (deep / "adapter_model.safetensors").write_bytes((SHIPPED / "adapter_model.safetensors").read_bytes())
    res = CliRunner().invoke(app, ["inspect", str(deep)])
    assert res.exit_code == 1 and len(_lines(res.output)) == 1 and "nested too deeply" in res.output
    assert "RecursionError" not in res.output
    bad = CliRunner().invoke(app, ["serve-keys", "set-budget", "alice", "²", "--state", str(tmp_path / "s.db")])
    assert bad.exit_code == 2 and _lines(bad.output) == ["error: BUDGET must be a number of queries or 'default', got '²'"]


def test_a_damaged_predict_resume_file_is_named(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i, im in enumerate(random_images(3, seed=5)):
        im.save(images / f"{i}.png")
    out = tmp_path / "preds.jsonl"
    first = CliRunner().invoke(app, ["predict", str(SHIPPED), str(images), "--output", str(out), "--batch-size", "2"])
    assert first.exit_code == 0, first.output
    rows = out.read_text().splitlines()
    out.write_text("\n".join([*rows[:-1], json.dumps({"label": "x"})]) + "\n")
    res = CliRunner().invoke(app, ["predict", str(SHIPPED), str(images), "--output", str(out), "--resume"])
    assert res.exit_code == 1 and len(_lines(res.output)) == 1
    assert "is not a prediction row" in res.output and "KeyError" not in res.output


def test_a_context_that_fills_the_text_context_is_blamed_not_the_class_names() -> None:
    import craft_sdk

    client = craft_sdk.create_client("demo")
    splits = craft_sdk.load_data("demo:digits", shots=1)
    adapter = craft_sdk.tune(client, splits.train, mode="zero-shot", budget=5, progress=False)
    long = craft_sdk.Adapter(dataclasses.replace(adapter.config, template=("word " * 200)[:999].strip()), None, None, None)
    clf = craft_sdk.CraftClassifier.from_adapter(long, client)
    with pytest.raises(craft_sdk.ClientError, match="leaves no room for any class name; use a shorter context") as info:
        clf.predict(splits.train.images[:2])
    assert "shorten the names" not in str(info.value)


def _help(*args: str) -> str:
    res = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "200", "TERM": "dumb"})
    assert res.exit_code == 0
    return res.output


def test_help_text_tells_the_truth() -> None:
    assert "craft-sdk[redis]" in _help("serve")
    tune = _help("tune")
    assert "<bool>" not in tune and "--test-fraction" in tune
    assert "a float or 'none'" in tune  # --lam / --beta: "None = 0.1 / C" is now typeable


def test_lam_none_is_accepted(tmp_path: Path, tiny_model_dir: Path) -> None:
    root = tmp_path / "data"
    for k, cls in enumerate(("a", "b")):
        (root / cls).mkdir(parents=True)
        for i, im in enumerate(random_images(4, seed=k)):
            im.save(root / cls / f"{i}.png")
    res = CliRunner().invoke(app, ["tune", str(root), "--model", f"local-dir:{tiny_model_dir}", "--shots", "2",
                                   "--mode", "zero-shot", "--budget", "5", "--lam", "none", "--beta", "None",
                                   "--out", str(tmp_path / "a"), "--json"])
    assert res.exit_code == 0, res.output
    hp = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["hyperparameters"]
    assert hp["lam"] is None and hp["beta"] is None


def test_a_linear_refiner_is_not_called_an_mlp(tmp_path: Path) -> None:
    import craft_sdk
    from craft_sdk.adapter import RefinerSpec

    adapter = craft_sdk.load_adapter(str(SHIPPED))
    assert adapter.config.refiner is not None
    linear = dataclasses.replace(adapter.config, refiner=RefinerSpec(1, 512, True))
    n = len(adapter.config.class_names)
    weights = {"refiner.0.weight": __import__("numpy").zeros((n, n), "float32"), "refiner.0.bias": __import__("numpy").zeros(n, "float32")}
    craft_sdk.Adapter(linear, adapter.z, adapter.offset, weights).save_pretrained(tmp_path / "lin")
    res = CliRunner().invoke(app, ["inspect", str(tmp_path / "lin")])
    assert res.exit_code == 0, res.output
    assert "linear map (no hidden layer), residual" in res.output and "hidden 512" not in res.output
    assert "linear map (no hidden layer)" in (tmp_path / "lin" / "README.md").read_text()


def test_ray_error_names_the_craft_option(tmp_path: Any) -> None:
    pytest.importorskip("ray")
    from craft_sdk import ConfigError
    from craft_sdk.sweep.ray_backend import run_on_ray

    with pytest.raises(ConfigError) as info:
        run_on_ray([], "auto", 1, lambda *a: None)
    message = str(info.value)
    assert "--ray" in message and "`--address`" not in message and "setting" not in message
