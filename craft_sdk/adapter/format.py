"""The adapter's format: a JSON config plus safetensors tensors in a directory (PEFT's convention).

``ADAPTER/adapter_config.json`` says what the adapter is; ``ADAPTER/adapter_model.safetensors``
holds ``z`` (float64 [D]), ``prompt_offset`` (float32 [n_ctx, d], the materialised A z)
and the refiner (``refiner.{i}.weight`` / ``.bias``). Loading needs numpy and
safetensors only, and every inconsistency is a one-line :class:`AdapterError`.

The package splits by concern, lowest first: :mod:`~craft_sdk.adapter.files` (the file names),
:mod:`~craft_sdk.adapter.card` (model cards), :mod:`~craft_sdk.adapter.hub` (the Hub round trip),
:mod:`~craft_sdk.adapter.io` (atomic disk I/O), :mod:`~craft_sdk.adapter.runtime` (running a
``refiner.onnx``), this module (what an adapter is, its validation, and the methods that save, load
and push it through those), then :mod:`~craft_sdk.adapter.export` (writing ``refiner.onnx``).
How the adapter is *queried* is deployment's: :mod:`craft_sdk.deploy.query`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from .. import mlp
from .._version import __version__
from ..client.base import DEFAULT_TEMPLATE
from ..client.canary import CanarySpec
from ..client.contexts import MAX_CONTEXT_CHARS, MAX_ENSEMBLE, context_problem, score_contexts
from ..errors import AdapterError
from ..projection import GENERATOR, project, projection_matrix
from ..scores import softmax
from .card import render_model_card
from .files import ADAPTER_FILES, CONFIG_FILE, ONNX_FILE, WEIGHTS_FILE  # noqa: F401 - re-exported (craft_sdk.adapter.*_FILE)
from .hub import push_adapter, resolve_adapter_dir
from .io import read_adapter_dir, write_adapter_dir
from .runtime import OnnxRefiner

logger = logging.getLogger(__name__)

CANARY_TENSOR = "canary_scores"
FORMAT_VERSION = 1
# A is regenerated as float64 then float32 (~20 bytes per element at peak): 2**25 elements is ~670 MB,
# above any open_clip text tower (ViT-bigG, 16 context tokens, D = 1,000 is 2 x 10**7)
MAX_PROJECTION_ELEMENTS = 2**25


@dataclass(frozen=True)
class PromptSpec:
    """A continuous prompt (``kind: continuous``): p = p0 + A z, A ~ N(0, std²) from ``seed``, added to the
    template's context-token embeddings (the ``z`` and ``prompt_offset`` tensors)."""

    n_ctx: int
    ctx_dim: int
    intrinsic_dim: int
    seed: int
    std: float
    generator: str = GENERATOR
    kind: str = "continuous"

    def __post_init__(self) -> None:
        if self.kind != "continuous":
            raise AdapterError(f"PromptSpec is the continuous prompt; got kind {self.kind!r}")
        for name in ("n_ctx", "ctx_dim", "intrinsic_dim"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise AdapterError(f"prompt.{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.std, (int, float, np.floating)) and np.isfinite(self.std) and self.std > 0):
            raise AdapterError(f"prompt.std must be a positive number, got {self.std!r}")
        size = int(self.n_ctx) * int(self.ctx_dim) * int(self.intrinsic_dim)
        if size > MAX_PROJECTION_ELEMENTS:
            raise AdapterError(
                f"prompt projection n_ctx x ctx_dim x intrinsic_dim = {self.n_ctx} x {self.ctx_dim} x {self.intrinsic_dim} "
                f"= {size:,} elements exceeds the limit of {MAX_PROJECTION_ELEMENTS:,}; the adapter config is corrupt or hostile"
            )

    def describe(self) -> str:
        return f"continuous: {self.n_ctx}x{self.ctx_dim} context offset from z[{self.intrinsic_dim}]"


@dataclass(frozen=True)
class DiscretePromptSpec:
    """A discrete prompt (``kind: discrete``): context words found for a text-only black box.

    ``text`` is sent as the template on every call (it equals the adapter's ``template``);
    there are no prompt tensors. ``initial`` is the context the search started from.
    """

    text: str
    initial: str
    n_slots: int
    vocabulary_size: int
    kind: str = "discrete"

    def __post_init__(self) -> None:
        if self.kind != "discrete":
            raise AdapterError(f"DiscretePromptSpec is the discrete prompt; got kind {self.kind!r}")
        _check_contexts({"text": self.text, "initial": self.initial})
        for name in ("n_slots", "vocabulary_size"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise AdapterError(f"prompt.{name} must be a positive integer, got {value!r}")

    def describe(self) -> str:
        return f"discrete: {self.text!r} (searched from {self.initial!r}, {self.n_slots} words over {self.vocabulary_size})"


@dataclass(frozen=True)
class EnsemblePromptSpec:
    """A template ensemble (``kind: ensemble``): the log-probabilities of ``texts`` averaged.

    Every prediction costs one query per context; the adapter's ``template`` is ``texts[0]``.
    ``bank`` names where the contexts were picked from (``ensemble`` mode's ``template_bank``);
    ``initial`` is the template zero-shot is measured with.
    """

    texts: tuple[str, ...]
    initial: str = DEFAULT_TEMPLATE
    bank: str = "given"
    kind: str = "ensemble"

    def __post_init__(self) -> None:
        if self.kind != "ensemble":
            raise AdapterError(f"EnsemblePromptSpec is the ensemble prompt; got kind {self.kind!r}")
        if not isinstance(self.texts, (list, tuple)) or not 1 <= len(self.texts) <= MAX_ENSEMBLE:
            raise AdapterError(f"prompt.texts must be a list of 1 to {MAX_ENSEMBLE} contexts, got {str(self.texts)[:60]!r}")
        object.__setattr__(self, "texts", tuple(self.texts))
        _check_contexts({**{f"texts[{i}]": t for i, t in enumerate(self.texts)}, "initial": self.initial})
        if len(set(self.texts)) != len(self.texts):
            raise AdapterError("prompt.texts has duplicates; the config is corrupt")
        if not isinstance(self.bank, str) or len(self.bank) > MAX_CONTEXT_CHARS:
            raise AdapterError(f"prompt.bank must be a short string naming where the contexts came from, got {str(self.bank)[:60]!r}")

    def describe(self) -> str:
        shown = ", ".join(repr(t) for t in self.texts[:4]) + (" ..." if len(self.texts) > 4 else "")
        return f"ensemble of {len(self.texts)} contexts from {self.bank} ({len(self.texts)} queries per image set): {shown}"


def _check_contexts(fields: dict[str, Any]) -> None:
    for name, value in fields.items():
        if context_problem(value):
            raise AdapterError(f"prompt.{name} {context_problem(value)}; got {str(value)[:60]!r}")


AnyPromptSpec = PromptSpec | DiscretePromptSpec | EnsemblePromptSpec
PROMPT_KINDS: dict[str, Any] = {"continuous": PromptSpec, "discrete": DiscretePromptSpec, "ensemble": EnsemblePromptSpec}


def describe_prompt(spec: AnyPromptSpec | None) -> str:
    """One line on an adapter's prompt, for ``inspect`` and the model card.

    Example:
        >>> describe_prompt(DiscretePromptSpec("a sketch of a", "a photo of a", 4, 300))
        "discrete: 'a sketch of a' (searched from 'a photo of a', 4 words over 300)"
    """
    return "none (the template as given)" if spec is None else spec.describe()


def provider_usage(queries: dict[str, Any]) -> dict[str, Any]:
    """What a tune cost in the provider's units (a ledger's ``to_dict()``): requests, images, tokens,
    and, when priced, the money (``cost``) and the ``price`` table it was computed at."""
    usage = dict(queries.get("usage") or {})
    return {**usage, "cost": queries.get("cost"), "price": queries.get("price")}


def _prompt_from_dict(data: Any) -> AnyPromptSpec:
    if not isinstance(data, dict):
        raise AdapterError(f"adapter prompt must be a JSON object, got {type(data).__name__}")
    kind = data.get("kind", "continuous")  # adapters written before discrete prompts name no kind
    spec = PROMPT_KINDS.get(kind) if isinstance(kind, str) else None
    if spec is None:
        raise AdapterError(f"unknown prompt.kind {kind!r}; this craft-sdk {__version__} reads {sorted(PROMPT_KINDS)}: upgrade craft-sdk")
    return spec(**data)


@dataclass(frozen=True)
class RefinerSpec:
    """Shape of the refiner MLP."""

    layers: int
    hidden: int
    residual: bool = True
    activation: str = "relu"
    centering: str = "row-mean"

    def __post_init__(self) -> None:
        if self.layers < 1 or self.hidden < 1:
            raise AdapterError(f"refiner layers/hidden must be positive, got {self.layers}/{self.hidden}")
        if self.activation != "relu" or self.centering != "row-mean":
            raise AdapterError(f"unsupported refiner activation/centering {self.activation}/{self.centering}")

    def describe(self) -> str:
        """What the refiner is, in words (a 1-layer refiner is a linear map: it has no hidden layer).

        Example:
            >>> RefinerSpec(3, 512).describe(), RefinerSpec(1, 512, residual=False).describe()
            ('3-layer MLP (hidden 512), residual', 'linear map (no hidden layer)')
        """
        shape = "linear map (no hidden layer)" if self.layers == 1 else f"{self.layers}-layer MLP (hidden {self.hidden})"
        return shape + (", residual" if self.residual else "")


@dataclass(frozen=True)
class CalibrationSpec:
    """Probability calibration: ``predict_proba = softmax(refined_logits / temperature)``.

    Fitted by the tuner on held-out folds of the training logits (no queries).
    """

    temperature: float = 1.0
    method: str = "temperature"

    def __post_init__(self) -> None:
        if self.method != "temperature":
            raise AdapterError(f"unsupported calibration method {self.method!r}")
        if not (isinstance(self.temperature, (int, float)) and np.isfinite(self.temperature) and self.temperature > 0):
            raise AdapterError(f"calibration.temperature must be a positive number, got {self.temperature!r}")


@dataclass(frozen=True)
class AdapterConfig:
    """What an adapter is; serialised to ``adapter_config.json``.

    Args:
        model_id: the black box the adapter was tuned on.
        class_names: ordered class names (output columns).
        template: the context template the offset modifies.
        output: ``"logits"`` or ``"probs"``: what the client returns.
        prompt: the learned prompt, or None (the template as given, no offset): a
            :class:`PromptSpec` (``kind: continuous``, an offset) or a :class:`DiscretePromptSpec`
            (``kind: discrete``, words; then ``template`` is its text).
        refiner: the refiner spec, or None (identity).
        logit_scale: the black box's logit scale when it reports one.
        calibration: temperature scaling for probabilities, or None (temperature 1).
        hyperparameters: the tuning configuration.
        provenance: mode, seed, shots, queries, data fingerprint, history...
        canary: the drift canary taken at tune time (:mod:`craft_sdk.deploy.canary`), or None (none recorded);
            its scores are the tensor ``canary_scores``.
    """

    model_id: str
    class_names: tuple[str, ...]
    template: str
    output: str = "logits"
    prompt: AnyPromptSpec | None = None
    refiner: RefinerSpec | None = None
    logit_scale: float | None = None
    calibration: CalibrationSpec | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    craft_sdk_version: str = __version__
    canary: CanarySpec | None = None

    def __post_init__(self) -> None:
        if not self.model_id:
            raise AdapterError("adapter model_id is empty")
        if not isinstance(self.class_names, (list, tuple)) or not all(isinstance(n, str) and n for n in self.class_names):
            raise AdapterError(
                f"adapter class_names must be a list of non-empty strings, got {type(self.class_names).__name__} "
                f"{str(self.class_names)[:60]!r}; write it as a JSON list such as [\"cat\", \"dog\"]"
            )
        names = tuple(self.class_names)
        object.__setattr__(self, "class_names", names)
        if not names or len(set(names)) != len(names):
            raise AdapterError("adapter class_names must be a non-empty list of unique names")
        if self.output not in ("logits", "probs"):
            raise AdapterError(f"adapter output must be 'logits' or 'probs', got {self.output!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["class_names"] = list(self.class_names)
        if d["calibration"] is None:  # adapters written before calibration existed keep their bytes
            del d["calibration"]
        if d["canary"] is None:  # adapters without a canary keep their bytes (and fingerprint)
            del d["canary"]
        if isinstance(self.prompt, PromptSpec):  # no kind = continuous: earlier craft-sdk 0.x versions still read it
            del d["prompt"]["kind"]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise AdapterError(
                f"adapter format_version {version!r} is not supported (this craft-sdk {__version__} reads {FORMAT_VERSION}); upgrade craft-sdk"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("ignoring unknown adapter config keys %s (written by a newer craft-sdk?)", unknown)
        kwargs = {k: v for k, v in data.items() if k in known}
        try:
            if kwargs.get("prompt") is not None:
                kwargs["prompt"] = _prompt_from_dict(kwargs["prompt"])
            if kwargs.get("refiner") is not None:
                kwargs["refiner"] = RefinerSpec(**kwargs["refiner"])
            if kwargs.get("calibration") is not None:
                kwargs["calibration"] = CalibrationSpec(**kwargs["calibration"])
            if kwargs.get("canary") is not None:
                if not isinstance(kwargs["canary"], dict):
                    raise AdapterError("adapter canary must be a JSON object; the config is corrupt")
                kwargs["canary"] = CanarySpec(**kwargs["canary"])
            return cls(**kwargs)
        except TypeError as exc:
            raise AdapterError(f"adapter config is malformed: {exc}") from None


@dataclass
class Adapter:
    """A tuned CraFT adapter: config + tensors.

    Example:
        >>> adapter = Adapter.from_pretrained("craft-demo/adapter")   # doctest: +SKIP
        >>> refined = adapter.refine(logits)                           # doctest: +SKIP
    """

    config: AdapterConfig
    z: np.ndarray | None = None
    offset: np.ndarray | None = None
    refiner: dict[str, np.ndarray] | None = None
    canary_scores: np.ndarray | None = None

    def __post_init__(self) -> None:
        _validate(self)

    # -------------------------------------------------------------- building

    @classmethod
    def from_result(cls, result: Any, *, seen_images: Sequence[str] | None = None) -> Adapter:
        """Build from a :class:`~craft_sdk.tuner.train.TuneResult`.

        Args:
            result: the tuning result.
            seen_images: digests of every image the run trained or selected on
                (:func:`craft_sdk.data.seen_fingerprints`); recorded as
                ``provenance.data.image_fingerprints`` so evaluation can exclude them.
        """
        tc = result.config  # a TuneConfig (read by attribute; the adapter layer does not import the tuner)
        caps = result.capabilities
        prompt: AnyPromptSpec | None = None
        if result.z is not None:
            prompt = PromptSpec(caps.n_ctx, caps.ctx_dim, tc.intrinsic_dim, tc.seed, float(result.projection_std))
        elif result.text_prompt is not None:  # learned words or a template ensemble
            prompt = _prompt_from_dict(result.text_prompt)
        layers, hidden = result.refiner_shape or (tc.refiner_layers, tc.refiner_hidden)
        refiner = RefinerSpec(layers, hidden, tc.residual) if result.refiner is not None else None
        provenance = {
            "mode": tc.mode,
            "requested_mode": result.requested_mode,
            "seed": tc.seed,
            "shots": result.data.shots,
            "queries_used": result.queries.used,
            "budget": tc.budget,
            "queries": result.queries.counts,
            "provider_usage": provider_usage(result.queries.to_dict()),
            "data": {**result.data.to_dict(), **({} if seen_images is None else {"image_fingerprints": sorted(set(seen_images))})},
            "kl_weights": {"lambda": result.kl_weights[0], "beta": result.kl_weights[1]},
            "n_generations": result.n_generations,
            "planned_generations": result.planned_generations,
            "selected_generation": result.selected_generation,
            "metrics": result.metrics.to_dict(),
            "history": [h.to_dict() for h in result.history],
        }
        if result.selection is not None:
            provenance["protocol"] = tc.protocol
            provenance["selection"] = result.selection.to_dict()
        calibration = CalibrationSpec(float(result.temperature)) if result.temperature is not None else None
        canary = getattr(result, "canary", None)
        config = AdapterConfig(
            model_id=caps.model_id,
            class_names=result.class_names,
            template=tc.template,
            output=caps.output,
            prompt=prompt,
            refiner=refiner,
            logit_scale=getattr(caps, "logit_scale", None),
            calibration=calibration,
            hyperparameters=tc.to_dict(),
            provenance=provenance,
            canary=canary.spec if canary is not None else None,
        )
        return cls(config, result.z, result.offset, result.refiner, canary.scores if canary is not None else None)

    # ------------------------------------------------------------------ use

    @property
    def n_classes(self) -> int:
        return len(self.config.class_names)

    def refine(self, logits: np.ndarray) -> np.ndarray:
        """Refined logits [..., C] (identity without a refiner); numpy only."""
        if self.refiner is None or self.config.refiner is None:
            return np.asarray(logits, dtype=np.float32)
        return mlp.forward(self.refiner, logits, self.config.refiner.residual)

    @property
    def temperature(self) -> float:
        """The calibration temperature (1.0 when the adapter has none)."""
        return self.config.calibration.temperature if self.config.calibration is not None else 1.0

    def probabilities(self, refined_logits: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities [..., C] from refined logits: softmax(refined / T)."""
        return softmax(refined_logits, self.temperature)

    @property
    def zero_shot_template(self) -> str:
        """The template zero-shot behaviour uses: the one a text prompt was searched or picked from."""
        spec = self.config.prompt
        return spec.initial if isinstance(spec, (DiscretePromptSpec, EnsemblePromptSpec)) else self.config.template

    @property
    def contexts(self) -> tuple[str, ...]:
        """The contexts each prediction sends: the ensemble's, else the one template."""
        spec = self.config.prompt
        return spec.texts if isinstance(spec, EnsemblePromptSpec) else (self.config.template,)

    def raw_scores(self, client: Any, images: Any, *, category: str = "predict") -> np.ndarray:
        """Deprecated: use :func:`craft_sdk.deploy.query.raw_scores` (the query policy is deployment's;
        this method is removed in the next release)."""
        warnings.warn("Adapter.raw_scores is deprecated: use craft_sdk.deploy.query.raw_scores(adapter, client, images)",
                      DeprecationWarning, stacklevel=2)
        return score_contexts(client, images, self.config.class_names, self.contexts, self.offset, self.config.output, category)

    def tensors(self) -> dict[str, np.ndarray]:
        """All tensors by their on-disk names."""
        out: dict[str, np.ndarray] = {}
        if self.z is not None:
            out["z"] = np.ascontiguousarray(self.z, dtype=np.float64)
            out["prompt_offset"] = np.ascontiguousarray(self.offset, dtype=np.float32)
        for k, v in (self.refiner or {}).items():
            out[k] = np.ascontiguousarray(v, dtype=np.float32)
        if self.canary_scores is not None:
            out[CANARY_TENSOR] = np.ascontiguousarray(self.canary_scores, dtype=np.float32)
        return out

    def fingerprint(self) -> str:
        """sha256 over the canonical config JSON and the tensors: identifies the adapter."""
        h = hashlib.sha256(_config_bytes(self.config))
        for name, value in sorted(self.tensors().items()):
            h.update(name.encode())
            h.update(value.tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------------- disk

    def save_pretrained(self, directory: str | Path, *, repo_id: str | None = None) -> Path:
        """Write the adapter and its model card (``README.md``) to ``directory`` atomically (temp dir, then rename).

        ``repo_id`` is the Hub id shown in the card's loading snippet (default: a placeholder path).
        """
        target = Path(directory)
        return write_adapter_dir(target, _config_bytes(self.config), self.tensors(), render_model_card(self, repo_id=repo_id))

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, verify_projection: bool = True, *, revision: str | None = None, subfolder: str | None = None
    ) -> Adapter:
        """Load and validate an adapter directory, or a Hugging Face Hub repo id ``"org/name"`` (``[hub]`` extra).

        ``revision`` (branch, tag, commit) and ``subfolder`` select the files on the Hub; the Hub
        cache and ``HF_HUB_OFFLINE=1`` are honoured (see :mod:`craft_sdk.adapter.hub`).
        """
        root = resolve_adapter_dir(directory, revision=revision, subfolder=subfolder)
        data, tensors = read_adapter_dir(root)
        config = AdapterConfig.from_dict(data)
        refiner = {k: v for k, v in tensors.items() if k.startswith(mlp.PREFIX)} or None
        adapter = cls(config, tensors.get("z"), tensors.get("prompt_offset"), refiner, tensors.get(CANARY_TENSOR))
        if verify_projection:
            adapter.verify_projection()
        return adapter

    def push_to_hub(self, repo_id: str, *, source_dir: str | Path | None = None, **kwargs: Any) -> str:
        """Upload the adapter (tensors, config, model card; ``refiner.onnx`` from ``source_dir``) to the Hub.

        ``kwargs``: ``revision``, ``private``, ``token``, ``commit_message`` (see :func:`craft_sdk.adapter.hub.push_folder`).
        Returns the commit URL.
        """
        return push_adapter(self, repo_id, source_dir=source_dir, **kwargs)

    def onnx_refiner(self, path: str | Path, threads: int = 1) -> OnnxRefiner:
        """The ONNX Runtime refiner of ``path`` (an exported ``refiner.onnx``), refused with an
        :class:`AdapterError` when it is stale or another adapter's (:class:`~craft_sdk.adapter.runtime.OnnxRefiner`)."""
        return OnnxRefiner(path, self, threads)

    def verify_projection(self, rtol: float = 1e-5) -> None:
        """Check that A z regenerated from the recorded seed equals the stored offset."""
        spec = self.config.prompt
        if not isinstance(spec, PromptSpec) or self.z is None or self.offset is None:
            return
        if spec.generator != GENERATOR:
            raise AdapterError(f"unknown projection generator {spec.generator!r}; cannot verify the prompt offset")
        a = projection_matrix(spec.seed, spec.n_ctx * spec.ctx_dim, spec.intrinsic_dim, spec.std)
        regenerated = project(a, self.z, spec.n_ctx, spec.ctx_dim)
        scale = float(np.abs(self.offset).max()) or 1.0
        err = float(np.abs(regenerated - self.offset).max())
        if err > rtol * scale + 1e-7:
            raise AdapterError(f"stored prompt_offset differs from A z regenerated from seed {spec.seed} (max error {err:.3g}); the adapter is corrupt")


def _config_bytes(config: AdapterConfig) -> bytes:
    """The config file's bytes, also what the fingerprint hashes (a continuous prompt names no kind,
    so adapters and refiner.onnx files from before ``prompt.kind`` keep their fingerprint)."""
    return (json.dumps(config.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


def _check_finite(name: str, arr: np.ndarray) -> None:
    if not np.isfinite(arr).all():
        raise AdapterError(f"adapter tensor {name} contains NaN or inf; the adapter is corrupt")


def _validate(adapter: Adapter) -> None:
    cfg = adapter.config
    if isinstance(cfg.prompt, DiscretePromptSpec) and cfg.template != cfg.prompt.text:
        raise AdapterError(f"adapter template {cfg.template!r} differs from its discrete prompt's text {cfg.prompt.text!r}; the config is corrupt")
    if isinstance(cfg.prompt, EnsemblePromptSpec) and cfg.template != cfg.prompt.texts[0]:
        raise AdapterError(f"adapter template {cfg.template!r} is not its ensemble's first context {cfg.prompt.texts[0]!r}; the config is corrupt")
    continuous = isinstance(cfg.prompt, PromptSpec)
    if continuous != (adapter.z is not None) or (adapter.z is None) != (adapter.offset is None):
        raise AdapterError("adapter config and tensors disagree on whether there is a prompt offset (z, prompt_offset)")
    if isinstance(cfg.prompt, PromptSpec):
        assert adapter.z is not None and adapter.offset is not None
        if adapter.z.shape != (cfg.prompt.intrinsic_dim,):
            raise AdapterError(f"z has shape {list(adapter.z.shape)}, config says [{cfg.prompt.intrinsic_dim}]")
        if adapter.offset.shape != (cfg.prompt.n_ctx, cfg.prompt.ctx_dim):
            raise AdapterError(
                f"prompt_offset has shape {list(adapter.offset.shape)}, config says [{cfg.prompt.n_ctx}, {cfg.prompt.ctx_dim}]"
            )
        _check_finite("z", adapter.z)
        _check_finite("prompt_offset", adapter.offset)
    if (cfg.refiner is None) != (adapter.refiner is None):
        raise AdapterError("adapter config and tensors disagree on whether there is a refiner")
    if cfg.refiner is not None and adapter.refiner is not None:
        _validate_refiner(cfg.refiner, adapter.refiner, len(cfg.class_names))
    if (cfg.canary is None) != (adapter.canary_scores is None):
        raise AdapterError(f"adapter config and tensors disagree on whether there is a drift canary ({CANARY_TENSOR})")
    if cfg.canary is not None and adapter.canary_scores is not None:
        if adapter.canary_scores.shape != (cfg.canary.n_probes, len(cfg.class_names)):
            raise AdapterError(f"{CANARY_TENSOR} has shape {list(adapter.canary_scores.shape)}, config says "
                               f"[{cfg.canary.n_probes}, {len(cfg.class_names)}]")
        _check_finite(CANARY_TENSOR, adapter.canary_scores)


def _validate_refiner(spec: RefinerSpec, weights: dict[str, np.ndarray], n_classes: int) -> None:
    dims = mlp.layer_dims(n_classes, spec.hidden, spec.layers)
    expected = {f"{mlp.PREFIX}{i}.{kind}" for i in range(len(dims)) for kind in ("weight", "bias")}
    if set(weights) != expected:
        raise AdapterError(f"refiner tensors {sorted(weights)} do not match a {spec.layers}-layer refiner")
    for i, (fan_in, fan_out) in enumerate(dims):
        w, b = weights[f"{mlp.PREFIX}{i}.weight"], weights[f"{mlp.PREFIX}{i}.bias"]
        if w.shape != (fan_out, fan_in) or b.shape != (fan_out,):
            raise AdapterError(
                f"refiner layer {i} has shape {list(w.shape)}, expected [{fan_out}, {fan_in}] "
                f"for {n_classes} classes and hidden {spec.hidden}: class-count or shape mismatch"
            )
        _check_finite(f"refiner.{i}", w)
        _check_finite(f"refiner.{i}.bias", b)


def check_compatible(adapter: Adapter, client: Any, allow_model_mismatch: bool = False) -> None:
    """Raise :class:`AdapterError` when ``client`` cannot serve ``adapter``."""
    caps = client.capabilities(adapter.config.template)
    if caps.model_id != adapter.config.model_id and not allow_model_mismatch:
        from ..client.model_ids import client_hint

        raise AdapterError(
            f"adapter was tuned on {adapter.config.model_id} but the client serves {caps.model_id}; "
            f"pass {client_hint(adapter.config.model_id)} (or allow_model_mismatch=True / --allow-model-mismatch)"
        )
    spec = adapter.config.prompt
    if isinstance(spec, PromptSpec):  # a discrete prompt is text: every client takes it
        if not caps.soft_prompts:
            raise AdapterError(f"adapter has a learned prompt but {caps.model_id} is text-only (no context offsets)")
        if (caps.n_ctx, caps.ctx_dim) != (spec.n_ctx, spec.ctx_dim):
            raise AdapterError(
                f"adapter prompt is [{spec.n_ctx}, {spec.ctx_dim}] but the client expects [{caps.n_ctx}, {caps.ctx_dim}]"
            )
    if caps.output != adapter.config.output:
        raise AdapterError(f"adapter expects {adapter.config.output} but the client returns {caps.output}")
