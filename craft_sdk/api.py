"""Verb-named entry points composing client → tuner → adapter (through :mod:`craft_sdk.tuning`): what the CLI calls."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .adapter import Adapter, check_compatible
from .client.base import PredictionClient
from .client.ledger import MeteredClient, QueryLedger
from .client.pricing import PriceTable, usage_summary
from .client.schemes import parse_model
from .client.usage import usage_of
from .data import DataSplits, ImageDataset, load_dataset
from .deploy.query import raw_scores
from .errors import AdapterError
from .scores import as_log_scores, softmax
from .tuning import tune_run  # re-exported: the facade's craft_sdk.tune_run is the one composition site itself

if TYPE_CHECKING:
    from .tuner.config import TuneConfig

logger = logging.getLogger(__name__)

_UNSET: Any = object()


def create_client(model: str, pretrained: str | None = _UNSET, *, device: str = "cpu", **kwargs: Any) -> PredictionClient:
    """A black-box client for ``model``.

    Args:
        model: ``"demo"``, an open_clip name (``"ViT-B-32"``), ``"local-dir:/path"``, or
            the URL of a craft-sdk prediction server (``"http://host:port"``), or a hosted
            zero-shot classification endpoint (``"zeroshot+http://host:port/path"``, text only), a chat VLM
            (``"chat+http://host:port/v1?model=NAME"``) or a multimodal embedding API
            (``"embed+http://host:port/v1?model=NAME"``), both text only over the ``openai`` package;
            ``"text-only:<model>"`` wraps any of these in a text-only view (offsets refused: what a
            hosted service allows, e.g. ``"text-only:demo"``).
        pretrained: tag or ``.safetensors`` file for open_clip names; None = random weights.
        device: torch device for local models.
        **kwargs: passed to the client class.

    Example:
        >>> client = create_client("demo")  # doctest: +SKIP
    """
    ref = parse_model(model)  # the one table of schemes (client/schemes.py)
    if ref.kind == "text-only":
        from .client.zeroshot import TextOnlyClient

        inner = create_client(ref.target, pretrained, device=device, **kwargs)
        return TextOnlyClient(inner, **({"cache_size": kwargs["cache_size"]} if "cache_size" in kwargs else {}))
    if ref.kind == "zeroshot":
        from .client.zeroshot import ZeroShotAPIClient

        return ZeroShotAPIClient(ref.target, **kwargs)
    if ref.kind == "chat":
        from .client.chat import ChatVLMClient

        return ChatVLMClient.from_url(ref.target, **kwargs)
    if ref.kind == "embed":
        from .client.embed import EmbeddingClient

        return EmbeddingClient.from_url(ref.target, **kwargs)
    if ref.kind == "server":
        from .client.http import HTTPClient

        return HTTPClient(ref.target, **kwargs)
    from .client.openclip import OpenCLIPClient

    if pretrained is _UNSET:
        return OpenCLIPClient(model, device=device, **kwargs)
    return OpenCLIPClient(model, pretrained, device=device, **kwargs)


def pretrained_kwargs(pretrained: str | None) -> dict[str, Any]:
    """:func:`create_client`'s keyword for a user-given pretrained value (CLI option, sweep file).

    None (not given) passes nothing, so the model name decides; ``"none"`` (any case) asks for
    random weights; anything else is a tag or ``.safetensors`` file.

    Example:
        >>> pretrained_kwargs("none"), pretrained_kwargs(None), pretrained_kwargs("openai")
        ({'pretrained': None}, {}, {'pretrained': 'openai'})
    """
    if pretrained is None:
        return {}
    return {"pretrained": None if pretrained.lower() == "none" else pretrained}


def load_data(
    path: str | Path, *, shots: int | None = None, seed: int = 0, val_shots: int = 0, test_fraction: float | None = None, **kwargs: Any
) -> DataSplits:
    """Load a dataset from disk, or a shipped demo task as ``"demo:<task>"``.

    Args:
        path: a ``train/``+``test/`` tree, a single ImageFolder ``path/<class>/*``, or ``demo:<task>``.
        shots, seed, val_shots: see :func:`~craft_sdk.data.load_dataset`.
        test_fraction: a single ImageFolder's test share per class (None: half, but never so many that
            ``shots + val_shots`` no longer fit; ``holdout=`` is its deprecated name).
        **kwargs: ``split_file``, ``max_pixels`` (:func:`~craft_sdk.data.load_dataset`).

    Example:
        >>> splits = load_data("my-folder", shots=16, test_fraction=0.25)  # doctest: +SKIP
    """
    from .data import check_sizes

    check_sizes(shots, val_shots)
    text = str(path)
    if text.startswith("demo:"):
        from .data import sample_k_shot
        from .demo.tasks import load_demo_task

        splits = load_demo_task(text[5:], shots=(shots or 16) + val_shots, seed=seed)
        if val_shots:
            pool = splits.train
            val_idx = sample_k_shot(pool, val_shots, seed + 1)
            splits.val = pool.subset(val_idx)
            splits.train = pool.subset(np.setdiff1d(np.arange(len(pool)), val_idx))
        return splits
    return load_dataset(path, shots=shots, seed=seed, val_shots=val_shots, test_fraction=test_fraction, **kwargs)


def tune(
    client: PredictionClient,
    train: ImageDataset,
    val: ImageDataset | None = None,
    config: TuneConfig | None = None,
    *,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 1,
    resume: bool = False,
    on_progress: Callable[..., None] | None = None,
    ledger: QueryLedger | None = None,
    price: PriceTable | None = None,
    max_cost: float | None = None,
    progress: bool | Callable[..., None] | None = None,
    **overrides: Any,
) -> Adapter:
    """Tune an adapter for ``train`` through ``client`` (:func:`~craft_sdk.tuning.tune_run`, re-exported here as
    ``tune_run``, without the run's result).

    Args:
        client: the black box.
        train: the few-shot training set.
        val: optional validation set for model selection.
        config: a :class:`TuneConfig`; keyword ``overrides`` replace its fields.
        checkpoint_dir, checkpoint_every, resume, on_progress: see :class:`craft_sdk.tuner.train.Tuner`.
        ledger: charge the queries to this ledger (default: a new one with the config's budget).
        price: a :class:`~craft_sdk.client.pricing.PriceTable`: the adapter records what the tune cost.
        max_cost: a hard ceiling on that cost (needs ``price``; ignored when ``ledger`` is given: set it there).
        progress: ``True``: a progress bar on stderr (queries, loss, the phases after the search);
            ``False``: none; ``None`` (default): a bar when stderr is a terminal; a callable: called with
            every :class:`~craft_sdk.tuner.result.Progress` (and, if it has a ``phase(name)`` method,
            with the phases: see :mod:`craft_sdk.tuner.progress`; ``LogProgress()`` logs instead).

    Example:
        >>> adapter = tune(create_client("demo"), splits.train, mode="craft", budget=2000)  # doctest: +SKIP
    """
    return tune_run(client, train, val, config, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                    resume=resume, on_progress=on_progress, ledger=ledger, price=price, max_cost=max_cost,
                    progress=progress, **overrides).adapter


def evaluate(
    adapter: Adapter,
    client: PredictionClient,
    test: ImageDataset,
    *,
    ledger: QueryLedger | None = None,
    allow_model_mismatch: bool = False,
    price: PriceTable | None = None,
) -> dict[str, Any]:
    """Test accuracy of zero-shot and of ``adapter`` (two queries: one per prompt).

    Test images the adapter was tuned or selected on (by the per-image digests its provenance
    records) are excluded, with a warning.

    Returns:
        ``accuracy``, ``ece`` (15-bin expected calibration error of ``predict_proba``),
        ``ece_uncalibrated`` (the same at temperature 1), ``zero_shot_accuracy``, ``n_test``,
        ``n_excluded`` (test images dropped because the adapter saw them), ``queries_used``, and what the
        adapter's predictions sent to the provider (the upload and the adapter's scoring, not the zero-shot
        reference): ``provider_usage``, ``cost`` at ``price`` (default: the ledger's; None without one) and
        ``per_1000_images`` (both per 1,000 predictions).
    """
    if tuple(test.class_names) != adapter.config.class_names:
        raise AdapterError(
            f"test classes {list(test.class_names)[:5]}... differ from the adapter's {list(adapter.config.class_names)[:5]}..."
        )
    test, n_excluded = _exclude_seen(adapter, test)
    check_compatible(adapter, client, allow_model_mismatch)
    ledger = ledger if ledger is not None else QueryLedger()
    metered = MeteredClient(client, ledger)
    meter = usage_of(client)
    u0 = meter.snapshot()
    handle = metered.upload(test.images)
    u1 = meter.snapshot()
    zero_template = adapter.zero_shot_template
    zero = as_log_scores(metered.predict(handle, list(test.class_names), zero_template, None, category="eval"), adapter.config.output)
    u2 = meter.snapshot()
    same = adapter.offset is None and adapter.contexts == (zero_template,)  # the adapter sends what zero-shot sends
    raw = zero if same else raw_scores(adapter, metered, handle, category="eval")
    sent = u1.minus(u0).plus(u2.minus(u1) if same else meter.snapshot().minus(u2))  # upload + the adapter's calls
    refined = adapter.refine(raw)
    from .tuner.selection import expected_calibration_error

    return {
        "accuracy": float((refined.argmax(-1) == test.labels).mean()),
        "ece": expected_calibration_error(adapter.probabilities(refined), test.labels),
        "ece_uncalibrated": expected_calibration_error(softmax(refined), test.labels),
        "zero_shot_accuracy": float((zero.argmax(-1) == test.labels).mean()),
        "n_test": len(test),
        "n_excluded": n_excluded,
        "queries_used": ledger.used,
        **usage_summary(sent, len(test), price if price is not None else ledger.price),
    }


def _exclude_seen(adapter: Adapter, test: ImageDataset) -> tuple[ImageDataset, int]:
    """``test`` without the images the adapter trained or selected on, and how many were dropped."""
    from .data import exclude_images
    from .errors import DataError

    seen = (adapter.config.provenance.get("data") or {}).get("image_fingerprints")
    if not seen:
        logger.info("the adapter records no image fingerprints: the test set cannot be checked for training images")
        return test, 0
    test, n_excluded = exclude_images(test, seen)
    if n_excluded:
        logger.warning("excluded %d test image(s) the adapter was tuned or selected on; %d remain", n_excluded, len(test))
    if len(test) == 0:
        raise DataError("every test image was used to tune the adapter; evaluate on images it has not seen")
    return test, n_excluded
