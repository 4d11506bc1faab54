"""Few-shot image datasets: ImageFolder trees, CoOp split files, seeded k-shot sampling.

Files are listed and their headers checked up front (unreadable files and images over
:data:`~craft_sdk.images.MAX_PIXELS` are skipped with a warning, before a single query is
spent); only the images a run uses are decoded: the sampled training and validation
images at load time, the test images when they are read. Supported layouts:

* ``DATA/train/<class>/*`` and ``DATA/test/<class>/*`` (optionally ``DATA/val/<class>/*``);
* a single ImageFolder ``DATA/<class>/*``, split per class with a seeded hold-out (``test_fraction``:
  by default half of each class, but never so many that the shots no longer fit);
* CoOp's ``split_zhou_<name>.json`` (``{"train"|"val"|"test": [[path, label, classname], ...]}``)
  with image paths relative to ``DATA``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import overload

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DataError
from .images import MAX_PIXELS, decode_file, header_size, image_digest, read_image, too_large

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})


class LazyImages(Sequence[Image.Image]):
    """Image files decoded on access, never cached (a test split is read once, when it is scored).

    Args:
        paths: image files (headers already checked).
        max_pixels: size limit applied again at decode time.
    """

    def __init__(self, paths: Sequence[str], max_pixels: int = MAX_PIXELS) -> None:
        self.paths = tuple(paths)
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    @overload
    def __getitem__(self, i: int) -> Image.Image: ...
    @overload
    def __getitem__(self, i: slice) -> LazyImages: ...
    def __getitem__(self, i: int | slice) -> Image.Image | LazyImages:
        if isinstance(i, slice):
            return LazyImages(self.paths[i], self.max_pixels)
        return read_image(self.paths[i], self.max_pixels)

    def __iter__(self) -> Iterator[Image.Image]:
        return (read_image(p, self.max_pixels) for p in self.paths)

    def take(self, index: Sequence[int]) -> LazyImages:
        """The files at ``index``, still undecoded."""
        return LazyImages([self.paths[int(i)] for i in index], self.max_pixels)


@dataclass
class ImageDataset:
    """Decoded RGB images with integer labels into ``class_names``.

    Args:
        images: RGB PIL images, length N (or :class:`LazyImages`, decoded when read).
        labels: int64 array [N] of indices into ``class_names``.
        class_names: ordered class names, as used in prompts.
        sources: optional per-image identifiers (file paths), length N or empty.
    """

    images: Sequence[Image.Image]
    labels: np.ndarray
    class_names: tuple[str, ...]
    sources: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        self.class_names = tuple(self.class_names)
        if len(self.images) != len(self.labels):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels; pass one label per image")
        if not self.class_names:
            raise DataError("class_names is empty; a dataset needs at least one class")
        if len(set(self.class_names)) != len(self.class_names):
            raise DataError(f"class_names has duplicates: {list(self.class_names)}; make every class name unique")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise DataError(f"labels must lie in [0, {len(self.class_names)}); got {self.labels.min()}..{self.labels.max()}")
        if self.sources and len(self.sources) != len(self.images):
            raise DataError("sources must be empty or one per image")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: Sequence[int] | np.ndarray) -> ImageDataset:
        """The dataset restricted to ``index`` (same class list)."""
        idx = [int(i) for i in index]
        return ImageDataset(
            images=self.images.take(idx) if isinstance(self.images, LazyImages) else [self.images[i] for i in idx],
            labels=self.labels[idx] if idx else np.zeros(0, np.int64),
            class_names=self.class_names,
            sources=tuple(self.sources[i] for i in idx) if self.sources else (),
        )

    def class_counts(self) -> np.ndarray:
        """Images per class, int64 [C]."""
        return np.bincount(self.labels, minlength=len(self.class_names))

    def image_fingerprints(self) -> list[str]:
        """Per-image short digests (:func:`~craft_sdk.images.image_digest`), in dataset order."""
        return [image_digest(im) for im in self.images]

    def decoded(self) -> ImageDataset:
        """The same dataset with every image decoded in memory (a no-op when it already is)."""
        if not isinstance(self.images, LazyImages):
            return self
        return ImageDataset(list(self.images), self.labels, self.class_names, self.sources)

    def fingerprint(self) -> str:
        """sha256 over class names, labels and pixels: identifies the exact data."""
        h = hashlib.sha256()
        h.update(json.dumps(list(self.class_names)).encode())
        h.update(self.labels.astype("<i8").tobytes())
        for im in self.images:
            h.update(f"{im.size[0]}x{im.size[1]}".encode())
            h.update(im.tobytes())
        return h.hexdigest()


@dataclass
class DataSplits:
    """Train / optional validation / optional test datasets over one class list."""

    train: ImageDataset
    val: ImageDataset | None = None
    test: ImageDataset | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.train.class_names


def prompt_name(folder_name: str) -> str:
    """Folder name to the class name used in prompts (CoOp convention: ``_`` → space)."""
    return folder_name.replace("_", " ").strip()


def _header_problem(path: Path, max_pixels: int) -> str | None:
    """Why ``path`` cannot be used, judged from its header alone (no pixel decoded), or None."""
    try:
        size = header_size(path)
    except Image.DecompressionBombError:
        return "too large: PIL refuses it as a decompression bomb"
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        return f"unreadable image: {exc.__class__.__name__}"
    problem = too_large(size, max_pixels)
    return None if problem is None else f"too large: {problem}"


def _read_files(
    files: Sequence[tuple[Path, int]], class_names: tuple[str, ...], skipped: list[tuple[str, str]],
    max_pixels: int = MAX_PIXELS,
) -> ImageDataset:
    """The usable files as an undecoded dataset (headers checked; the rest goes to ``skipped``)."""
    labels: list[int] = []
    sources: list[str] = []
    for path, label in files:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append((str(path), "not an image file (suffix)"))
            continue
        problem = _header_problem(path, max_pixels)
        if problem is not None:
            skipped.append((str(path), problem))
            continue
        labels.append(label)
        sources.append(str(path))
    return ImageDataset(LazyImages(sources, max_pixels), np.asarray(labels, np.int64), class_names, tuple(sources))


def _decode(ds: ImageDataset, skipped: list[tuple[str, str]]) -> tuple[ImageDataset, set[str]]:
    """(ds with its images decoded, sources that failed to decode; those go to ``skipped``)."""
    if not isinstance(ds.images, LazyImages):
        return ds, set()
    images, failed = [], set()
    for path in ds.images.paths:
        try:
            images.append(decode_file(path, ds.images.max_pixels))
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            skipped.append((path, f"unreadable image: {exc.__class__.__name__}"))
            failed.add(path)
    if failed:
        return ds, failed
    return ImageDataset(images, ds.labels, ds.class_names, ds.sources), failed


def _class_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        raise DataError(f"{root} is not a directory; pass a folder with one sub-folder per class")
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise DataError(f"{root} has no class sub-folders; expected {root}/<class>/<image files>")
    return dirs


def _folder_files(root: Path, names: dict[str, int]) -> list[tuple[Path, int]]:
    files: list[tuple[Path, int]] = []
    for d in _class_dirs(root):
        if d.name not in names:
            continue
        files += [(f, names[d.name]) for f in sorted(d.rglob("*")) if f.is_file() and not f.name.startswith(".")]
    return files


def load_image_folder(
    root: str | Path, class_folders: Sequence[str] | None = None, max_pixels: int = MAX_PIXELS
) -> tuple[ImageDataset, list]:
    """Read ``root/<class>/*`` into an :class:`ImageDataset` whose images are decoded when read.

    Non-image, unreadable and too-large files (header over ``max_pixels``) are skipped and
    returned as ``(path, reason)``.

    Args:
        root: the ImageFolder root.
        class_folders: folder names to use as classes, in order; default: sorted sub-folders.
        max_pixels: images with more pixels are skipped without being decoded.
    """
    root = Path(root)
    folders = list(class_folders) if class_folders is not None else [d.name for d in _class_dirs(root)]
    skipped: list[tuple[str, str]] = []
    names = {f: i for i, f in enumerate(folders)}
    ds = _read_files(_folder_files(root, names), tuple(prompt_name(f) for f in folders), skipped, max_pixels)
    return ds, skipped


def _require_nonempty(ds: ImageDataset, where: str) -> None:
    counts = ds.class_counts()
    empty = [ds.class_names[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise DataError(f"class(es) {empty} have no readable images in {where}; add images or remove those folders")


def seen_fingerprints(train: ImageDataset, val: ImageDataset | None = None) -> list[str]:
    """Sorted per-image digests of every image a run trains or selects on (train + validation)."""
    return sorted(set(train.image_fingerprints()) | set(val.image_fingerprints() if val is not None else ()))


def exclude_images(ds: ImageDataset, fingerprints: Sequence[str]) -> tuple[ImageDataset, int]:
    """(``ds`` without the images whose digest is in ``fingerprints``, how many were removed)."""
    banned = set(fingerprints)
    if not banned:
        return ds, 0
    keep = [i for i, fp in enumerate(ds.image_fingerprints()) if fp not in banned]
    return (ds, 0) if len(keep) == len(ds) else (ds.subset(keep), len(ds) - len(keep))


def check_sizes(shots: int | None, val_shots: int) -> None:
    """Refuse shot counts that cannot describe a split (one line naming the fix)."""
    if isinstance(val_shots, bool) or not isinstance(val_shots, (int, np.integer)) or val_shots < 0:
        raise DataError(f"val_shots must be an integer >= 0 (0 = no validation split), got {val_shots!r}")
    if shots is not None and (isinstance(shots, bool) or not isinstance(shots, (int, np.integer)) or shots < 1):
        raise DataError(f"shots must be an integer >= 1 (or None for every image), got {shots!r}")


def require_classes(ds: ImageDataset, where: str) -> None:
    """Refuse a dataset with fewer than two classes: there is nothing to classify."""
    if len(ds.class_names) < 2:
        raise DataError(
            f"{where} has {len(ds.class_names)} class ({', '.join(ds.class_names)}); classification needs at least "
            "two classes: add another class folder"
        )


def sample_k_shot(ds: ImageDataset, shots: int, seed: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """Indices of ``shots`` images per class, drawn with a seeded generator.

    Raises:
        DataError: when a class has fewer than ``shots`` images available.
    """
    if shots < 1:
        raise DataError(f"shots must be >= 1, got {shots}")
    rng = np.random.Generator(np.random.PCG64(seed))
    available = np.ones(len(ds), bool)
    if exclude is not None:
        available[exclude] = False
    chosen: list[np.ndarray] = []
    for c, name in enumerate(ds.class_names):
        pool = np.flatnonzero((ds.labels == c) & available)
        if len(pool) < shots:
            raise DataError(
                f"class '{name}' has {len(pool)} image(s) available but --shots is {shots}; "
                f"lower --shots to {max(len(pool), 1)} or add images"
            )
        chosen.append(np.sort(rng.permutation(pool)[:shots]))
    return np.concatenate(chosen)


DEFAULT_TEST_FRACTION = 0.5  # a single folder's test share when none is given (less when the shots need more)


def n_test_images(n: int, test_fraction: float | None, keep: int) -> int:
    """Test images of a class of ``n`` in a single folder. An explicit ``test_fraction`` is applied as
    given (at least 1, at most ``n - 1``); None (the default) holds out half but leaves ``keep``
    (shots + validation shots) for training when the class has them.

    Example:
        >>> n_test_images(24, None, 16), n_test_images(24, 0.5, 16), n_test_images(40, None, 16), n_test_images(1, None, 0)
        (8, 12, 20, 0)
    """
    if n < 2:
        return 0
    n_test = min(max(1, int(round((test_fraction or DEFAULT_TEST_FRACTION) * n))), n - 1)
    return n_test if test_fraction is not None else max(min(n_test, n - keep), 0)


def _holdout(ds: ImageDataset, test_fraction: float | None, seed: int, keep: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.Generator(np.random.PCG64(seed + 7919))
    train_idx, test_idx = [], []
    for c in range(len(ds.class_names)):
        pool = rng.permutation(np.flatnonzero(ds.labels == c))
        n_test = n_test_images(len(pool), test_fraction, keep)
        test_idx.append(pool[:n_test])
        train_idx.append(pool[n_test:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(test_idx))


def _from_split_json(
    root: Path, split_file: Path, skipped: list[tuple[str, str]], max_pixels: int = MAX_PIXELS
) -> dict[str, ImageDataset]:
    try:
        spec = json.loads(split_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read split file {split_file}: {exc}") from None
    except RecursionError:
        raise DataError(f"split file {split_file} is nested too deeply to be a CoOp split file") from None
    if not isinstance(spec, dict) or "train" not in spec:
        raise DataError(f"{split_file} is not a CoOp split file: expected keys 'train', 'val', 'test'")
    names: dict[int, str] = {}
    for part in ("train", "val", "test"):
        for row in spec.get(part, []):
            if not (isinstance(row, list) and len(row) == 3):
                raise DataError(f"{split_file}: rows must be [path, label, classname], got {row!r}")
            names.setdefault(int(row[1]), str(row[2]))
    n = max(names) + 1 if names else 0
    if sorted(names) != list(range(n)):
        raise DataError(f"{split_file}: labels must be 0..{n - 1} without gaps")
    class_names = tuple(names[i] for i in range(n))
    return {
        part: _read_files([(root / r[0], int(r[1])) for r in spec[part]], class_names, skipped, max_pixels)
        for part in ("train", "val", "test")
        if spec.get(part)
    }


def load_dataset(
    path: str | Path,
    *,
    shots: int | None = None,
    seed: int = 0,
    val_shots: int = 0,
    test_fraction: float | None = None,
    split_file: str | Path | None = None,
    max_pixels: int = MAX_PIXELS,
    holdout: float | None = None,
) -> DataSplits:
    """Load a few-shot task from disk.

    The k shots (and validation shots) are sampled from the files' list first; only they are
    decoded here. Test images are decoded when read (:class:`LazyImages`).

    Args:
        path: a ``train/``+``test/`` tree, a single ImageFolder, or the image root of ``split_file``.
        shots: images per class kept for training (seeded); None keeps all.
        seed: seed of the k-shot sampling and of the hold-out split.
        val_shots: images per class moved from the training pool to a validation split
            (disjoint from the k shots); 0 means no validation split.
        test_fraction: when ``path`` is a single ImageFolder, the fraction of each class held out as
            test images (CLI ``--test-fraction``). None (default): half of each class, but never so
            many that fewer than ``shots + val_shots`` images are left for training.
        split_file: a CoOp ``split_zhou_*.json``; image paths are relative to ``path``.
        max_pixels: images whose header declares more pixels are skipped, never decoded.
        holdout: deprecated name of ``test_fraction`` (removed in the next release).

    Raises:
        DataError: with one line naming the problem and the fix.
    """
    check_sizes(shots, val_shots)
    test_fraction = _test_fraction(test_fraction, holdout)
    root = Path(path)
    if not root.exists():
        raise DataError(f"data path {root} does not exist")
    skipped: list[tuple[str, str]] = []
    keep = (shots or 0) + val_shots
    parts = _load_parts(root, split_file, (test_fraction, keep), seed, skipped, max_pixels)
    pool = parts["train"]
    require_classes(pool, f"{root} (train)")
    while True:  # a sampled file that passed its header check but fails to decode is skipped, then we resample
        _require_nonempty(pool, f"{root} (train)")
        train, val = _sample(pool, parts.get("val"), shots, val_shots, seed)
        train, bad = _decode(train, skipped)
        val, bad_val = _decode(val, skipped) if val is not None else (None, set())
        if not bad and not bad_val:
            break
        if bad_val and "val" in parts:
            parts["val"] = parts["val"].subset([i for i, s in enumerate(parts["val"].sources) if s not in bad_val])
        pool = pool.subset([i for i, s in enumerate(pool.sources) if s not in bad | bad_val])
    if skipped:
        logger.warning("skipped %d file(s) under %s: %s", len(skipped), root, describe_skipped(skipped))
    return DataSplits(train=train, val=val, test=parts.get("test"), skipped=skipped)


def _test_fraction(test_fraction: float | None, holdout: float | None) -> float | None:
    """``test_fraction``, or the deprecated ``holdout`` keyword's value (with a DeprecationWarning)."""
    if holdout is not None:
        if test_fraction is not None:
            raise DataError("pass test_fraction only (holdout is its deprecated name)")
        warnings.warn("load_data(holdout=) is deprecated: use test_fraction= (removed in the next release)",
                      DeprecationWarning, stacklevel=3)
        test_fraction = holdout
    if test_fraction is not None and not (isinstance(test_fraction, (int, float)) and 0.0 < test_fraction < 1.0):
        raise DataError(f"test_fraction (--test-fraction) must be in (0, 1), got {test_fraction!r}")
    return test_fraction


MAX_NAMED_SKIPPED = 5


def describe_skipped(skipped: Sequence[tuple[str, str]], limit: int = MAX_NAMED_SKIPPED) -> str:
    """The skipped files as ``path (reason)``, the first ``limit`` named and the rest counted.

    Example:
        >>> describe_skipped([("a.txt", "not an image"), ("b.jpg", "unreadable")], limit=1)
        'a.txt (not an image); and 1 more'
    """
    named = "; ".join(f"{path} ({reason})" for path, reason in skipped[:limit])
    return named + (f"; and {len(skipped) - limit} more" if len(skipped) > limit else "")


def _sample(
    pool: ImageDataset, val: ImageDataset | None, shots: int | None, val_shots: int, seed: int
) -> tuple[ImageDataset, ImageDataset | None]:
    """(train, val) drawn from the (undecoded) training pool: val shots first, then the k shots."""
    train = pool
    if val_shots > 0 and val is None:
        val_idx = sample_k_shot(pool, val_shots, seed + 1)
        val = pool.subset(val_idx)
        train = pool.subset(np.setdiff1d(np.arange(len(pool)), val_idx))
    if shots is not None:
        train = train.subset(sample_k_shot(train, shots, seed))
    return train, val


def _load_parts(
    root: Path, split_file: str | Path | None, test: tuple[float | None, int], seed: int, skipped: list[tuple[str, str]],
    max_pixels: int = MAX_PIXELS,
) -> dict[str, ImageDataset]:
    if split_file is not None:
        return _from_split_json(root, Path(split_file), skipped, max_pixels)
    if (root / "train").is_dir():
        folders = [d.name for d in _class_dirs(root / "train")]
        parts: dict[str, ImageDataset] = {}
        for part in ("train", "val", "test"):
            if (root / part).is_dir():
                _check_no_extra_classes(root / part, folders)
                ds, sk = load_image_folder(root / part, folders, max_pixels)
                skipped += sk
                parts[part] = ds
        if "test" in parts:
            missing = [parts["test"].class_names[i] for i in np.flatnonzero(parts["test"].class_counts() == 0)]
            if missing:
                logger.warning("class(es) %s have no test images; test accuracy covers the other classes", missing)
        return parts
    ds, sk = load_image_folder(root, max_pixels=max_pixels)
    skipped += sk
    _require_nonempty(ds, str(root))
    train_idx, test_idx = _holdout(ds, test[0], seed, test[1])
    parts = {"train": ds.subset(train_idx), "test": ds.subset(test_idx)}
    _check_single_folder(parts, ds.class_counts(), *test)
    return parts


def _check_single_folder(parts: dict[str, ImageDataset], counts: np.ndarray, test_fraction: float | None, keep: int) -> None:
    """A single folder's split: refuse a test fraction that leaves too few training images (naming
    ``--test-fraction``), warn about classes left without test images."""
    names, n_train, n_test = parts["train"].class_names, parts["train"].class_counts(), parts["test"].class_counts()
    short = [c for c in range(len(names)) if n_train[c] < keep <= counts[c]]
    if short and test_fraction is not None:
        c = short[0]
        raise DataError(
            f"class '{names[c]}' has {counts[c]} image(s); --test-fraction {test_fraction:g} holds out {n_test[c]} "
            f"for testing and leaves {n_train[c]}, fewer than the {keep} --shots (+ --val-shots) need; lower "
            f"--test-fraction to {max((counts[c] - keep) / counts[c], 0.01):.2f} or leave it unset, or lower --shots"
        )
    empty = [names[c] for c in np.flatnonzero(n_test == 0)]
    if empty:
        logger.warning(
            "class(es) %s get no test images (too few images to hold any out beside the shots); test accuracy covers "
            "the other classes: add images to test them", empty
        )


def _check_no_extra_classes(part_dir: Path, train_folders: list[str]) -> None:
    extra = sorted({d.name for d in _class_dirs(part_dir)} - set(train_folders))
    if extra:
        raise DataError(
            f"{part_dir} has class folder(s) {extra} that are not in the train split; "
            "add them to train/ or remove them"
        )
