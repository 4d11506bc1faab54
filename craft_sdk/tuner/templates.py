"""A bank of prompt templates and template ensembles: the baseline of a text-only black box.

Templates here are *contexts*: the text before the class name, so the class
prompt is ``"{context} {class name}."`` exactly as every client builds it
(``"a sketch of a"`` → ``"a sketch of a dog."``). The bank is the part of CLIP's
80 ImageNet templates (Radford et al. 2021, ``notebooks/Prompt_Engineering_for_ImageNet.ipynb``)
that ends with the class name; ``CLIP_SELECTED`` are the contexts of the 7
templates CLIP's authors selected for ImageNet (the eighth, ``"a {} in a video game."``,
has text after the class name).

A template ensemble scores K templates (K queries per image set) and averages
their log-probabilities (a geometric mean of the probabilities, renormalised by
the softmax that follows): :func:`~craft_sdk.client.contexts.ensemble_log_probs`, which with the
scoring of contexts through a client lives in :mod:`craft_sdk.client.contexts` (deployment needs it too). :func:`greedy_templates`
picks K templates from the bank by forward selection on training scores.
"""

from __future__ import annotations

import numpy as np

from ..client.contexts import ensemble_log_probs, log_softmax_templates, score_contexts, score_templates  # noqa: F401 - re-exported
from ..errors import ConfigError

CLIP_IMAGENET_CONTEXTS: tuple[str, ...] = (
    "a bad photo of a",
    "a photo of many",
    "a sculpture of a",
    "a photo of the hard to see",
    "a low resolution photo of the",
    "a rendering of a",
    "graffiti of a",
    "a cropped photo of the",
    "a tattoo of a",
    "the embroidered",
    "a bright photo of a",
    "a photo of a clean",
    "a photo of a dirty",
    "a dark photo of the",
    "a drawing of a",
    "a photo of my",
    "the plastic",
    "a photo of the cool",
    "a close-up photo of a",
    "a black and white photo of the",
    "a painting of a",
    "a pixelated photo of the",
    "a jpeg corrupted photo of a",
    "a blurry photo of the",
    "a photo of the",
    "a good photo of the",
    "a photo of one",
    "a doodle of a",
    "a photo of a",
    "the origami",
    "a sketch of a",
    "the toy",
    "a rendition of the",
    "a photo of a large",
    "a photo of a nice",
    "a photo of a weird",
    "a cartoon",
    "art of a",
    "a plushie",
    "itap of a",
    "a photo of the small",
)

CLIP_SELECTED: tuple[str, ...] = (
    "itap of a",
    "a bad photo of the",
    "a origami",
    "a photo of the large",
    "art of the",
    "a photo of the small",
)


def _cross_entropy(log_scores: np.ndarray, labels: np.ndarray) -> float:
    m = log_scores.max(-1, keepdims=True)
    log_z = m[:, 0] + np.log(np.exp(log_scores - m).sum(-1))
    return float((log_z - log_scores[np.arange(len(labels)), labels]).mean())


def greedy_templates(per_template: np.ndarray, labels: np.ndarray, k: int) -> list[int]:
    """Forward selection of ``k`` templates whose ensemble has the lowest training cross-entropy.

    Each step adds the not yet picked template whose addition gives the ensemble the
    lowest cross-entropy (so the ensemble costs k queries per image set); ties go to
    the lower index.

    Args:
        per_template: training scores [K, N, C] (logits or log-probabilities).
        labels: int [N].
        k: templates to pick (1 <= k <= K).

    Returns:
        indices into the K templates, in the order picked.

    Example:
        >>> scores = np.log(np.array([[[0.4, 0.6]], [[0.9, 0.1]]]))
        >>> greedy_templates(scores, np.array([0]), 1)
        [1]
    """
    log_p = log_softmax_templates(per_template)
    y = np.asarray(labels)
    if y.shape != (log_p.shape[1],):
        raise ConfigError(f"labels must be [N] = [{log_p.shape[1]}], got {list(y.shape)}")
    if not 1 <= k <= log_p.shape[0]:
        raise ConfigError(f"k must be between 1 and the {log_p.shape[0]} templates, got {k}")
    picked: list[int] = []
    total = np.zeros(log_p.shape[1:])
    for step in range(1, k + 1):
        losses = [np.inf if i in picked else _cross_entropy((total + log_p[i]) / step, y) for i in range(log_p.shape[0])]
        best = int(np.argmin(losses))
        picked.append(best)
        total += log_p[best]
    return picked
