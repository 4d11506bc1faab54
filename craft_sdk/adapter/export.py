"""ONNX export of the refiner, and the ONNX Runtime refiner that deploys it.

The exported graph is the refiner alone, the same math as :mod:`craft_sdk.mlp`::

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
names and model id; :class:`~craft_sdk.adapter.runtime.OnnxRefiner` (the runtime half) refuses a file whose fingerprint differs
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

from .. import mlp
from .._fileio import write_bytes_atomic
from .._version import __version__
from ..errors import AdapterError, require
from .files import ONNX_FILE
from .format import Adapter
from .runtime import (  # noqa: F401 - OnnxRefiner, refiners_agree and the names re-exported (craft_sdk.adapter.export)
    ATOL,
    INPUT_NAME,
    META_CLASSES,
    META_FINGERPRINT,
    META_INPUT,
    META_MODEL_ID,
    META_VERSION,
    OUTPUT_NAME,
    PROBS_NAME,
    RTOL,
    TEMPERATURE_NAME,
    OnnxRefiner,
    refiners_agree,
)

logger = logging.getLogger(__name__)

OPSET = 17
IR_VERSION = 8


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
