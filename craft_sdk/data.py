"""Few-shot image datasets: ImageFolder trees, CoOp split files, seeded k-shot sampling.

Everything is decoded and validated up front, so a bad file is reported before a
single query is spent. Supported layouts:

* ``DATA/train/<class>/*`` and ``DATA/test/<class>/*`` (optionally ``DATA/val/<class>/*``);
* a single ImageFolder ``DATA/<class>/*``, split per class with a seeded hold-out;
* CoOp's ``split_zhou_<name>.json`` (``{"train"|"val"|"test": [[path, label, classname], ...]}``)
  with image paths relative to ``DATA``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DataError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})


@dataclass
class ImageDataset:
    """Decoded RGB images with integer labels into ``class_names``.

    Args:
        images: RGB PIL images, length N.
        labels: int64 array [N] of indices into ``class_names``.
        class_names: ordered class names, as used in prompts.
        sources: optional per-image identifiers (file paths), length N or empty.
    """

    images: list[Image.Image]
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
            images=[self.images[i] for i in idx],
            labels=self.labels[idx] if idx else np.zeros(0, np.int64),
            class_names=self.class_names,
            sources=tuple(self.sources[i] for i in idx) if self.sources else (),
        )

    def class_counts(self) -> np.ndarray:
        """Images per class, int64 [C]."""
        return np.bincount(self.labels, minlength=len(self.class_names))

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


def _load_image(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


def _read_files(
    files: Sequence[tuple[Path, int]], class_names: tuple[str, ...], skipped: list[tuple[str, str]]
) -> ImageDataset:
    images: list[Image.Image] = []
    labels: list[int] = []
    sources: list[str] = []
    for path, label in files:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append((str(path), "not an image file (suffix)"))
            continue
        try:
            images.append(_load_image(path))
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            skipped.append((str(path), f"unreadable image: {exc.__class__.__name__}"))
            continue
        labels.append(label)
        sources.append(str(path))
    return ImageDataset(images, np.asarray(labels, np.int64), class_names, tuple(sources))


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


def load_image_folder(root: str | Path, class_folders: Sequence[str] | None = None) -> tuple[ImageDataset, list]:
    """Read ``root/<class>/*`` into an :class:`ImageDataset`.

    Non-image and unreadable files are skipped and returned as ``(path, reason)``.

    Args:
        root: the ImageFolder root.
        class_folders: folder names to use as classes, in order; default: sorted sub-folders.
    """
    root = Path(root)
    folders = list(class_folders) if class_folders is not None else [d.name for d in _class_dirs(root)]
    skipped: list[tuple[str, str]] = []
    names = {f: i for i, f in enumerate(folders)}
    ds = _read_files(_folder_files(root, names), tuple(prompt_name(f) for f in folders), skipped)
    return ds, skipped


def _require_nonempty(ds: ImageDataset, where: str) -> None:
    counts = ds.class_counts()
    empty = [ds.class_names[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise DataError(f"class(es) {empty} have no readable images in {where}; add images or remove those folders")


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


def _holdout(ds: ImageDataset, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.Generator(np.random.PCG64(seed + 7919))
    train_idx, test_idx = [], []
    for c in range(len(ds.class_names)):
        pool = rng.permutation(np.flatnonzero(ds.labels == c))
        n_test = min(max(1, int(round(fraction * len(pool)))), len(pool) - 1) if len(pool) > 1 else 0
        test_idx.append(pool[:n_test])
        train_idx.append(pool[n_test:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(test_idx))


def _from_split_json(root: Path, split_file: Path, skipped: list[tuple[str, str]]) -> dict[str, ImageDataset]:
    try:
        spec = json.loads(split_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read split file {split_file}: {exc}") from None
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
        part: _read_files([(root / r[0], int(r[1])) for r in spec[part]], class_names, skipped)
        for part in ("train", "val", "test")
        if spec.get(part)
    }


def load_dataset(
    path: str | Path,
    *,
    shots: int | None = None,
    seed: int = 0,
    val_shots: int = 0,
    holdout: float = 0.5,
    split_file: str | Path | None = None,
) -> DataSplits:
    """Load a few-shot task from disk.

    Args:
        path: a ``train/``+``test/`` tree, a single ImageFolder, or the image root of ``split_file``.
        shots: images per class kept for training (seeded); None keeps all.
        seed: seed of the k-shot sampling and of the hold-out split.
        val_shots: images per class moved from the training pool to a validation split
            (disjoint from the k shots); 0 means no validation split.
        holdout: fraction of each class held out as test when ``path`` is a single ImageFolder.
        split_file: a CoOp ``split_zhou_*.json``; image paths are relative to ``path``.

    Raises:
        DataError: with one line naming the problem and the fix.
    """
    root = Path(path)
    if not root.exists():
        raise DataError(f"data path {root} does not exist")
    skipped: list[tuple[str, str]] = []
    parts = _load_parts(root, split_file, holdout, seed, skipped)
    train = parts["train"]
    _require_nonempty(train, f"{root} (train)")
    val = parts.get("val")
    if val_shots > 0 and val is None:
        val_idx = sample_k_shot(train, val_shots, seed + 1)
        val = train.subset(val_idx)
        train = train.subset(np.setdiff1d(np.arange(len(train)), val_idx))
    if shots is not None:
        train = train.subset(sample_k_shot(train, shots, seed))
    if skipped:
        logger.warning("skipped %d file(s) under %s (first: %s: %s)", len(skipped), root, *skipped[0])
    return DataSplits(train=train, val=val, test=parts.get("test"), skipped=skipped)


def _load_parts(
    root: Path, split_file: str | Path | None, holdout: float, seed: int, skipped: list[tuple[str, str]]
) -> dict[str, ImageDataset]:
    if split_file is not None:
        return _from_split_json(root, Path(split_file), skipped)
    if (root / "train").is_dir():
        folders = [d.name for d in _class_dirs(root / "train")]
        parts: dict[str, ImageDataset] = {}
        for part in ("train", "val", "test"):
            if (root / part).is_dir():
                _check_no_extra_classes(root / part, folders)
                ds, sk = load_image_folder(root / part, folders)
                skipped += sk
                parts[part] = ds
        if "test" in parts:
            missing = [parts["test"].class_names[i] for i in np.flatnonzero(parts["test"].class_counts() == 0)]
            if missing:
                logger.warning("class(es) %s have no test images; test accuracy covers the other classes", missing)
        return parts
    if not 0.0 < holdout < 1.0:
        raise DataError(f"holdout must be in (0, 1), got {holdout}")
    ds, sk = load_image_folder(root)
    skipped += sk
    _require_nonempty(ds, str(root))
    train_idx, test_idx = _holdout(ds, holdout, seed)
    return {"train": ds.subset(train_idx), "test": ds.subset(test_idx)}


def _check_no_extra_classes(part_dir: Path, train_folders: list[str]) -> None:
    extra = sorted({d.name for d in _class_dirs(part_dir)} - set(train_folders))
    if extra:
        raise DataError(
            f"{part_dir} has class folder(s) {extra} that are not in the train split; "
            "add them to train/ or remove them"
        )
