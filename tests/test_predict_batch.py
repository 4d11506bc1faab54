"""Batch prediction at scale: input discovery (trees, lists, globs, FIFOs refused), the prefetching and
concurrent stream, resumable JSONL/CSV output through ``craft-sdk predict``, remote client options,
and the Ray Data predictor on a local 2-worker Ray instance."""

from __future__ import annotations

import csv
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import craft_sdk
from craft_sdk import Adapter, AdapterConfig, CallableClient, Capabilities, ClientError, CraftClassifier, DataError, mlp
from craft_sdk.adapter import RefinerSpec
from craft_sdk.cli import app
from craft_sdk.deploy.stream import iter_image_paths, predict_stream

NAMES = ("red", "green", "blue")


class Spy(CallableClient):
    """Scores = mean colour per channel; counts calls, tracks calls in flight, can sleep or fail."""

    def __init__(self, delay: float = 0.0, fail_on_call: int | None = None) -> None:
        def fn(ims, names, t, offsets):  # type: ignore[no-untyped-def]
            return np.stack([np.asarray(im, np.float32).mean(axis=(0, 1)) / 25.0 for im in ims])

        super().__init__(fn, Capabilities("spy/1"))
        self.delay, self.fail_on_call = delay, fail_on_call
        self.calls, self.in_flight, self.max_in_flight = 0, 0, 0
        self.lock = threading.Lock()

    def predict(self, images, class_names, template="a photo of a", offsets=None):  # type: ignore[no-untyped-def]
        with self.lock:
            self.calls += 1
            n = self.calls
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.fail_on_call == n:
                raise ClientError("the service went away")
            time.sleep(self.delay)
            return super().predict(images, class_names, template, offsets)
        finally:
            with self.lock:
                self.in_flight -= 1


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    weights = mlp.init_weights(3, 8, 2, residual=False, seed=1)
    cfg = AdapterConfig("spy/1", NAMES, "a photo of a", refiner=RefinerSpec(2, 8, True))
    return Adapter(cfg, None, None, weights).save_pretrained(tmp_path_factory.mktemp("ad") / "adapter")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 images in a tree: a/0..3.png, b/4..7.png (+ a hidden folder, a text file), c/8..9.jpg."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(10):
        sub = root / ("a" if i < 4 else "b" if i < 8 else "c")
        sub.mkdir(exist_ok=True)
        arr = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
        Image.fromarray(arr).save(sub / f"{i}.{'jpg' if i >= 8 else 'png'}", quality=95)
    (root / ".hidden").mkdir()
    Image.new("RGB", (4, 4)).save(root / ".hidden" / "x.png")
    (root / "b" / "notes.txt").write_text("not an image")
    return root


def files_of(root: Path) -> list[str]:
    return [str(root / d / f"{i}.{'jpg' if i >= 8 else 'png'}") for d, ids in (("a", range(4)), ("b", range(4, 8)),
                                                                            ("c", range(8, 10))) for i in ids]


def test_discovery_trees_globs_lists_and_fifos(images: Path, tmp_path: Path) -> None:
    every = files_of(images)
    assert list(iter_image_paths([str(images)])) == every  # sorted, recursive, hidden and non-image skipped
    assert list(iter_image_paths([str(images / "c"), str(images / "*" / "[0-1].png")])) == every[8:] + every[:2]
    listing = tmp_path / "list.txt"
    listing.write_text(f"# my images\n{every[3]}\n\n{every[1]}\n")
    assert list(iter_image_paths([every[5]], files_from=listing)) == [every[5], every[3], every[1]]
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="pipe.png is not a regular file"):
        list(iter_image_paths([str(fifo)]))
    listing.write_text(f"{fifo}\n")
    assert list(iter_image_paths([], files_from=listing)) == [str(fifo)]  # listed paths are decode-time errors
    (tmp_path / "ok.png").write_bytes((images / "a" / "0.png").read_bytes())
    assert list(iter_image_paths([str(tmp_path)])) == [str(tmp_path / "ok.png")]  # a FIFO inside a tree is skipped
    for bad, needle in (([str(tmp_path / "gone.png")], "does not exist"), ([str(tmp_path / "*.jpeg")], "no file matches")):
        with pytest.raises(DataError, match=needle):
            list(iter_image_paths(bad))


