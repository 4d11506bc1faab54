"""Prediction refinement (PR) in torch: the residual MLP, its losses and AdamW training.

**A black box whose logit scale is arbitrary** (``Capabilities.scale_arbitrary``: an embedding API's
``scale x cosine`` at the scale the client chose, not the model's) gets a standardised refiner: before
its first training step the trainer takes the temperature ``T`` that brings the centred logits' RMS to
:data:`~craft_sdk.mlp.INPUT_RMS` (:func:`~craft_sdk.mlp.input_temperature`), trains ``g`` on ``x / T`` with the losses at that
temperature, and folds ``T`` into the deployed weights exactly (``x + T g'((x - mean) / T)`` is an MLP
with the same matrices and the biases times ``T``), so the adapter format and its numpy/ONNX twins are
unchanged. Logits ``k x`` then train the same refiner as ``x`` for any ``k > 0``. Other black boxes
(their own scale: in-process models, chat log-probabilities, probabilities) train at ``T = 1``, as before.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import mlp


class Refiner(nn.Module):
    """refined = logits + g(logits − mean) (see :mod:`craft_sdk.mlp` for the numpy twin).

    Args:
        weights: initial weights by name (``refiner.{i}.weight`` / ``.bias``).
        residual: add the black-box logits back.
    """

    def __init__(self, weights: dict[str, np.ndarray], residual: bool = True) -> None:
        super().__init__()
        self.residual = residual
        self.temperature = 1.0  # the input's fitted temperature T (see the module docstring)
        n = mlp.n_layers(weights)
        self.layers: list[nn.Linear] = nn.ModuleList()  # type: ignore[assignment]
        for i in range(n):
            w = torch.from_numpy(weights[f"{mlp.PREFIX}{i}.weight"].copy())
            lin = nn.Linear(w.shape[1], w.shape[0])
            with torch.no_grad():
                lin.weight.copy_(w)
                lin.bias.copy_(torch.from_numpy(weights[f"{mlp.PREFIX}{i}.bias"].copy()))
            self.layers.append(lin)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        h = (logits - logits.mean(dim=-1, keepdim=True)) / self.temperature
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = F.relu(h)
        h = h * self.temperature
        return logits + h if self.residual else h

    def raw_weights(self) -> dict[str, np.ndarray]:
        """The trained parameters as they are (the temperature not folded in): what a checkpoint keeps."""
        out = {}
        for i, layer in enumerate(self.layers):
            out[f"{mlp.PREFIX}{i}.weight"] = layer.weight.detach().cpu().numpy().astype(np.float32).copy()
            out[f"{mlp.PREFIX}{i}.bias"] = layer.bias.detach().cpu().numpy().astype(np.float32).copy()
        return out

    def numpy_weights(self) -> dict[str, np.ndarray]:
        """Deployable weights (the temperature folded in: biases x T) as contiguous float32 arrays, by stable name."""
        out = {}
        for i, layer in enumerate(self.layers):
            out[f"{mlp.PREFIX}{i}.weight"] = layer.weight.detach().cpu().numpy().astype(np.float32).copy()
            out[f"{mlp.PREFIX}{i}.bias"] = (layer.bias.detach().cpu().numpy() * self.temperature).astype(np.float32)
        return out


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p) ‖ softmax(q)) per row (last axis is classes)."""
    log_p = F.log_softmax(p_logits, dim=-1)
    return (log_p.exp() * (log_p - F.log_softmax(q_logits, dim=-1))).sum(-1)


def fitness(logits: np.ndarray, labels: np.ndarray, refiner: Refiner | None, lam: float) -> np.ndarray:
    """CMA-ES fitness per candidate (paper eq. 5), float64 [P].

    CE(f(x; p), y) + λ · KL(softmax(f + g(f)) ‖ softmax(f)), with the refiner g frozen.
    """
    f = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
    y = torch.from_numpy(labels).expand(f.shape[0], -1)
    with torch.no_grad():
        loss = F.cross_entropy(f.transpose(1, 2), y, reduction="none").mean(-1)
        if refiner is not None and lam > 0:
            loss = loss + lam * kl(refiner(f), f).mean(-1)
    return loss.double().numpy()


