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
* **The decision** (:func:`decide`). The search never sees the check images' labels; they decide
  only *when* it stops (:mod:`craft_sdk.tuner.stopping`), and the run deploys the generation it
  stops at, not the one that scored best on them: they choose when the search stops, not which of
  its generations is deployed. Every
  option (prompt, ensemble, prompt + refiner, refiner only) must then beat zero-shot on every
  check image in an exact one-sided sign test (McNemar's, on the images where exactly one of the
  two is right), Holm-corrected over all the options, at family-wise level
  ``alpha = 1 - Phi(z_noise)``. The refiner alone also counts its out-of-fold predictions on every
  search image (zero-shot logits were fitted to nothing). Among the certified, the one with the
  largest paired gain on all the check images (the same images for all) is deployed: a
  preference, not part of the guarantee (Holm makes every certified option beat zero-shot
  jointly, so any rule may choose among them).
  Guarantee: when no option's expected paired accuracy beats zero-shot's, one is deployed with
  probability at most ``alpha`` (5 %) -- exactly so if the check images had chosen nothing. The
  one thing they choose is the stopping time: the run stops at a generation that is *not* a new
  best on them, which pushes its score down, not up, unless the search repeats itself with a
  period (a repeat of its best generation would then be deployed; nothing in CMA-ES's mean update
  does so on purpose). That step is not proved: tests/test_selection.py simulates it (independent
  and correlated generations of a prompt that does nothing; a real client whose prompts carry no
  information) and asserts at most 5 %.
* **Calibration** (:func:`calibrate`): one temperature, cross-fitted on the chosen
  behaviour's held-out predictions (out-of-fold refiner logits plus the check images) over a
  bounded grid; deployed only when the cross-fitted log-loss beats temperature 1 beyond noise,
  and then shrunk toward 1 by how clearly it does (else 1.0).
