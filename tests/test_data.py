"""Dataset loading: ImageFolder layouts, CoOp split files, seeded k-shot sampling, bad data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from craft_sdk import DataError, ImageDataset, load_dataset
from craft_sdk.data import sample_k_shot
from craft_sdk.images import to_pil, to_pil_list


def _write(root: Path, counts: dict[str, int], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for cls, n in counts.items():
        d = root / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")


def test_train_test_layout(tmp_path: Path) -> None:
    _write(tmp_path / "train", {"sea_or_lake": 5, "forest": 6})
    _write(tmp_path / "test", {"sea_or_lake": 3, "forest": 2}, seed=1)
    s = load_dataset(tmp_path, shots=4, seed=0)
    assert s.class_names == ("forest", "sea or lake")
    assert s.train.class_counts().tolist() == [4, 4]
    assert len(s.test) == 5 and s.val is None


def test_single_folder_holdout_is_seeded_and_disjoint(tmp_path: Path) -> None:
    _write(tmp_path, {"a": 10, "b": 10})
    s1 = load_dataset(tmp_path, shots=3, seed=5)
    s2 = load_dataset(tmp_path, shots=3, seed=5)
    s3 = load_dataset(tmp_path, shots=3, seed=6)
    assert s1.train.sources == s2.train.sources and s1.test.sources == s2.test.sources
    assert s1.train.sources != s3.train.sources
    assert not set(s1.train.sources) & set(s1.test.sources)
    assert s1.test.class_counts().tolist() == [5, 5]


def test_val_split_is_disjoint_from_shots(tmp_path: Path) -> None:
    _write(tmp_path / "train", {"a": 10, "b": 10})
    s = load_dataset(tmp_path, shots=4, val_shots=3, seed=0)
    assert s.val is not None and s.val.class_counts().tolist() == [3, 3]
    assert not set(s.train.sources) & set(s.val.sources)


def test_coop_split_json(tmp_path: Path) -> None:
    _write(tmp_path / "images", {"x": 4, "y": 4})
    rows = lambda cls, lab, idx: [[f"images/{cls}/{i:03d}.png", lab, cls.upper()] for i in idx]  # noqa: E731
    spec = {"train": rows("x", 0, [0, 1, 2]) + rows("y", 1, [0, 1, 2]), "val": [], "test": rows("x", 0, [3]) + rows("y", 1, [3])}
    split = tmp_path / "split_zhou_toy.json"
    split.write_text(json.dumps(spec))
    s = load_dataset(tmp_path, shots=2, split_file=split)
    assert s.class_names == ("X", "Y") and len(s.train) == 4 and len(s.test) == 2


def test_bad_files_are_skipped_and_counted(tmp_path: Path) -> None:
    _write(tmp_path / "train", {"a": 3, "b": 3})
    (tmp_path / "train" / "a" / "readme.txt").write_text("hello")
    (tmp_path / "train" / "b" / "broken.jpg").write_bytes(b"\xff\xd8not a jpeg")
    s = load_dataset(tmp_path, shots=3)
    reasons = sorted(r for _, r in s.skipped)
    assert len(s.skipped) == 2 and "not an image file" in reasons[0] and "unreadable" in reasons[1]


@pytest.mark.parametrize(
    "layout, kwargs, match",
    [
        ({"train": {"a": 3, "b": 0}}, {"shots": 1}, "no readable images"),
        ({"train": {"a": 3, "b": 2}}, {"shots": 3}, "lower --shots to 2"),
        ({"train": {"a": 3}, "test": {"a": 1, "zzz": 1}}, {}, "not in the train split"),
    ],
)
def test_bad_datasets_raise_one_clear_error(tmp_path: Path, layout: dict, kwargs: dict, match: str) -> None:
    for part, counts in layout.items():
        _write(tmp_path / part, counts)
        for cls in counts:
            (tmp_path / part / cls).mkdir(parents=True, exist_ok=True)
    with pytest.raises(DataError, match=match):
        load_dataset(tmp_path, **kwargs)


def test_missing_and_empty_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "nope")
    with pytest.raises(DataError, match="no class sub-folders"):
        load_dataset(tmp_path)


def test_class_missing_from_test_only_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write(tmp_path / "train", {"a": 2, "b": 2})
    _write(tmp_path / "test", {"a": 2})
    with caplog.at_level("WARNING"):
        s = load_dataset(tmp_path)
    assert "no test images" in caplog.text and s.test.class_counts().tolist() == [2, 0]


def test_k_shot_sampling_is_seeded() -> None:
    ds = ImageDataset([Image.new("RGB", (2, 2))] * 20, np.repeat([0, 1], 10), ("a", "b"))
    a, b, c = sample_k_shot(ds, 4, 0), sample_k_shot(ds, 4, 0), sample_k_shot(ds, 4, 1)
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist() and len(a) == 8


def test_image_inputs() -> None:
    arr = np.zeros((4, 5, 3), np.uint8)
    assert to_pil(arr).size == (5, 4)
    assert to_pil(np.zeros((4, 5), np.uint8)).mode == "RGB"
    with pytest.raises(DataError, match="uint8"):
        to_pil(np.zeros((4, 5, 3), np.float32))
    with pytest.raises(DataError, match="does not exist"):
        to_pil("/no/such/file.png")
    with pytest.raises(DataError, match="single image"):
        to_pil_list(Image.new("RGB", (2, 2)))  # type: ignore[arg-type]
    with pytest.raises(DataError, match="labels"):
        ImageDataset([Image.new("RGB", (2, 2))], np.array([0, 1]), ("a",))
