"""The wire codec of the prediction service, shared by the server and :class:`~craft_sdk.client.http.HTTPClient`.

Bodies are safetensors buffers: an 8-byte little-endian header length, a JSON
header (tensor name → dtype, shape, byte offsets; optional ``__metadata__``:
string → string), then the raw little-endian tensor bytes. Everything read
from the wire is hostile until checked: :func:`parse` and :func:`loads_json`
raise :class:`WireError` (one line) for *any* malformed input — deep nesting,
huge integers, wrong types — and never another exception. The format itself is
documented in ``docs/wire-format.md``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

API = "v1"
SAFETENSORS = "application/x-safetensors"
CHECKSUM_HEADER = "X-Craft-Body-SHA256"
IDEMPOTENCY_HEADER = "Idempotency-Key"
MODEL_FAULT = "model_fault"  # the error code of a 5xx a retry cannot fix: the model's scores for a valid request are unusable
STORE_UNAVAILABLE = "store_unavailable"  # 503: the state store cannot record a charge now; nothing was computed or billed
MAX_HEADER_BYTES = 16 << 20
MAX_NDIM = 8
MAX_DIM = 1 << 40  # any larger dimension cannot describe bytes of a body we accept
MAX_JSON_DEPTH = 32

# safetensors dtype codes understood on the wire
DTYPES: dict[str, np.dtype] = {
    "U8": np.dtype("uint8"),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
}


class WireError(ValueError):
    """A body does not follow the wire format (the server answers 422; the client retries)."""

    def __init__(self, message: str, field: str = "body") -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors body, located but not yet read."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


_JSON_STRING = re.compile(rb'"(?:[^"\\\\]|\\\\.)*"')
_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))
_NUMBER = re.compile(rb"[-+0-9.eE]+")


def query_cost(offsets: Any) -> int:
    """The queries one prediction call costs, the product's billing unit, computed only here.

    No offsets (the plain template) or one context's offsets ``[n_ctx, d]``: 1 query; a batch of P
    candidate offsets ``[P, n_ctx, d]``: P queries. The client ledger charges it before sending and the
    server's meter bills it, so the two always agree.

    Example:
        >>> query_cost(None), query_cost(np.zeros((4, 8))), query_cost(np.zeros((6, 4, 8)))
        (1, 1, 6)
    """
    return 1 if offsets is None or np.ndim(offsets) == 2 else int(np.shape(offsets)[0])


def _depth_ok(text: str | bytes, limit: int) -> bool:
    """Whether JSON ``text`` nests at most ``limit`` deep (strings skipped; vectorised, so a 16 MiB header is cheap)."""
    data = text.encode("utf-8", "replace") if isinstance(text, str) else bytes(text)
    if data.count(b"[") + data.count(b"{") <= limit:
        return True
    brackets = np.frombuffer(_JSON_STRING.sub(b"", data).translate(None, delete=_BRACKETS), np.uint8)
    if brackets.size == 0:
        return True
    steps = np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1)
    return int(np.cumsum(steps).max()) <= limit


def _longest_number(text: str | bytes) -> int:
    """Characters in the longest run of number characters outside JSON strings."""
    data = text.encode("utf-8", "replace") if isinstance(text, str) else bytes(text)
    return max(map(len, _NUMBER.findall(_JSON_STRING.sub(b'""', data))), default=0)


def loads_json(
    text: str | bytes, what: str = "body", field: str = "body", max_depth: int = MAX_JSON_DEPTH, max_number_chars: int | None = None
) -> Any:
    """``json.loads`` for hostile input: deep nesting, >4,300-digit integers, bad UTF-8 → :class:`WireError`;
    with ``max_number_chars``, also any number written with more characters (a 5,000-digit score)."""
    if not _depth_ok(text, max_depth):
        raise WireError(f"{what} nests JSON deeper than {max_depth} levels", field)
    if max_number_chars is not None and _longest_number(text) > max_number_chars:
        raise WireError(f"{what} holds a number longer than {max_number_chars} characters", field)
    try:
        return json.loads(text)
    except (ValueError, RecursionError, UnicodeDecodeError):  # JSONDecodeError and int-digit limits are ValueErrors
        raise WireError(f"{what} is not valid JSON", field) from None


def encode(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors body (contiguous little-endian tensors + string metadata)."""
    from safetensors.numpy import save

    arrays = {k: np.asarray(v) for k, v in tensors.items()}  # (np.ascontiguousarray would turn a 0-d tensor into 1-d)
    return save({k: a if a.flags.c_contiguous else np.ascontiguousarray(a) for k, a in arrays.items()}, metadata=metadata)


def parse(body: bytes) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Locate the tensors and metadata of a safetensors body without reading any tensor.

    Raises:
        WireError: the body is not a well-formed safetensors buffer (and nothing else, whatever the bytes).
    """
    if len(body) < 8:
        raise WireError("body is not safetensors: shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", body[:8])
    if n > min(MAX_HEADER_BYTES, len(body) - 8):
        raise WireError("body is not safetensors: header length exceeds the body")
    header = loads_json(body[8 : 8 + n], "safetensors header")
    if not isinstance(header, dict):
        raise WireError("body is not safetensors: header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise WireError("safetensors metadata must map strings to strings")
    data_len = len(body) - 8 - n
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        entries[name] = _entry(name, info, data_len, 8 + n)
    return entries, meta


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry(name: str, info: Any, data_len: int, base: int) -> TensorEntry:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise WireError(f"tensor {name[:40]!r} has a malformed header entry", name)
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or len(dtype) > 8:
        raise WireError(f"tensor {name[:40]!r} has a malformed dtype", name)
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape):
        raise WireError(f"tensor {name[:40]!r} has a malformed shape (at most {MAX_NDIM} dims of 0 to 2^40)", name)
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise WireError(f"tensor {name[:40]!r} has malformed data_offsets", name)
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise WireError(f"tensor {name[:40]!r} lies outside the body (truncated?)", name)
    size = DTYPES[dtype].itemsize if dtype in DTYPES else 0
    if size and end - begin != math.prod(shape) * size:  # Python ints: no overflow
        raise WireError(f"tensor {name[:40]!r} byte length does not match its shape", name)
    return TensorEntry(dtype, tuple(shape), base + begin, base + end)


def read(body: bytes, entry: TensorEntry, name: str) -> np.ndarray:
    """The tensor ``entry`` of ``body`` as a read-only numpy array (no copy)."""
    if entry.dtype not in DTYPES:
        raise WireError(f"tensor {name!r} has unsupported dtype {entry.dtype[:8]}", name)
    dt = DTYPES[entry.dtype]
    return np.frombuffer(body, dt, offset=entry.start, count=(entry.end - entry.start) // dt.itemsize).reshape(entry.shape)


def encode_images(images: Sequence[Image.Image]) -> bytes:
    """RGB pixels as a safetensors body: ``images`` [N, H, W, 3] if all sizes agree, else ``image.{i:06d}``."""
    arrays = [np.asarray(im.convert("RGB") if im.mode != "RGB" else im, dtype=np.uint8) for im in images]
    if len({a.shape for a in arrays}) == 1:
        return encode({"images": np.stack(arrays)})
    return encode({f"image.{i:06d}": a for i, a in enumerate(arrays)})


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