"""

from __future__ import annotations

import logging
import math
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
T_BOUNDS = (0.25, 10.0)  # the temperature grid; a fit at a bound is logged as a warning
CALIBRATION_FOLDS = 5


def fit_temperature(logits: np.ndarray, labels: np.ndarray, warn: bool = True) -> float:
    """The temperature minimising NLL on (logits, labels) within :data:`T_BOUNDS`; 1.0 with fewer
    than :data:`MIN_CALIBRATION` of them (a temperature fitted on 3 images can be anything)."""
    if len(labels) < MIN_CALIBRATION:
        return 1.0
    grid = np.exp(np.linspace(np.log(T_BOUNDS[0]), np.log(T_BOUNDS[1]), 97))
    losses = [log_loss(logits, labels, t) for t in grid]
    i = int(np.argmin(losses))
    if warn and i in (0, len(grid) - 1):
        logger.warning("calibration temperature hit the grid's bound %.2f (labels may be noise or the model degenerate)", grid[i])
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    for _ in range(30):  # golden-section refinement on the bracketing interval
        a, b = lo + 0.382 * (hi - lo), lo + 0.618 * (hi - lo)
        if log_loss(logits, labels, a) < log_loss(logits, labels, b):
            hi = b
        else:
            lo = a
    return float((lo + hi) / 2)


def _per_image_loss(logits: np.ndarray, labels: np.ndarray, temperature: float) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -logp[np.arange(len(labels)), labels]


def calibrate(logits: np.ndarray, labels: np.ndarray, z_noise: float, seed: int = 0) -> tuple[float, dict[str, Any]]:
    """A temperature that is itself checked: (temperature, report).

    Cross-fitting: each of :data:`CALIBRATION_FOLDS` folds gets a temperature fitted on the others
    and is scored with it and with 1.0; the per-image log-loss differences d give the held-out
    improvement and its standard error. T != 1 is deployed only when the improvement exceeds
    ``z_noise`` standard errors (t = mean(-d) / se > z_noise); it is then the temperature fitted on
    all predictions, shrunk toward 1 in log space by ``w = 1 - (z_noise / t)**2`` (little evidence:
    close to 1). Otherwise 1.0.

    Args:
        logits: held-out logits [N, C] of the deployed behaviour.
        labels: [N] labels.
        z_noise: standard errors the improvement must clear.
        seed: seed of the folds.

    Example:
        >>> rng = np.random.default_rng(0); x = rng.normal(0, 2, (400, 4)); y = x.argmax(-1)
        >>> calibrate(x, y, 1.645)[0] < 1.0  # right every time: sharpening helps
        True
    """
    n = len(labels)
    report: dict[str, Any] = {"n": n, "temperature_fitted": None, "improvement": None, "improvement_se": None}
    if n < MIN_CALIBRATION:
        report["reason"] = f"fewer than {MIN_CALIBRATION} held-out predictions: temperature 1"
        return 1.0, report
    rng = np.random.Generator(np.random.PCG64([seed, 0xCA1]))
    folds = np.array_split(rng.permutation(n), CALIBRATION_FOLDS)
    diff = np.zeros(n)
    for held in folds:
        rest = np.setdiff1d(np.arange(n), held)
        t = fit_temperature(logits[rest], labels[rest], warn=False)
        diff[held] = _per_image_loss(logits[held], labels[held], 1.0) - _per_image_loss(logits[held], labels[held], t)
    gain, se = float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(n))
    fitted = fit_temperature(logits, labels)
    report.update(temperature_fitted=round(fitted, 6), improvement=round(gain, 6), improvement_se=round(se, 6))
    t_stat = gain / se if se > 0 else (np.inf if gain > 0 else 0.0)
    if t_stat <= z_noise:
        report["reason"] = f"held-out log-loss gain {gain:.4f} is within noise (se {se:.4f}): temperature 1"
        return 1.0, report
    weight = 1.0 - (z_noise / t_stat) ** 2
    temperature = float(np.exp(weight * np.log(fitted)))
    report["reason"] = f"held-out log-loss gain {gain:.4f} (se {se:.4f}): fitted {fitted:.3f}, shrunk to {temperature:.3f}"
    return temperature, report


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
    input_rms: float | None = None  # standardise the refiner's input (refiner.input_rms_for)


def _train_and_score(
    spec: RefinerTraining, layers: int, train_x: np.ndarray, train_y: np.ndarray, eval_x: list[np.ndarray], fold_seed: int
) -> list[list[np.ndarray]]:
    """Train one refiner for max(epoch_grid) epochs; return its outputs on each ``eval_x`` at every grid epoch."""
    from .. import mlp
    from .refiner import RefinerTrainer

    n_classes = train_x.shape[-1]
    weights = mlp.init_weights(n_classes, spec.hidden, layers, spec.residual, spec.seed + fold_seed)
    trainer = RefinerTrainer(weights, spec.residual, spec.lr, spec.weight_decay, spec.batch_size, spec.seed + 1 + fold_seed, spec.input_rms)
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
    from ..mlp import input_temperature

    t = input_temperature(logits, spec.input_rms)  # 1.0 unless standardised: log-loss compared at the trained scale
    scored = {g: (accuracy(o, labels), log_loss(o, labels, t)) for g, o in oof.items()}
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
    from .. import mlp
    from .refiner import RefinerTrainer

    x, y = logits, labels
    if extra is not None:
        x = np.concatenate([x, extra.reshape(-1, logits.shape[-1])])
        y = np.concatenate([y, np.tile(labels[: extra.shape[1]], extra.shape[0])])
    weights = mlp.init_weights(logits.shape[-1], spec.hidden, choice.layers, spec.residual, spec.seed)
    trainer = RefinerTrainer(weights, spec.residual, spec.lr, spec.weight_decay, spec.batch_size, spec.seed + 1, spec.input_rms)
    trainer.train(x, y, spec.beta, choice.epochs)
    return trainer.model.numpy_weights()


# ---------------------------------------------------------------- decision


def alpha_of(z_noise: float) -> float:
    """The one-sided level of a ``z_noise``-SE threshold: 1 - Phi(z) (1.645 -> 0.05)."""
    return 0.5 * math.erfc(z_noise / math.sqrt(2.0))


def sign_test_p(b: int, c: int) -> float:
    """Exact one-sided p-value of McNemar's test: P(X >= b), X ~ Binomial(b + c, 1/2)
    (b: images only the candidate gets right, c: only zero-shot)."""
    n = b + c
    if n == 0 or b == 0:
        return 1.0
    return float(sum(math.comb(n, i) for i in range(b, n + 1)) / 2.0**n)


def min_flips(alpha: float) -> int:
    """The fewest images a candidate must win (and none lose) to be certified at ``alpha``."""
    k = 1
    while sign_test_p(k, 0) > alpha:
        k += 1
    return k


def split_check(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(stop, certify) positions into the check images: both are every check image.

    Issue 23 first split them into disjoint halves (the select half chose the generation, the
    certify half certified it). That halved the evidence for both, and a prompt's lead over the
    refiner alone (2-3 of 40 images) was lost to it. Now the run deploys the generation it stops at
    (:class:`~craft_sdk.tuner.stopping.EarlyStopping`, ``keep="last"``), so the check images choose
    no generation and may certify on their whole: the stopping rule and the certificate both read
    every check image. ``seed`` is kept for the callers' signature.
    """
    every = np.arange(len(labels), dtype=np.int64)
    return every, every


def _discordant(logits: np.ndarray, labels: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, int, int]:
    """(which images ``logits`` gets right, b, c): b images only it gets right, c only ``reference``."""
    correct, ref = logits.argmax(-1) == labels, reference.argmax(-1) == labels
    return correct, int((correct & ~ref).sum()), int((ref & ~correct).sum())


