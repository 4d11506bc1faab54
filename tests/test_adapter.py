"""Adapter format: round trips for every mode, loading without torch, and every rejection path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import suite_env  # noqa: E402
from safetensors.numpy import load_file, save_file

from craft_sdk import Adapter, AdapterConfig, AdapterError, load_adapter, mlp
from craft_sdk.adapter import CONFIG_FILE, WEIGHTS_FILE, PromptSpec, RefinerSpec
from craft_sdk.projection import project, projection_matrix

NAMES = ("cat", "dog", "bird")


def make_adapter(prompt: bool = True, refiner: bool = True, residual: bool = True, layers: int = 3) -> Adapter:
    spec = PromptSpec(n_ctx=4, ctx_dim=8, intrinsic_dim=6, seed=11, std=0.05) if prompt else None
    z = np.random.default_rng(0).normal(size=6) if prompt else None
    offset = project(projection_matrix(11, 32, 6, 0.05), z, 4, 8) if prompt else None
    weights = None
    if refiner:
        weights = mlp.init_weights(3, 16, layers, residual=False, seed=0)
    cfg = AdapterConfig(
        model_id="m/1",
        class_names=NAMES,
        template="a photo of a",
        prompt=spec,
        refiner=RefinerSpec(layers, 16, residual) if refiner else None,
        hyperparameters={"seed": 0},
        provenance={"mode": "craft", "history": [{"generation": 0, "train_accuracy": 0.5}]},
    )
    return Adapter(cfg, z, offset, weights)


@pytest.mark.parametrize("prompt, refiner, residual, layers", [(True, True, True, 3), (True, False, True, 3), (False, True, True, 3), (False, False, True, 3), (True, True, False, 1)])
def test_round_trip(tmp_path: Path, prompt: bool, refiner: bool, residual: bool, layers: int) -> None:
    a = make_adapter(prompt, refiner, residual, layers)
    a.save_pretrained(tmp_path / "ad")
    b = Adapter.from_pretrained(tmp_path / "ad")
    assert b.config == a.config
    assert a.fingerprint() == b.fingerprint()
    for k, v in a.tensors().items():
        np.testing.assert_array_equal(v, b.tensors()[k])
    logits = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
    np.testing.assert_array_equal(a.refine(logits), b.refine(logits))
    # saving again is byte-identical
    b.save_pretrained(tmp_path / "ad2")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        assert (tmp_path / "ad" / name).read_bytes() == (tmp_path / "ad2" / name).read_bytes()


def test_config_json_is_sorted_and_stamped(tmp_path: Path) -> None:
    make_adapter().save_pretrained(tmp_path / "ad")
    text = (tmp_path / "ad" / CONFIG_FILE).read_text()
    data = json.loads(text)
    assert data["format_version"] == 1 and data["craft_sdk_version"]
    assert text == json.dumps(data, indent=2, sort_keys=True) + "\n"


def test_numpy_refiner_matches_torch(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from craft_sdk.tuner.refiner import Refiner

    for residual in (True, False):
        w = mlp.init_weights(7, 32, 3, residual=False, seed=2)
        x = np.random.default_rng(3).normal(0, 10, (50, 7)).astype(np.float32)
        ref = Refiner(w, residual)(torch.from_numpy(x)).detach().numpy()
        np.testing.assert_allclose(mlp.forward(w, x, residual), ref, atol=1e-5)


def test_load_needs_no_torch(tmp_path: Path) -> None:
    make_adapter().save_pretrained(tmp_path / "ad")
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import craft_sdk\n"
        f"a = craft_sdk.load_adapter({str(tmp_path / 'ad')!r})\n"
        "import numpy as np; print(a.refine(np.zeros((1, 3), np.float32)).shape)\n"
        "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=suite_env())
    assert out.returncode == 0, out.stderr
    assert "(1, 3)" in out.stdout


def test_save_is_atomic_and_refuses_foreign_dirs(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(AdapterError, match="not an adapter"):
        make_adapter().save_pretrained(foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    make_adapter().save_pretrained(tmp_path / "ad")
    make_adapter(prompt=False).save_pretrained(tmp_path / "ad")  # overwrite an adapter in place
    assert Adapter.from_pretrained(tmp_path / "ad").config.prompt is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def _saved(tmp_path: Path) -> Path:
    return make_adapter().save_pretrained(tmp_path / "ad")


def _edit_config(d: Path, **changes: object) -> None:
    data = json.loads((d / CONFIG_FILE).read_text())
    data.update(changes)
    (d / CONFIG_FILE).write_text(json.dumps(data))


def _edit_tensor(d: Path, name: str, value: np.ndarray | None) -> None:
    t = load_file(str(d / WEIGHTS_FILE))
    if value is None:
        del t[name]
    else:
        t[name] = value
    save_file(t, str(d / WEIGHTS_FILE))


def test_rejects_missing_files(tmp_path: Path) -> None:
    d = _saved(tmp_path)
    (d / WEIGHTS_FILE).unlink()
    with pytest.raises(AdapterError, match="missing"):
        load_adapter(str(d))
    with pytest.raises(AdapterError, match="missing"):
        load_adapter(str(tmp_path / "nowhere"))


def test_rejects_unknown_format_version(tmp_path: Path) -> None:
    d = _saved(tmp_path)
    _edit_config(d, format_version=99)
    with pytest.raises(AdapterError, match="format_version"):
        load_adapter(str(d))


def test_drops_unknown_keys_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = _saved(tmp_path)
    _edit_config(d, future_feature={"x": 1})
    with caplog.at_level("WARNING"):
        load_adapter(str(d))
    assert "future_feature" in caplog.text


def test_rejects_corrupt_json_and_weights(tmp_path: Path) -> None:
    d = _saved(tmp_path)
    (d / CONFIG_FILE).write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_adapter(str(d))
    d2 = make_adapter().save_pretrained(tmp_path / "ad2")
    (d2 / WEIGHTS_FILE).write_bytes(b"garbage")
    with pytest.raises(AdapterError, match="safetensors"):
        load_adapter(str(d2))


def test_rejects_shape_mismatches(tmp_path: Path) -> None:
    d = _saved(tmp_path)
    _edit_tensor(d, "prompt_offset", np.zeros((4, 9), np.float32))
    with pytest.raises(AdapterError, match="prompt_offset has shape"):
        load_adapter(str(d))
    d = make_adapter().save_pretrained(tmp_path / "b")
    _edit_tensor(d, "z", np.zeros(7))
    with pytest.raises(AdapterError, match="z has shape"):
        load_adapter(str(d))


def test_rejects_class_count_mismatch(tmp_path: Path) -> None:
    d = _saved(tmp_path)
    _edit_config(d, class_names=["cat", "dog", "bird", "fish"])
    with pytest.raises(AdapterError, match="class-count"):
        load_adapter(str(d))


def test_rejects_nan(tmp_path: Path) -> None:
    d = _saved(tmp_path)
    w = load_file(str(d / WEIGHTS_FILE))["refiner.1.weight"].copy()
    w[0, 0] = np.nan
    _edit_tensor(d, "refiner.1.weight", w)
    with pytest.raises(AdapterError, match="NaN"):
        load_adapter(str(d))


def test_rejects_offset_that_disagrees_with_projection(tmp_path: Path) -> None:
    d = _saved(tmp_path)
    off = load_file(str(d / WEIGHTS_FILE))["prompt_offset"] * 1.01
    _edit_tensor(d, "prompt_offset", off)
    with pytest.raises(AdapterError, match="regenerated"):
        load_adapter(str(d))
    assert load_adapter(str(d), verify_projection=False).offset is not None


def test_rejects_missing_refiner_or_prompt_tensors(tmp_path: Path) -> None:
    d = _saved(tmp_path)
    _edit_tensor(d, "refiner.2.bias", None)
    with pytest.raises(AdapterError, match="refiner tensors"):
        load_adapter(str(d))
    d = make_adapter().save_pretrained(tmp_path / "b")
    _edit_tensor(d, "z", None)
    with pytest.raises(AdapterError, match="disagree"):
        load_adapter(str(d))


def test_projection_is_reproducible() -> None:
    a = projection_matrix(5, 12, 4, 0.1)
    b = projection_matrix(5, 12, 4, 0.1)
    np.testing.assert_array_equal(a, b)
    # numpy's PCG64 standard_normal stream is fixed across platforms: pin two values
    assert a.dtype == np.float32 and a.shape == (12, 4)
    np.testing.assert_allclose(projection_matrix(0, 1, 2, 1.0)[0], [0.12573022, -0.13210486], rtol=1e-6)


def test_class_names_must_be_a_json_list_of_strings(tmp_path: Path) -> None:
    make_adapter().save_pretrained(tmp_path / "ad")
    path = tmp_path / "ad" / CONFIG_FILE
    for bad in ("abcdefghij", ["cat", 3, "bird"], ["cat", "", "bird"], {"cat": 0}):
        cfg = json.loads(path.read_text())
        cfg["class_names"] = bad
        path.write_text(json.dumps(cfg))
        with pytest.raises(AdapterError, match="class_names must be a list of non-empty strings") as err:
            Adapter.from_pretrained(tmp_path / "ad")
        assert "\n" not in str(err.value)


def _hostile_projection_adapter(root: Path, n_ctx: int, ctx_dim: int, intrinsic_dim: int) -> Path:
    """A small adapter whose config and tensors agree on a huge projection n_ctx x ctx_dim x intrinsic_dim."""
    make_adapter(refiner=False).save_pretrained(root)
    cfg = json.loads((root / CONFIG_FILE).read_text())
    cfg["prompt"].update(n_ctx=n_ctx, ctx_dim=ctx_dim, intrinsic_dim=intrinsic_dim)
    (root / CONFIG_FILE).write_text(json.dumps(cfg))
    z = np.zeros(intrinsic_dim)
    save_file({"z": z, "prompt_offset": np.zeros((n_ctx, ctx_dim), np.float32)}, str(root / WEIGHTS_FILE))
    return root


def test_huge_projection_is_refused_on_load(tmp_path: Path) -> None:
    import tracemalloc

    root = _hostile_projection_adapter(tmp_path / "ad", 77, 2048, 4096)  # 6.5e8 elements: ~12 GB to regenerate
    assert (root / WEIGHTS_FILE).stat().st_size < 1_000_000
    tracemalloc.start()
    try:
        with pytest.raises(AdapterError, match="n_ctx x ctx_dim x intrinsic_dim .* exceeds the limit") as err:
            Adapter.from_pretrained(root)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "\n" not in str(err.value) and peak < 20_000_000
    with pytest.raises(AdapterError, match="exceeds the limit"):
        PromptSpec(n_ctx=77, ctx_dim=2048, intrinsic_dim=4096, seed=0, std=0.1)
    PromptSpec(n_ctx=16, ctx_dim=1280, intrinsic_dim=1000, seed=0, std=0.1)  # the largest real towers still load


def test_inspect_regenerates_no_projection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import craft_sdk.adapter.format as adapter_mod
    from craft_sdk.cli import app

    make_adapter().save_pretrained(tmp_path / "ad")

    def forbidden(*args: object) -> None:
        raise AssertionError("inspect regenerated the projection")

    monkeypatch.setattr(adapter_mod, "projection_matrix", forbidden)
    res = CliRunner().invoke(app, ["inspect", str(tmp_path / "ad"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["prompt"]["intrinsic_dim"] == 6
