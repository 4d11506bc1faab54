"""Drift canaries, the recording half: a behavioural fingerprint of the black box, taken at tune time.

A canary is ``n_probes`` synthetic probe images and the log-scores the box returned for them
under the *deployed* prompt (the context offset, the searched words, the ensemble's contexts,
or the template as given), plus the box's own run-to-run noise, measured by sending the very
same request a second time. :mod:`craft_sdk.deploy.canary` re-scores the probes later and says whether
the box still behaves the same.

Why synthetic probes. They are regenerated from the stored ``seed`` by a tiny integer generator
(SplitMix64, written out below in numpy, so it never changes with a numpy release and needs no
torch), so the adapter stores no user data and anyone can rebuild them. Each probe is a 4 x 4
grid of random colour blocks with per-pixel noise on top, 4:3 in shape: the hard block edges and
the fine noise make the scores sensitive to the image preprocessing (interpolation, normalisation;
the aspect ratio to cropping versus squashing), the colours to the weights. They are off the task's distribution, so what they
measure is the box's *behaviour*, not its accuracy; the adapter's agreement on them then versus
now is a proxy for the effect of a drift (BENCHMARKS.md, "Drift canaries", relates it to test accuracy).

Distance. Scores are compared after centring each row (a constant added to every class's score
changes no prediction). The noise unit is the RMS of the centred difference of the two tune-time
requests, but at least ``FLOOR_RELATIVE`` x the RMS of the centred scores: a bit-exact box
measures zero noise, and a float32 model rerun on another machine or BLAS differs in the last
bits (~1e-6 relative), so the floor (1e-3) keeps such a box from raising false alarms. The
distance of a new scoring is the RMS of its centred difference from the recorded scores, in
noise units; the box has drifted when it exceeds ``tolerance`` (3: two runs of an unchanged box
differ by about 1 unit). Both the unit and a check's distance are RMS values over the same
``d = n_probes x (C - 1)`` centred differences, so for Gaussian noise their squared ratio is F(d, d);
below d = 14 its 0.9999 quantile exceeds 3², so a small canary (1 probe, 2 classes: d = 1) gets
the tolerance ``sqrt(F⁻¹(0.9999; d, d))`` instead (:func:`canary_tolerance`) and a warning to use more probes.

Cost: ``2 x contexts`` queries at tune time (1 + 1 for a single prompt; an ensemble sends each of
its K contexts), charged to the ledger's ``canary`` category and to the run's budget (the plan
reserves them), and ``contexts`` queries per check.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from ..errors import AdapterError
from .contexts import score_contexts

logger = logging.getLogger(__name__)

GENERATOR = "splitmix64-blocks-v1"
PROBE_SIZE = 64  # width in pixels (height 3/4 of it): every model resizes; small keeps the wire cheap
GRID = 4  # colour blocks per side
PIXEL_NOISE = 24  # +- amplitude of the per-pixel noise
FLOOR_RELATIVE = 1e-3
FLOOR_ABSOLUTE = 1e-6
TOLERANCE = 3.0
# sqrt of the 0.9999 quantile of F(d, d) for d = 1..13 (scipy.stats.f.ppf(0.9999, d, d) ** 0.5); from d = 14 on it is <= 3
_SMALL_DOF_TOLERANCE = (6366.2, 99.99, 25.68, 13.11, 8.77, 6.7, 5.52, 4.77, 4.24, 3.86, 3.57, 3.34, 3.15)
MAX_PROBES = 256
MAX_SIZE = 256
CATEGORY = "canary"

_GOLDEN, _MIX1, _MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def splitmix64(seed: int, n: int, start: int = 0) -> np.ndarray:
    """Outputs ``start`` to ``start + n - 1`` (uint64 [n]) of SplitMix64 seeded with ``seed`` (Steele et al. 2014).

    Example:
        >>> hex(int(splitmix64(0, 1)[0]))
        '0xe220a8397b1dcdaf'
    """
    with np.errstate(over="ignore"):
        x = np.uint64(seed % 2**64) + np.arange(start + 1, start + n + 1, dtype=np.uint64) * _GOLDEN
        z = (x ^ (x >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def probe_images(seed: int, n_probes: int, size: int = PROBE_SIZE) -> list[Image.Image]:
    """``n_probes`` RGB probe images, ``size`` wide and ``3 size / 4`` high (not square, so a change
    between cropping and squashing shows): 4 x 4 random colour blocks plus pixel noise.

    Example:
        >>> [im.size for im in probe_images(0, 2)]
        [(64, 48), (64, 48)]
    """
    if size % (4 * GRID):
        raise AdapterError(f"canary probe size must be a multiple of {4 * GRID}, got {size}")
    height = size * 3 // 4
    n_block, n_pixel = GRID * GRID * 3, height * size * 3
    images = []
    for i in range(n_probes):
        row = (splitmix64(seed, n_block + n_pixel, i * (n_block + n_pixel)) >> np.uint64(56)).astype(np.int16)  # 0..255
        blocks = row[:n_block].reshape(GRID, GRID, 3)
        base = np.kron(blocks, np.ones((height // GRID, size // GRID, 1), np.int16))
        noise = (row[n_block:].reshape(height, size, 3) * (2 * PIXEL_NOISE + 1)) // 256 - PIXEL_NOISE
        images.append(Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)))
    return images


@dataclass(frozen=True)
class CanarySpec:
    """How a canary was taken (the adapter config's ``canary``); its scores are the tensor ``canary_scores``.

    Args:
        seed: seed of the probe images (:func:`probe_images`).
        n_probes: number of probe images.
        noise: RMS of the centred difference between two identical tune-time requests.
        floor: the smallest noise unit (``FLOOR_RELATIVE`` x the centred scores' RMS).
        queries: what recording cost (``2 x contexts``).
        tolerance: distance, in noise units, above which the box has drifted.
        size: probe side in pixels.
        generator: the probe generator's name.
    """

    seed: int
    n_probes: int
    noise: float
    floor: float
    queries: int
    tolerance: float = TOLERANCE
    size: int = PROBE_SIZE
    generator: str = GENERATOR

    def __post_init__(self) -> None:
        for name in ("seed", "n_probes", "queries", "size"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < (0 if name == "seed" else 1):
                raise AdapterError(f"canary.{name} must be a {'non-negative' if name == 'seed' else 'positive'} integer, got {value!r}")
        if self.n_probes > MAX_PROBES or self.size > MAX_SIZE or self.size % (4 * GRID):
            raise AdapterError(f"canary has {self.n_probes} probes {self.size} px wide; at most {MAX_PROBES}, a multiple of "
                               f"{4 * GRID} px up to {MAX_SIZE} px")
        for name in ("noise", "floor", "tolerance"):
            value = getattr(self, name)
            if not isinstance(value, (int, float, np.floating)) or not np.isfinite(value) or value < 0:
                raise AdapterError(f"canary.{name} must be a non-negative number, got {value!r}")
        if self.floor <= 0 or self.tolerance <= 0:
            raise AdapterError("canary.floor and canary.tolerance must be positive; the config is corrupt")
        if self.generator != GENERATOR:
            raise AdapterError(f"unknown canary generator {self.generator!r}; this craft-sdk reads {GENERATOR!r}: upgrade craft-sdk")

    @property
    def unit(self) -> float:
        """The noise unit distances are measured in: the measured noise, at least the floor."""
        return max(float(self.noise), float(self.floor))

    def probes(self) -> list[Image.Image]:
        """The probe images, regenerated from the seed."""
        return probe_images(self.seed, self.n_probes, self.size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CanaryRecord:
    """A recorded canary: its spec and the scores float32 [n_probes, C] the box returned."""

    spec: CanarySpec
    scores: np.ndarray


def centred(scores: np.ndarray) -> np.ndarray:
    """Scores [..., C] minus each row's mean, float64."""
    x = np.asarray(scores, dtype=np.float64)
    return x - x.mean(-1, keepdims=True)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if x.size else 0.0


def distance(spec: CanarySpec, then: np.ndarray, now: np.ndarray) -> float:
    """How far ``now`` is from the recorded ``then`` (both [n_probes, C]), in noise units."""
    if np.shape(then) != np.shape(now):
        raise AdapterError(f"canary scores have shape {list(np.shape(now))}, the recording {list(np.shape(then))}")
    return _rms(centred(now) - centred(then)) / spec.unit


def canary_tolerance(n_probes: int, n_classes: int) -> float:
    """The drift tolerance of a canary of ``n_probes`` probes over ``n_classes`` classes: ``TOLERANCE``, raised
    where too few centred differences (``n_probes x (n_classes - 1)`` < 14) make the measured noise unit itself
    noisy (a false alarm at most once in 10,000 recordings of an unchanged Gaussian-noise box).

    Example:
        >>> canary_tolerance(16, 6), canary_tolerance(1, 2)
        (3.0, 6366.2)
    """
    dof = n_probes * (n_classes - 1)
    return max(TOLERANCE, _SMALL_DOF_TOLERANCE[dof - 1]) if 1 <= dof <= len(_SMALL_DOF_TOLERANCE) else TOLERANCE


@contextmanager
def uncached(client: Any) -> Iterator[None]:
    """Inside the block, ``client`` and the clients it wraps (``.client``) that keep answers in a cache (the
    embedding client) ask the provider again: a canary scored from a cache would never see the box change."""
    with ExitStack() as stack:
        inner = client
        for _ in range(8):  # MeteredClient -> TextOnlyClient -> EmbeddingClient, at most a few levels
            fresh = getattr(inner, "uncached", None)
            if callable(fresh):
                stack.enter_context(fresh())
            inner = getattr(inner, "client", None)
            if inner is None:
                break
        yield


def canary_cost(n_contexts: int) -> int:
    """Queries recording a canary costs: the probes scored twice under each deployed context."""
    return 2 * n_contexts


def record_canary(
    client: Any, class_names: Sequence[str], contexts: Sequence[str], offset: np.ndarray | None,
    output: str, n_probes: int, seed: int,
) -> CanaryRecord:
    """Score the probes twice under the deployed prompt (``contexts``, ``offset``) and keep the first scores.

    Args:
        client: a :class:`~craft_sdk.client.ledger.MeteredClient` (charged ``canary``) or any client.
        class_names: the C classes.
        contexts: the contexts each prediction sends (one, or an ensemble's K).
        offset: the context offset [n_ctx, d], or None.
        output: ``logits`` or ``probs``: what the client returns.
        n_probes: probe images (1 to 256).
        seed: seed of the probe images.
    """
    if not 1 <= n_probes <= MAX_PROBES:
        raise AdapterError(f"a canary needs 1 to {MAX_PROBES} probe images, got {n_probes}")
    images = probe_images(seed, n_probes)
    with uncached(client):  # both scorings reach the provider: the noise measured is the box's, not a cache's zero
        first = score_contexts(client, images, class_names, contexts, offset, output, CATEGORY)
        second = score_contexts(client, images, class_names, contexts, offset, output, CATEGORY)
    noise = _rms(centred(second) - centred(first))
    floor = max(FLOOR_RELATIVE * _rms(centred(first)), FLOOR_ABSOLUTE)
    tolerance = canary_tolerance(n_probes, len(class_names))
    if tolerance > TOLERANCE:
        logger.warning("a canary of %d probes over %d classes measures the noise too coarsely: tolerance %g noise units "
                       "instead of %g; record more probes (--canary 16) for a sensitive canary", n_probes, len(class_names), tolerance, TOLERANCE)
    spec = CanarySpec(seed, n_probes, noise, floor, canary_cost(len(contexts)), tolerance)
    logger.info("canary recorded: %d probes, run-to-run noise %.3g (floor %.3g)", n_probes, noise, floor)
    return CanaryRecord(spec, np.asarray(first, dtype=np.float32))
