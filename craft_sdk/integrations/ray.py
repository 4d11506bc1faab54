"""Batch prediction on a Ray cluster: a ``Dataset.map_batches``-ready callable class.

Each Ray actor builds the client and loads the adapter once, in its constructor, then
classifies every batch it is handed with one black-box query per ``batch_size`` images.
Needs ``pip install 'craft-sdk[ray]'`` (ray[data]); this module itself imports no Ray.

Example:
    >>> import ray
    >>> from craft_sdk.integrations.ray import CraftPredictor
    >>> ds = ray.data.read_images("s3://bucket/photos", include_paths=True)          # doctest: +SKIP
    >>> out = ds.map_batches(CraftPredictor, fn_constructor_kwargs={"adapter": "org/digits-adapter",
    ...                      "model": "demo"}, batch_size=64, compute=ray.data.ActorPoolStrategy(size=2))  # doctest: +SKIP
    >>> out.select_columns(["path", "label", "prob"]).write_parquet("preds/")     # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..deploy.classifier import ClassifierConfig, CraftClassifier

logger = logging.getLogger(__name__)


class CraftPredictor:
    """Classify a batch of images (a dict of columns) with an adapter loaded once per worker.

    Args:
        adapter: adapter directory or Hub repo id (``revision``/``subfolder`` as in
            :meth:`CraftClassifier.from_pretrained`).
        model: the black box: ``"demo"``, an open_clip name, ``local-dir:/path`` or a server URL.
        client_kwargs: passed to :func:`craft_sdk.create_client` (``pretrained``, ``api_key``...).
        batch_size: images per black-box call inside one Ray batch.
        backend: refiner backend (``auto``, ``onnx``, ``numpy``).
        image_column: column of uint8 image arrays (e.g. from ``ray.data.read_images``); when absent,
            ``path_column`` is read from disk instead.
        path_column: column of image file paths.

    Returns (per call):
        The input columns except ``image_column``, plus ``label`` [B], ``prob`` [B] (top probability)
        and ``probs`` [B, C] (calibrated probabilities in ``classes_`` order).
    """

    def __init__(
        self,
        adapter: str,
        *,
        model: str = "demo",
        client_kwargs: dict[str, Any] | None = None,
        revision: str | None = None,
        subfolder: str | None = None,
        batch_size: int = 64,
        backend: str = "auto",
        image_column: str = "image",
        path_column: str = "path",
    ) -> None:
        from ..api import create_client

        self.image_column, self.path_column = image_column, path_column
        client = create_client(model, **(client_kwargs or {}))
        self.classifier = CraftClassifier.from_pretrained(
            adapter, client, revision=revision, subfolder=subfolder,
            config=ClassifierConfig(batch_size=batch_size, backend=backend),
        )
        logger.info("CraftPredictor loaded %s (%d classes)", adapter, len(self.classifier.classes_))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.image_column in batch:
            column = batch[self.image_column]
            images: Any = column if isinstance(column, np.ndarray) and column.ndim == 4 else list(column)
        elif self.path_column in batch:
            images = [str(p) for p in batch[self.path_column]]
        else:
            raise KeyError(f"batch has neither an {self.image_column!r} nor a {self.path_column!r} column: {sorted(batch)}")
        out = self.classifier.predict_all(images)
        result = {k: v for k, v in batch.items() if k != self.image_column}
        result.update(label=out.labels, prob=out.probs.max(axis=1), probs=out.probs)
        return result
