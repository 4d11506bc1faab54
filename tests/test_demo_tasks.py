"""Demo tasks, the synthetic pretraining generator, and the shipped demo VLM."""

from __future__ import annotations

import functools
import hashlib
import json

import numpy as np
import pytest

from craft_sdk.data import DataSplits
from craft_sdk.demo import demo_task_info, demo_vlm_dir, list_demo_tasks, load_demo_task, synth, tasks
from craft_sdk.errors import CraftError, DataError

TASKS = ["digits", "noisy-shapes", "digits-on-texture"]
N_DIGITS = 1797


@functools.cache
def _load(name: str, shots: int, seed: int) -> DataSplits:
    return load_demo_task(name, shots=shots, seed=seed)


def _pixels(images: list) -> bytes:
    return b"".join(im.tobytes() for im in images)


def test_list_demo_tasks() -> None:
    assert list_demo_tasks() == sorted(TASKS)


@pytest.mark.parametrize("name", TASKS)
def test_task_loads_with_expected_classes_and_sizes(name: str) -> None:
    splits = _load(name, 2, 0)
    info = demo_task_info(name)
    expected = synth.SHAPE_NAMES if name == "noisy-shapes" else synth.DIGIT_NAMES
    assert info.name == name and info.class_names == expected
    assert info.source and info.license and info.description
    assert splits.class_names == expected and splits.test is not None and splits.val is None
    assert splits.test.class_names == expected
    assert np.array_equal(splits.train.class_counts(), np.full(10, 2))
    assert np.all(splits.test.class_counts() >= 40)
    n_test = N_DIGITS - 20 if name == "digits" else 10 * tasks.TEST_PER_CLASS
    assert len(splits.test) == n_test
    for im in splits.train.images[:3] + splits.test.images[:3]:
        assert im.mode == "RGB" and im.size == (tasks.IMAGE_SIZE, tasks.IMAGE_SIZE)
    # not blank: images carry structure
    arr = np.stack([np.asarray(im, np.float32) for im in splits.test.images[:20]])
    assert arr.std(axis=(1, 2, 3)).min() > 5.0


@pytest.mark.parametrize("name", TASKS)
def test_seeded_determinism(name: str) -> None:
    a, b, c = _load(name, 2, 0), load_demo_task(name, shots=2, seed=0), _load(name, 2, 1)
    assert _pixels(a.train.images) == _pixels(b.train.images)
    assert a.train.fingerprint() == b.train.fingerprint()
    assert a.test is not None and b.test is not None and c.test is not None
    assert a.test.fingerprint() == b.test.fingerprint()
    assert a.train.fingerprint() != c.train.fingerprint()
    if name != "digits":  # the procedural test sets do not depend on the seed
        assert a.test.fingerprint() == c.test.fingerprint()


@pytest.mark.parametrize("render", [tasks.render_noisy_shape, tasks.render_digit_on_texture])
def test_procedural_renderers_are_seeded(render) -> None:  # type: ignore[no-untyped-def]
    same = [render(3, synth.make_rng(7, i)).tobytes() for i in (0, 0, 1)]
    assert same[0] == same[1] and same[0] != same[2]


def test_returned_images_are_private_copies() -> None:
    first = load_demo_task("noisy-shapes", shots=1, seed=0)
    assert first.test is not None
    first.test.images[0].paste((0, 0, 0), (0, 0, 32, 32))
    again = _load("noisy-shapes", 2, 0).test
    assert again is not None and np.asarray(again.images[0]).std() > 5.0


@pytest.mark.parametrize("name", TASKS)
def test_shots_respected(name: str) -> None:
    splits = _load(name, 5, 3)
    assert np.array_equal(splits.train.class_counts(), np.full(10, 5))
    assert np.array_equal(splits.train.labels, np.repeat(np.arange(10), 5))


def test_digits_train_test_disjoint_and_complete() -> None:
    splits = _load("digits", 16, 0)
    assert splits.test is not None
    train, test = set(splits.train.sources), set(splits.test.sources)
    assert len(train) == 160 and not train & test
    assert len(train | test) == N_DIGITS


def test_digits_images_follow_the_asset() -> None:
    counts, labels = tasks._digits_arrays()
    splits = _load("digits", 2, 0)
    i = int(splits.train.sources[0].split("[")[1].rstrip("]"))
    assert splits.train.labels[0] == labels[i]
    assert _pixels([splits.train.images[0]]) == _pixels([tasks.digit_image(counts[i])])
    img = np.asarray(splits.train.images[0], np.float32)
    assert img[0].mean() < img[12:20, 12:20].mean() or img.max() > 200  # light strokes on dark


def test_digits_asset_matches_recorded_checksum() -> None:
    digest = hashlib.sha256(tasks.DIGITS_FILE.read_bytes()).hexdigest()
    assert digest == tasks.digits_sha256()
    counts, labels = tasks._digits_arrays()
    assert counts.shape == (N_DIGITS, 8, 8) and counts.dtype == np.uint8 and counts.max() == 16
    uci_counts = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == uci_counts


