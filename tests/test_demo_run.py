"""``craft-sdk demo`` end to end: tune, observe, export, deploy, report (tiny model for speed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")


def test_run_demo_writes_everything(tiny_model_dir: Path, tmp_path: Path) -> None:
    from craft_sdk.apps.demo import run_demo

    seen = []
    report = run_demo(
        "digits", tmp_path / "demo", model=f"local-dir:{tiny_model_dir}", budget=120, popsize=6,
        intrinsic_dim=16, refiner_hidden=32, curve_points=5, on_progress=seen.append,
    )
    out = tmp_path / "demo"
    assert (out / "adapter" / "adapter_config.json").is_file()
    # issue 23: refiner.onnx is exported exactly when the adapter deploys a refiner
    has_refiner = json.loads((out / "adapter" / "adapter_config.json").read_text())["refiner"] is not None
    assert (out / "adapter" / "refiner.onnx").is_file() == has_refiner
    assert (out / "report.png").stat().st_size > 10_000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["queries_used"] == report.queries_used <= 120
    assert report.n_test == 1637 and 0.0 <= report.accuracy <= 1.0
    # observation queries are counted apart from the training budget: one per curve point, 2 for the
    # final evaluation, one per CraftClassifier batch
    has_prompt = json.loads((out / "adapter" / "adapter_config.json").read_text())["prompt"] is not None
    assert report.eval_queries == len(report.curve) + (2 if has_prompt else 1) + 1  # curve + evaluate() + one predict batch
    assert [c["generation"] for c in report.curve][0] == 0 and report.curve[-1]["generation"] == seen[-1].generation
    assert len(report.samples) == 16
    assert {s["true"] for s in report.samples} <= {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}


def test_demo_list_cli() -> None:
    from typer.testing import CliRunner

    from craft_sdk.cli import app

    res = CliRunner().invoke(app, ["demo", "--list"])
    assert res.exit_code == 0
    assert [line.split()[0] for line in res.stdout.splitlines()] == ["digits", "digits-on-texture", "noisy-shapes"]
