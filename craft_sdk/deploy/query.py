"""The query policy of a deployed adapter: what it sends to the black box for a set of images.

The template with the prompt offset (one query), or each context of an ensemble with the average
of their log-probabilities (one query per context, all paid or none): the adapter's ``contexts``
and ``offset`` say which. Prediction, drift checks and evaluation all ask through here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..adapter import Adapter
from ..client.contexts import score_contexts


def raw_scores(adapter: Adapter, client: Any, images: Any, *, category: str = "predict") -> np.ndarray:
    """The black box's log-scores [N, C] for ``images`` as ``adapter`` asks for them.

    Args:
        adapter: the deployed adapter.
        client: a :class:`~craft_sdk.client.ledger.MeteredClient` (charged ``category``) or any client.
        images: images or an uploaded handle.
        category: the ledger category when ``client`` is metered.
    """
    cfg = adapter.config
    return score_contexts(client, images, cfg.class_names, adapter.contexts, adapter.offset, cfg.output, category)
