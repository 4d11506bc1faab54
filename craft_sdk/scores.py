"""Score conversions shared by every layer (numpy only): log-scores, softmax, calibration.

A client returns either logits or probabilities (``Capabilities.output``); everything
downstream works on log-scores, so probabilities are turned into log-probabilities
once, here.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-12


def as_log_scores(scores: np.ndarray, output: str) -> np.ndarray:
    """float32 log-scores: ``log(p)`` for a ``"probs"`` client, the logits unchanged otherwise."""
    x = np.asarray(scores, dtype=np.float32)
    return np.log(np.clip(x, EPS, None)).astype(np.float32) if output == "probs" else x


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row softmax of ``logits / temperature`` in float32."""
    z = np.asarray(logits, dtype=np.float32) / np.float32(temperature)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)
