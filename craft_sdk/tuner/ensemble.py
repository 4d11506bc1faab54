"""The ``ensemble`` mode: a template ensemble picked from a bank, a baseline that needs no search.

Every context of the bank (:data:`~craft_sdk.tuner.templates.CLIP_IMAGENET_CONTEXTS` by default)
is scored once on the run's scored images (one query each; the robust protocol's check
images ride along), ``ensemble_k`` of them are picked by greedy forward selection on the
search images (:func:`~craft_sdk.tuner.templates.greedy_templates`), and their
log-probabilities are averaged (:func:`~craft_sdk.tuner.templates.ensemble_log_probs`).
The robust protocol then deploys the ensemble only when it beats zero-shot on the check
images beyond noise, like any other behaviour (:mod:`craft_sdk.tuner.finish`). A deployed
ensemble costs ``k`` queries per image set at prediction time.

A resumed ensemble run scores the bank again (the ledger pays it again; it is the run's
only cost after the zero-shot baseline).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._fileio import read_lines
from ..client.contexts import MAX_ENSEMBLE, context_problem
from ..errors import BudgetExceededError, ConfigError
from .templates import CLIP_IMAGENET_CONTEXTS, CLIP_SELECTED, ensemble_log_probs, greedy_templates, score_templates

logger = logging.getLogger(__name__)

BANKS: dict[str, tuple[str, ...]] = {"clip-imagenet": CLIP_IMAGENET_CONTEXTS, "clip-selected": CLIP_SELECTED}
MAX_BANK = 1000


def load_bank(name: str) -> tuple[str, ...]:
    """The contexts of a named bank, or of a UTF-8 file with one context per line (blank lines skipped).

    Raises:
        ConfigError: unknown name, unreadable file, a context with braces, duplicates, or an empty bank.

    Example:
        >>> len(load_bank("clip-selected"))
        6
    """
    if name in BANKS:
        return BANKS[name]
    if not Path(name).is_file():
        raise ConfigError(f"template_bank {name!r} is neither {' nor '.join(BANKS)} nor a file; pass a file with one context per line")
    contexts = read_lines(name, "template_bank")
    bad = [c for c in contexts if context_problem(c)]
    if bad:
        raise ConfigError(f"template_bank context {bad[0][:60]!r} {context_problem(bad[0])}; write the text before the class name, e.g. 'a sketch of a'")
    if not contexts or len(contexts) > MAX_BANK or len(set(contexts)) != len(contexts):
        raise ConfigError(f"template_bank {name} must hold 1 to {MAX_BANK} distinct contexts, got {len(contexts)} ({len(set(contexts))} distinct)")
    return tuple(contexts)


def ensemble_bank(config: Any) -> tuple[str, ...]:
    """The bank an ``ensemble`` run scores, checked against ``ensemble_k`` (before any query)."""
    bank = load_bank(config.template_bank)
    if config.ensemble_k > len(bank):
        raise ConfigError(f"ensemble_k {config.ensemble_k} exceeds the {len(bank)} contexts of template_bank {config.template_bank!r}; lower --ensemble-k")
    if config.ensemble_k == 0 and len(bank) > MAX_ENSEMBLE:
        raise ConfigError(f"ensemble_k 0 keeps all {len(bank)} contexts, over the {MAX_ENSEMBLE} an adapter may send per prediction; set --ensemble-k")
    return bank


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields, not records
class EnsemblePick:
    """``ensemble`` mode: the picked contexts, their log-probabilities on the scored images [N, C], the bank's name."""

    texts: tuple[str, ...]
    logits: np.ndarray
    bank: str


def select_ensemble(
    config: Any, bank: tuple[str, ...], client: Any, ledger: Any, handle: Any, names: list[str], search_labels: np.ndarray
) -> EnsemblePick:
    """Score ``bank`` (one query per context) on the images behind ``handle`` (the search images first),
    pick ``ensemble_k`` contexts greedily on the search images (``search_labels``, [N_search])."""
    k = len(bank) if config.ensemble_k == 0 else config.ensemble_k
    if not ledger.can_afford(len(bank)):
        raise BudgetExceededError(
            f"the ensemble scores {len(bank)} contexts ({len(bank)} queries) but {ledger.remaining} of the budget remain; "
            "raise --budget or use a smaller --template-bank"
        )
    scores = score_templates(client, handle, names, bank, category="search")
    picked = greedy_templates(scores[:, : len(search_labels)], search_labels, k)
    texts = tuple(bank[i] for i in picked)
    logits = ensemble_log_probs(scores[picked])
    logger.info("ensemble of %d of %d contexts: %s", k, len(bank), list(texts))
    return EnsemblePick(texts, np.asarray(logits), config.template_bank)