def test_stream_matches_predict_all_with_bounded_prefetch_and_concurrency(adapter_dir: Path, images: Path) -> None:
    every = files_of(images)
    reference = CraftClassifier.from_pretrained(adapter_dir, Spy()).predict_proba(every)
    consumed: list[str] = []

    def source():  # type: ignore[no-untyped-def]
        for p in every:
            consumed.append(p)
            yield p

    slow = CraftClassifier.from_pretrained(adapter_dir, Spy(delay=0.15))
    stream = predict_stream(slow, source(), batch_size=2, prefetch=1, concurrency=1)
    first = next(stream)
    # decoding runs ahead, but boundedly: the batch sent + 1 queued + 1 being decoded (2 images each) of 10
    assert 2 < len(consumed) <= 6
    assert [p for r in [first, *stream] for p in r.paths] == every
    client = Spy(delay=0.15)
    clf = CraftClassifier.from_pretrained(adapter_dir, client)
    results = list(predict_stream(clf, every, batch_size=2, prefetch=2, concurrency=3))
    assert [len(r.paths) for r in results] == [2] * 5 and [p for r in results for p in r.paths] == every  # input order
    np.testing.assert_allclose(np.concatenate([r.predictions.probs for r in results]), reference, atol=1e-6)
    assert client.calls == 5 and clf.ledger.counts["predict"] == 5
    assert 1 < client.max_in_flight <= 3
    assert all(r.seconds["decode"] > 0 and r.seconds["black_box"] >= 0.15 for r in results)


def test_stream_errors_fail_before_sending_or_skip(adapter_dir: Path, images: Path, tmp_path: Path) -> None:
    every = files_of(images)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG garbage")
    paths = every[:4] + [str(broken)] + every[4:6]
    client = Spy()
    clf = CraftClassifier.from_pretrained(adapter_dir, client)
    got = []
    with pytest.raises(DataError, match="broken.png.*4 image\\(s\\) were done before it"):
        for res in predict_stream(clf, paths, batch_size=2):
            got.append(res)
    assert [p for r in got for p in r.paths] == every[:4] and client.calls == 2  # the broken batch was never sent
    skipped = list(predict_stream(clf, paths, batch_size=2, on_error="skip"))
    assert skipped[2].errors.keys() == {0} and skipped[2].ok == [1] and len(skipped[2].predictions.labels) == 1


