"""Query-free model selection and calibration for the robust protocol.

Everything here works on logits the run has already paid for; nothing queries the
black box (the ledger proves it in a test).

* **Held-out images.** The prompt is searched on the *fit* part of the training set;
  the *check* part (the user's validation split when given, else a seeded
  per-class hold-out, :func:`split_holdout`) rides along only in the one query per
  generation that scores the CMA-ES mean on the whole set. The search never sees the
  check images' labels, so they give an unbiased estimate of the prompt's gain over
  zero-shot, at zero extra queries.
* **Refiner capacity by cross-validation** (:func:`cross_validate_refiners`):
  stratified k-fold over the fit images' logits chooses the refiner (linear residual
  or the paper's MLP) and its training length (epochs). The refiner is local, so
  this costs CPU, not queries.
* **The decision** (:func:`decide`): the deployed behaviour is the best of
  {zero-shot, prompt only, prompt + refiner, refiner only} on held-out evidence, and a
  candidate replaces zero-shot only when its paired accuracy gain exceeds ``z_noise``
  McNemar standard errors (a noise-aware threshold: with 40 check images one lucky
  image is 2.5 points). The evidence is what is honestly held out for each: for
  behaviours with a searched prompt, the check images only (the prompt was fitted on
  the others); for the refiner alone, the check images *plus* the out-of-fold
  predictions on every search image (zero-shot logits were fitted to nothing, so
  cross-validation there is unbiased) — four times the evidence at 25 % hold-out.
  Ties go to the simpler behaviour.
* **Calibration** (:func:`fit_temperature`): one temperature fitted by NLL on the
  chosen behaviour's held-out predictions (out-of-fold refiner logits plus the check
  images), stored in the adapter and applied by ``predict_proba``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

OPTIONS = ("zero-shot", "prompt", "ensemble", "prompt+refiner", "refiner")
EPOCH_GRID = (5, 10, 20, 40, 80, 160, 320)


@dataclass(frozen=True)
class RefinerChoice:
    """A refiner architecture and training length chosen by cross-validation."""

    layers: int
    hidden: int
    epochs: int
    cv_accuracy: float
    cv_loss: float


@dataclass
class Decision:
    """What the robust protocol deploys, and the held-out estimates behind it."""

    option: str
    reason: str
    estimates: dict[str, dict[str, float]]
    n_check: int
    refiner: RefinerChoice | None = None
    temperature: float = 1.0
    extras: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "deployed": self.option,
            "reason": self.reason,
            "n_check": self.n_check,
            "estimates": self.estimates,
            "temperature": round(self.temperature, 6),
        }
        if self.refiner is not None:
            out["refiner"] = {
                "layers": self.refiner.layers,
                "hidden": self.refiner.hidden,
                "epochs": self.refiner.epochs,
                "cv_accuracy": round(self.refiner.cv_accuracy, 6),
                "cv_loss": round(self.refiner.cv_loss, 6),
            }
        out.update(self.extras)
        return out


# ------------------------------------------------------------------ splits


def split_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, check) indices, seeded: ``floor(fraction · shots)`` images per class held out (at least
    one when a class has two or more). With one image per class (1 shot) the prompt, which is
    shared by all classes, is checked on whole classes instead: ``ceil(fraction · C)`` of the
    single images are held out (at least 2, and only with 4 or more classes)."""
    rng = np.random.Generator(np.random.PCG64([seed, 0x5E1]))
    check: list[int] = []
    if fraction <= 0:
        return np.arange(len(labels)), np.zeros(0, np.int64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            continue
        n = min(len(idx) - 1, max(1, int(np.floor(fraction * len(idx)))))
        check.extend(rng.permutation(idx)[:n].tolist())
    if not check and len(labels) >= 4:
        check = rng.permutation(len(labels))[: max(2, int(np.ceil(fraction * len(labels))))].tolist()
    check_idx = np.sort(np.asarray(check, dtype=np.int64))
    fit_idx = np.setdiff1d(np.arange(len(labels)), check_idx)
    return fit_idx, check_idx


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """k disjoint index arrays covering ``labels``, each class spread round-robin (seeded)."""
    rng = np.random.Generator(np.random.PCG64([seed, 0xF01D]))
    folds: list[list[int]] = [[] for _ in range(k)]
    offset = 0
    for c in np.unique(labels):
        for j, i in enumerate(rng.permutation(np.flatnonzero(labels == c))):
            folds[(offset + j) % k].append(int(i))
        offset += 1
    return [np.sort(np.asarray(f, dtype=np.int64)) for f in folds if f]


# ------------------------------------------------------------------ scores


def log_loss(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean cross-entropy of softmax(logits / T) (float64)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(labels)), labels].mean()) if len(labels) else float("nan")


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(logits).argmax(-1) == labels).mean()) if len(labels) else float("nan")


