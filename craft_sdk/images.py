"""Image inputs accepted everywhere: PIL images, file paths, and uint8 arrays."""

from __future__ import annotations

import hashlib
import os
import stat
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DataError

ImageLike = Union[Image.Image, np.ndarray, str, Path]

# PIL's own warning threshold (~0.25 GiB once decoded to RGB): larger files are refused before any
# pixel is decoded (a 71 KB PNG can declare 150 Mpx); PIL raises DecompressionBombError at twice it
MAX_PIXELS = 89_478_485
# what ``craft-sdk predict`` decodes an image to at most (4096 x 4096, far above any VLM's input side): a larger
# file is resized to it while decoding (a JPEG is decoded at 1/2..1/8 scale first, by ``draft``), so a batch of
# huge images holds at most one at full size in memory (6 x 88-Mpx PNGs: see BENCHMARKS.md, "Decoding memory")
PREDICT_MAX_PIXELS = 1 << 24
_PIL_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


def header_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from an image file's header; no pixel is decoded.

    Raises:
        OSError, ValueError, SyntaxError, ``PIL.Image.DecompressionBombError``: PIL's own errors.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            return im.size


def too_large(size: tuple[int, int], max_pixels: int = MAX_PIXELS) -> str | None:
    """Why an image of ``size`` is refused (over ``max_pixels``), or None."""
    n = int(size[0]) * int(size[1])
    if n > max_pixels:
        return f"{size[0]}x{size[1]} = {n:,} pixels is over the limit of {max_pixels:,}"
    return None


def _fit(size: tuple[int, int], limit: int) -> tuple[int, int]:
    """The largest size of ``size``'s aspect ratio with at most ``limit`` pixels (``size`` itself if it fits)."""
    w, h = size
    if w * h <= limit:
        return size
    scale = (limit / (w * h)) ** 0.5
    return max(1, int(w * scale)), max(1, int(h * scale))


def decode_file(path: str | Path, max_pixels: int = MAX_PIXELS, reduce_above: int | None = None) -> Image.Image:
    """Decode an image file to RGB after checking its header size against ``max_pixels``.

    Args:
        reduce_above: if set, an image of more pixels is resized (Lanczos) to the largest size of its aspect
            ratio within this many pixels while decoding (a JPEG is decoded at reduced scale to begin with),
            so a batch holds at most one image at full size in memory.

    Raises:
        DataError: too large; PIL's own errors (see :func:`header_size`) when unreadable.
    """
    problem = too_large(header_size(path), max_pixels)
    if problem is not None:
        raise DataError(f"image {path} is too large ({problem}); downscale it")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            if reduce_above is None or _fit(im.size, reduce_above) == im.size:
                im.load()
                return im.convert("RGB")
            im.draft("RGB", _fit(im.size, reduce_above))  # JPEG only (1/2..1/8 scale); a no-op for other formats
            im.load()
            full = im.convert("RGB") if im.mode in ("1", "P", "PA") else im  # palettes resize only by nearest
            target = _fit(full.size, reduce_above)
            small = full if target == full.size else full.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
            return small.convert("RGB")


def require_regular(path: str | Path) -> None:
    """Fail with one line unless ``path`` is a regular file: opening a FIFO would block forever, a device never end.

    Raises:
        DataError: missing, unreadable, or a FIFO, device, socket or directory.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.__class__.__name__}") from None
    if not stat.S_ISREG(mode):
        raise DataError(f"{path} is not a regular file (a FIFO, device or socket?); predict reads image files only")


def read_image(path: str | Path, max_pixels: int = MAX_PIXELS, reduce_above: int | None = None) -> Image.Image:
    """:func:`decode_file` with every failure as a one-line :class:`DataError` naming the file (a FIFO or
    device is refused before it is opened)."""
    require_regular(path)
    try:
        return decode_file(path, max_pixels, reduce_above)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"image file {path} does not exist") from None
    except Image.DecompressionBombError:
        raise DataError(f"image {path} is too large (PIL refuses it as a decompression bomb); downscale it") from None
    except _PIL_ERRORS as exc:
        raise DataError(f"cannot read image {path}: {exc.__class__.__name__}; is it a valid image file?") from None


def image_digest(image: Image.Image) -> str:
    """Short sha256 (16 hex digits) of one image's size and RGB pixels: identifies it across datasets."""
    im = image if image.mode == "RGB" else image.convert("RGB")
    h = hashlib.sha256(f"{im.size[0]}x{im.size[1]};".encode())
    h.update(im.tobytes())
    return h.hexdigest()[:16]


def to_pil(image: ImageLike) -> Image.Image:
    """Convert one image input to an RGB PIL image.

    Args:
        image: a PIL image, a path to an image file, or a uint8 array of shape
            [H, W], [H, W, 1], [H, W, 3] or [H, W, 4].

    Raises:
        DataError: naming the input and what is wrong with it.
    """
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, np.ndarray):
        return _array_to_pil(image)
    raise DataError(f"unsupported image type {type(image).__name__}; pass a PIL image, a file path or a uint8 array")


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    if arr.dtype != np.uint8:
        raise DataError(f"image arrays must be uint8 (0..255), got dtype {arr.dtype}; convert with .astype(np.uint8)")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        return Image.fromarray(arr, "L").convert("RGB")
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return Image.fromarray(arr[:, :, :3].copy(), "RGB")
    raise DataError(f"image array shape {arr.shape} is not [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]")


def to_pil_list(images: Sequence[ImageLike]) -> list[Image.Image]:
    """Convert a sequence of image inputs (see :func:`to_pil`)."""
    if isinstance(images, (str, Path, Image.Image)) or (isinstance(images, np.ndarray) and images.ndim < 4):
        raise DataError("expected a sequence of images, got a single image; wrap it in a list")
    out = [to_pil(im) for im in images]
    if not out:
        raise DataError("the image list is empty")
    return out


def images_fingerprint(images: Sequence[Image.Image]) -> str:
    """sha256 over sizes and RGB pixels of ``images`` (order-sensitive)."""
    h = hashlib.sha256()
    for im in images:
        h.update(f"{im.size[0]}x{im.size[1]};".encode())
        h.update(im.tobytes())
    return h.hexdigest()
