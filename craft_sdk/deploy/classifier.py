"""Deployment and scikit-learn manners: :class:`CraftClassifier` = client + learned prompt offset + local refiner.

Each batch of images costs one black-box call (one query, category ``predict``)
carrying the adapter's prompt offset; the refiner then runs locally on the
returned logits, with ONNX Runtime (``refiner.onnx``) or plain numpy. Nothing
here imports torch or scikit-learn: ``pip install craft-sdk`` is enough to deploy
with any client that is not the local open_clip one; ``fit`` needs ``[train]``.
"""

from __future__ import annotations

import copy
import inspect
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..adapter import ONNX_FILE, Adapter, check_compatible
from ..client.base import PredictionClient
from ..client.ledger import MeteredClient, QueryLedger
from ..client.pricing import PriceTable, usage_summary
from ..errors import AdapterError, ConfigError, DataError, DriftError, NotFittedError
from ..images import ImageLike, to_pil_list
from ..scores import as_log_scores
from .query import raw_scores

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "onnx", "numpy")
ON_DRIFT = ("raise", "warn")
_CANARY_LOCK = threading.Lock()  # batch counting and canary checks of concurrent predict_all calls
_OWN_TUNE_FIELDS = ("mode", "budget", "seed")


@dataclass(frozen=True)
class ClassifierConfig:
    """How a :class:`CraftClassifier` runs at prediction time.

    Args:
        batch_size: images per black-box call (one query each).
        backend: refiner backend: ``"auto"`` (ONNX Runtime when ``refiner.onnx`` sits in
            the adapter directory, else numpy), ``"onnx"`` (require the file) or ``"numpy"``.
        threads: ONNX Runtime intra-op threads (1 is fastest for this small MLP; 0 = all cores).
        allow_model_mismatch: serve the adapter through a client whose model id differs.
        budget: hard query ceiling for the ledger the classifier creates (None: unlimited);
            pass your own ``ledger`` instead to share one.
        canary_every: check the adapter's drift canary (:func:`craft_sdk.check_canary`) before the
            first batch and then before every ``canary_every``-th batch; 0 (default) never checks. Each
            check costs one query per context the adapter sends (ledger category ``canary``).
        on_drift: ``raise`` a :class:`~craft_sdk.errors.DriftError` (the batch is not sent) or ``warn``
            (log a warning and go on) when the canary has drifted.
        price: a :class:`~craft_sdk.client.pricing.PriceTable` for the ledger the classifier creates: its
            :meth:`CraftClassifier.provider_cost` then reports money too (pass your own ``ledger`` instead to share one).
    """

    batch_size: int = 64
    backend: str = "auto"
    threads: int = 1
    allow_model_mismatch: bool = False
    budget: int | None = None
    canary_every: int = 0
    on_drift: str = "raise"
    price: PriceTable | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0, got {self.threads}")
        if self.budget is not None and self.budget < 0:
            raise ConfigError(f"budget must be >= 0 or None, got {self.budget}")
        if not isinstance(self.canary_every, int) or isinstance(self.canary_every, bool) or self.canary_every < 0:
            raise ConfigError(f"canary_every must be an integer >= 0 (0: never check), got {self.canary_every!r}")
        if self.on_drift not in ON_DRIFT:
            raise ConfigError(f"on_drift must be one of {ON_DRIFT}, got {self.on_drift!r}")


@dataclass(frozen=True)
class Predictions:
    """Everything one prediction pass computed, for N images and C classes.

    Args:
        raw_logits: float32 [N, C] black-box logits (log-probabilities for probability clients).
        logits: float32 [N, C] refined logits.
        classes: the C labels, in column order (the classifier's ``classes_``).
        probs: float32 [N, C] calibrated probabilities (the adapter's ``probabilities(logits)``).
        seconds: wall time spent in the black box (``"black_box"``) and the refiner (``"refiner"``).
    """

    raw_logits: np.ndarray
    logits: np.ndarray
    classes: np.ndarray
    probs: np.ndarray
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def labels(self) -> np.ndarray:
        """[N] predicted labels (entries of ``classes``)."""
        return self.classes[self.logits.argmax(-1)]


