"""The ONNX Runtime refiner: runs an exported ``refiner.onnx`` and checks it against its adapter.

The graph and its names are described in :mod:`craft_sdk.adapter.export`, which writes it. This half needs
only ``onnxruntime`` (a base dependency) and treats the adapter as a value (its fingerprint, classes,
weights, temperature and numpy refiner), so the format's ``push_to_hub`` can refuse a stale
``refiner.onnx`` without depending on the exporter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AdapterError, require
from ..scores import softmax
from .files import ONNX_FILE

INPUT_NAME = "logits"
OUTPUT_NAME = "refined_logits"
PROBS_NAME = "probabilities"
TEMPERATURE_NAME = "calibration.temperature"
META_FINGERPRINT = "craft_sdk.adapter_fingerprint"
META_CLASSES = "craft_sdk.class_names"
META_MODEL_ID = "craft_sdk.model_id"
META_INPUT = "craft_sdk.input"
META_VERSION = "craft_sdk.version"
# ONNX Runtime, numpy and torch refiners agree within |a - b| <= ATOL + RTOL * max|b| of each row
# (refiners_agree): float32 rounding on logits ~100 in size reaches 2e-5 absolute, ~1e-7 relative, and an
# entry near 0 in such a row can differ by ~1e-4, which an entry-wise relative tolerance would flag
RTOL = 1e-5
ATOL = 1e-5


class OnnxRefiner:
    """Runs an exported ``refiner.onnx`` with ONNX Runtime, checked against its adapter.

    Args:
        path: the ``.onnx`` file.
        adapter: the adapter it must have been exported from (fingerprint and classes are compared).
        threads: ONNX Runtime intra-op threads (1 is fastest for this small MLP; 0 = all cores).

    Raises:
        AdapterError: the file is missing, unreadable, or belongs to another adapter.

    Example:
        >>> refiner = OnnxRefiner("my-adapter/refiner.onnx", load_adapter("my-adapter"))  # doctest: +SKIP
        >>> refiner(logits).shape                                                        # doctest: +SKIP
        (8, 10)
    """

    def __init__(self, path: str | Path, adapter: Any, threads: int = 1) -> None:
        self.path = Path(path)
        command = (
            f"craft-sdk export-onnx {self.path.parent}"
            if self.path.name == ONNX_FILE
            else f"craft-sdk export-onnx ADAPTER -o {self.path}"
        )
        fix = f"re-export it with: {command}"
        if not self.path.is_file():
            raise AdapterError(f"{self.path} is missing; export it with: {command}")
        self.session = _session(self.path, threads, fix)
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        found, expected = meta.get(META_FINGERPRINT), adapter.fingerprint()
        if found != expected:
            raise AdapterError(
                f"{self.path} was exported from another adapter (fingerprint {str(found)[:12]}, adapter {expected[:12]}); {fix}"
            )
        if meta.get(META_CLASSES) != json.dumps(list(adapter.config.class_names)):
            raise AdapterError(f"{self.path} has a different class list than its adapter; {fix}")
        inputs = self.session.get_inputs()
        if [i.name for i in inputs] != [INPUT_NAME] or inputs[0].shape[-1] != adapter.n_classes:
            raise AdapterError(f"{self.path} does not take logits [batch, {adapter.n_classes}]; {fix}")
        self._check_weights(adapter, fix)

    def _check_weights(self, adapter: Any, fix: str) -> None:
        """Refuse a graph whose weights are not the adapter's (a copied fingerprint proves nothing).

        With the ``onnx`` package the initialisers are compared exactly; always, the graph is run on
        probe logits (fresh random ones each load) and must agree with the numpy refiner.
        """
        expected = {k: np.asarray(v, np.float32) for k, v in (adapter.refiner or {}).items()}
        found = _initializers(self.path)
        self.has_probabilities = PROBS_NAME in [o.name for o in self.session.get_outputs()]
        if self.has_probabilities or adapter.temperature != 1.0:  # graphs exported before calibration have neither
            expected[TEMPERATURE_NAME] = np.asarray([adapter.temperature], np.float32)
        if found is not None and (
            set(found) != set(expected) or any(not np.array_equal(found[k], expected[k]) for k in expected)
        ):
            raise AdapterError(f"{self.path} holds refiner weights that are not its adapter's; {fix}")
        rng = np.random.default_rng()
        c = adapter.n_classes
        probe = np.concatenate([np.zeros((1, c)), 30.0 * np.eye(c), rng.normal(0.0, 30.0, (16, c))]).astype(np.float32)
        if not refiners_agree(self(probe), adapter.refine(probe)):
            raise AdapterError(f"{self.path} computes something other than its adapter's refiner; {fix}")

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """Refined logits [N, C] float32 from black-box logits [N, C]."""
        x = np.ascontiguousarray(logits, dtype=np.float32)
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities [N, C] (softmax of refined logits / the adapter's temperature)."""
        x = np.ascontiguousarray(logits, dtype=np.float32)
        if not self.has_probabilities:  # a graph exported before calibration (temperature 1, checked at load)
            return softmax(self(x))
        return self.session.run([PROBS_NAME], {INPUT_NAME: x})[0]


def refiners_agree(got: np.ndarray, want: np.ndarray) -> bool:
    """Whether two refiners' outputs [N, C] agree: |got − want| ≤ ATOL + RTOL · max|want| of the row.

    float32 rounding scales with a row's largest value, not with each entry (an entry near 0 in a row
    of values in the hundreds differs by ~1e-4 between ONNX Runtime and numpy), so the tolerance is
    relative to the row.
    """
    scale = np.abs(want).max(axis=-1, keepdims=True)
    return bool((np.abs(np.asarray(got) - want) <= ATOL + RTOL * scale).all())


def _initializers(path: Path) -> dict[str, np.ndarray] | None:
    """The graph's initialisers by name, or None without the ``onnx`` package (deploy installs)."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        return None
    try:
        model = onnx.load(str(path), load_external_data=False)
        return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    except Exception as exc:  # onnx raises protobuf's untyped errors for odd files
        raise AdapterError(f"{path} has unreadable initialisers ({exc.__class__.__name__}); re-export it") from None


def _session(path: Path, threads: int, fix: str) -> Any:
    ort = require("onnxruntime", None, "running refiner.onnx")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors for corrupt files
        msg = str(exc).splitlines()[0][:200] if str(exc) else exc.__class__.__name__
        raise AdapterError(f"{path} is not a loadable ONNX model ({msg}); {fix}") from None
