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
the softmax that follows): :func:`ensemble_log_probs`. :func:`greedy_templates`
picks K templates from the bank by forward selection on training scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..scores import as_log_scores

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


def ensemble_log_probs(per_template: np.ndarray) -> np.ndarray:
    """Average of K templates' log-probabilities, float32 [N, C].

    Args:
        per_template: scores [K, N, C]; logits or log-probabilities (each template's
            rows are log-softmax normalised first, so both give the same answer).

    Example:
        >>> ensemble_log_probs(np.log(np.array([[[0.9, 0.1]], [[0.5, 0.5]]]))).argmax(-1)
        array([0])
    """
    return _log_softmax(per_template).mean(0).astype(np.float32)


def _log_softmax(per_template: np.ndarray) -> np.ndarray:
    x = np.asarray(per_template, dtype=np.float64)
    if x.ndim != 3 or x.shape[0] < 1:
        raise ConfigError(f"per_template must be [K, N, C] with K >= 1, got shape {list(x.shape)}")
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


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
    log_p = _log_softmax(per_template)
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


def score_templates(
    client: Any, images: Any, class_names: Sequence[str], templates: Sequence[str], category: str = "search", output: str | None = None
) -> np.ndarray:
    """Log-scores [K, N, C] of K templates: one query each (one call per template).

    Args:
        client: a :class:`~craft_sdk.client.ledger.MeteredClient` (charged ``category``)
            or any :class:`~craft_sdk.client.base.PredictionClient`.
        images: an image-set handle or images.
        class_names: the C classes.
        templates: K context strings.
        category: the ledger category when ``client`` is metered.
        output: ``logits`` or ``probs`` when the caller knows it (None: ask the client's capabilities).
    """
    from ..client.ledger import MeteredClient

    names = list(class_names)
    output = output or client.capabilities(templates[0]).output
    rows = []
    for t in templates:
        out = client.predict(images, names, t, category=category) if isinstance(client, MeteredClient) else client.predict(images, names, t)
        rows.append(as_log_scores(out, output))
    return np.stack(rows)


def score_contexts(
    client: Any, images: Any, class_names: Sequence[str], contexts: Sequence[str], offset: np.ndarray | None,
    output: str, category: str = "predict",
) -> np.ndarray:
    """Log-scores [N, C] of a deployed prompt: one context with an optional offset (one query), or the
    average log-probabilities of an ensemble's contexts (one query per context, all paid or none).

    Args:
        client: a :class:`~craft_sdk.client.ledger.MeteredClient` (charged ``category``) or any client.
        images: images or an uploaded handle.
        class_names: the C classes.
        contexts: the contexts each prediction sends (K >= 1).
        offset: the context offset [n_ctx, d] (single context only), or None.
        output: ``logits`` or ``probs``: what the client returns.
        category: the ledger category when ``client`` is metered.
    """
    from ..client.ledger import MeteredClient
    from ..errors import BudgetExceededError

    names = list(class_names)
    if len(contexts) == 1:
        kwargs = {"category": category} if isinstance(client, MeteredClient) else {}
        return as_log_scores(client.predict(images, names, contexts[0], offset, **kwargs), output)
    ledger = getattr(client, "ledger", None)
    if ledger is not None and not ledger.can_afford(len(contexts)):  # all contexts or none: no half-paid prediction
        raise BudgetExceededError(
            f"query budget exhausted: this ensemble sends {len(contexts)} contexts ({len(contexts)} queries) but "
            f"{ledger.remaining} remain; raise the budget"
        )
    handle = client.upload(images) if isinstance(images, (list, tuple)) else images
    return ensemble_log_probs(score_templates(client, handle, names, contexts, category, output=output))