class CraftClassifier:
    """A CraFT classifier over a black-box VLM, with scikit-learn manners.

    The constructor only stores its arguments; :meth:`fit` tunes an adapter through
    ``client`` (prompt search + refiner, needs the ``[train]`` extra), or
    :meth:`from_pretrained` loads a trained one. ``get_params``/``set_params``,
    ``sklearn.base.clone`` (the client is shared, never copied), ``check_is_fitted``,
    ``Pipeline``, ``cross_val_score`` and ``GridSearchCV`` work; scikit-learn itself is
    not required.

    Every query goes through ``ledger``, which clones share: a 5-fold
    ``cross_val_score`` runs 5 tunings (5 x ``budget`` queries plus the prediction
    batches), and ``GridSearchCV`` runs one per fold and candidate plus the refit; all of
    them show on the original classifier's ``ledger``. Run them with ``n_jobs=1``.

    Args:
        client: the black box (any :class:`PredictionClient`).
        mode: tuning mode (``zero-shot``, ``pg``, ``pr``, ``pg+pr``, ``craft``).
        budget: query budget of one tuning (one ``fit``).
        shots: train on this many images per class drawn (seeded) from ``X``; None = all.
        val_shots: hold this many images per class out of training for model selection.
        seed: seed of the shot sample and of tuning.
        class_names: the names used in prompts: None (labels must be strings: they are
            the names), a mapping label → name, or a sequence whose entry k names integer label k.
        tune_options: further :class:`~craft_sdk.TuneConfig` fields (``refiner_layers``, ``lam``...).
        config: a :class:`ClassifierConfig` (batch size, refiner backend, threads...).
        ledger: the :class:`QueryLedger` charged for every query (default: a new one
            with ``config.budget`` as its ceiling).

    Example:
        >>> import numpy as np
        >>> from craft_sdk import AdapterConfig, CallableClient, Capabilities
        >>> adapter = Adapter(AdapterConfig("my-model", ("cat", "dog"), "a photo of a"))
        >>> scores = lambda ims, names, t, o: np.tile([[0.0, 1.0]], (len(ims), 1))
        >>> clf = CraftClassifier.from_adapter(adapter, CallableClient(scores, Capabilities("my-model")))
        >>> clf.predict([np.zeros((8, 8, 3), np.uint8)]).tolist()
        ['dog']
    """

    _estimator_type = "classifier"

    def __init__(
        self,
        client: PredictionClient,
        *,
        mode: str = "craft",
        budget: int = 8000,
        shots: int | None = None,
        val_shots: int = 0,
        seed: int = 0,
        class_names: Mapping[Any, str] | Sequence[str] | None = None,
        tune_options: Mapping[str, Any] | None = None,
        config: ClassifierConfig | None = None,
        ledger: QueryLedger | None = None,
    ) -> None:
        self.client = client
        self.mode = mode
        self.budget = budget
        self.shots = shots
        self.val_shots = val_shots
        self.seed = seed
        self.class_names = class_names
        self.tune_options = tune_options
        self.config = config
        self.ledger = ledger if ledger is not None else QueryLedger(None if config is None else config.budget,
                                                                     price=None if config is None else config.price)

    # ------------------------------------------------------------ scikit-learn protocol

    @classmethod
    def _param_names(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor arguments, by name (``deep`` is accepted for scikit-learn; nothing nests)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> CraftClassifier:
        """Set constructor arguments by name; returns self. Unknown names are a :class:`ConfigError`."""
        valid = self._param_names()
        for name, value in params.items():
            if name not in valid:
                raise ConfigError(f"invalid parameter {name!r} for CraftClassifier; valid: {valid}")
            setattr(self, name, value)
        return self

    def __sklearn_clone__(self) -> CraftClassifier:
        """An unfitted copy with the same parameters; the client and the ledger are shared, not copied."""
        shared = ("client", "ledger")
        params = {k: (v if k in shared else copy.deepcopy(v)) for k, v in self.get_params().items()}
        return type(self)(**params)

    def __sklearn_is_fitted__(self) -> bool:
        return getattr(self, "adapter_", None) is not None

    def __sklearn_tags__(self) -> Any:
        """scikit-learn (>= 1.6) tags: a classifier that needs ``y`` and takes images, not a 2-D array."""
        from sklearn.utils import ClassifierTags, InputTags, Tags, TargetTags

        return Tags(
            estimator_type="classifier",
            target_tags=TargetTags(required=True),
            classifier_tags=ClassifierTags(),
            input_tags=InputTags(two_d_array=False),
            non_deterministic=False,
        )

    def __repr__(self) -> str:
        defaults = {p.name: p.default for p in inspect.signature(type(self).__init__).parameters.values()}
        shown = [f"{k}={v!r}" for k, v in self.get_params().items()
                 if k not in ("client", "ledger") and not _same(v, defaults.get(k))]
        return f"{type(self).__name__}({', '.join([type(self.client).__name__ + '(...)', *shown])})"

    # ------------------------------------------------------------ loading

    @classmethod
    def from_adapter(
        cls,
        adapter: Adapter,
        client: PredictionClient,
        *,
        config: ClassifierConfig | None = None,
        ledger: QueryLedger | None = None,
        onnx_path: str | Path | None = None,
    ) -> CraftClassifier:
        """A fitted classifier serving ``adapter`` through ``client``; ``classes_`` are its class names.

        Raises:
            AdapterError: the client cannot serve the adapter (model id, soft prompts, output
                kind), or ``onnx_path`` holds a refiner exported from another adapter.
        """
        if ledger is not None and config is not None and (config.budget is not None or config.price is not None):
            raise ConfigError("pass either a ledger or config.budget/config.price, not both; set them on your ledger")
        clf = cls(client, config=config, ledger=ledger)
        clf._learn(adapter, onnx_path, np.array(adapter.config.class_names))
        return clf

    @classmethod
    def from_pretrained(
        cls,
        adapter: str | Path,
        client: PredictionClient,
        *,
        revision: str | None = None,
        subfolder: str | None = None,
        config: ClassifierConfig | None = None,
        ledger: QueryLedger | None = None,
    ) -> CraftClassifier:
        """Load an adapter directory or Hugging Face Hub repo id (and its ``refiner.onnx`` when present).

        Args:
            adapter: a local adapter directory, or a Hub repo id ``"org/name"`` (``[hub]`` extra).
            client: the black box the adapter was tuned on.
            revision: Hub branch, tag or commit (Hub ids only).
            subfolder: the adapter's folder inside the directory or repo.
            config, ledger: see :class:`CraftClassifier`.

        Example:
            >>> clf = CraftClassifier.from_pretrained("my-adapter", client)  # doctest: +SKIP
            >>> clf.predict(["cat.jpg", "dog.png"])                          # doctest: +SKIP
            array(['cat', 'dog'], dtype='<U3')
        """
        from ..adapter.hub import resolve_adapter_dir

        root = resolve_adapter_dir(adapter, revision=revision, subfolder=subfolder)
        loaded = Adapter.from_pretrained(root)
        return cls.from_adapter(loaded, client, config=config, ledger=ledger, onnx_path=root / ONNX_FILE)

    def save_pretrained(self, directory: str | Path, *, repo_id: str | None = None) -> Path:
        """Write the fitted adapter and its model card to ``directory`` (:meth:`Adapter.save_pretrained`);
        :meth:`from_pretrained` loads it back. A loaded classifier's ``classes_`` are the prompt names
        (``class_names_``), whatever labels ``fit`` saw.

        Example:
            >>> CraftClassifier(client, budget=2000).fit(paths, labels).save_pretrained("my-adapter")  # doctest: +SKIP
        """
        return self._check_fitted().save_pretrained(directory, repo_id=repo_id)

    @property
    def _runtime(self) -> ClassifierConfig:
        return self.config if self.config is not None else ClassifierConfig()

    def _learn(self, adapter: Adapter, onnx_path: str | Path | None, classes: np.ndarray) -> None:
        check_compatible(adapter, self.client, self._runtime.allow_model_mismatch)
        self.refiner_, self.refiner_backend_ = self._make_refiner(adapter, onnx_path)
        self.adapter_ = adapter
        self.classes_ = classes
        self.class_names_ = adapter.config.class_names
        self.canary_report_ = None  # the last drift-canary check (config.canary_every)
        self.batches_sent_ = 0
        logger.info("CraftClassifier ready: %d classes, refiner backend %s", len(classes), self.refiner_backend_)

    def _make_refiner(self, adapter: Adapter, onnx_path: str | Path | None) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
        backend = self._runtime.backend
        has_file = onnx_path is not None and Path(onnx_path).is_file()
        if backend == "onnx" and not has_file:
            raise AdapterError("backend 'onnx' needs a refiner.onnx next to the adapter; run craft-sdk export-onnx ADAPTER")
        if backend == "onnx" or (backend == "auto" and has_file):
            return adapter.onnx_refiner(onnx_path, self._runtime.threads), "onnx"  # type: ignore[arg-type]
        return adapter.refine, "numpy"

    # ------------------------------------------------------------ learning

    def fit(self, X: Sequence[ImageLike], y: Sequence[Any]) -> CraftClassifier:
        """Tune an adapter on images ``X`` with labels ``y`` through the client (``[train]`` extra).

        ``classes_`` are the sorted unique values of ``y`` (as in scikit-learn) and
        :meth:`predict` returns values of that kind. The prompt names come from
        ``class_names`` (or from string labels). One call costs up to ``budget`` queries,
        charged to ``ledger``.

        Args:
            X: N images: PIL images, file paths, or uint8 arrays (a list, or an array [N, H, W, 3]).
            y: N labels: strings, or any labels when ``class_names`` names them.

        Returns:
            self, with ``adapter_``, ``classes_``, ``class_names_`` set.

        Example:
            >>> clf = CraftClassifier(client, mode="pg", budget=2000).fit(paths, labels)  # doctest: +SKIP
        """
        from ..data import ImageDataset, sample_k_shot
        from ..tuning import merged_config, tune_run

        labels = np.asarray(y)
        if labels.ndim != 1 or len(labels) != _n_images(X):
            raise DataError(f"y must be one label per image: got {_n_images(X)} images and labels of shape {list(labels.shape)}")
        classes, index = np.unique(labels, return_inverse=True)
        if len(classes) < 2:
            raise DataError(f"fit needs at least 2 classes, got {len(classes)}")
        names = self._prompt_names(classes)
        full = ImageDataset([None] * len(labels), index, names)  # type: ignore[list-item]  # labels only: decode what is used
        train_idx = np.arange(len(labels)) if self.shots is None else sample_k_shot(full, self.shots, self.seed)
        val_idx = np.array([], np.int64)
        if self.val_shots:
            val_idx = sample_k_shot(full, self.val_shots, self.seed + 1, exclude=train_idx)
            if self.shots is None:
                train_idx = np.setdiff1d(train_idx, val_idx)

        def dataset(idx: np.ndarray) -> ImageDataset:
            return ImageDataset(to_pil_list([X[int(i)] for i in idx]), index[idx], names)

        options = dict(self.tune_options or {})
        clash = sorted(set(options) & set(_OWN_TUNE_FIELDS))
        if clash:
            raise ConfigError(f"tune_options sets {clash}; pass them as CraftClassifier arguments instead")
        val = dataset(val_idx) if len(val_idx) else None
        config = merged_config(None, {**options, "mode": self.mode, "budget": self.budget, "seed": self.seed})
        adapter = tune_run(self.client, dataset(train_idx), val, config, ledger=self.ledger, progress=False).adapter
        self._learn(adapter, None, classes)
        return self

    def _prompt_names(self, classes: np.ndarray) -> tuple[str, ...]:
        spec = self.class_names
        if spec is None:
            if classes.dtype.kind not in "US":
                raise DataError("labels are not strings; pass class_names (a list naming label k, or a mapping label -> name)")
            return tuple(str(c) for c in classes)
        if isinstance(spec, Mapping):
            missing = [c for c in classes.tolist() if c not in spec]
            if missing:
                raise DataError(f"class_names has no name for label(s) {missing[:5]}")
            return tuple(str(spec[c]) for c in classes.tolist())
        if classes.dtype.kind not in "iu":
            raise ConfigError("a class_names list names integer labels; with string labels pass a mapping or nothing")
        spec = list(spec)
        if classes.min() < 0 or classes.max() >= len(spec):
            raise DataError(f"labels {classes.min()}..{classes.max()} do not index class_names ({len(spec)} names)")
        return tuple(spec[int(c)] for c in classes)

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
        return self.refiner_(as_log_scores(scores, self._check_fitted().config.output))

    def predict_all(self, X: Sequence[ImageLike]) -> Predictions:
        """Raw logits, refined logits, probabilities and labels, from one pass over ``X``.

        Args:
            X: PIL images, file paths or uint8 arrays (a list, or an array [N, H, W, 3]);
                one query per ``config.batch_size`` images.

        Example:
            >>> out = clf.predict_all(images)                   # doctest: +SKIP
            >>> out.raw_logits.shape, out.probs.shape, out.labels[:2]  # doctest: +SKIP
        """
        adapter = self._check_fitted()
        if isinstance(X, (str, Path, Image.Image)) or (isinstance(X, np.ndarray) and X.ndim < 4):
            raise DataError("expected a sequence of images, got a single image; wrap it in a list")
        bs = self._runtime.batch_size
        metered = MeteredClient(self.client, self.ledger)
        raws, refined, seconds = [], [], {"black_box": 0.0, "refiner": 0.0}
        for start in range(0, len(X), bs):
            batch = to_pil_list(X[start : start + bs])
            self._canary_gate(adapter, metered)
            t0 = time.perf_counter()
            raw = raw_scores(adapter, metered, batch, category="predict")  # one query per context sent
            t1 = time.perf_counter()
            refined.append(self.refiner_(raw))
            seconds["black_box"] += t1 - t0
            seconds["refiner"] += time.perf_counter() - t1
            raws.append(raw)
        if not raws:
            raise DataError("the image list is empty")
        logits = np.concatenate(refined)
        self.predicted_images_ = getattr(self, "predicted_images_", 0) + len(logits)  # for provider_cost()
        return Predictions(np.concatenate(raws), logits, self.classes_, adapter.probabilities(logits), seconds)

    def provider_cost(self) -> dict[str, Any]:
        """What this classifier's predictions sent to the provider (ledger category ``predict``): ``provider_usage``,
        ``cost`` at the ledger's price (None without one) and both per 1,000 images predicted (``per_1000_images``).

        Example:
            >>> clf = CraftClassifier.from_pretrained("my-adapter", client, config=ClassifierConfig(price=price))  # doctest: +SKIP
            >>> clf.predict(images); clf.provider_cost()["per_1000_images"]["cost"]  # doctest: +SKIP
        """
        return usage_summary(self.ledger.usage_by_category["predict"], getattr(self, "predicted_images_", 0), self.ledger.price)

    def _canary_gate(self, adapter: Adapter, metered: MeteredClient) -> None:
        """Count one batch; before the first and every ``canary_every``-th, check the drift canary.
        With ``on_drift="raise"`` every batch is refused while the last check says drifted."""
        every = self._runtime.canary_every
        if not every:
            return
        with _CANARY_LOCK:  # concurrent batches wait for a check in progress
            due = self.batches_sent_ % every == 0
            self.batches_sent_ += 1
            report, fresh = self.canary_report_, False
            if due and (report is None or report.recorded):
                from .canary import check_canary

                report = self.canary_report_ = check_canary(adapter, metered)
                fresh = True
        if report is None or not (fresh or self._runtime.on_drift == "raise"):
            return
        if not report.recorded:
            if fresh:
                logger.warning("canary_every is set but %s", report.summary())
        elif report.drifted:
            message = (f"the black box drifted since tuning (canary distance {report.distance:.1f} > "
                       f"{report.tolerance:g} noise units); run `craft-sdk check ADAPTER --model MODEL` for details")
            if self._runtime.on_drift == "raise":
                raise DriftError(message)
            logger.warning("%s", message)

    def predict(self, X: Sequence[ImageLike]) -> np.ndarray:
        """[N] predicted labels, of the kind ``fit`` saw (entries of ``classes_``)."""
        return self.predict_all(X).labels

    def predict_proba(self, X: Sequence[ImageLike]) -> np.ndarray:
        """float32 [N, C] calibrated probabilities (the adapter's ``probabilities`` of the refined logits), columns in ``classes_`` order."""
        return self.predict_all(X).probs

    def decision_function(self, X: Sequence[ImageLike]) -> np.ndarray:
        """float32 [N, C] refined logits, columns in ``classes_`` order."""
        return self.predict_all(X).logits

    def score(self, X: Sequence[ImageLike], y: Sequence[Any], sample_weight: Sequence[float] | None = None) -> float:
        """Mean accuracy of :meth:`predict` on ``X`` against ``y`` (optionally weighted)."""
        truth = np.asarray(y)
        hits = (self.predict(X) == truth).astype(np.float64)
        return float(np.average(hits, weights=None if sample_weight is None else np.asarray(sample_weight, np.float64)))


def _n_images(X: Any) -> int:
    if isinstance(X, (str, Path, Image.Image)) or (isinstance(X, np.ndarray) and X.ndim < 4):
        raise DataError("expected a sequence of images, got a single image; wrap it in a list")
    return len(X)


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) if not isinstance(a, np.ndarray) else False
    except Exception:  # comparisons of exotic parameter values
        return False
