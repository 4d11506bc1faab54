"""The deployment layer: a tuned adapter predicting through its black box, without the training package.

Modules: ``query`` (what an adapter sends for a set of images), ``classifier`` (:class:`CraftClassifier`,
scikit-learn style; its ``fit`` tunes, with the ``[train]`` extra), ``stream`` (streaming batch prediction over files), ``sinks`` (writing
predictions), ``canary`` (drift checks). The refiner they run is the numpy one (:mod:`craft_sdk.mlp`,
through :meth:`~craft_sdk.adapter.Adapter.refine`) or an exported ``refiner.onnx``
(:mod:`craft_sdk.adapter.runtime`). Importing this package needs neither torch nor the ``[train]`` extra.
"""

from __future__ import annotations

from .canary import CanaryReport, check_canary
from .classifier import ClassifierConfig, CraftClassifier, Predictions
from .query import raw_scores
from .sinks import PredictionSink
from .stream import BatchResult, iter_image_paths, predict_stream

__all__ = [
    "BatchResult", "CanaryReport", "ClassifierConfig", "CraftClassifier", "PredictionSink", "Predictions", "check_canary",
    "iter_image_paths", "predict_stream", "raw_scores",
]
