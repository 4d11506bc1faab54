"""ONNX export of the refiner: graph checks, agreement with the torch Refiner, metadata, atomic writes, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from craft_sdk import Adapter, AdapterConfig, AdapterError, export_onnx, mlp
from craft_sdk.adapter import ONNX_FILE, RefinerSpec
from craft_sdk.adapter.export import ATOL, META_CLASSES, META_FINGERPRINT, OPSET, RTOL, OnnxRefiner, build_refiner_model
from craft_sdk.cli import app

onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")

from conftest import CLASS_NAMES, random_images  # noqa: E402

from craft_sdk.tuner.refiner import Refiner  # noqa: E402


def refiner_adapter(n_classes: int = 6, layers: int = 3, hidden: int = 32, residual: bool = True, seed: int = 0) -> Adapter:
    names = CLASS_NAMES[:n_classes] if n_classes <= len(CLASS_NAMES) else tuple(f"class {i}" for i in range(n_classes))
    weights = mlp.init_weights(n_classes, hidden, layers, residual=False, seed=seed)  # non-zero last layer
    cfg = AdapterConfig("m/1", names, "a photo of a", refiner=RefinerSpec(layers, hidden, residual))
    return Adapter(cfg, refiner=weights)


def torch_refine(adapter: Adapter, logits: np.ndarray) -> np.ndarray:
    assert adapter.refiner is not None and adapter.config.refiner is not None
    with torch.no_grad():
        return Refiner(adapter.refiner, adapter.config.refiner.residual)(torch.from_numpy(logits)).numpy()


@pytest.mark.parametrize("layers, residual, n_classes", [(3, True, 6), (3, False, 6), (1, True, 2), (2, True, 6)])
def test_onnx_matches_torch_on_random_logits(tmp_path: Path, layers: int, residual: bool, n_classes: int) -> None:
    adapter = refiner_adapter(n_classes, layers, residual=residual)
    path = export_onnx(adapter, tmp_path / "r.onnx")
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    ort_refiner = OnnxRefiner(path, adapter)
    rng = np.random.default_rng(1)
    for batch in (1, 7, 300):  # dynamic batch axis
        x = rng.normal(0, 10, (batch, n_classes)).astype(np.float32)
        np.testing.assert_allclose(ort_refiner(x), torch_refine(adapter, x), rtol=RTOL, atol=ATOL)


def test_onnx_matches_torch_on_real_logits(tmp_path: Path, tiny_client) -> None:  # type: ignore[no-untyped-def]
    adapter = refiner_adapter(6, 3, hidden=64)
    logits = tiny_client.predict(random_images(40, seed=3), list(adapter.config.class_names), "a photo of a")
    assert logits.shape == (40, 6) and np.ptp(logits) > 1.0  # real, non-degenerate black-box logits
    ort_refiner = OnnxRefiner(export_onnx(adapter, tmp_path / "r.onnx"), adapter)
    np.testing.assert_allclose(ort_refiner(logits), torch_refine(adapter, logits), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(adapter.refine(logits), torch_refine(adapter, logits), rtol=RTOL, atol=ATOL)


def test_agreement_is_relative_on_large_logits(tmp_path: Path) -> None:
    """Logits of a few hundred (CLIP scale 100 plus an offset the centring removes) are rounded to
    float32 steps of ~3e-5, so only a relative tolerance can hold: |a - b| <= ATOL + RTOL |b|."""
    adapter = refiner_adapter(10, 3, hidden=64)
    rng = np.random.default_rng(4)
    logits = (250.0 + 100.0 * (0.25 + 0.05 * rng.standard_normal((200, 10)))).astype(np.float32)
    ort = OnnxRefiner(export_onnx(adapter, tmp_path / "r.onnx"), adapter)(logits)
    ref = torch_refine(adapter, logits)
    for got in (ort, adapter.refine(logits)):
        np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)
        assert np.max(np.abs(got - ref) / np.abs(ref)) < 1e-6  # a few float32 ulps
    assert (RTOL, ATOL) == (1e-5, 1e-5)  # the numbers README.md states


def _forged_onnx(tmp_path: Path) -> tuple[Adapter, Path]:
    """Adapter a, and an ONNX file holding adapter b's weights with a's fingerprint copied into it."""
    from onnx import helper

    a, b = refiner_adapter(seed=0), refiner_adapter(seed=1)
    model = build_refiner_model(b)
    helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, META_FINGERPRINT: a.fingerprint()})
    forged = tmp_path / "forged.onnx"
    forged.write_bytes(model.SerializeToString())
    return a, forged


def test_foreign_weights_with_a_copied_fingerprint_are_refused(tmp_path: Path) -> None:
    a, forged = _forged_onnx(tmp_path)
    with pytest.raises(AdapterError, match="weights that are not its adapter's.*re-export"):
        OnnxRefiner(forged, a)
    OnnxRefiner(export_onnx(a, tmp_path / "a.onnx"), a)  # the genuine export loads


def test_foreign_weights_are_refused_without_the_onnx_package(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    import craft_sdk.adapter.runtime as export_mod

    a, forged = _forged_onnx(tmp_path)
    monkeypatch.setattr(export_mod, "_initializers", lambda path: None)  # a deploy install: onnxruntime only
    with pytest.raises(AdapterError, match="computes something other than its adapter's refiner"):
        OnnxRefiner(forged, a)
    OnnxRefiner(export_onnx(a, tmp_path / "a.onnx"), a)


def test_torch_2_14_exporter_agrees_with_our_graph(tmp_path: Path) -> None:
    """torch's own (dynamo) exporter also handles the training-time Refiner, and the graph it writes
    computes what ours does; we ship ours because it needs no torch and is byte-deterministic."""
    adapter = refiner_adapter(10, 3, hidden=64)
    assert adapter.refiner is not None and adapter.config.refiner is not None
    module = Refiner(adapter.refiner, adapter.config.refiner.residual).eval()
    x = torch.zeros(4, 10)
    torch_path = tmp_path / "torch.onnx"
    torch.onnx.export(
        module, (x,), str(torch_path), dynamo=True, input_names=["logits"], output_names=["refined_logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )
    import onnxruntime as ort

    session = ort.InferenceSession(str(torch_path), providers=["CPUExecutionProvider"])
    logits = np.random.default_rng(2).normal(0, 10, (33, 10)).astype(np.float32)
    theirs = session.run(None, {session.get_inputs()[0].name: logits})[0]
    ours = OnnxRefiner(export_onnx(adapter, tmp_path / "ours.onnx"), adapter)(logits)
    np.testing.assert_allclose(theirs, ours, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(theirs, torch_refine(adapter, logits), rtol=RTOL, atol=ATOL)


def test_graph_interface_and_metadata(tmp_path: Path) -> None:
    adapter = refiner_adapter()
    model = onnx.load(str(export_onnx(adapter, tmp_path / "r.onnx")))
    assert [(o.domain, o.version) for o in model.opset_import] == [("", OPSET)]
    (inp,), (out, probs) = model.graph.input, model.graph.output
    assert inp.name == "logits" and out.name == "refined_logits" and probs.name == "probabilities"
    for v in (inp, out, probs):
        dims = v.type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch" and dims[1].dim_value == 6
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["ReduceMean", "Sub", "Gemm", "Relu", "Gemm", "Relu", "Gemm", "Add", "Div", "Softmax"]  # centring; calibrated softmax
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta[META_FINGERPRINT] == adapter.fingerprint()
    assert json.loads(meta[META_CLASSES]) == list(adapter.config.class_names)
    # deterministic: exporting twice gives the same bytes
    assert (tmp_path / "r.onnx").read_bytes() == export_onnx(adapter, tmp_path / "r2.onnx").read_bytes()


def test_adapter_without_refiner_exports_identity(tmp_path: Path) -> None:
    adapter = Adapter(AdapterConfig("m/1", ("a", "b", "c"), "a photo of a"))
    ort_refiner = OnnxRefiner(export_onnx(adapter, tmp_path / "r.onnx"), adapter)
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    np.testing.assert_array_equal(ort_refiner(x), x)


def test_mismatched_pair_is_detected(tmp_path: Path) -> None:
    a, b = refiner_adapter(seed=0), refiner_adapter(seed=1)
    a.save_pretrained(tmp_path / "a")
    export_onnx(tmp_path / "a")
    with pytest.raises(AdapterError, match="another adapter.*re-export it with: craft-sdk export-onnx"):
        OnnxRefiner(tmp_path / "a" / ONNX_FILE, b)
    # re-saving the adapter drops its now-stale refiner.onnx
    b.save_pretrained(tmp_path / "a")
    assert not (tmp_path / "a" / ONNX_FILE).exists()


def test_corrupt_or_missing_file(tmp_path: Path) -> None:
    adapter = refiner_adapter()
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(AdapterError, match="not a loadable ONNX model.*re-export"):
        OnnxRefiner(tmp_path / "bad.onnx", adapter)
    with pytest.raises(AdapterError, match="missing"):
        OnnxRefiner(tmp_path / "nowhere.onnx", adapter)


def test_export_is_atomic_and_validates_paths(tmp_path: Path) -> None:
    adapter = refiner_adapter()
    target = tmp_path / "out" / "r.onnx"
    target.parent.mkdir()
    target.write_bytes(b"old")
    export_onnx(adapter, target)
    assert onnx.load(str(target)).graph.name == "craft_refiner"
    with pytest.raises(AdapterError, match="is a directory"):
        export_onnx(adapter, tmp_path / "out")
    with pytest.raises(AdapterError, match="pass path="):
        export_onnx(adapter)
    assert sorted(p.name for p in target.parent.iterdir()) == ["r.onnx"]  # no temp leftovers


def test_export_without_onnx_package_names_the_fix(tmp_path: Path) -> None:
    refiner_adapter().save_pretrained(tmp_path / "ad")
    code = f"import sys; sys.modules['onnx'] = None\nfrom craft_sdk import export_onnx\nexport_onnx({str(tmp_path / 'ad')!r})\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode != 0 and "pip install onnx" in out.stderr


def test_build_model_is_checked() -> None:
    model = build_refiner_model(refiner_adapter(n_classes=3, hidden=8))
    assert model.ir_version == 8 and model.producer_name == "craft-sdk"


def test_cli_export_onnx(tmp_path: Path) -> None:
    adapter = refiner_adapter()
    adapter.save_pretrained(tmp_path / "ad")
    res = CliRunner().invoke(app, ["export-onnx", str(tmp_path / "ad"), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["onnx"] == str(tmp_path / "ad" / ONNX_FILE) and info["opset"] == OPSET
    assert info["bytes"] == (tmp_path / "ad" / ONNX_FILE).stat().st_size
    res = CliRunner().invoke(app, ["export-onnx", str(tmp_path / "ad"), "-o", str(tmp_path / "x.onnx")])
    assert res.exit_code == 0 and (tmp_path / "x.onnx").is_file()
    res = CliRunner().invoke(app, ["export-onnx", str(tmp_path / "nowhere")])
    assert res.exit_code == 1 and "missing" in res.output  # an adapter error: runtime


@pytest.mark.parametrize("temperature", [None, 0.37, 2.5])
def test_calibrated_probabilities_agree_across_backends(tmp_path: Path, temperature: float | None) -> None:
    """predict_proba's numbers: ONNX ``probabilities`` output == numpy softmax(refined / T) == torch."""
    from dataclasses import replace

    from craft_sdk.adapter import CalibrationSpec

    base = refiner_adapter(6, 3, hidden=32)
    cal = None if temperature is None else CalibrationSpec(temperature)
    adapter = Adapter(replace(base.config, calibration=cal), refiner=base.refiner)
    assert adapter.temperature == (temperature or 1.0)
    ort = OnnxRefiner(export_onnx(adapter, tmp_path / "r.onnx"), adapter)
    x = np.random.default_rng(2).normal(0, 10, (50, 6)).astype(np.float32)
    expected = torch.softmax(torch.from_numpy(torch_refine(adapter, x)) / (temperature or 1.0), -1).numpy()
    np.testing.assert_allclose(ort.probabilities(x), expected, rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(adapter.probabilities(adapter.refine(x)), expected, rtol=RTOL, atol=1e-6)
    assert np.allclose(ort.probabilities(x).sum(-1), 1.0, atol=1e-5)
    if temperature is not None:  # a saved adapter keeps its temperature
        adapter.save_pretrained(tmp_path / "ad")
        assert Adapter.from_pretrained(tmp_path / "ad").temperature == pytest.approx(temperature)


def test_a_graph_exported_before_calibration_still_loads(tmp_path: Path) -> None:
    """refiner.onnx files written before the probabilities output existed keep working at temperature 1."""
    from dataclasses import replace

    from craft_sdk.adapter import CalibrationSpec

    adapter = refiner_adapter(6, 2, hidden=16)
    model = build_refiner_model(adapter)
    del model.graph.node[-2:]  # Div, Softmax
    del model.graph.output[-1]
    keep = [i for i in model.graph.initializer if i.name != "calibration.temperature"]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    path = tmp_path / "old.onnx"
    path.write_bytes(model.SerializeToString())
    old = OnnxRefiner(path, adapter)
    x = np.random.default_rng(3).normal(0, 5, (7, 6)).astype(np.float32)
    np.testing.assert_allclose(old.probabilities(x), adapter.probabilities(adapter.refine(x)), rtol=RTOL, atol=1e-6)
    calibrated = Adapter(replace(adapter.config, calibration=CalibrationSpec(2.0)), refiner=adapter.refiner)
    with pytest.raises(AdapterError):  # the fingerprint differs anyway; a calibrated adapter needs a fresh export
        OnnxRefiner(path, calibrated)


def test_load_check_never_refuses_a_true_export_on_random_probes(tmp_path: Path) -> None:
    """OnnxRefiner's load-time probe compares row-scaled: the shipped digits refiner passes 300 random
    probe batches (entry-wise allclose refused ~6 % of them: the hub test flaked), a foreign one never does."""
    from craft_sdk.adapter.export import refiners_agree

    adapter = Adapter.from_pretrained(Path(__file__).resolve().parents[1] / "adapters" / "digits")
    ort = OnnxRefiner(export_onnx(adapter, tmp_path / "r.onnx"), adapter)
    foreign = refiner_adapter(adapter.n_classes, 3, hidden=32, seed=9)
    rng = np.random.default_rng(0)
    for _ in range(300):
        x = rng.normal(0.0, 30.0, (16, adapter.n_classes)).astype(np.float32)
        assert refiners_agree(ort(x), adapter.refine(x))
        assert not refiners_agree(foreign.refine(x), adapter.refine(x))
