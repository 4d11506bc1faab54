"""Decoding and validation of what a client sends: every failure is a :class:`Problem` (4xx), never billed."""

from __future__ import annotations

import base64
import binascii
import io
import logging
import re
import warnings
from typing import Any

import numpy as np
from PIL import Image

from ..wire import MODEL_FAULT, TensorEntry, WireError, loads_json, parse, read
from .config import ServerConfig

logger = logging.getLogger(__name__)

_IMAGE_RE = re.compile(r"^image\.(\d{6})$")


class Problem(Exception):
    """An HTTP error answered as JSON ``{"error": {"code", "message", "field"}}``."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.headers = headers or {}
        self.done = 0  # a request stopped part-way: the chunks it computed (billed; the rest is refunded)
        self.billed = 0  # ... and their queries, which the route fills in (sent as X-Craft-Queries)


def parse_body(body: bytes) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    try:
        return parse(body)
    except WireError as exc:
        raise Problem(422, "invalid", str(exc), exc.field) from None


def array(body: bytes, entry: TensorEntry, name: str, field: str) -> np.ndarray:
    try:
        return read(body, entry, name)
    except WireError as exc:
        raise Problem(422, "invalid", str(exc), field) from None


def decode_images(body: bytes, cfg: ServerConfig) -> list[Image.Image]:
    entries, _ = parse_body(body)
    parts: list[TensorEntry]
    if set(entries) == {"images"}:
        e = entries["images"]
        if len(e.shape) != 4:
            raise Problem(422, "invalid", "tensor 'images' must be uint8 [N, H, W, 3]", "images")
        parts = [e]
        n = e.shape[0]
    else:
        idx = sorted(int(m.group(1)) for m in map(_IMAGE_RE.match, entries) if m)
        if not entries or len(idx) != len(entries) or idx != list(range(len(idx))):
            raise Problem(422, "invalid", "an image set is one tensor 'images' [N, H, W, 3] or tensors image.000000... [H, W, 3]", "images")
        parts = [entries[f"image.{i:06d}"] for i in idx]
        n = len(parts)
    if n < 1 or n > cfg.max_images:
        raise Problem(413 if n else 422, "too_large" if n else "invalid", f"an image set holds 1 to {cfg.max_images} images, got {n}", "images")
    for e in parts:
        shape = e.shape[1:] if len(e.shape) == 4 else e.shape
        if e.dtype != "U8" or len(shape) != 3 or shape[2] != 3:
            raise Problem(422, "invalid", "images must be uint8 RGB [H, W, 3]", "images")
        if not (1 <= shape[0] <= cfg.max_image_side and 1 <= shape[1] <= cfg.max_image_side):
            raise Problem(413, "too_large", f"image size {shape[1]}x{shape[0]} exceeds {cfg.max_image_side} pixels per side", "images")
    out: list[Image.Image] = []
    for e in parts:
        arr = array(body, e, "images", "images")
        for a in arr if arr.ndim == 4 else [arr]:
            out.append(Image.fromarray(np.ascontiguousarray(a), "RGB"))
    return out


def request_json(meta: dict[str, str]) -> dict[str, Any]:
    try:
        req = loads_json(meta["request"], "metadata 'request'", "request", max_depth=4)
    except KeyError:
        raise Problem(422, "invalid", "metadata 'request' must be a JSON object", "request") from None
    except WireError as exc:
        raise Problem(422, "invalid", str(exc), "request") from None
    if not isinstance(req, dict):
        raise Problem(422, "invalid", "metadata 'request' must be a JSON object", "request")
    return req


def check_names(names: Any, cfg: ServerConfig) -> list[str]:
    if not isinstance(names, list) or not names:
        raise Problem(422, "invalid", "class_names must be a non-empty list of strings", "class_names")
    if len(names) > cfg.max_classes:
        raise Problem(413, "too_large", f"{len(names)} classes exceed the limit of {cfg.max_classes}", "class_names")
    if any(not isinstance(n, str) or not n.strip() or len(n) > cfg.max_class_name_chars for n in names):
        raise Problem(422, "invalid", f"every class name must be a non-empty string of at most {cfg.max_class_name_chars} characters", "class_names")
    if len(set(names)) != len(names):
        raise Problem(422, "invalid", "class_names has duplicates", "class_names")
    return names


def check_template(template: Any, cfg: ServerConfig) -> None:
    if not isinstance(template, str) or not template.strip() or len(template) > cfg.max_template_chars:
        raise Problem(422, "invalid", f"template must be a non-empty string of at most {cfg.max_template_chars} characters", "template")


def check_offsets(body: bytes, e: TensorEntry, caps: Any, cfg: ServerConfig) -> np.ndarray:
    if not caps.soft_prompts:
        raise Problem(422, "invalid", "this model is text-only: it accepts no offsets", "offsets")
    if e.dtype != "F32":
        raise Problem(422, "invalid", f"offsets must be float32, got {e.dtype}", "offsets")
    want = (caps.n_ctx, caps.ctx_dim)
    if len(e.shape) not in (2, 3) or tuple(e.shape[-2:]) != want or (len(e.shape) == 3 and e.shape[0] < 1):
        raise Problem(422, "invalid", f"offsets must have shape [{want[0]}, {want[1]}] or [P, {want[0]}, {want[1]}], got {list(e.shape)}", "offsets")
    if len(e.shape) == 3 and e.shape[0] > cfg.max_population:
        raise Problem(413, "too_large", f"{e.shape[0]} candidate offsets exceed the limit of {cfg.max_population} per request", "offsets")
    arr = array(body, e, "offsets", "offsets")
    if not np.isfinite(arr).all():
        raise Problem(422, "invalid", "offsets contain NaN or inf", "offsets")
    if arr.size and float(np.abs(arr).max()) > cfg.max_abs_offset:
        raise Problem(422, "out_of_range", f"offset values must lie within +-{cfg.max_abs_offset} (max_abs_offset in "
                      "/v1/capabilities and /v1/limits); scale the offsets down", "offsets")
    return np.array(arr)  # a writable copy for the model


def check_logits(out: Any, want: tuple[int, int, int]) -> np.ndarray:
    """The model's scores as float32 [P, N, C], or a 500 ``model_fault`` (logged, not leaked, not worth a retry:
    the same valid request gives the same invalid result)."""
    arr = np.asarray(out, dtype=np.float32)
    if arr.ndim == 2 and want[0] == 1:
        arr = arr[None]
    if arr.shape != want or not np.isfinite(arr).all():
        logger.error("the model returned shape %s (expected %s) or non-finite scores", arr.shape, want)
        raise Problem(500, MODEL_FAULT, "the model returned non-finite or misshapen scores for this request; "
                      "retrying will not help, report it to the model owner")
    return arr


def first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [exc.__class__.__name__])[0][:300]


def decode_image_b64(inputs: Any, max_side: int) -> Image.Image:
    """A base64 image (or a ``data:`` URI's payload) as RGB, at most ``max_side`` pixels a side (413), else 422."""
    if not isinstance(inputs, str):
        raise Problem(422, "invalid", "inputs must be a base64-encoded image", "inputs")
    if inputs.startswith("data:"):
        inputs = inputs.partition(",")[2]
    try:
        raw = base64.b64decode(inputs, validate=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(raw))
            if max(im.size) > max_side:
                raise Problem(413, "too_large", f"image size {im.size[0]}x{im.size[1]} exceeds {max_side} pixels per side", "inputs")
            im.load()
            return im.convert("RGB")
    except Problem:
        raise
    except (binascii.Error, ValueError, OSError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise Problem(422, "invalid", "inputs is not a base64-encoded image PIL can read", "inputs") from None
