"""CI runs every example script (long ones in a smoke configuration)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import suite_env  # noqa: E402

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
ENV = suite_env(PYTHONPATH=str(ROOT))


def run(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_every_example_is_covered() -> None:
    covered = {"quickstart_adapter.py", "make_shipped_adapters.py", "make_digits_asset.py", "pretrain_demo_vlm.py", "text_only_api.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == covered


def test_quickstart_adapter() -> None:
    out = run(str(EXAMPLES / "quickstart_adapter.py"))
    lines = [line for line in out.stdout.splitlines() if line.startswith("predicted")]
    assert len(lines) == 8 and "queries used: 1" in out.stdout
    correct = sum(line.split()[1] == line.split()[-1] for line in lines)
    assert correct >= 5  # the shipped digits adapter is ~80% accurate


def test_text_only_api() -> None:
    """The text-only example: three adapters of the three behaviours, none below zero-shot, each saved and reloaded."""
    out = run(str(EXAMPLES / "text_only_api.py"), "--test-images", "300")
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines() if line.split() and line.split()[0] in ("ensemble", "pg", "craft")}
    assert set(rows) == {"ensemble", "pg", "craft"}, out.stdout
    for mode, row in rows.items():
        acc, zero = float(row[-3]), float(row[-1].strip(")"))
        assert acc >= zero - 0.01, (mode, row)
        assert row[4] in ("none", "ensemble", "discrete")
    assert int(rows["ensemble"][rows["ensemble"].index("queries") + 1]) == 42  # 1 + CLIP's 41 contexts
    assert float(rows["craft"][-3]) > float(rows["craft"][-1].strip(")")) + 0.15  # the refiner's gain on digits


def test_make_shipped_adapters_smoke(tmp_path: Path) -> None:
    run(str(EXAMPLES / "make_shipped_adapters.py"), "--out", str(tmp_path), "--budget", "50")
    assert (tmp_path / "manifest.json").is_file() and (tmp_path / "digits" / "refiner.onnx").is_file()
    card = (tmp_path / "digits" / "README.md").read_text()  # the model card, with the test accuracy
    assert card.startswith("---\nlibrary_name: craft-sdk") and "| the demo:digits test split (" in card


def test_make_digits_asset_reproduces_the_shipped_file(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    out = tmp_path / "digits.safetensors"
    run(str(EXAMPLES / "make_digits_asset.py"), "--out", str(out))
    shipped = ROOT / "craft_sdk" / "demo" / "assets" / "digits.safetensors"
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(shipped.read_bytes()).hexdigest()


def test_pretrain_demo_vlm_smoke(tmp_path: Path) -> None:
    run(str(EXAMPLES / "pretrain_demo_vlm.py"), "--steps", "2", "--batch-size", "16", "--workers", "0",
        "--threads", "1", "--warmup", "1", "--out", str(tmp_path / "vlm"), "--log-file", str(tmp_path / "log.txt"))
    assert (tmp_path / "vlm" / "open_clip_model.safetensors").is_file()
    assert (tmp_path / "vlm" / "checksum.sha256").is_file()