def test_unknown_task_name() -> None:
    with pytest.raises(DataError) as err:
        load_demo_task("mnist")
    msg = str(err.value)
    assert "\n" not in msg and all(name in msg for name in TASKS)
    with pytest.raises(ValueError):
        demo_task_info("mnist")
    assert isinstance(err.value, CraftError)


@pytest.mark.parametrize(("shots", "seed"), [(0, 0), (-1, 0), (2, -1)])
def test_bad_shots_or_seed(shots: int, seed: int) -> None:
    with pytest.raises(DataError):
        load_demo_task("noisy-shapes", shots=shots, seed=seed)


def test_digits_too_many_shots() -> None:
    with pytest.raises(DataError, match="shots"):
        load_demo_task("digits", shots=175)


# --------------------------------------------------------------------------- synth generator


def test_synth_batch_is_seeded() -> None:
    gen = synth.SynthGenerator()
    x1, c1 = gen.batch(8, seed=3, step=5)
    x2, c2 = gen.batch(8, seed=3, step=5)
    x3, c3 = gen.batch(8, seed=3, step=6)
    assert x1.shape == (8, 32, 32, 3) and x1.dtype == np.uint8
    assert np.array_equal(x1, x2) and c1 == c2
    assert not np.array_equal(x1, x3)
    assert all(isinstance(c, str) and c.strip() for c in c1 + c3)


def test_synth_captions_are_varied_and_mention_the_object() -> None:
    gen = synth.SynthGenerator()
    samples = [gen.sample(synth.make_rng(0, i)) for i in range(150)]
    captions = {s.caption for s in samples}
    assert len(captions) > 100
    for s in samples:
        if s.kind in ("digit", "shape"):
            name = s.label
            numeral = str(synth.DIGIT_NAMES.index(name)) if s.kind == "digit" else name
            assert name in s.caption or numeral in s.caption, s.caption


def test_synth_builtin_font_only_still_works() -> None:
    gen = synth.SynthGenerator(synth.SynthConfig(system_fonts=False))
    assert gen.fonts == (None,)
    x, captions = gen.batch(4, seed=0, step=0)
    assert x.shape == (4, 32, 32, 3) and len(captions) == 4


@pytest.mark.parametrize("kind", synth.SHAPE_NAMES)
def test_shape_masks_are_distinct(kind: str) -> None:
    mask = synth.shape_mask(kind, 64, (32, 32), 24)
    assert 0.1 < mask.mean() < 0.8
    others = [synth.shape_mask(k, 64, (32, 32), 24) for k in synth.SHAPE_NAMES if k != kind]
    assert min(np.abs(mask - o).mean() for o in others) > 0.01


def test_synth_config_validation() -> None:
    with pytest.raises(ValueError, match="unknown kinds"):
        synth.SynthConfig(mix=(("video", 1.0),))


# --------------------------------------------------------------------------- shipped demo VLM


@pytest.fixture(scope="module")
def demo_vlm():  # type: ignore[no-untyped-def]
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    path = demo_vlm_dir()
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    model.eval()
    return torch, model, preprocess, tokenizer


def test_demo_vlm_checksum_and_size() -> None:
    path = demo_vlm_dir()
    weights = path / "open_clip_model.safetensors"
    recorded = (path / "checksum.sha256").read_text().split()[0]
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == recorded
    assert sum(f.stat().st_size for f in path.iterdir()) <= 15_000_000


def test_demo_vlm_config_is_standard_clip_text_tower() -> None:
    cfg = json.loads((demo_vlm_dir() / "open_clip_config.json").read_text())
    text = cfg["model_cfg"]["text_cfg"]
    assert text["vocab_size"] == 49408 and text.get("pool_type", "argmax") == "argmax"
    assert not text.get("no_causal_mask", False) and "hf_tokenizer_name" not in text
    assert cfg["preprocess_cfg"]["size"] == cfg["model_cfg"]["vision_cfg"]["image_size"]


def test_demo_vlm_prompts_fit_context(demo_vlm) -> None:  # type: ignore[no-untyped-def]
    _, _, _, tokenizer = demo_vlm
    names = {n for t in TASKS for n in demo_task_info(t).class_names}
    tokens = tokenizer([f"a photo of a {n}." for n in names])
    # the end-of-text token (49407) survives: no prompt was truncated
    assert bool((tokens == 49407).any(dim=1).all())
    assert tokens.shape[1] == tokenizer.context_length


def test_demo_vlm_zero_shot_digits_matches_record(demo_vlm) -> None:  # type: ignore[no-untyped-def]
    torch, model, preprocess, tokenizer = demo_vlm
    record = json.loads((demo_vlm_dir() / "zero_shot.json").read_text())
    test = _load("digits", record["shots"], record["seed"]).test
    assert test is not None
    with torch.no_grad():
        txt = model.encode_text(tokenizer([record["template"].format(c) for c in test.class_names]))
        img = model.encode_image(torch.stack([preprocess(im) for im in test.images]))
        pred = (img / img.norm(dim=-1, keepdim=True) @ (txt / txt.norm(dim=-1, keepdim=True)).T).argmax(1)
    acc = 100.0 * float((pred.numpy() == test.labels).mean())
    assert abs(acc - record["accuracy"]["digits"]) <= 1.0
    assert acc > 2 * record["chance"]["digits"]  # clearly above chance
