"""ONNX export of the refiner, and the ONNX Runtime refiner that deploys it.

The exported graph is the refiner alone, the same math as :mod:`craft_sdk.tuner.mlp`::

    logits [batch, C] ──► h = logits − mean(logits, axis=-1)        (row-mean centring)
                          h = Gemm(h, W_i, b_i) + ReLU …  Gemm(h, W_last, b_last)
                          refined_logits = logits + h                 (residual adapters)

Input ``logits`` is what the black box returned (log-probabilities when the client
returns probabilities: take ``log`` before feeding the graph); outputs
``refined_logits`` and ``probabilities`` = softmax(refined_logits / T), T being the
adapter's calibration temperature (initialiser ``calibration.temperature``; 1 for an
uncalibrated adapter), the same numbers ``CraftClassifier.predict_proba`` returns. The
batch axis is dynamic. The graph is built directly with ``onnx.helper`` from the
safetensors weights (no torch involved), opset :data:`OPSET`, IR version 8, so
any ONNX Runtime ≥ 1.14 loads it. torch 2.14's own exporter
(``torch.onnx.export(Refiner(...), ..., dynamo=True)``, which needs ``onnxscript``,
in the ``[train]`` extra) also exports the training-time refiner, and its graph
agrees with this one within :data:`RTOL` / :data:`ATOL` (tested); this one is kept because it needs no
torch, exports in milliseconds instead of ~15 s, and is byte-deterministic.

Metadata properties (``craft_sdk.*``) carry the adapter's fingerprint, class
names and model id; :class:`OnnxRefiner` refuses a file whose fingerprint differs
from the adapter it is paired with. Exporting needs the ``onnx`` package
(``pip install onnx``, part of the ``[train]`` extra); running needs only
``onnxruntime`` (a base dependency).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ._fileio import write_bytes_atomic
from ._version import __version__
from .adapter import ONNX_FILE, Adapter
from .errors import AdapterError, require
from .scores import softmax
from .tuner import mlp

logger = logging.getLogger(__name__)

OPSET = 17
IR_VERSION = 8
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


def _import_onnx() -> Any:
    return require("onnx", "train", "exporting ONNX")


def _resolve(adapter: Adapter | str | Path, path: str | Path | None) -> tuple[Adapter, Path]:
    if isinstance(adapter, Adapter):
        if path is None:
            raise AdapterError("an Adapter object has no directory; pass path= to export_onnx")
        return adapter, Path(path)
    root = Path(adapter)
    return Adapter.from_pretrained(root), Path(path) if path is not None else root / ONNX_FILE


def build_refiner_model(adapter: Adapter) -> Any:
    """The refiner of ``adapter`` as an ``onnx.ModelProto`` (see the module docstring for the graph).

    Args:
        adapter: the adapter; one without a refiner exports an Identity graph.

    Returns:
        A checked ``onnx.ModelProto`` with input ``logits`` [batch, C] and output
        ``refined_logits`` [batch, C], float32.

    Example:
        >>> model = build_refiner_model(load_adapter("my-adapter"))  # doctest: +SKIP
        >>> [i.name for i in model.graph.input]                      # doctest: +SKIP
        ['logits']
    """
    onnx = _import_onnx()
    from onnx import TensorProto, helper, numpy_helper

    c = adapter.n_classes
    nodes, inits = [], []
    if adapter.refiner is None or adapter.config.refiner is None:
        nodes.append(helper.make_node("Identity", [INPUT_NAME], [OUTPUT_NAME]))
    else:
        nodes.append(helper.make_node("ReduceMean", [INPUT_NAME], ["row_mean"], axes=[-1], keepdims=1))
        nodes.append(helper.make_node("Sub", [INPUT_NAME, "row_mean"], ["h0"]))
        n = mlp.n_layers(adapter.refiner)
        last = "h0"
        for i in range(n):
            w, b = f"{mlp.PREFIX}{i}.weight", f"{mlp.PREFIX}{i}.bias"
            inits += [numpy_helper.from_array(np.ascontiguousarray(adapter.refiner[k], np.float32), k) for k in (w, b)]
            out = f"linear{i}"
            nodes.append(helper.make_node("Gemm", [last, w, b], [out], transB=1))
            last = out
            if i < n - 1:
                nodes.append(helper.make_node("Relu", [out], [f"relu{i}"]))
                last = f"relu{i}"
        if adapter.config.refiner.residual:
            nodes.append(helper.make_node("Add", [INPUT_NAME, last], [OUTPUT_NAME]))
        else:
            nodes.append(helper.make_node("Identity", [last], [OUTPUT_NAME]))
    temperature = np.asarray([adapter.temperature], np.float32)
    inits.append(numpy_helper.from_array(temperature, TEMPERATURE_NAME))
    nodes.append(helper.make_node("Div", [OUTPUT_NAME, TEMPERATURE_NAME], ["scaled_logits"]))
    nodes.append(helper.make_node("Softmax", ["scaled_logits"], [PROBS_NAME], axis=-1))
    graph = helper.make_graph(
        nodes,
        "craft_refiner",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", c])],
        [
            helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", c]),
            helper.make_tensor_value_info(PROBS_NAME, TensorProto.FLOAT, ["batch", c]),
        ],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="craft-sdk",
        producer_version=__version__,
        doc_string="CraFT refiner: black-box logits in; refined logits and calibrated probabilities out.",
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(model, _metadata(adapter))
    onnx.checker.check_model(model, full_check=True)
    return model


def _metadata(adapter: Adapter) -> dict[str, str]:
    cfg = adapter.config
    return {
        META_FINGERPRINT: adapter.fingerprint(),
        META_CLASSES: json.dumps(list(cfg.class_names)),
        META_MODEL_ID: cfg.model_id,
        META_INPUT: "log-probs" if cfg.output == "probs" else "logits",
        META_VERSION: __version__,
    }


def export_onnx(adapter: Adapter | str | Path, path: str | Path | None = None) -> Path:
    """Export an adapter's refiner to ONNX, atomically (temp file, then rename).

    Args:
        adapter: an adapter directory, or an :class:`~craft_sdk.Adapter` (then ``path`` is required).
        path: output file; default ``ADAPTER/refiner.onnx``, where
            :meth:`CraftClassifier.from_pretrained <craft_sdk.CraftClassifier.from_pretrained>` finds it.

    Returns:
        The path written.

    Example:
        >>> export_onnx("my-adapter")  # doctest: +SKIP
        PosixPath('my-adapter/refiner.onnx')
    """
    obj, target = _resolve(adapter, path)
    data = build_refiner_model(obj).SerializeToString()
    if target.is_dir():
        raise AdapterError(f"{target} is a directory; pass a file path such as {target / ONNX_FILE}")
    write_bytes_atomic(target, data)
    logger.info("exported refiner (%d bytes, opset %d) to %s", len(data), OPSET, target)
    return target


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

    def __init__(self, path: str | Path, adapter: Adapter, threads: int = 1) -> None:
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

    def _check_weights(self, adapter: Adapter, fix: str) -> None:
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
