"""The one composition site (issue 21): craft_sdk.tune_run / tune run client -> tuner -> adapter and return it all."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import craft_sdk
from craft_sdk.tuner.checkpoint import LEDGER_FILE, has_checkpoint
from craft_sdk.tuning import TuneRun, merged_config

SMALL = {"mode": "craft", "protocol": "paper", "budget": 40, "popsize": 4, "intrinsic_dim": 8, "refiner_hidden": 16, "seed": 0}


def test_tune_run_returns_the_adapter_with_its_full_result(tiny_client, folder: Path, tmp_path: Path) -> None:  # noqa: ANN001
    splits = craft_sdk.load_data(folder, shots=4, seed=0)
    seen: list[int] = []
    run = craft_sdk.tune_run(tiny_client, splits.train, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=2,
                             on_progress=lambda p: seen.append(p.generation), progress=False, **SMALL)
    assert isinstance(run, TuneRun)
    prov = run.adapter.config.provenance
    assert prov["queries_used"] == run.result.queries.used > 0
    assert prov["n_generations"] == run.result.n_generations and seen[0] == 0 and seen[-1] == run.result.n_generations
    np.testing.assert_array_equal(run.adapter.z, run.result.z)
    assert (tmp_path / "ckpt" / LEDGER_FILE).is_file() and has_checkpoint(tmp_path / "ckpt")
    again = craft_sdk.tune(tiny_client, splits.train, progress=False, **SMALL)  # the facade: the same run, the adapter only
    assert again.fingerprint() == run.adapter.fingerprint()


def test_the_run_options_reach_the_tuner(tiny_client, folder: Path) -> None:  # noqa: ANN001
    splits = craft_sdk.load_data(folder, shots=4, seed=0)
    with pytest.raises(craft_sdk.ConfigError, match="checkpoint_every must be >= 1"):
        craft_sdk.tune(tiny_client, splits.train, checkpoint_every=0, progress=False, **SMALL)
    with pytest.raises(craft_sdk.ConfigError, match="resume needs a checkpoint_dir"):
        craft_sdk.tune_run(tiny_client, splits.train, resume=True, progress=False, **SMALL)
    with pytest.raises(craft_sdk.ConfigError, match=r"unknown tuning option\(s\) \['budgett'\]"):
        craft_sdk.tune_run(tiny_client, splits.train, budgett=3)


def test_merged_config_replaces_only_the_named_fields() -> None:
    base = craft_sdk.TuneConfig(mode="pg", budget=123)
    assert merged_config(base, {}) is base
    merged = merged_config(base, {"seed": 7})
    assert (merged.mode, merged.budget, merged.seed) == ("pg", 123, 7)
    assert merged_config(None, {"budget": 9}) == craft_sdk.TuneConfig(budget=9)
