"""A multimodal embedding API as a text-only black box: logits = scale x cosine(image, text).

An image is embedded once per client, cached by content digest (:func:`~craft_sdk.images.image_digest`):
an image set of N new images costs N requests, once; a later prediction, a new upload or a
``predict`` stream over the same images costs nothing more. Class prompts
``"{template} {class name}."`` (the text :class:`~craft_sdk.client.openclip.OpenCLIPClient` builds)
are embedded per (context, class), also cached, up to 96 per request. Logits are
:data:`SCALE` (100, CLIP's cap) times the cosine of the unit-normalised embeddings. That scale is the
client's, not the model's (``Capabilities.scale_arbitrary``), so the tuner standardises the refiner's
input to a fixed spread (:mod:`craft_sdk.tuner.refiner`): an adapter does not depend on it. With
``&scale=S`` (the model's own logit scale, when known) the logits are used as they are.

Two request/response profiles (``docs/wire-format.md``, "Embedding APIs"):

* ``openai`` (default): ``POST {base_url}/embeddings``; texts as ``{"model", "input": [texts],
  "encoding_format": "float"}``; an image as vLLM's multimodal form ``{"model", "messages": [{"role":
  "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}],
  "encoding_format": "float"}``; answer ``{"data": [{"index", "embedding"}], "usage":
  {"prompt_tokens", "total_tokens"}}``.
* ``cohere`` (Cohere's v2 embed): ``POST {base_url}/embed`` with ``{"model", "input_type": "image",
  "embedding_types": ["float"], "images": [data URI]}`` (one image per request) or ``{"model",
  "input_type": "classification", "embedding_types": ["float"], "texts": [...]}``; answer
  ``{"embeddings": {"float": [[...]]}, "meta": {"billed_units": {"input_tokens", "image_tokens"}}}``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image

from .._lru import LRU
from ..errors import ClientError, ConfigError
from ..images import image_digest
from .base import DEFAULT_TEMPLATE, BaseClient, Capabilities
from .chat import data_uri
from .hosted import IMAGE_TOKENS, Transport, parse_model_url, text_tokens
from .usage import TEXT_TOKENS, ProviderUsage, attempt_bound

logger = logging.getLogger(__name__)

SCALE = 100.0
MAX_TEXTS = 96  # texts per request (Cohere's limit; OpenAI's is larger)
PROFILES = ("openai", "cohere")


@dataclass(frozen=True)
class EmbedConfig:
    """Options of an :class:`EmbeddingClient`.

    Args:
        profile: ``"openai"`` (OpenAI/vLLM ``/embeddings``) or ``"cohere"`` (Cohere v2 ``/embed``).
        scale: logits = scale x cosine.
        scale_arbitrary: the scale is the client's default, not the model's own (True unless ``scale`` is given):
            the tuner then standardises the refiner's input (:mod:`craft_sdk.tuner.refiner`), so the
            default scale does not matter to the adapter's accuracy.
        max_concurrency: requests in flight at once.
        max_retries: the openai client's retries (429 honours Retry-After).
        timeout: seconds per request.
        image_cache: image embeddings kept (by content digest); text_cache: text embeddings kept.
        cache_size: image sets kept by handle.
    """

    profile: str = "openai"
    scale: float = SCALE
    scale_arbitrary: bool = True
    max_concurrency: int = 8
    max_retries: int = 6
    timeout: float = 120.0
    image_cache: int = 100_000
    text_cache: int = 100_000
    cache_size: int = 8

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ConfigError(f"profile must be one of {list(PROFILES)}, got {self.profile!r}")
        if not self.scale > 0 or not self.timeout > 0:
            raise ConfigError(f"scale and timeout must be > 0, got {self.scale} and {self.timeout}")
        if min(self.max_concurrency, self.image_cache, self.text_cache, self.cache_size) < 1 or self.max_retries < 0:
            raise ConfigError("max_concurrency and the cache sizes must be >= 1, max_retries >= 0")


class EmbeddingClient(BaseClient):
    """A text-only black box behind a multimodal embedding API.

    Args:
        base_url: the openai ``base_url``, e.g. ``"http://127.0.0.1:8765/v1"``.
        model: the ``model`` field of every request.
        api_key: bearer key; default ``CRAFT_API_KEY``.
        model_id: identifier stored in adapters (default ``"embed:<base_url>?model=<model>"``).
        config: an :class:`EmbedConfig`; keyword ``overrides`` replace its fields.

    ``predict`` returns logits [N, C] = scale x cosine. ``usage`` counts requests (retries
    included), images and the endpoint's input tokens; ``image_requests`` the images embedded.

    Example:
        >>> client = EmbeddingClient("http://127.0.0.1:8765/v1", "demo", api_key="...")  # doctest: +SKIP
        >>> client.predict(images, ["cat", "dog"]).shape                                   # doctest: +SKIP
        (2, 2)
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, model_id: str | None = None,
                 config: EmbedConfig | None = None, **overrides: Any) -> None:
        if "scale" in overrides and "scale_arbitrary" not in overrides:
            overrides["scale_arbitrary"] = False  # a scale given is the user's statement of the model's own
        try:
            self.config = replace(config or EmbedConfig(), **overrides)
        except TypeError:
            raise ConfigError(f"unknown EmbeddingClient option(s) {sorted(overrides)}; valid: {sorted(EmbedConfig.__dataclass_fields__)}") from None
        super().__init__(self.config.cache_size)
        self.base_url, self.model = base_url, model
        self.usage = ProviderUsage()
        self.image_requests = 0
        self._images: LRU[str, np.ndarray] = LRU(self.config.image_cache)
        self._texts: LRU[str, np.ndarray] = LRU(self.config.text_cache)
        self._fresh = 0  # > 0 inside uncached(): every embedding is fetched again
        self._caps = Capabilities(model_id or f"embed:{base_url}?model={model}", output="logits", logit_scale=self.config.scale,
                                  scale_arbitrary=self.config.scale_arbitrary)
        self._wire = Transport(base_url, api_key, self.usage, max_retries=self.config.max_retries,
                               timeout=self.config.timeout, max_concurrency=self.config.max_concurrency)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> EmbeddingClient:
        """From ``http(s)://HOST[:PORT]/v1?model=NAME[&profile=cohere][&scale=S]`` (the part after ``embed+``)."""
        parsed = parse_model_url(url, ["profile", "scale"])
        if "profile" in parsed.options:
            kwargs.setdefault("profile", parsed.options["profile"])
        if "scale" in parsed.options:
            try:
                kwargs.setdefault("scale", float(parsed.options["scale"]))
            except ValueError:
                raise ConfigError(f"scale must be a number, got {parsed.options['scale']!r}") from None
        return cls(parsed.base_url, parsed.model, **kwargs)

    def capabilities(self, template: str = DEFAULT_TEMPLATE) -> Capabilities:
        """Text only, logits; no request is made."""
        if not template.strip():
            raise ClientError("the template is empty; use a context such as 'a photo of a'")
        return self._caps

    @contextmanager
    def uncached(self) -> Iterator[None]:
        """Inside the block every image and text is embedded again by the provider (what comes back still refreshes
        the caches): the drift canary must see the provider now, not this client's memory of it."""
        with self._lock:
            self._fresh += 1
        try:
            yield
        finally:
            with self._lock:
                self._fresh -= 1

    def _prepare(self, images: list[Image.Image]) -> np.ndarray:
        """Unit embeddings [N, E]: each image not yet cached is fetched once (one request per image)."""
        digests = [image_digest(im) for im in images]
        missing = {d: im for d, im in zip(digests, images) if self._fresh or self._images.get(d) is None}
        vectors = self._wire.map(self._embed_image, list(missing.values()))
        for d, v in zip(missing, vectors):
            self._images.put(d, v)
        found = [self._images.get(d) for d in digests]
        if any(v is None for v in found):  # evicted by this very call: the cache is smaller than the set
            raise ConfigError(f"image_cache ({self.config.image_cache}) is smaller than the image set ({len(images)}); raise it")
        return np.stack(found)  # type: ignore[arg-type]

    def _predict_images(self, prepared: np.ndarray, class_names: list[str], template: str, offsets: np.ndarray | None) -> np.ndarray:
        texts = [f"{template} {name}." for name in class_names]
        missing = list(dict.fromkeys(t for t in texts if self._fresh or self._texts.get(t) is None))
        batches = [missing[i : i + MAX_TEXTS] for i in range(0, len(missing), MAX_TEXTS)]
        for batch, vectors in zip(batches, self._wire.map(self._embed_texts, batches)):
            for t, v in zip(batch, vectors):
                self._texts.put(t, v)
        text = np.stack([self._texts.get(t) for t in texts])  # type: ignore[misc]
        if prepared.shape[1] != text.shape[1]:
            raise ClientError(f"image embeddings have {prepared.shape[1]} dimensions, text embeddings {text.shape[1]}; is it one model?")
        return (self.config.scale * prepared @ text.T)[None].astype(np.float32)

    # ------------------------------------------------------------------ the two profiles

    def _embed_image(self, image: Image.Image) -> np.ndarray:
        uri = data_uri(image)
        if self.config.profile == "cohere":
            body: dict[str, Any] = {"model": self.model, "input_type": "image", "embedding_types": ["float"], "images": [uri]}
        else:
            content = [{"type": "image_url", "image_url": {"url": uri}}]
            body = {"model": self.model, "messages": [{"role": "user", "content": content}], "encoding_format": "float"}
        with self._lock:
            self.image_requests += 1
        return self._request(body, attempt_bound(images=1, image_tokens=IMAGE_TOKENS, overhead=TEXT_TOKENS), 1)[0]

    def _embed_texts(self, texts: list[str]) -> np.ndarray:
        if self.config.profile == "cohere":
            body: dict[str, Any] = {"model": self.model, "input_type": "classification", "embedding_types": ["float"], "texts": texts}
        else:
            body = {"model": self.model, "input": texts, "encoding_format": "float"}
        return self._request(body, attempt_bound(texts=texts, overhead=TEXT_TOKENS * len(texts)), len(texts))

    def _request(self, body: dict[str, Any], bound: ProviderUsage, k: int) -> np.ndarray:
        path = "/embed" if self.config.profile == "cohere" else "/embeddings"
        answer = self._wire.post(f"POST {path}", path, body, bound)
        images = bound.images
        vectors, tokens = _cohere(answer) if self.config.profile == "cohere" else _openai(answer)
        if vectors.ndim != 2 or vectors.shape[0] != k or not np.isfinite(vectors).all():
            raise ClientError(f"the endpoint answered {list(vectors.shape)} embeddings for {k} input(s); is it an embedding endpoint?")
        fallback = images * IMAGE_TOKENS + sum(text_tokens(t) for t in body.get("texts", body.get("input", [])) or [])
        self.usage.add(input_tokens=fallback if tokens is None else tokens)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)

    # ------------------------------------------------------------------ cost

    def estimate_usage(self, n_images: int, class_names: Sequence[str], template: str = DEFAULT_TEMPLATE,
                       n_prompts: int = 1, *, images_cached: bool = False, texts_cached: bool = False) -> ProviderUsage:
        """What ``n_prompts`` predictions over ``n_images`` new images would bill, before sending anything.

        Rule: one request and :data:`~craft_sdk.client.hosted.IMAGE_TOKENS` per image (none when
        ``images_cached``: an image is embedded once per client), and ``ceil(texts / 96)`` requests
        for the ``n_prompts x C`` class prompts at ``ceil(chars / 4)`` tokens each (none when
        ``texts_cached``: the context was embedded before; otherwise an upper bound: prompts already
        cached, or repeated across prompts, cost nothing); no output tokens.
        """
        texts = [] if texts_cached else [f"{template} {name}." for name in class_names] * n_prompts
        images = 0 if images_cached else n_images
        requests = images + -(-len(texts) // MAX_TEXTS)
        return ProviderUsage(requests, images, images * IMAGE_TOKENS + sum(map(text_tokens, texts)), 0)

    def estimate_upload(self, n_images: int, *, seen: int = 0) -> ProviderUsage:
        """Uploading an image set embeds its images, but for ``seen`` of them embedded by an earlier upload
        (an upper bound: other images already cached cost nothing either)."""
        return self.estimate_usage(max(n_images - seen, 0), [], n_prompts=0)

    def close(self) -> None:
        """Stop the request threads and close the connections."""
        self._wire.close()

    def __enter__(self) -> EmbeddingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _openai(answer: Any) -> tuple[np.ndarray, int | None]:
    data = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(data, list) or not all(isinstance(d, dict) and isinstance(d.get("embedding"), list) for d in data):
        raise ClientError("the endpoint answered no data[].embedding lists; is it an OpenAI-compatible embeddings endpoint?")
    data = sorted(data, key=lambda d: d.get("index", 0))
    usage = answer.get("usage") or {}
    tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    return np.asarray([d["embedding"] for d in data], dtype=np.float64), tokens if isinstance(tokens, int) else None


def _cohere(answer: Any) -> tuple[np.ndarray, int | None]:
    emb = answer.get("embeddings") if isinstance(answer, dict) else None
    vectors = emb.get("float") if isinstance(emb, dict) else emb  # v2 answers by type; v1 answered a plain list
    if not isinstance(vectors, list):
        raise ClientError("the endpoint answered no embeddings.float; is it a Cohere v2 embed endpoint?")
    units = ((answer.get("meta") or {}).get("billed_units") or {})
    tokens = [units.get(k) for k in ("input_tokens", "image_tokens") if isinstance(units.get(k), (int, float))]
    return np.asarray(vectors, dtype=np.float64), int(sum(tokens)) if tokens else None
