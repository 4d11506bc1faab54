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


# ------------------------------------------------------------- decode only what is used, size limits


def _huge_png(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit PNG whose header declares width x height, written row by row (a few KB, no big buffer)."""
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    comp, row = zlib.compressobj(9), b"\x00" * (1 + (width + 7) // 8)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_is_skipped_not_fatal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write(tmp_path / "train", {"a": 3, "b": 3})
    bomb = _huge_png(tmp_path / "train" / "a" / "000_bomb.png", 20000, 20000)  # 400 Mpx in a few KB
    assert bomb.stat().st_size < 200_000
    with caplog.at_level("WARNING"):
        s = load_dataset(tmp_path, shots=3)
    assert s.train.class_counts().tolist() == [3, 3]
    assert [(Path(p).name, r.split(":")[0]) for p, r in s.skipped] == [("000_bomb.png", "too large")]
    assert "skipped 1 file(s)" in caplog.text
    with pytest.raises(DataError, match="too large") as err:  # a path given at predict time: one line, no PIL error
        to_pil(bomb)
    assert "\n" not in str(err.value)


def test_pixel_limit_is_checked_from_the_header(tmp_path: Path) -> None:
    _write(tmp_path / "train", {"a": 3, "b": 3})
    Image.new("RGB", (16, 16)).save(tmp_path / "train" / "b" / "big.png")  # 256 px
    s = load_dataset(tmp_path, shots=3, max_pixels=100)  # the 8x8 images (64 px) pass
    assert [(Path(p).name, r) for p, r in s.skipped] == [("big.png", "too large: 16x16 = 256 pixels is over the limit of 100")]


def test_only_sampled_images_are_decoded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import craft_sdk.data as data_mod

    _write(tmp_path / "train", {"a": 10, "b": 10})
    _write(tmp_path / "test", {"a": 5, "b": 5}, seed=1)
    decoded: list[str] = []
    real = data_mod.read_image
    real_decode = data_mod.decode_file
    monkeypatch.setattr(data_mod, "read_image", lambda path, *a: decoded.append(Path(path).name) or real(path, *a))
    monkeypatch.setattr(data_mod, "decode_file", lambda path, *a: decoded.append(Path(path).name) or real_decode(path, *a))
    s = load_dataset(tmp_path, shots=2, val_shots=1, seed=3)
    assert len(decoded) == 6  # 2 shots + 1 validation image per class; the other 14 training files stay on disk
    assert sorted(decoded) == sorted(Path(p).name for p in s.train.sources + s.val.sources)
    assert len(s.test) == 10 and len(decoded) == 6  # the test split is decoded when it is read
    assert np.asarray(s.test.images[0]).shape == (8, 8, 3) and len(decoded) == 7
    assert len(s.test.image_fingerprints()) == 10


def test_sampled_file_that_fails_to_decode_is_skipped_and_resampled(tmp_path: Path) -> None:
    _write(tmp_path / "train", {"a": 4, "b": 4})
    good = (tmp_path / "train" / "a" / "000.png").read_bytes()
    for name in ("001.png", "002.png"):  # headers fine, pixel data cut off
        (tmp_path / "train" / "a" / name).write_bytes(good[: len(good) // 2])
    s = load_dataset(tmp_path, shots=2, seed=0)
    assert s.train.class_counts().tolist() == [2, 2]
    cut = {str(tmp_path / "train" / "a" / n) for n in ("001.png", "002.png")}
    assert not cut & set(s.train.sources)
    assert s.skipped and all(p in cut and r.startswith("unreadable image: ") for p, r in s.skipped)


def test_single_class_and_negative_val_shots_are_refused(tmp_path: Path) -> None:
    _write(tmp_path / "one" / "train", {"only": 4})
    with pytest.raises(DataError, match="at least two classes") as err:
        load_dataset(tmp_path / "one", shots=2)
    assert "\n" not in str(err.value)
    _write(tmp_path / "two", {"a": 4, "b": 4})
    with pytest.raises(DataError, match="val_shots must be an integer >= 0"):
        load_dataset(tmp_path / "two", shots=1, val_shots=-1)
    from craft_sdk import load_data

    with pytest.raises(DataError, match="val_shots must be an integer >= 0"):
        load_data("demo:digits", shots=2, val_shots=-1)


@pytest.mark.parametrize("args, match", [(["--val-shots", "-1"], "--val-shots must be >= 0"), (["--shots", "0"], "--shots must be >= 1")])
def test_cli_tune_refuses_bad_shot_counts_in_one_line(tmp_path: Path, args: list[str], match: str) -> None:
    from typer.testing import CliRunner

    from craft_sdk.cli import app

    _write(tmp_path, {"a": 4, "b": 4})
    res = CliRunner().invoke(app, ["tune", str(tmp_path), "--out", str(tmp_path / "out"), *args])
    assert res.exit_code == 2 and match in res.output
    assert len([ln for ln in res.output.splitlines() if ln.strip()]) == 1
    _write(tmp_path / "one", {"only": 4})  # an ImageFolder of one class
    res = CliRunner().invoke(app, ["tune", str(tmp_path / "one"), "--shots", "1", "--out", str(tmp_path / "out")])
    assert res.exit_code == 1 and "at least two classes" in res.output  # a data error: runtime, not usage


def test_image_fingerprints_identify_images_across_loads(tmp_path: Path) -> None:
    from craft_sdk.data import exclude_images, seen_fingerprints

    _write(tmp_path / "train", {"a": 4, "b": 4})
    _write(tmp_path / "test", {"a": 3, "b": 3}, seed=1)
    (tmp_path / "test" / "a" / "leak.png").write_bytes((tmp_path / "train" / "a" / "002.png").read_bytes())
    s = load_dataset(tmp_path, shots=4)
    fps = s.train.image_fingerprints()
    assert len(set(fps)) == 8 and all(len(f) == 16 for f in fps)
    assert fps == load_dataset(tmp_path, shots=4).train.image_fingerprints()  # stable across loads
    assert seen_fingerprints(s.train) == sorted(fps)
    kept, n = exclude_images(s.test, seen_fingerprints(s.train))
    assert n == 1 and len(kept) == 6 and "leak.png" not in {Path(p).name for p in kept.sources}


def test_single_folder_default_split_leaves_the_shots(tmp_path: Path) -> None:
    """24 images per class and 16 shots: the default test share shrinks to 8 so the shots fit (issue 24)."""
    _write(tmp_path, {"a": 24, "b": 24})
    s = load_dataset(tmp_path, shots=16, seed=0)
    assert s.train.class_counts().tolist() == [16, 16] and s.test.class_counts().tolist() == [8, 8]
    assert not set(s.train.sources) & set(s.test.sources)
    big = load_dataset(tmp_path, shots=4, seed=0)  # enough images: half of each class is the test split
    assert big.test.class_counts().tolist() == [12, 12]


def test_single_folder_explicit_test_fraction(tmp_path: Path) -> None:
    _write(tmp_path, {"a": 24, "b": 24})
    s = load_dataset(tmp_path, shots=4, seed=0, test_fraction=0.25)
    assert s.test.class_counts().tolist() == [6, 6]
    with pytest.raises(DataError, match=r"--test-fraction 0.5 holds out 12 .* lower --test-fraction to 0.33"):
        load_dataset(tmp_path, shots=16, seed=0, test_fraction=0.5)
    with pytest.raises(DataError, match=r"must be in \(0, 1\)"):
        load_dataset(tmp_path, shots=4, test_fraction=1.5)


def test_load_data_holdout_is_a_deprecated_alias(tmp_path: Path) -> None:
    from craft_sdk import load_data

    _write(tmp_path, {"a": 24, "b": 24})
    with pytest.warns(DeprecationWarning, match="test_fraction"):
        old = load_data(tmp_path, shots=4, holdout=0.25)
    new = load_data(tmp_path, shots=4, test_fraction=0.25)
    assert old.test.sources == new.test.sources and len(new.test) == 12


def test_class_without_test_images_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write(tmp_path, {"a": 1, "b": 6})
    with caplog.at_level("WARNING", logger="craft_sdk.data"):
        s = load_dataset(tmp_path, shots=1, seed=0)
    assert s.test.class_counts().tolist() == [0, 3]
    assert "['a'] get no test images" in caplog.text


def test_every_skipped_file_is_named_up_to_a_bound(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write(tmp_path / "train", {"a": 3, "b": 3})
    for i in range(7):
        (tmp_path / "train" / "a" / f"note{i}.txt").write_text("x")
    with caplog.at_level("WARNING", logger="craft_sdk.data"):
        load_dataset(tmp_path, shots=3)
    assert "skipped 7 file(s)" in caplog.text and "note4.txt" in caplog.text and "and 2 more" in caplog.text
    assert "note5.txt" not in caplog.text
