"""The refiner's weights and forward pass in numpy (no torch): shared by training and deployment.

refined = x + g(x - mean(x)) with residual, g(x - mean(x)) without; g is a stack of
``layers`` linear maps with ReLU between them. Rows are centred first: logits are
shift-invariant under softmax, and centring keeps the MLP's inputs small.
Tensor names: ``refiner.{i}.weight`` [out, in] and ``refiner.{i}.bias`` [out].
"""

from __future__ import annotations

from typing import Any

import numpy as np

PREFIX = "refiner."
INPUT_RMS = 3.0  # the spread the refiner's defaults were chosen for (the demo VLM at its own scale: 2.2-3.2);
# a client whose logit scale is arbitrary has its logits brought to it (craft_sdk.tuner.refiner)


def input_rms_for(caps: Any) -> float | None:
    """:data:`INPUT_RMS` for a client whose logit scale is arbitrary (``Capabilities.scale_arbitrary``), else None."""
    return INPUT_RMS if getattr(caps, "scale_arbitrary", False) else None


def input_temperature(logits: np.ndarray, target_rms: float | None) -> float:
    """The temperature ``T`` that brings the row-centred logits' RMS to ``target_rms`` (1.0 without a target,
    or for constant logits). Equivariant: ``input_temperature(k * x, r) == k * input_temperature(x, r)``."""
    if target_rms is None:
        return 1.0
    x = np.asarray(logits, dtype=np.float64)
    h = x - x.mean(axis=-1, keepdims=True)
    rms = float(np.sqrt((h**2).mean())) if h.size else 0.0
    return rms / target_rms if rms > 0 else 1.0


def layer_dims(n_classes: int, hidden: int, layers: int) -> list[tuple[int, int]]:
    """(in, out) of each linear layer."""
    dims = [n_classes] + [hidden] * (layers - 1) + [n_classes]
    return list(zip(dims[:-1], dims[1:]))


def init_weights(n_classes: int, hidden: int, layers: int, residual: bool, seed: int) -> dict[str, np.ndarray]:
    """PyTorch-default uniform init from a seeded PCG64; the last layer is zero when residual
    (so training starts exactly at the black box's output)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    weights: dict[str, np.ndarray] = {}
    dims = layer_dims(n_classes, hidden, layers)
    for i, (fan_in, fan_out) in enumerate(dims):
        bound = 1.0 / np.sqrt(fan_in)
        w = rng.uniform(-bound, bound, (fan_out, fan_in))
        b = rng.uniform(-bound, bound, fan_out)
        if residual and i == len(dims) - 1:
            w, b = np.zeros_like(w), np.zeros_like(b)
        weights[f"{PREFIX}{i}.weight"] = w.astype(np.float32)
        weights[f"{PREFIX}{i}.bias"] = b.astype(np.float32)
    return weights


def n_layers(weights: dict[str, np.ndarray]) -> int:
    """Number of linear layers in a refiner weight dict."""
    return sum(1 for k in weights if k.startswith(PREFIX) and k.endswith(".weight"))


def forward(weights: dict[str, np.ndarray], logits: np.ndarray, residual: bool) -> np.ndarray:
    """Refined logits [..., C] from black-box logits [..., C] (float32)."""
    x = np.asarray(logits, dtype=np.float32)
    h = x - x.mean(axis=-1, keepdims=True)
    n = n_layers(weights)
    for i in range(n):
        h = h @ weights[f"{PREFIX}{i}.weight"].T + weights[f"{PREFIX}{i}.bias"]
        if i < n - 1:
            h = np.maximum(h, 0.0)
    return (x + h if residual else h).astype(np.float32)
