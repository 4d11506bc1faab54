"""Evaluation never scores an image the adapter was tuned or selected on (issue 11, item 2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from craft_sdk import Adapter, AdapterConfig, load_data
from craft_sdk.cli import app
from craft_sdk.data import seen_fingerprints

pytest.importorskip("torch")


def zero_shot_adapter(model_id: str, class_names: tuple[str, ...], provenance: dict) -> Adapter:
    """An adapter with neither prompt nor refiner: evaluating it costs one query and no training."""
    return Adapter(AdapterConfig(model_id, class_names, "a photo of a", provenance=provenance))


def test_cli_eval_on_a_demo_task_scores_only_unseen_images(tiny_client, tiny_model_dir: Path, tmp_path: Path) -> None:  # noqa: ANN001
    splits = load_data("demo:digits", shots=12, val_shots=4, seed=0)  # what `tune --shots 12 --val-shots 4` trains on
    seen = seen_fingerprints(splits.train, splits.val)
    assert len(seen) == 160 and len(splits.test) == 1637
    model_id = tiny_client.capabilities().model_id
    data = {"n_val": 40, "image_fingerprints": seen}
    zero_shot_adapter(model_id, splits.class_names, {"seed": 0, "shots": 12, "data": data}).save_pretrained(tmp_path / "A")
    args = ["eval", str(tmp_path / "A"), "demo:digits", "--model", f"local-dir:{tiny_model_dir}", "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    ev = json.loads(res.stdout.strip().splitlines()[-1])
    assert (ev["n_test"], ev["n_excluded"]) == (1637, 0)  # the tune's exact split, rebuilt
    # an adapter that does not record n_val: the split is rebuilt with 12 shots only, and the
    # 40 training/validation images that land in its test set are excluded by fingerprint
    zero_shot_adapter(model_id, splits.class_names, {"seed": 0, "shots": 12, "data": {"image_fingerprints": seen}}).save_pretrained(tmp_path / "B")
    res = CliRunner().invoke(app, ["eval", str(tmp_path / "B"), *args[2:]])
    assert res.exit_code == 0, res.output
    ev = json.loads(res.stdout.strip().splitlines()[-1])
    assert (ev["n_test"], ev["n_excluded"]) == (1637, 40)
    assert "excluded 40 test image(s)" in res.stderr


def _folder(root: Path) -> Path:
    from conftest import random_images

    for part, n, seed in (("train", 6, 1), ("test", 4, 2)):
        for k, cls in enumerate(("forest", "river", "sea")):
            (root / part / cls).mkdir(parents=True)
            for i, im in enumerate(random_images(n, seed=10 * seed + k)):
                im.save(root / part / cls / f"{i}.png")
    return root


def test_tune_records_fingerprints_and_evaluate_excludes_leaked_images(tiny_client, tmp_path: Path) -> None:  # noqa: ANN001
    import craft_sdk

    root = _folder(tmp_path / "data")
    splits = load_data(root, shots=4, val_shots=1, seed=0)
    adapter = craft_sdk.tune(tiny_client, splits.train, splits.val, mode="zero-shot", budget=10)
    recorded = adapter.config.provenance["data"]["image_fingerprints"]
    assert recorded == seen_fingerprints(splits.train, splits.val) and len(recorded) == 15
    assert len(json.dumps(recorded)) <= 20 * len(recorded)  # 16 hex digits per image: the adapter stays small
    clean = craft_sdk.evaluate(adapter, tiny_client, splits.test)
    assert (clean["n_test"], clean["n_excluded"]) == (12, 0)
    # copy two training images and one validation image into the test folder: they must not be scored
    for i, src in enumerate([splits.train.sources[0], splits.train.sources[5], splits.val.sources[2]]):
        label = Path(src).parent.name
        (root / "test" / label / f"leak{i}.png").write_bytes(Path(src).read_bytes())
    leaky = load_data(root, shots=4, val_shots=1, seed=0).test
    assert len(leaky) == 15
    res = craft_sdk.evaluate(adapter, tiny_client, leaky)
    assert (res["n_test"], res["n_excluded"]) == (12, 3) and res["accuracy"] == clean["accuracy"]


def test_cli_tune_records_fingerprints(tiny_model_dir: Path, tmp_path: Path) -> None:
    root = _folder(tmp_path / "data")
    args = ["tune", str(root), "--model", f"local-dir:{tiny_model_dir}", "--mode", "zero-shot", "--shots", "3",
            "--val-shots", "2", "--budget", "10", "--out", str(tmp_path / "A"), "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    splits = load_data(root, shots=3, val_shots=2, seed=0)
    cfg = json.loads((tmp_path / "A" / "adapter_config.json").read_text())
    assert cfg["provenance"]["data"]["image_fingerprints"] == seen_fingerprints(splits.train, splits.val)
    assert np.isin(cfg["provenance"]["data"]["image_fingerprints"], splits.test.image_fingerprints()).sum() == 0
