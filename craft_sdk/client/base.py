"""The prediction-only client protocol: the only door to the black-box model.

A client scores images against class prompts ``"{template} {class name}."`` and
returns logits (or probabilities). Soft-prompt clients also accept a *context
offset*: an array [n_ctx, d] added to the embeddings of the template's tokens, or
a batch [P, n_ctx, d] of P candidate offsets scored in one call.

To wrap your own model, subclass :class:`BaseClient` and implement
``capabilities`` and ``_predict_images`` (a few lines), or pass a plain function
to :class:`CallableClient`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, Union, runtime_checkable

import numpy as np
from PIL import Image

from .._lru import LRU
from ..errors import ClientError, ConfigError, UnknownHandleError
from ..images import ImageLike, images_fingerprint, to_pil_list

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "a photo of a"
OutputKind = Literal["logits", "probs"]


@dataclass(frozen=True)
class Capabilities:
    """What a black box can do, for one context template.

    Args:
        model_id: stable identifier of the model behind the client.
        n_ctx: number of context tokens of the template; None for text-only clients.
        ctx_dim: embedding width d of a context token; None for text-only clients.
        output: ``"logits"`` or ``"probs"`` (then the tuner works on log-probabilities).
        ctx_rms: RMS of the template's context-token embeddings, the natural scale of
            a prompt offset; None when the service does not disclose it.
        logit_scale: the scale the black box applies to cosine similarities, if disclosed.
        scale_arbitrary: the logits' scale was chosen by the client, not the model (an embedding API's
            ``scale x cosine`` at the default scale): the tuner's refiner then standardises its input
            (:mod:`craft_sdk.tuner.refiner`).
    """

    model_id: str
    n_ctx: int | None = None
    ctx_dim: int | None = None
    output: OutputKind = "logits"
    ctx_rms: float | None = None
    logit_scale: float | None = None
    scale_arbitrary: bool = False

    def __post_init__(self) -> None:
        if not self.model_id:
            raise ConfigError("Capabilities.model_id must be a non-empty string")
        if self.output not in ("logits", "probs"):
            raise ConfigError(f"Capabilities.output must be 'logits' or 'probs', got {self.output!r}")
        if (self.n_ctx is None) != (self.ctx_dim is None):
            raise ConfigError("Capabilities.n_ctx and ctx_dim must both be set (soft prompts) or both None (text only)")
        if self.n_ctx is not None and (self.n_ctx < 1 or (self.ctx_dim or 0) < 1):
            raise ConfigError(f"Capabilities n_ctx/ctx_dim must be positive, got {self.n_ctx}/{self.ctx_dim}")

    @property
    def soft_prompts(self) -> bool:
        """Whether the client accepts context offsets."""
        return self.n_ctx is not None


@dataclass(frozen=True)
class ImageSetHandle:
    """A set of images uploaded once and queried many times."""

    id: str
    n_images: int


Images = Union[ImageSetHandle, Sequence[ImageLike]]


@runtime_checkable
class PredictionClient(Protocol):
    """A prediction-only black box.

    ``predict`` returns float32 logits [N, C] for ``offsets`` None or [n_ctx, d], and
    [P, N, C] for a batch of offsets [P, n_ctx, d].
    """

    def capabilities(self, template: str = DEFAULT_TEMPLATE) -> Capabilities: ...

    def upload(self, images: Sequence[ImageLike]) -> ImageSetHandle: ...

    def predict(
        self,
        images: Images,
        class_names: Sequence[str],
        template: str = DEFAULT_TEMPLATE,
        offsets: np.ndarray | None = None,
    ) -> np.ndarray: ...


def check_offsets(offsets: np.ndarray | None, caps: Capabilities) -> np.ndarray | None:
    """Validate an offset argument; returns it as float32 [P, n_ctx, d] (or None)."""
    if offsets is None:
        return None
    if not caps.soft_prompts:
        raise ClientError(f"model {caps.model_id} is text-only: it does not accept context offsets")
    arr = np.asarray(offsets, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1:] != (caps.n_ctx, caps.ctx_dim):
        raise ClientError(
            f"offsets must have shape [{caps.n_ctx}, {caps.ctx_dim}] or [P, {caps.n_ctx}, {caps.ctx_dim}], "
            f"got {list(np.shape(offsets))}"
        )
    if arr.shape[0] == 0:
        raise ClientError("offsets batch is empty")
    if not np.isfinite(arr).all():
        raise ClientError("offsets contain NaN or inf")
    return arr


def check_class_names(class_names: Sequence[str]) -> list[str]:
    """Validate a class list: non-empty, strings, unique."""
    names = list(class_names)
    if not names:
        raise ClientError("class_names is empty")
    if any(not isinstance(n, str) or not n.strip() for n in names):
        raise ClientError("every class name must be a non-empty string")
    if len(set(names)) != len(names):
        raise ClientError("class_names has duplicates; make every class name unique")
    return names


def check_output(out: Any, p: int, n: int, c: int, model_id: str) -> np.ndarray:
    """Validate what a client returned: float array [P, N, C], all finite."""
    arr = np.asarray(out, dtype=np.float32)
    if arr.ndim == 2 and p == 1:
        arr = arr[None]
    if arr.shape != (p, n, c):
        raise ClientError(f"model {model_id} returned shape {list(arr.shape)}, expected {[p, n, c]}")
    if not np.isfinite(arr).all():
        raise ClientError(f"model {model_id} returned NaN or inf scores")
    return arr


class BaseClient:
    """Shared machinery for clients: image-set handles, validation, batching of offsets.

    Subclasses implement :meth:`capabilities` and :meth:`_predict_images`, and may
    override :meth:`_prepare` to cache something cheaper than images (e.g. features).

    Args:
        cache_size: how many uploaded image sets are kept (least recently used evicted).
    """

    def __init__(self, cache_size: int = 8) -> None:
        if cache_size < 1:
            raise ConfigError(f"cache_size must be >= 1, got {cache_size}")
        self._cache: LRU[str, tuple[Any, int]] = LRU(cache_size)
        self._lock = threading.Lock()

    def capabilities(self, template: str = DEFAULT_TEMPLATE) -> Capabilities:
        raise NotImplementedError

    def _prepare(self, images: list[Image.Image]) -> Any:
        """What is cached per image set; default: the images themselves."""
        return images

    def _predict_images(
        self, prepared: Any, class_names: list[str], template: str, offsets: np.ndarray | None
    ) -> np.ndarray:
        """Scores [P, N, C] (P = 1 when ``offsets`` is None) for validated inputs."""
        raise NotImplementedError

    def upload(self, images: Sequence[ImageLike]) -> ImageSetHandle:
        """Prepare ``images`` once; later calls may pass the returned handle."""
        pil = to_pil_list(images)
        key = images_fingerprint(pil)
        if getattr(self, "_fresh", 0) or self._cache.get(key) is None:  # _fresh: a client's uncached() block
            self._cache.put(key, (self._prepare(pil), len(pil)))
        return ImageSetHandle(key, len(pil))

    def _resolve(self, images: Images) -> tuple[Any, int]:
        if isinstance(images, ImageSetHandle):
            kept = self._cache.get(images.id)
            if kept is None:
                raise UnknownHandleError(f"unknown or evicted image-set handle {images.id[:12]}; upload the images again")
            return kept
        pil = to_pil_list(images)
        return self._prepare(pil), len(pil)

    def predict(
        self,
        images: Images,
        class_names: Sequence[str],
        template: str = DEFAULT_TEMPLATE,
        offsets: np.ndarray | None = None,
    ) -> np.ndarray:
        """Scores of ``images`` against ``class_names``; see :class:`PredictionClient`."""
        try:
            names = check_class_names(class_names)
            caps = self.capabilities(template)
            batch = check_offsets(offsets, caps)
            prepared, n = self._resolve(images)
        except ClientError as exc:
            exc.unbilled = True  # refused before the model was asked anything
            raise
        p = 1 if batch is None else batch.shape[0]
        out = check_output(self._predict_images(prepared, names, template, batch), p, n, len(names), caps.model_id)
        single = offsets is None or np.ndim(offsets) == 2
        return out[0] if single else out


PredictFn = Callable[[list[Image.Image], list[str], str, Union[np.ndarray, None]], np.ndarray]


class CallableClient(BaseClient):
    """Wrap a plain function as a client.

    Args:
        fn: ``fn(images, class_names, template, offsets)`` → scores [P, N, C] (or [N, C]
            when ``offsets`` is None); ``offsets`` is None or float32 [P, n_ctx, d].
        capabilities: what the function supports (a :class:`Capabilities`).

    Example:
        >>> import numpy as np
        >>> caps = Capabilities(model_id="my-model")
        >>> client = CallableClient(lambda ims, names, t, o: np.zeros((len(ims), len(names))), caps)
    """

    def __init__(self, fn: PredictFn, capabilities: Capabilities, cache_size: int = 8) -> None:
        super().__init__(cache_size)
        self._fn = fn
        self._caps = capabilities

    def capabilities(self, template: str = DEFAULT_TEMPLATE) -> Capabilities:
        return self._caps

    def _predict_images(
        self, prepared: Any, class_names: list[str], template: str, offsets: np.ndarray | None
    ) -> np.ndarray:
        return np.asarray(self._fn(prepared, class_names, template, offsets))
