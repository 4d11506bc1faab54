"""Deployment: :class:`CraftClassifier` = client + learned prompt offset + local refiner.

Each batch of images costs one black-box call (one query, category ``predict``)
carrying the adapter's prompt offset; the refiner then runs locally on the
returned logits, with ONNX Runtime (``refiner.onnx``) or plain numpy. Nothing
here imports torch: ``pip install craft-sdk`` is enough to deploy with any
client that is not the local open_clip one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .adapter import ONNX_FILE, Adapter
from .api import check_compatible
from .client.base import PredictionClient
from .client.ledger import MeteredClient, QueryLedger
from .errors import AdapterError, ConfigError, DataError, NotFittedError
from .images import ImageLike, to_pil_list
from .scores import as_log_scores, softmax

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "onnx", "numpy")


@dataclass(frozen=True)
class ClassifierConfig:
    """How a :class:`CraftClassifier` runs.

    Args:
        batch_size: images per black-box call (one query each).
        backend: refiner backend: ``"auto"`` (ONNX Runtime when ``refiner.onnx`` sits in
            the adapter directory, else numpy), ``"onnx"`` (require the file) or ``"numpy"``.
        threads: ONNX Runtime intra-op threads (1 is fastest for this small MLP; 0 = all cores).
        allow_model_mismatch: serve the adapter through a client whose model id differs.
        budget: hard query ceiling for the ledger the classifier creates (None: unlimited);
            pass your own ``ledger`` instead to share one.
    """

    batch_size: int = 64
    backend: str = "auto"
    threads: int = 1
    allow_model_mismatch: bool = False
    budget: int | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0, got {self.threads}")
        if self.budget is not None and self.budget < 0:
            raise ConfigError(f"budget must be >= 0 or None, got {self.budget}")


@dataclass(frozen=True)
class Predictions:
    """Everything one prediction pass computed, for N images and C classes.

    Args:
        raw_logits: float32 [N, C] black-box logits (log-probabilities for probability clients).
        logits: float32 [N, C] refined logits.
        classes: the C class names, in column order.
        temperature: the adapter's calibration temperature (probabilities = softmax(logits / T)).
    """

    raw_logits: np.ndarray
    logits: np.ndarray
    classes: np.ndarray
    temperature: float = 1.0

    @property
    def probs(self) -> np.ndarray:
        """float32 [N, C] calibrated probabilities: softmax of the refined logits / temperature."""
        return softmax(self.logits, self.temperature)

    @property
    def labels(self) -> np.ndarray:
        """[N] predicted class names."""
        return self.classes[self.logits.argmax(-1)]


class CraftClassifier:
    """A deployed CraFT adapter, with scikit-learn manners.

    Args:
        adapter: the tuned adapter, or None to learn one later with :meth:`fit`.
        client: the black box the adapter was tuned on (any :class:`PredictionClient`).
        config: a :class:`ClassifierConfig` (batch size, backend, threads...).
        ledger: a :class:`QueryLedger` to charge deployment queries to (default: a new one).
        onnx_path: an exported refiner for ``adapter`` (see :func:`craft_sdk.export_onnx`).
        class_names: the class list the caller expects; a different adapter list is an error.

    Raises:
        AdapterError: the client cannot serve the adapter (model id, soft prompts, output
            kind), or the class list or ``refiner.onnx`` does not match the adapter.

    Example:
        >>> import numpy as np
        >>> from craft_sdk import AdapterConfig, CallableClient, Capabilities
        >>> adapter = Adapter(AdapterConfig("my-model", ("cat", "dog"), "a photo of a"))
        >>> scores = lambda ims, names, t, o: np.tile([[0.0, 1.0]], (len(ims), 1))
        >>> clf = CraftClassifier(adapter, CallableClient(scores, Capabilities("my-model")))
        >>> clf.predict([np.zeros((8, 8, 3), np.uint8)]).tolist()
        ['dog']
    """

    def __init__(
        self,
        adapter: Adapter | None,
        client: PredictionClient,
        *,
        config: ClassifierConfig | None = None,
        ledger: QueryLedger | None = None,
        onnx_path: str | Path | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        self.client = client
        self.config = config if config is not None else ClassifierConfig()
        if ledger is not None and self.config.budget is not None:
            raise ConfigError("pass either a ledger or config.budget, not both; set the budget on your ledger")
        self.ledger = ledger if ledger is not None else QueryLedger(self.config.budget)
        self.class_names = None if class_names is None else tuple(class_names)
        self._metered = MeteredClient(client, self.ledger)
        if adapter is not None:
            self._learn(adapter, onnx_path)

    @classmethod
    def from_pretrained(
        cls,
        adapter_dir: str | Path,
        client: PredictionClient,
        *,
        config: ClassifierConfig | None = None,
        ledger: QueryLedger | None = None,
        class_names: Sequence[str] | None = None,
    ) -> CraftClassifier:
        """Load ``adapter_dir`` (and its ``refiner.onnx`` when present) for ``client``.

        Example:
            >>> clf = CraftClassifier.from_pretrained("my-adapter", client)  # doctest: +SKIP
            >>> clf.predict(["cat.jpg", "dog.png"])                          # doctest: +SKIP
            array(['cat', 'dog'], dtype='<U3')
        """
        root = Path(adapter_dir)
        adapter = Adapter.from_pretrained(root)
        return cls(adapter, client, config=config, ledger=ledger, onnx_path=root / ONNX_FILE, class_names=class_names)

    # ------------------------------------------------------------ learning

    def _learn(self, adapter: Adapter, onnx_path: str | Path | None) -> None:
        names = adapter.config.class_names
        if self.class_names is not None and self.class_names != names:
            raise AdapterError(
                f"class list mismatch: adapter has {_short(names)}, expected {_short(self.class_names)}; "
                "use the adapter tuned for these classes"
            )
        check_compatible(adapter, self.client, self.config.allow_model_mismatch)
        self.refiner_, self.refiner_backend_ = self._make_refiner(adapter, onnx_path)
        self.adapter_ = adapter
        self.classes_ = np.array(names)
        logger.info("CraftClassifier ready: %d classes, refiner backend %s", len(names), self.refiner_backend_)

    def _make_refiner(self, adapter: Adapter, onnx_path: str | Path | None) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
        backend = self.config.backend
        has_file = onnx_path is not None and Path(onnx_path).is_file()
        if backend == "onnx" and onnx_path is None:
            raise AdapterError("backend 'onnx' needs a refiner.onnx; use from_pretrained or pass onnx_path=")
        if backend == "onnx" or (backend == "auto" and has_file):
            from .export import OnnxRefiner

            assert onnx_path is not None
            return OnnxRefiner(onnx_path, adapter, self.config.threads), "onnx"
        return adapter.refine, "numpy"

    def fit(
        self, images: Sequence[ImageLike], labels: Sequence[Any], class_names: Sequence[str] | None = None, **tune_overrides: Any
    ) -> CraftClassifier:
        """Tune an adapter through the client with :func:`craft_sdk.tune` (needs the ``[train]`` extra).

        Args:
            images: training images (PIL, paths or uint8 arrays), length N.
            labels: N class indices into ``class_names``, or N class names (then the class
                list defaults to their sorted unique values).
            class_names: ordered class names (required for integer labels).
            **tune_overrides: :class:`~craft_sdk.TuneConfig` fields (``mode``, ``budget``, ``seed``...).

        Returns:
            self, fitted: ``adapter_``, ``classes_`` are set.

        Example:
            >>> clf = CraftClassifier(None, client).fit(images, labels, budget=2000)  # doctest: +SKIP
        """
        from .api import tune
        from .data import ImageDataset

        y = np.asarray(labels)
        if y.dtype.kind in "US":
            names = tuple(class_names) if class_names is not None else tuple(sorted(set(y.tolist())))
            index = {n: i for i, n in enumerate(names)}
            unknown = sorted(set(y.tolist()) - set(index))
            if unknown:
                raise DataError(f"labels {unknown[:5]} are not in class_names; add them or fix the labels")
            y = np.array([index[v] for v in y.tolist()], dtype=np.int64)
        elif class_names is None:
            raise DataError("integer labels need class_names; pass the ordered class list")
        else:
            names = tuple(class_names)
        dataset = ImageDataset(to_pil_list(images), y, names)
        # tuning queries land in this classifier's ledger too (categories search/refine), so
        # ``clf.ledger`` accounts for every billable call; the tuning plan still fits TuneConfig.budget.
        self._learn(tune(self.client, dataset, ledger=self.ledger, **tune_overrides), None)
        return self

    # ------------------------------------------------------------ inference

    def _check_fitted(self) -> Adapter:
        adapter = getattr(self, "adapter_", None)
        if adapter is None:
            raise NotFittedError("this CraftClassifier has no adapter yet; call fit() or use CraftClassifier.from_pretrained")
        return adapter

    def refine(self, scores: np.ndarray) -> np.ndarray:
        """Refined logits [N, C] from black-box scores [N, C] locally (no query).

        Probabilities (from a ``"probs"`` client) are turned into log-probabilities
        first, as the tuner does.
        """
        return self.refiner_(self._to_logits(scores, self._check_fitted()))

    @staticmethod
    def _to_logits(scores: np.ndarray, adapter: Adapter) -> np.ndarray:
        return as_log_scores(scores, adapter.config.output)

    def predict_all(self, images: Sequence[ImageLike]) -> Predictions:
        """Raw logits, refined logits, probabilities and labels, from one pass over ``images``.

        Args:
            images: PIL images, file paths or uint8 arrays (a list, or an array [N, H, W, 3]).

        Example:
            >>> out = clf.predict_all(images)                   # doctest: +SKIP
            >>> out.raw_logits.shape, out.probs.shape, out.labels[:2]  # doctest: +SKIP
        """
        adapter = self._check_fitted()
        if isinstance(images, (str, Path, Image.Image)) or (isinstance(images, np.ndarray) and images.ndim < 4):
            raise DataError("expected a sequence of images, got a single image; wrap it in a list")
        names, template, bs = list(adapter.config.class_names), adapter.config.template, self.config.batch_size
        raws, refined = [], []
        for start in range(0, len(images), bs):
            batch = to_pil_list(images[start : start + bs])
            scores = self._metered.predict(batch, names, template, adapter.offset, category="predict")
            raw = self._to_logits(scores, adapter)
            raws.append(raw)
            refined.append(self.refiner_(raw))
        if not raws:
            raise DataError("the image list is empty")
        return Predictions(np.concatenate(raws), np.concatenate(refined), self.classes_, adapter.temperature)

    def predict(self, images: Sequence[ImageLike]) -> np.ndarray:
        """[N] predicted class names (entries of ``classes_``)."""
        return self.predict_all(images).labels

    def predict_proba(self, images: Sequence[ImageLike]) -> np.ndarray:
        """float32 [N, C] calibrated class probabilities (softmax of refined logits / the adapter's temperature), columns in ``classes_`` order."""
        return self.predict_all(images).probs

    def decision_function(self, images: Sequence[ImageLike]) -> np.ndarray:
        """float32 [N, C] refined logits."""
        return self.predict_all(images).logits


def _short(names: Sequence[str]) -> str:
    head = ", ".join(names[:4])
    return f"[{head}{', ...' if len(names) > 4 else ''}] ({len(names)} classes)"
