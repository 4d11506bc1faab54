"""Scoring contexts through a client: one query per context, and the average of an ensemble's log-probabilities.

What a context may be (:func:`context_problem`, :data:`MAX_CONTEXT_CHARS`, :data:`MAX_ENSEMBLE`): one rule for
the tuner's options and the adapter format's validation (``craft_sdk.tuner.config`` re-exports them).
What a deployed prompt sends (:func:`score_contexts`: one context with an optional offset, or an
ensemble's contexts) and how a template ensemble is scored (:func:`score_templates`,
:func:`ensemble_log_probs`). Shared by the tuner (template banks, canaries) and deployment
(:mod:`craft_sdk.deploy.query`), so it lives beside the clients, below both; numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import BudgetExceededError, ConfigError
from ..scores import as_log_scores
from .ledger import MeteredClient

MAX_CONTEXT_CHARS = 1000  # a template / context; the adapter format's limit too
MAX_ENSEMBLE = 100  # contexts an ensemble adapter may send per prediction


def context_problem(text: object) -> str | None:
    """Why ``text`` cannot be a context (the text before the class name), or None when it can.

    Example:
        >>> context_problem("a photo of a") is None, context_problem("a {} of")
        (True, 'has braces (write it without braces)')
    """
    if not isinstance(text, str) or not text.strip():
        return "is empty or not text"
    if "{" in text or "}" in text:
        return "has braces (write it without braces)"
    if len(text) > MAX_CONTEXT_CHARS:
        return f"is over {MAX_CONTEXT_CHARS} characters (at most {MAX_CONTEXT_CHARS} characters)"
    return None


def ensemble_log_probs(per_template: np.ndarray) -> np.ndarray:
    """Average of K templates' log-probabilities, float32 [N, C].

    Args:
        per_template: scores [K, N, C]; logits or log-probabilities (each template's
            rows are log-softmax normalised first, so both give the same answer).

    Example:
        >>> ensemble_log_probs(np.log(np.array([[[0.9, 0.1]], [[0.5, 0.5]]]))).argmax(-1)
        array([0])
    """
    return log_softmax_templates(per_template).mean(0).astype(np.float32)


def log_softmax_templates(per_template: np.ndarray) -> np.ndarray:
    """Each template's rows of ``per_template`` [K, N, C] log-softmax normalised (float64)."""
    x = np.asarray(per_template, dtype=np.float64)
    if x.ndim != 3 or x.shape[0] < 1:
        raise ConfigError(f"per_template must be [K, N, C] with K >= 1, got shape {list(x.shape)}")
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


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