def run(args: list[str], client: Spy, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    monkeypatch.setattr(craft_sdk, "create_client", lambda *a, **k: client)
    model = [] if "--model" in args else ["--model", "spy"]  # the spy's id alone cannot reopen it
    res = CliRunner().invoke(app, ["predict", *args, *model])
    return res.exit_code, res.stdout, res.stderr


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_cli_output_resumes_without_repaying(adapter_dir: Path, images: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    out, fresh = tmp_path / f"preds.{fmt}", tmp_path / f"fresh.{fmt}"
    common = [str(adapter_dir), str(images), "--batch-size", "3", "--top-k", "2", "--json"]
    code, stdout, _ = run([*common, "--output", str(fresh)], Spy(), monkeypatch)
    assert code == 0 and json.loads(stdout)["queries_used"] == 4  # 10 images, batches of 3
    # an interrupted run: the service fails on the third call; two batches are on disk
    code, _, stderr = run([*common, "--output", str(out)], Spy(fail_on_call=3), monkeypatch)
    assert code == 1 and "the service went away" in stderr
    with open(out, "a") as f:
        f.write('{"image": "torn' if fmt == "jsonl" else "/torn/line.png,gre")  # a torn last line
    code, _, stderr = run([*common, "--output", str(out)], Spy(), monkeypatch)
    assert code == 1 and "exists; pass --resume" in stderr
    client = Spy()
    code, stdout, _ = run([*common, "--output", str(out), "--resume"], client, monkeypatch)
    summary = json.loads(stdout)
    assert code == 0 and summary["resumed_after"] == 6 and summary["images"] == 4
    assert client.calls == 2 and summary["queries_used"] == 2  # only the unfinished batches were paid for
    assert out.read_text() == fresh.read_text()  # identical to an uninterrupted run
    if fmt == "csv":
        rows = list(csv.DictReader(fresh.open()))
        assert list(rows[0]) == ["image", "label", "prob", "label_2", "prob_2", "error"] and len(rows) == 10
    else:
        rows = [json.loads(line) for line in fresh.read_text().splitlines()]
        assert [r["image"] for r in rows] == files_of(images) and all(r["label"] in NAMES for r in rows)
    # resuming with changed inputs or another adapter is refused
    code, _, stderr = run([str(adapter_dir), str(images / "c"), "--output", str(out), "--resume", "--top-k", "2"],
                          Spy(), monkeypatch)
    assert code == 1 and "rows but there are only 2 inputs" in stderr
    code, _, stderr = run([*common, "--output", str(out), "--resume", "--top-k", "3"], Spy(), monkeypatch)
    assert code == 1 and "different top_k" in stderr


def test_cli_fifo_and_remote_options(adapter_dir: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fifo = tmp_path / "in.png"
    os.mkfifo(fifo)
    code, _, stderr = run([str(adapter_dir), str(fifo)], Spy(), monkeypatch)
    assert code == 1 and "is not a regular file" in stderr and len(stderr.strip().splitlines()) == 1
    seen: dict = {}

    def fake_create(model: str, **kwargs: object) -> Spy:
        seen.update(model=model, **kwargs)
        return Spy()

    monkeypatch.setattr(craft_sdk, "create_client", fake_create)
    key = tmp_path / "key"
    key.write_text("secret\n")
    res = CliRunner().invoke(app, ["predict", str(adapter_dir), str(images / "c"), "--model", "http://127.0.0.1:9",
                                   "--api-key-file", str(key), "--concurrency", "8"])
    assert res.exit_code == 0, res.output
    assert seen == {"model": "http://127.0.0.1:9", "api_key": "secret", "max_concurrency": 8}
    assert res.stdout.count("\n") == 2 and res.stdout.startswith(str(images / "c" / "8.jpg") + "\t")


def test_files_from_listing_a_fifo_or_missing_file_is_skipped_not_opened(
    adapter_dir: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # opening it would block forever: nobody writes to it
    every = files_of(images)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{every[0]}\n{fifo}\n{tmp_path / 'gone.png'}\n{every[1]}\n")
    out = tmp_path / "preds.jsonl"
    client = Spy()
    done = threading.Event()
    result: list = []

    def go() -> None:
        result.append(run([str(adapter_dir), "--files-from", str(listing), "--on-error", "skip", "--output", str(out),
                           "--json"], client, monkeypatch))
        done.set()

    threading.Thread(target=go, daemon=True).start()
    assert done.wait(60), "predict blocked on the FIFO"
    code, stdout, stderr = result[0]
    assert code == 0, stderr
    assert json.loads(stdout)["errors"] == 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in rows] == [every[0], str(fifo), str(tmp_path / "gone.png"), every[1]]
    assert "not a regular file" in rows[1]["error"] and "does not exist" in rows[2]["error"]
    assert rows[0]["label"] in NAMES and rows[3]["label"] in NAMES and client.calls == 1
    code, _, stderr = run([str(adapter_dir), "--files-from", str(listing)], Spy(), monkeypatch)  # on-error fail
    assert code == 1 and "pipe.png is not a regular file" in stderr.strip().splitlines()[-1]


def test_files_from_a_pipe_is_read_once(adapter_dir: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    every = files_of(images)
    fifo = tmp_path / "list.fifo"
    os.mkfifo(fifo)

    def writer() -> None:  # like --files-from <(find ...): the listing can be read once only
        with open(fifo, "w") as f:
            f.write("\n".join(every[:3]) + "\n")

    threading.Thread(target=writer, daemon=True).start()
    result: list = []
    reader = threading.Thread(target=lambda: result.append(run([str(adapter_dir), "--files-from", str(fifo), "--json"],
                                                                Spy(), monkeypatch)), daemon=True)
    reader.start()
    reader.join(60)
    assert result, "predict opened the pipe twice and blocked"
    code, stdout, stderr = result[0]
    assert code == 0, stderr
    assert [r["image"] for r in json.loads(stdout)["predictions"]] == every[:3]


def test_csv_output_neutralises_formula_labels_and_paths(tmp_path: Path, images: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = ("=1+2", "@SUM(1)", "+cmd", "-2", "\tx", "\rx", "plain")
    weights = mlp.init_weights(len(names), 8, 2, residual=False, seed=1)
    cfg = AdapterConfig("spy/1", names, "a photo of a", refiner=RefinerSpec(2, 8, True))
    ad = Adapter(cfg, None, None, weights).save_pretrained(tmp_path / "hostile")
    evil = tmp_path / "=HYPERLINK(1).png"
    evil.write_bytes((images / "a" / "0.png").read_bytes())

    class Seven(Spy):
        def predict(self, images, class_names, template="a photo of a", offsets=None):  # type: ignore[no-untyped-def]
            return np.tile(np.arange(7, dtype=np.float32)[::-1], (len(images), 1))

    out = tmp_path / "p.csv"
    monkeypatch.chdir(tmp_path)  # the file is named relatively: its name starts the cell
    code, _, stderr = run([str(ad), evil.name, str(images / "a" / "1.png"), "--top-k", "7", "--output", str(out)], Seven(), monkeypatch)
    assert code == 0, stderr
    rows = list(csv.reader(out.open(newline="")))
    cells = [c for row in rows[1:] for c in row]
    assert not any(c.startswith(("=", "+", "-", "@", "\t", "\r")) for c in cells)
    labels = {c for row in rows[1:] for c in row[1:-1:2]}
    assert labels == {"'=1+2", "'@SUM(1)", "'+cmd", "'-2", "'\tx", "'\rx", "plain"}
    assert rows[1][0] == "'=HYPERLINK(1).png" and len(rows) == 3
    code, stdout, stderr = run([str(ad), evil.name, str(images / "a" / "1.png"), "--top-k", "7", "--output", str(out), "--resume",
                                "--json"], Seven(), monkeypatch)
    assert code == 0 and json.loads(stdout)["resumed_after"] == 2, stderr  # resuming matches the neutralised rows


def test_predict_decodes_huge_images_reduced_and_small_ones_unchanged(adapter_dir: Path, images: Path, tmp_path: Path) -> None:
    from craft_sdk.images import PREDICT_MAX_PIXELS, to_pil

    big = tmp_path / "big.png"
    Image.new("RGB", (5000, 4000), (200, 10, 10)).save(big)  # 20 Mpx: over the 16.8-Mpx decode bound
    small = files_of(images)[0]
    seen: list = []

    class Sizes(Spy):
        def predict(self, images, class_names, template="a photo of a", offsets=None):  # type: ignore[no-untyped-def]
            seen.extend(images)
            return super().predict(images, class_names, template, offsets)

    clf = CraftClassifier.from_pretrained(adapter_dir, Sizes())
    res = list(predict_stream(clf, [str(big), small], batch_size=2))
    assert res[0].predictions.labels[0] == "red"
    w, h = seen[0].size
    assert w * h <= PREDICT_MAX_PIXELS and abs(w / h - 5000 / 4000) < 0.01 and seen[0].getpixel((7, 7)) == (200, 10, 10)
    assert seen[1].tobytes() == to_pil(small).tobytes()  # an ordinary image is decoded exactly as before


def test_ray_data_predictor_on_two_workers(adapter_dir: Path, images: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    import sys

    every = files_of(images)
    expected = dict(zip(every, CraftClassifier.from_pretrained(adapter_dir, Spy()).predict(every).tolist()))
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        ds = ray.data.from_items([{"path": p} for p in every], override_num_blocks=10)
        kwargs = {"adapter": str(adapter_dir), "rendezvous": str(tmp_path)}
        pool = ray.data.ActorPoolStrategy(size=2, max_tasks_in_flight_per_actor=1)
        out = ds.map_batches(SpyPredictor, fn_constructor_kwargs=kwargs, batch_size=1, compute=pool, num_cpus=1).take_all()
    finally:
        ray.shutdown()
    assert sorted(r["path"] for r in out) == sorted(every)
    assert {r["path"]: r["label"] for r in out} == expected
    assert all(abs(float(np.sum(r["probs"])) - 1.0) < 1e-5 and r["prob"] == pytest.approx(float(np.max(r["probs"])))
               for r in out)
    assert len({r["worker"] for r in out}) == 2  # both actors served batches, each loading the adapter once
    assert {r["loads"] for r in out} == {1}


def _spy_predictor_base():  # type: ignore[no-untyped-def]
    from craft_sdk.integrations.ray import CraftPredictor

    return CraftPredictor


class SpyPredictor(_spy_predictor_base()):  # type: ignore[misc]
    """CraftPredictor with the spy client (a monkeypatch does not reach Ray workers), tagging rows with its worker."""

    loads = 0

    def __init__(self, rendezvous: str, **kwargs):  # type: ignore[no-untyped-def]
        import craft_sdk.api

        craft_sdk.api.create_client = lambda *a, **k: Spy(delay=0.1)  # type: ignore[assignment]
        type(self).loads += 1
        super().__init__(**kwargs)
        self.rendezvous = Path(rendezvous)
        (self.rendezvous / f"worker-{os.getpid()}").touch()

    def __call__(self, batch):  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + 180  # hold the first batch until both actors exist, so both get work
        while len(list(self.rendezvous.glob("worker-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        out = super().__call__(batch)
        out["worker"] = np.full(len(out["label"]), os.getpid())
        out["loads"] = np.full(len(out["label"]), type(self).loads)
        return out


def test_streaming_deploy_path_needs_no_torch_sklearn_or_hub(adapter_dir: Path, images: Path, tmp_path: Path) -> None:
    """The base install's path: local adapter, stream, resumable sink; torch, scikit-learn and huggingface_hub blocked."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for m in ('torch', 'sklearn', 'huggingface_hub', 'ray'): sys.modules[m] = None\n"
        "import numpy as np\n"
        "from craft_sdk import CallableClient, Capabilities, CraftClassifier\n"
        "from craft_sdk.deploy.sinks import PredictionSink, rows_of\n"
        "from craft_sdk.deploy.stream import iter_image_paths, predict_stream\n"
        "import craft_sdk.integrations.ray, craft_sdk.adapter.card, craft_sdk.adapter.hub\n"
        "client = CallableClient(lambda ims, n, t, o: np.ones((len(ims), len(n))), Capabilities('spy/1'))\n"
        "clf = CraftClassifier.from_pretrained(sys.argv[1], client)\n"
        "with PredictionSink(sys.argv[3], 'jsonl', 1, {}, resume=False) as sink:\n"
        "    for res in predict_stream(clf, iter_image_paths([sys.argv[2]]), batch_size=4):\n"
        "        sink.write(rows_of(res, 1))\n"
        "print(sink.done, clf.ledger.used)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(adapter_dir), str(images), str(tmp_path / "o.jsonl")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["10", "3"]


def test_sink_repairs_and_counts_in_chunks(tmp_path: Path) -> None:
    import io

    from craft_sdk.deploy.sinks import PredictionSink, _last_newline_end

    data = b'{"image": "a"}\n{"image": "bb"}\n{"image": "ccc"}\n{"image": "to'
    for chunk in (1, 3, 4, 1 << 20):
        assert _last_newline_end(io.BytesIO(data), len(data), chunk) == data.rfind(b"\n") + 1
        assert _last_newline_end(io.BytesIO(data), data.rfind(b"\n"), chunk) == data[:-20].rfind(b"\n") + 1
    assert _last_newline_end(io.BytesIO(b"no newline"), 10, 3) == 0
    out = tmp_path / "p.jsonl"
    PredictionSink(out, "jsonl", 1, {"adapter": "x"}, resume=False).close()
    out.write_bytes(data)
    sink = PredictionSink(out, "jsonl", 1, {"adapter": "x"}, resume=True)
    sink.close()
    assert (sink.done, sink.last_image) == (3, "ccc") and out.read_bytes() == data[: data.rfind(b"\n") + 1]
    with pytest.raises(DataError, match="different adapter"):
        PredictionSink(out, "jsonl", 1, {"adapter": "y"}, resume=True)
