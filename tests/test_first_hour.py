"""A new user's first hour (issue 24): a single folder of their own images, a small budget, progress,
Ctrl-C, what the run reports, the model card, eval/predict defaults and the resume outlook."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from conftest import random_images
from craft_sdk.cli import app
from test_resume import CrashingClient  # noqa: E402  (the suite's one crash-injecting client)

pytest.importorskip("torch")

CLI = [sys.executable, "-m", "craft_sdk.cli"]
SMALL = ["--popsize", "4", "--intrinsic-dim", "8", "--refiner-hidden", "16"]


def _folder(root: Path, per_class: int = 24, classes: tuple[str, ...] = ("cat", "dog", "fox")) -> Path:
    for k, cls in enumerate(classes):
        (root / cls).mkdir(parents=True)
        for i, im in enumerate(random_images(per_class, seed=40 + k)):
            im.save(root / cls / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def my_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _folder(tmp_path_factory.mktemp("mine") / "my-folder")


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def test_single_folder_with_24_images_per_class_tunes_at_the_default_shots(my_folder: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "a"
    res = _invoke("tune", str(my_folder), "--model", f"local-dir:{tiny_model_dir}", "--budget", "60", *SMALL,
                  "--out", str(out), "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["n_train"] == 3 * 16  # the default --shots 16 fit: the test split took 8 of 24, not 12
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["provenance"]["data"]["test_fraction"] is None
    ev = _invoke("eval", str(out), str(my_folder), "--model", f"local-dir:{tiny_model_dir}", "--json")
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.stdout)["n_test"] == 3 * 8
    bad = _invoke("tune", str(my_folder), "--model", f"local-dir:{tiny_model_dir}", "--test-fraction", "0.5",
                  "--budget", "60", *SMALL, "--out", str(tmp_path / "b"))
    assert bad.exit_code == 1 and "lower --test-fraction to 0.33" in bad.output and len(bad.output.strip().splitlines()) == 1


def test_a_budget_below_one_generation_is_refused_up_front(my_folder: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    # the paper protocol: at 4 shots of 3 classes the robust protocol can certify no search and buys none (issue 23)
    res = _invoke("tune", str(my_folder), "--model", f"local-dir:{tiny_model_dir}", "--shots", "4", "--budget", "40",
                  "--protocol", "paper", "--out", str(tmp_path / "a"))
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert len(line.splitlines()) == 1 and "P + 1 = 41 queries" in line and "--popsize to 38" in line
    assert not (tmp_path / "a" / "adapter_config.json").exists()
    ok = _invoke("tune", str(my_folder), "--model", f"local-dir:{tiny_model_dir}", "--shots", "4", "--budget", "40",
                 "--mode", "pr", "--refiner-hidden", "16", "--out", str(tmp_path / "pr"), "--json")
    assert ok.exit_code == 0, ok.output  # no generation needed: unaffected


def test_python_tune_reports_progress_and_phases(tiny_client: Any, my_folder: Path, capsys: pytest.CaptureFixture) -> None:
    import craft_sdk

    splits = craft_sdk.load_data(my_folder, shots=4)
    seen: list[Any] = []

    class Recorder:
        def __call__(self, p: Any) -> None:
            seen.append(("generation", p.generation, p.queries_used))

        def phase(self, name: str) -> None:
            seen.append(("phase", name))

    adapter = craft_sdk.tune(tiny_client, splits.train, budget=40, popsize=4, intrinsic_dim=8, refiner_hidden=16,
                             progress=Recorder())
    gens = [s for s in seen if s[0] == "generation"]
    assert gens[0][1] == 0 and len(gens) == adapter.config.provenance["n_generations"] + 1
    assert seen[-1] == ("phase", "selection")
    capsys.readouterr()
    craft_sdk.tune(tiny_client, splits.train, budget=12, popsize=4, intrinsic_dim=8, refiner_hidden=16)
    assert capsys.readouterr().err == ""  # not a terminal: the default shows nothing
    with pytest.raises(craft_sdk.ConfigError, match="progress must be"):
        craft_sdk.tune(tiny_client, splits.train, budget=12, popsize=4, progress="yes")


def test_generations_reported_are_the_generations_run(my_folder: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "a"
    # 16 shots: at 4 shots of 3 classes the robust protocol can certify no search and buys none (issue 23)
    res = _invoke("tune", str(my_folder), "--model", f"local-dir:{tiny_model_dir}", "--shots", "16", "--budget", "400",
                  "--patience", "2", *SMALL, "--out", str(out), "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    prov = json.loads((out / "adapter_config.json").read_text())["provenance"]
    run = prov["history"][-1]["generation"]
    assert summary["n_generations"] == prov["n_generations"] == run
    assert summary["planned_generations"] == prov["planned_generations"] == 79 and run < 79  # stopped by patience
    card = (out / "README.md").read_text()
    assert "0 images" not in card and f"the check images ({prov['data']['n_check']} training images" in card
    assert f"the training shots ({prov['data']['n_search']} images" in card


def test_eval_and_predict_default_to_the_recorded_model(tmp_path: Path) -> None:
    import craft_sdk

    client = craft_sdk.create_client("demo")
    splits = craft_sdk.load_data("demo:digits", shots=2)
    adapter = craft_sdk.tune(client, splits.train, mode="zero-shot", budget=5, progress=False)
    adapter.save_pretrained(tmp_path / "a")
    image = tmp_path / "one.png"
    splits.train.images[0].save(image)
    res = _invoke("predict", str(tmp_path / "a"), str(image), "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["predictions"][0]["top_k"][0]["label"] in splits.class_names


def test_a_model_the_id_cannot_reopen_is_named(my_folder: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    from craft_sdk.client.model_ids import client_args, client_hint

    out = tmp_path / "a"
    assert _invoke("tune", str(my_folder), "--model", f"local-dir:{tiny_model_dir}", "--mode", "zero-shot", "--shots", "4",
                   "--budget", "5", "--out", str(out)).exit_code == 0
    res = _invoke("eval", str(out), str(my_folder))
    assert res.exit_code == 2 and f"--model local-dir:/path/to/{tiny_model_dir.name}" in res.output
    mismatch = _invoke("eval", str(out), str(my_folder), "--model", "demo")
    assert mismatch.exit_code == 1 and f"pass --model local-dir:/path/to/{tiny_model_dir.name}" in mismatch.output
    assert client_args("open_clip/ViT-B-32/openai") == ("ViT-B-32", "openai")
    assert client_hint("open_clip/RN50/random-seed3") == "--model RN50 --pretrained none"
    assert client_args("zeroshot-api:http://h:1/x") == ("zeroshot+http://h:1/x", None)
    assert client_args("chat:http://h:1/v1?model=m") == ("chat+http://h:1/v1?model=m", None)


def test_resume_outlook_accounts_for_early_stopping(my_folder: Path, tiny_model_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import craft_sdk.cli._tune as tune_cli

    base = ["tune", str(my_folder), "--model", f"local-dir:{tiny_model_dir}", "--shots", "16", "--budget", "401",
            "--patience", "2", *SMALL, "--json"]  # 80 generations planned = 401 queries: no room for lost ones
    plain = _invoke(*base, "--out", str(tmp_path / "plain"))
    assert plain.exit_code == 0, plain.output
    ckpt = tmp_path / "ckpt"
    real = tune_cli._client
    monkeypatch.setattr(tune_cli, "_client", lambda *a: CrashingClient(real(*a), crash_at=2))
    assert _invoke(*base, "--checkpoint-dir", str(ckpt), "--out", str(tmp_path / "b")).exit_code != 0
    monkeypatch.setattr(tune_cli, "_client", real)
    resumed = _invoke(*base, "--checkpoint-dir", str(ckpt), "--resume", "--out", str(tmp_path / "b"))
    assert resumed.exit_code == 0, resumed.output
    assert "will differ" not in resumed.stderr and "equals the uninterrupted run's" in resumed.stderr
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["resume_can_match"] is True
    same = [(tmp_path / d / "adapter_model.safetensors").read_bytes() for d in ("plain", "b")]
    assert same[0] == same[1]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {path} (exit {proc.returncode}): {proc.communicate()[1][-2000:]}")
        time.sleep(0.2)


def test_ctrl_c_leaves_a_resumable_run_and_prints_the_command(my_folder: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    args = ["tune", str(my_folder), "--model", f"local-dir:{tiny_model_dir}", "--shots", "16", "--budget", "3000",
            "--patience", "none", "--max-generations", "300", *SMALL, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # a suite started in the background of a non-interactive shell (`pytest &`) inherits SIGINT ignored, and so would
    # the CLI (Python keeps an ignored SIGINT ignored): give the child the default disposition a terminal user has
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for(out / ".craft-checkpoint" / "checkpoint.safetensors", proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "Resume it with:" in stderr
    command = stderr.split("Resume it with:")[1].strip().splitlines()[0].split()
    assert command[0] == "craft-sdk" and command[-1] == "--resume" and command[1:-1] == args
    again = subprocess.run([*CLI, *command[1:]], capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (out / "adapter_config.json").is_file() and not (out / ".craft-checkpoint").exists()
    prov = json.loads((out / "adapter_config.json").read_text())["provenance"]
    assert prov["n_generations"] == 300


def test_classifier_save_pretrained_round_trips(tmp_path: Path) -> None:
    import craft_sdk

    client = craft_sdk.create_client("demo")
    splits = craft_sdk.load_data("demo:digits", shots=1)
    clf = craft_sdk.CraftClassifier(client, mode="zero-shot", budget=5)
    with pytest.raises(craft_sdk.NotFittedError):
        clf.save_pretrained(tmp_path / "none")
    labels = [splits.class_names[i] for i in splits.train.labels]
    clf.fit(splits.train.images, labels)
    clf.save_pretrained(tmp_path / "clf")
    back = craft_sdk.CraftClassifier.from_pretrained(tmp_path / "clf", client)
    assert back.adapter_.fingerprint() == clf.adapter_.fingerprint()
    assert (back.predict(splits.train.images[:3]) == clf.predict(splits.train.images[:3])).all()
