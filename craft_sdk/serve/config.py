"""Server configuration: limits, per-key budget, cache bounds, and API keys from a file."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import ConfigError

MIN_KEY_CHARS = 16


@dataclass(frozen=True)
class ServerConfig:
    """Limits and bounds of a prediction server.

    Args:
        budget_per_key: queries each API key may use (one candidate prompt scored on one
            image set = one query, the client-side ledger's unit); None = unlimited.
        max_body_bytes: largest request body accepted (413 beyond).
        max_images: images per uploaded set (413 beyond).
        max_image_side: largest image height or width in pixels (413 beyond).
        max_classes: class names per prediction (413 beyond).
        max_class_name_chars: characters per class name (422 beyond).
        max_template_chars: characters in a context template (422 beyond).
        max_population: candidate offsets per prediction (413 beyond).
        max_answer_bytes: largest answer, P x N x C x 4 (or 2 for float16) bytes of logits (413
            beyond; HTTPClient splits a population to fit).
        max_prompts: P x C prompts encoded per prediction, the request's compute (413 beyond;
            HTTPClient splits): bounds how long one request holds the model from other keys
            (16,384 prompts: about 7 s of a ViT-B-32 text tower on a busy 2-core CPU; raise it on a GPU).
        max_abs_offset: largest absolute value of an offset element (422 beyond): a finite but huge
            offset (1e20) overflows the text tower to NaN; tuned offsets are below 1 in practice.
        max_image_sets: uploaded image sets whose features are kept *per key* (that key's least
            recently used evicted; an evicted handle answers 404 and the client uploads again).
        idempotency_entries: answers remembered in memory for replay, per process.
        idempotency_bytes: total bytes of answers remembered in memory (an answer larger than
            this is not kept; a replay then recomputes it, unbilled).
        max_pending: requests waiting for the model at once (429 ``rate_limited`` beyond).
        header_timeout_s: seconds a connection may take to send its request headers (or stay idle
            between requests) before it is closed.
        body_timeout_s: seconds a request may take to send its body (408 beyond).
        lease_s: seconds after which a killed server process's unfinished requests may be taken
            over by another process sharing the state (its retries are computed, not billed again).
        store_timeout_s: seconds one state-store call may take (off the event loop); beyond it, or
            when the store is down, metered routes answer 503 with Retry-After and ``/v1/health``
            reports the store unavailable.
        max_request_s: seconds of model time one request may use (its compute budget, beside
            ``max_prompts``): a population is computed in chunks of ``chunk_prompts`` prompts, and
            between chunks a request over this budget stops (413 ``compute_budget``) and one whose
            client left stops (499); both are refunded whole (nothing delivered, nothing billed).
        chunk_prompts: P x C prompts computed per chunk of a prediction (whole candidates; at least
            one candidate a chunk): how often a request checks its time budget and its client.

    Example:
        >>> ServerConfig(budget_per_key=8000).max_classes
        1000
    """

    budget_per_key: int | None = None
    max_body_bytes: int = 256 << 20
    max_images: int = 10_000
    max_image_side: int = 1024
    max_classes: int = 1000
    max_class_name_chars: int = 200
    max_template_chars: int = 200
    max_population: int = 256
    max_answer_bytes: int = 64 << 20
    max_prompts: int = 16_384
    max_abs_offset: int = 10_000
    max_image_sets: int = 8
    idempotency_entries: int = 256
    idempotency_bytes: int = 128 << 20
    max_pending: int = 64
    header_timeout_s: int = 10
    body_timeout_s: int = 60
    lease_s: int = 10
    store_timeout_s: int = 5
    max_request_s: int = 60
    chunk_prompts: int = 4096

    def __post_init__(self) -> None:
        if self.budget_per_key is not None and self.budget_per_key < 0:
            raise ConfigError(f"budget_per_key must be >= 0 or None, got {self.budget_per_key}")
        for name, value in asdict(self).items():
            if name != "budget_per_key" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")

    def limits(self) -> dict[str, int]:
        """The size limits, as the ``/v1/limits`` endpoint reports them."""
        shown = ("max_body_bytes", "max_images", "max_image_side", "max_classes", "max_class_name_chars",
                 "max_template_chars", "max_population", "max_answer_bytes", "max_prompts", "max_abs_offset", "max_request_s")
        return {**{k: getattr(self, k) for k in shown}, "max_zero_shot_body_bytes": self.zero_shot_body_bytes}

    @property
    def zero_shot_body_bytes(self) -> int:
        """The largest body ``/v1/zero-shot`` reads: a valid request at every limit (an incompressible 16-bit RGBA
        image of ``max_image_side`` squared, base64, and ``max_classes`` labels JSON-escaped), at most ``max_body_bytes``."""
        png = self.max_image_side * (8 * self.max_image_side + 1) * 1.01 + (1 << 16)  # 8 bytes a pixel, stored
        labels = self.max_classes * (6 * self.max_class_name_chars + 4)  # \uXXXX escapes, quotes, comma
        return min(self.max_body_bytes, int(png * 4 / 3) + labels + 6 * self.max_template_chars + (1 << 16))


def load_api_keys(path: str | Path) -> dict[str, str]:
    """Read API keys: one per line, either ``KEY`` or ``NAME KEY``; blank and ``#`` lines ignored.

    Errors name the file and line, never a key. A file whose names collide (the same name twice,
    or a bare key whose generated name ``key-<n>`` is also written out) is refused whole.

    Returns:
        name → key (unnamed keys are called ``key-1``, ``key-2``... in file order).

    Example:
        >>> load_api_keys("keys.txt")  # doctest: +SKIP
        {'alice': '...', 'key-2': '...'}
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"API key file {p} does not exist; create it with one key per line")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"API key file {p} cannot be read ({exc.__class__.__name__}); it must be UTF-8 text") from None
    keys: dict[str, str] = {}
    lines: dict[str, int] = {}
    for i, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) > 2:
            raise ConfigError(f"{p}:{i} has {len(parts)} fields; expected KEY or NAME KEY")
        name, key = (parts[0], parts[1]) if len(parts) == 2 else (f"key-{len(keys) + 1}", parts[0])
        if name in keys:
            raise ConfigError(f"{p}:{i} reuses the key name of line {lines[name]}; give every key its own name")
        if len(key) < MIN_KEY_CHARS:
            raise ConfigError(f"{p}:{i} holds a key shorter than {MIN_KEY_CHARS} characters; use long random keys")
        if key in keys.values():
            raise ConfigError(f"{p}:{i} repeats the key of an earlier line; every key must be distinct")
        keys[name], lines[name] = key, i
    return validate_keys(keys, str(p))


def validate_keys(keys: dict[str, str], where: str = "api_keys") -> dict[str, str]:
    """Check that keys are long enough, unique and named uniquely (errors never show a key)."""
    if not keys:
        raise ConfigError(f"{where} holds no API key; add at least one (e.g. python -c 'import secrets; print(secrets.token_hex(24))')")
    short = sum(1 for key in keys.values() if len(key) < MIN_KEY_CHARS)
    if short:
        raise ConfigError(f"{short} API key(s) in {where} are shorter than {MIN_KEY_CHARS} characters; use long random keys")
    if len(set(keys.values())) != len(keys):
        raise ConfigError(f"{where} lists the same key twice; every key must be distinct")
    return dict(keys)