class RefinerTrainer:
    """AdamW training of the refiner on black-box logits (paper eq. 6).

    Loss: CE(f + g(f), y) + β · KL(softmax(f) ‖ softmax(f + g(f))).

    Args:
        weights: initial weights (from :func:`craft_sdk.mlp.init_weights`).
        residual, lr, weight_decay, batch_size: see :class:`~craft_sdk.tuner.config.TuneConfig`.
        seed: seed of the mini-batch order.
        input_rms: standardise the input to this spread (:func:`~craft_sdk.mlp.input_rms_for`; None: train at T = 1).
    """

    def __init__(
        self, weights: dict[str, np.ndarray], residual: bool, lr: float, weight_decay: float, batch_size: int, seed: int,
        input_rms: float | None = None,
    ) -> None:
        self.model = Refiner(weights, residual)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=weight_decay)
        self.batch_size = batch_size
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.input_rms = input_rms
        self.fitted = False  # the input temperature is set on the first training data, then kept

    def train(self, logits: np.ndarray, labels: np.ndarray, beta: float, epochs: int) -> float:
        """Run ``epochs`` epochs over (logits [N, C], labels [N]); returns the mean loss of the last epoch."""
        if not self.fitted:
            self.model.temperature, self.fitted = mlp.input_temperature(logits, self.input_rms), True
        t = self.model.temperature
        f = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
        y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.model.train()
        last = float("nan")
        for _ in range(epochs):
            order = torch.from_numpy(self.rng.permutation(len(y)))
            total = 0.0
            for start in range(0, len(y), self.batch_size):
                idx = order[start : start + self.batch_size]
                refined = self.model(f[idx]) / t  # the losses at the fitted temperature
                loss = F.cross_entropy(refined, y[idx])
                if beta > 0:
                    loss = loss + beta * kl(f[idx] / t, refined).mean()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                total += float(loss.detach()) * len(idx)
            last = total / len(y)
        self.model.eval()
        return last

    def refine(self, logits: np.ndarray) -> np.ndarray:
        """Refined logits for black-box logits [..., C]."""
        with torch.no_grad():
            return self.model(torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))).numpy()

    # -- state for checkpoints: tensors by name + JSON-able extras

    def state_tensors(self) -> dict[str, np.ndarray]:
        """Weights (unfolded: see :meth:`state_json`'s temperature) and AdamW moments as numpy arrays by stable name."""
        out = self.model.raw_weights()
        for i, p in enumerate(self.model.parameters()):
            st = self.optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq", "step"):
                if key in st:
                    out[f"adamw.{i}.{key}"] = np.asarray(st[key].detach().cpu().numpy(), dtype=np.float32).copy()
        return out

    def state_json(self) -> dict[str, Any]:
        """The mini-batch RNG state and the input temperature (None before the first training step)."""
        return {"rng": self.rng.bit_generator.state, "input_temperature": self.model.temperature if self.fitted else None}

    def load_state(self, tensors: dict[str, np.ndarray], extras: dict[str, Any]) -> None:
        """Restore what :meth:`state_tensors` / :meth:`state_json` saved (a state written before the input
        temperature existed was trained at T = 1 and keeps it)."""
        t = extras.get("input_temperature")
        self.fitted = t is not None or "input_temperature" not in extras
        self.model.temperature = float(t) if t is not None else 1.0
        for i, layer in enumerate(self.model.layers):
            with torch.no_grad():
                layer.weight.copy_(torch.from_numpy(tensors[f"{mlp.PREFIX}{i}.weight"].copy()))
                layer.bias.copy_(torch.from_numpy(tensors[f"{mlp.PREFIX}{i}.bias"].copy()))
        for i, p in enumerate(self.model.parameters()):
            if f"adamw.{i}.exp_avg" in tensors:
                self.optimizer.state[p] = {
                    key: torch.from_numpy(tensors[f"adamw.{i}.{key}"].copy()) for key in ("exp_avg", "exp_avg_sq", "step")
                }
        self.rng.bit_generator.state = extras["rng"]