def paired_p_value(logits: np.ndarray, labels: np.ndarray, reference: np.ndarray) -> float:
    """The exact one-sided sign-test p-value of ``logits`` beating ``reference`` on the same images."""
    _, b, c = _discordant(logits, labels, reference)
    return sign_test_p(b, c)


def _estimate(logits: np.ndarray, labels: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """Accuracy, log-loss and the paired gain over ``reference``: b, c (images only this / only the
    reference gets right), the McNemar standard error sqrt(b + c) / n and the exact sign-test p-value."""
    correct, b, c = _discordant(logits, labels, reference)
    n = len(labels)
    if n == 0:  # nothing held out: no evidence either way
        return {"accuracy": None, "log_loss": None, "gain": 0.0, "gain_se": None, "n": 0, "b": 0, "c": 0, "p_value": 1.0}
    return {
        "accuracy": float(correct.mean()),
        "log_loss": log_loss(logits, labels),
        "gain": (b - c) / n,
        "gain_se": float(np.sqrt(b + c) / n),
        "n": n, "b": b, "c": c,
        "p_value": sign_test_p(b, c),
    }


Evidence = dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]


def holm(p_values: dict[str, float], alpha: float) -> set[str]:
    """The hypotheses Holm's step-down procedure rejects at family-wise level ``alpha``."""
    rejected: set[str] = set()
    ranked = sorted(p_values, key=p_values.__getitem__)
    for i, k in enumerate(ranked):
        if p_values[k] > alpha / (len(ranked) - i):
            break
        rejected.add(k)
    return rejected


def decide(select: Evidence, certify: Evidence, alpha: float, rank: Evidence | None = None) -> tuple[str, str, dict[str, dict[str, Any]]]:
    """Pick the deployed behaviour: certify every option on ``certify``, rank the certified on ``rank``.

    Each option must beat zero-shot in the exact sign test on its certify evidence, Holm-corrected
    over *all* the options (family-wise level ``alpha``; no option is ruled out first on the same
    images, which would shrink the family after a look), so that with probability at least
    1 - alpha *every* certified option beats zero-shot. The deployed one is the certified option
    with the largest paired gain on ``rank`` (images shared by every option: the run passes all its
    check images; default ``certify``), then on ``select``, then the simpler.

    Args:
        select: option -> (its logits, zero-shot's logits, labels) on the images the stopping rule
            read (the run: every check image); reported, and breaks ties in the ranking.
        certify: option -> the same triple on the images that certify it (every check image; the
            refiner alone adds its out-of-fold search images); ``zero-shot`` must be present.
        alpha: family-wise level of the certification (:func:`alpha_of` of ``z_noise``).
        rank: option -> the triple on images shared by every option, to choose among the certified.

    Returns:
        (option, reason, estimates): estimates[option] is the certify-stage estimate plus
        ``select_gain`` / ``select_n``, ``rank_gain`` and ``certified``.
    """
    sel = {k: _estimate(lg, y, zero) for k, (lg, zero, y) in select.items()}
    estimates = {k: _estimate(lg, y, zero) for k, (lg, zero, y) in certify.items()}
    ranked = {k: _estimate(lg, y, zero) for k, (lg, zero, y) in (rank or certify).items()}
    options = [k for k in estimates if k != "zero-shot" and estimates[k]["n"]]
    certified = holm({k: estimates[k]["p_value"] for k in options}, alpha) if options else set()
    for k, e in estimates.items():
        e["select_gain"], e["select_n"] = sel.get(k, {}).get("gain"), sel.get(k, {}).get("n", 0)
        e["rank_gain"], e["certified"] = ranked.get(k, {}).get("gain"), k in certified
    order = {name: i for i, name in enumerate(OPTIONS)}
    best = sorted(certified, key=lambda k: (-ranked[k]["gain"], -(sel[k]["gain"] if k in sel else 0.0), order[k]))
    candidates = best or sorted(options, key=lambda k: estimates[k]["p_value"])
    winner = next((k for k in candidates if k in certified), None)
    if winner is not None:
        e = estimates[winner]
        return winner, (f"{winner}: {100 * e['gain']:+.1f} points over zero-shot on {e['n']} check images "
                        f"(sign test p = {e['p_value']:.3g} <= {alpha:.3g})"), estimates
    if not options:
        return "zero-shot", "no held-out images to verify any gain: zero-shot behaviour deployed", estimates
    k = candidates[0]
    e = estimates[k]
    return "zero-shot", (f"nothing beat zero-shot beyond noise (best: {k} {100 * e['gain']:+.1f} points on {e['n']} certify "
                         f"images, p = {e['p_value']:.3g} > {alpha:.3g}): zero-shot behaviour deployed"), estimates