MIN_CALIBRATION = 20  # held-out predictions below which a fitted temperature is noise: keep 1.0


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising NLL on held-out (logits, labels); 1.0 with fewer than
    :data:`MIN_CALIBRATION` of them (a temperature fitted on 3 images can be anything)."""
    if len(labels) < MIN_CALIBRATION:
        return 1.0
    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 121))
    losses = [log_loss(logits, labels, t) for t in grid]
    i = int(np.argmin(losses))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    for _ in range(30):  # golden-section refinement on the bracketing interval
        a, b = lo + 0.382 * (hi - lo), lo + 0.618 * (hi - lo)
        if log_loss(logits, labels, a) < log_loss(logits, labels, b):
            hi = b
        else:
            lo = a
    return float((lo + hi) / 2)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE with ``bins`` equal-width confidence bins (the usual 15)."""
    p = np.asarray(probs, dtype=np.float64)
    conf, pred = p.max(-1), p.argmax(-1)
    correct = (pred == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(ece)


# ------------------------------------------------------------- refiner CV


@dataclass(frozen=True)
class RefinerTraining:
    """How refiners are trained during selection (from the TuneConfig)."""

    hidden: int
    lr: float
    weight_decay: float
    batch_size: int
    beta: float
    seed: int
    architectures: tuple[int, ...] = (1, 3)
    epoch_grid: tuple[int, ...] = EPOCH_GRID
    residual: bool = True


def _train_and_score(
    spec: RefinerTraining, layers: int, train_x: np.ndarray, train_y: np.ndarray, eval_x: list[np.ndarray], fold_seed: int
) -> list[list[np.ndarray]]:
    """Train one refiner for max(epoch_grid) epochs; return its outputs on each ``eval_x`` at every grid epoch."""
    from . import mlp
    from .refiner import RefinerTrainer

    n_classes = train_x.shape[-1]
    weights = mlp.init_weights(n_classes, spec.hidden, layers, spec.residual, spec.seed + fold_seed)
    trainer = RefinerTrainer(weights, spec.residual, spec.lr, spec.weight_decay, spec.batch_size, spec.seed + 1 + fold_seed)
    outputs: list[list[np.ndarray]] = []
    done = 0
    for epochs in spec.epoch_grid:
        trainer.train(train_x, train_y, spec.beta, epochs - done)
        done = epochs
        outputs.append([trainer.refine(x) for x in eval_x])
    return outputs


def cross_validate_refiners(
    logits: np.ndarray, labels: np.ndarray, spec: RefinerTraining, folds: int, extra: np.ndarray | None = None
) -> tuple[RefinerChoice | None, np.ndarray | None]:
    """Choose the refiner (architecture × epochs) by stratified k-fold CV on ``logits`` [N, C].

    Args:
        logits: the prompt's logits on the fit images.
        labels: [N] labels.
        spec: training hyperparameters and the candidate grid.
        folds: k (reduced to the smallest class count; below 2 no CV is possible).
        extra: optional extra training rows per image [P, N, C] (the population's logits):
            a fold trains on its images' rows from every candidate, scores the mean's.

    Returns:
        (choice, out-of-fold refined logits of the choice) or (None, None) without CV.
    """
    counts = np.bincount(labels, minlength=logits.shape[-1])
    k = int(min(folds, counts[counts > 0].min())) if len(labels) else 0
    if k < 2:
        return None, None
    parts = stratified_folds(labels, k, spec.seed)
    grid = [(layers, e) for layers in spec.architectures for e in spec.epoch_grid]
    oof = {g: np.zeros_like(logits, dtype=np.float32) for g in grid}
    for f, held in enumerate(parts):
        train_idx = np.setdiff1d(np.arange(len(labels)), held)
        x, y = logits[train_idx], labels[train_idx]
        if extra is not None:
            x = np.concatenate([x, extra[:, train_idx].reshape(-1, logits.shape[-1])])
            y = np.concatenate([y, np.tile(labels[train_idx], extra.shape[0])])
        for layers in spec.architectures:
            outs = _train_and_score(spec, layers, x, y, [logits[held]], f)
            for e, out in zip(spec.epoch_grid, outs):
                oof[(layers, e)][held] = out[0]
    scored = {g: (accuracy(o, labels), log_loss(o, labels)) for g, o in oof.items()}
    # chosen by out-of-fold log-loss, not accuracy: smoother, so the max over the grid is less
    # flattered by noise (the accuracy gain estimated next is then close to unbiased)
    best = min(grid, key=lambda g: (round(scored[g][1], 9), g[0], g[1]))
    choice = RefinerChoice(best[0], spec.hidden, best[1], scored[best][0], scored[best][1])
    logger.info("refiner CV (%d folds): %d-layer, %d epochs, accuracy %.3f", k, choice.layers, choice.epochs, choice.cv_accuracy)
    return choice, oof[best]


def train_refiner(
    spec: RefinerTraining, choice: RefinerChoice, logits: np.ndarray, labels: np.ndarray, extra: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Train the chosen refiner on all given rows; returns numpy weights."""
    from . import mlp
    from .refiner import RefinerTrainer

    x, y = logits, labels
    if extra is not None:
        x = np.concatenate([x, extra.reshape(-1, logits.shape[-1])])
        y = np.concatenate([y, np.tile(labels[: extra.shape[1]], extra.shape[0])])
    weights = mlp.init_weights(logits.shape[-1], spec.hidden, choice.layers, spec.residual, spec.seed)
    trainer = RefinerTrainer(weights, spec.residual, spec.lr, spec.weight_decay, spec.batch_size, spec.seed + 1)
    trainer.train(x, y, spec.beta, choice.epochs)
    return trainer.model.numpy_weights()


# ---------------------------------------------------------------- decision


def _estimate(logits: np.ndarray, labels: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """Accuracy, log-loss and the paired gain over ``reference`` with its McNemar standard error
    sqrt(b + c) / n (b, c: images only this / only the reference gets right)."""
    correct = logits.argmax(-1) == labels
    ref = reference.argmax(-1) == labels
    b, c, n = int((correct & ~ref).sum()), int((ref & ~correct).sum()), len(labels)
    if n == 0:  # nothing held out: no evidence either way
        return {"accuracy": None, "log_loss": None, "gain": 0.0, "gain_se": None, "n": 0}  # JSON-safe (adapter config)
    return {
        "accuracy": float(correct.mean()),
        "log_loss": log_loss(logits, labels),
        "gain": (b - c) / n,
        "gain_se": float(np.sqrt(b + c) / n),
        "n": n,
    }


def decide(
    held_out: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], z_noise: float
) -> tuple[str, str, dict[str, dict[str, float]]]:
    """Pick the deployed behaviour from held-out evidence per option.

    Args:
        held_out: option -> (its logits, zero-shot's logits, labels) on the images that are
            honest held-out evidence for it (``zero-shot`` must be present).
        z_noise: standard errors a gain must clear.

    A non-zero-shot option qualifies when its paired gain over zero-shot is positive and exceeds
    ``z_noise`` McNemar standard errors; the qualified option with the largest gain wins (then
    lower log-loss, then the simpler option). Returns (option, reason, estimates).
    """
    estimates = {name: _estimate(lg, y, zero) for name, (lg, zero, y) in held_out.items()}
    qualified = [k for k, e in estimates.items() if k != "zero-shot" and e["n"] and e["gain"] > 0 and e["gain"] > z_noise * e["gain_se"]]
    if not qualified:
        others = [(k, e) for k, e in estimates.items() if k != "zero-shot" and e["n"]]
        if not others:
            return "zero-shot", "no held-out images to verify any gain: zero-shot behaviour deployed", estimates
        k, e = max(others, key=lambda ke: ke[1]["gain"])
        return (
            "zero-shot",
            f"nothing beat zero-shot beyond noise (best: {k} {100 * e['gain']:+.1f} points on {e['n']} held-out images): "
            "zero-shot behaviour deployed",
            estimates,
        )
    order = {name: i for i, name in enumerate(OPTIONS)}
    winner = max(qualified, key=lambda k: (estimates[k]["gain"], -estimates[k]["log_loss"], -order[k]))
    e = estimates[winner]
    return winner, f"{winner}: {100 * e['gain']:+.1f} points over zero-shot on {e['n']} held-out images", estimates
