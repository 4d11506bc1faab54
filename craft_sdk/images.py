"""Image inputs accepted everywhere: PIL images, file paths, and uint8 arrays."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DataError

ImageLike = Union[Image.Image, np.ndarray, str, Path]


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
        try:
            with Image.open(image) as im:
                im.load()
                return im.convert("RGB")
        except FileNotFoundError:
            raise DataError(f"image file {image} does not exist") from None
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise DataError(f"cannot read image {image}: {exc.__class__.__name__}; is it a valid image file?") from None
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
