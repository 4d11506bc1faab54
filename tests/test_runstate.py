"""The run's typed state (issue 21): finish/resume/ensemble read the state and return values, the
result's records serialise to the JSON they always did, the interfaces are declared Protocols,
and a checkpoint written before the refactor still resumes."""

from __future__ import annotations

import ast
import dataclasses
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from craft_sdk import Adapter, Capabilities, ImageDataset, QueryLedger, TuneConfig
from craft_sdk.adapter.files import WEIGHTS_FILE
from craft_sdk.tuner.result import DataInfo, GenerationRecord, Metrics, QueryReport, SelectionReport

pytest.importorskip("torch")
pytest.importorskip("cma")
from craft_sdk.tuner import loop  # noqa: E402
from craft_sdk.tuner.ensemble import EnsemblePick, select_ensemble  # noqa: E402
from craft_sdk.tuner.finish import finish_paper, finish_robust  # noqa: E402
from craft_sdk.tuner.protocols import AskTellSearch, PromptSpace  # noqa: E402
from craft_sdk.tuner.resume import checkpoint_payload, restore  # noqa: E402
from craft_sdk.tuner.state import CheckSnapshot, EnsembleSnapshot, RunOptions, RunState, ValSnapshot  # noqa: E402
from craft_sdk.tuner.train import Tuner  # noqa: E402

TUNER = Path(__file__).resolve().parents[1] / "craft_sdk" / "tuner"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
try:  # the box, the task and the checkpoint written before RunState (commit bb678d1)
    from make_checkpoint_v1 import CHECKPOINT_V1, CHECKPOINT_V1_CFG, CLASSES, CTX_DIM, N_CTX, SMALL, Box, make_task
finally:
    sys.path.pop(0)


@pytest.fixture(scope="module")
def task() -> tuple[ImageDataset, ImageDataset]:
    return make_task()


def _searched(config: TuneConfig, train: ImageDataset, val: ImageDataset | None = None, **options: Any) -> tuple[RunState, Any]:
    state, io = loop.open_run(config, RunOptions(**options), Box().client(), QueryLedger(config.budget), train, val)
    loop.search(state, io)
    return state, io


def _canon(x: Any) -> Any:
    """A comparable copy of a state value: arrays as (dtype, shape, bytes), dataclasses and containers walked."""
    if isinstance(x, np.ndarray):
        return ("array", x.dtype.str, x.shape, x.tobytes())
    if isinstance(x, np.generic):
        return x.item()
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return (type(x).__name__, tuple((f.name, _canon(getattr(x, f.name))) for f in dataclasses.fields(x)))
    if isinstance(x, dict):
        return {k: _canon(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_canon(v) for v in x]
    if isinstance(x, float) and np.isnan(x):
        return "nan"
    return x


def _fingerprint(state: RunState) -> Any:
    """Everything the state holds: its plain fields, its objects' states (search, refiner, stopping), the checkpoint."""
    plain = {f.name: _canon(getattr(state, f.name)) for f in dataclasses.fields(state)
             if f.name not in ("setup", "prompts", "refiner", "stopping", "handles")}
    objects = {
        "search": None if state.prompts is None else (state.prompts.search.generation, _canon(state.prompts.search.mean),
                                                      list(state.prompts.search.ask_digests)),
        "refiner": None if state.refiner is None else (_canon(state.refiner.state_tensors()), _canon(state.refiner.state_json())),
        "stopping": _canon(state.stopping.state()),
    }
    return plain, objects, _canon(checkpoint_payload(state, 0))


def _ids(state: RunState) -> dict[str, int]:
    return {f.name: id(getattr(state, f.name)) for f in dataclasses.fields(state)}


# ------------------------------------------------------------------ satellites do not mutate the run


def test_finish_robust_reads_the_state_and_returns_values(task) -> None:  # noqa: ANN001
    train, _ = task
    state, _ = _searched(TuneConfig(mode="craft", budget=300, **SMALL), train)
    assert isinstance(state.best, CheckSnapshot) and state.best.generation > 0  # a searched prompt is held
    before, ids = _fingerprint(state), _ids(state)
    end = finish_robust(state)
    assert _fingerprint(state) == before and _ids(state) == ids
    assert end.selection is not None and end.metrics.deployed == end.selection.deployed
    assert state.metrics.deployed is None  # the loop applies the returned metrics, finish does not


def test_finish_paper_reads_the_state_and_returns_values(task) -> None:  # noqa: ANN001
    train, val = task
    state, _ = _searched(TuneConfig(mode="craft", budget=300, protocol="paper", val_every=2, max_generations=6, **SMALL), train, val)
    assert isinstance(state.best, ValSnapshot)
    before, ids = _fingerprint(state), _ids(state)
    end = finish_paper(state)
    assert _fingerprint(state) == before and _ids(state) == ids
    assert end.selected_generation == state.best.generation and end.metrics.val_accuracy == state.best.val
    assert state.metrics.val_accuracy is None


def test_checkpoint_and_restore_do_not_touch_the_run(task, tmp_path: Path) -> None:  # noqa: ANN001
    train, _ = task
    cfg = TuneConfig(mode="craft", budget=300, **SMALL)
    state, _ = _searched(cfg, train, checkpoint_dir=tmp_path)
    before, ids = _fingerprint(state), _ids(state)
    tensors, saved = checkpoint_payload(state, len(state.history) - 1)
    restored = restore(tensors, saved, True, state.prompts)
    assert _fingerprint(state) == before and _ids(state) == ids  # no replay into the live search, no refiner load
    assert restored.generation == len(state.history) - 1 and _canon(restored.best) == _canon(state.best)
    assert _canon(restored.metrics) == _canon(state.metrics) and restored.history == state.history


def test_select_ensemble_returns_a_pick(task) -> None:  # noqa: ANN001
    train, _ = task
    cfg = TuneConfig(mode="ensemble", budget=300, ensemble_k=2, template_bank="clip-selected", **SMALL)
    state, io = _searched(cfg, train)
    assert isinstance(state.ensemble, EnsemblePick) and isinstance(state.best, EnsembleSnapshot)
    before, ids = _fingerprint(state), _ids(state)
    assert state.handles is not None
    pick = select_ensemble(cfg, state.setup.bank, io.client, io.ledger, state.handles.scored, list(CLASSES), state.images.y)
    assert _fingerprint(state) == before and _ids(state) == ids
    assert pick.texts == state.ensemble.texts and np.array_equal(pick.logits, state.ensemble.logits)


def _assigned_attributes(path: Path) -> list[str]:
    """``x.attr = …`` / ``x.attr[…] = …`` / ``x.attr += …`` with ``x`` not ``self``, and calls that change a run's objects."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            while isinstance(target, ast.Subscript):
                target = target.value
            if isinstance(target, ast.Attribute) and not (isinstance(target.value, ast.Name) and target.value.id == "self"):
                found.append(f"{path.name}:{node.lineno} {ast.unparse(target)}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("replay", "load_state", "load", "tell", "append"):
            found.append(f"{path.name}:{node.lineno} {ast.unparse(node.func)}()")
    return found


@pytest.mark.parametrize("module", ["finish.py", "resume.py", "ensemble.py", "train.py"])
def test_no_satellite_assigns_to_the_run(module: str) -> None:
    assert _assigned_attributes(TUNER / module) == []


def test_the_satellite_check_catches_an_assignment(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f(run):\n    run.best = 1\n    run.metrics['x'] = 2\n    run.prompts.search.replay(None)\n")
    assert _assigned_attributes(bad) == ["bad.py:2 run.best", "bad.py:3 run.metrics", "bad.py:4 run.prompts.search.replay()"]


# ------------------------------------------------------------------ interfaces


def test_prompt_spaces_and_searches_satisfy_the_protocols(task) -> None:  # noqa: ANN001
    from craft_sdk.tuner.prompts import create_prompt_space

    caps = Capabilities("runstate-box", n_ctx=N_CTX, ctx_dim=CTX_DIM, ctx_rms=1.0)
    text = Capabilities("text-box")
    spaces = [create_prompt_space(TuneConfig(mode="craft", **SMALL), caps),
              create_prompt_space(TuneConfig(mode="craft", word_search="halving", **SMALL), text),
              create_prompt_space(TuneConfig(mode="craft", word_search="pg", **SMALL), text)]
    assert [type(s.search).__name__ for s in spaces] == ["PromptSearch", "WordHalvingSearch", "DiscretePromptSearch"]
    for space in spaces:
        assert isinstance(space, PromptSpace) and isinstance(space.search, AskTellSearch)
    assert not isinstance(object(), PromptSpace) and not isinstance(spaces[0], AskTellSearch)


# ------------------------------------------------------------------ typed records


def test_records_serialise_to_the_recorded_json_shape(task) -> None:  # noqa: ANN001
    train, val = task
    robust = Tuner(TuneConfig(mode="craft", budget=300, **SMALL)).fit(Box().client(), train)
    paper = Tuner(TuneConfig(mode="craft", budget=300, protocol="paper", val_every=2, max_generations=6, **SMALL)).fit(Box().client(), train, val)
    metrics = {
        # robust: this run stops early on its 20 check images (issue 23: stopping reads every check image)
        "robust": ["deployed", "stopped", "train_accuracy", "val_accuracy", "zero_shot_check_accuracy", "zero_shot_train_accuracy"],
        "paper": ["train_accuracy", "val_accuracy", "zero_shot_train_accuracy", "zero_shot_val_accuracy"],
    }
    data = ["image_fingerprints", "n_train", "n_val", "shots", "train_fingerprint", "val_fingerprint"]
    queries = ["budget", "cost", "counts", "max_cost", "price", "uploads", "usage", "usage_by_category", "used"]
    selection = ["calibration", "deployed", "estimates", "n_check", "plan", "reason", "temperature"]
    for name, result in (("robust", robust), ("paper", paper)):
        assert isinstance(result.metrics, Metrics) and isinstance(result.data, DataInfo) and isinstance(result.queries, QueryReport)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # to_dict() is not the deprecated access
            m, d, q = result.metrics.to_dict(), result.data.to_dict(), result.queries.to_dict()
        provenance = Adapter.from_result(result).config.provenance  # what adapter_config.json records
        assert provenance["history"] == [h.to_dict() for h in result.history] and isinstance(result.history[1], GenerationRecord)
        assert sorted(result.history[0].to_dict()) == ["generation", "queries_used", "train_accuracy", "train_loss", "val_accuracy"]
        searched = ["best_fitness", "generation", "mean_fitness", "queries_used", "sigma", "train_accuracy", "train_loss"]
        assert sorted(result.history[1].to_dict()) == sorted(searched + (["val_accuracy"] if name == "robust" else []))  # paper: val every 2
        assert provenance["metrics"] == m and provenance["data"] == d and provenance["queries_used"] == q["used"] == result.queries.used
        assert sorted(m) == metrics[name], name
        assert sorted(d) == sorted(data + (["n_check", "n_search"] if name == "robust" else [])), name
        assert sorted(q) == queries and q["used"] <= 300 and sum(q["counts"].values()) == q["used"]
        assert Metrics.from_dict(m).to_dict() == m and DataInfo.from_dict(d).to_dict() == d and QueryReport.from_dict(q).to_dict() == q
    assert isinstance(robust.selection, SelectionReport)
    s = robust.selection.to_dict()
    assert Adapter.from_result(robust).config.provenance["selection"] == s
    assert set(s) - {"refiner"} == set(selection) and list(SelectionReport.from_dict(s).to_dict()) == list(s)
    assert SelectionReport.from_dict(s).to_dict() == s and paper.selection is None
    # a robust run always states val_accuracy (None without check images); a paper run only with best-val
    assert Metrics(deployed="zero-shot").to_dict() == {"deployed": "zero-shot", "val_accuracy": None}
    assert Metrics(train_accuracy=0.5).to_dict() == {"train_accuracy": 0.5}
    assert QueryReport.from_dict({**q, "newer": 1}).to_dict() == {**q, "newer": 1}  # a newer ledger's keys are kept


def test_dict_access_to_a_record_warns_and_still_works() -> None:
    m = Metrics(zero_shot_train_accuracy=0.25, stopped="stopped: inert")
    with pytest.warns(DeprecationWarning, match="result.metrics.train_accuracy"):
        assert m["stopped"] == "stopped: inert"
    with pytest.warns(DeprecationWarning):
        assert m.get("train_accuracy") is None and m.get("x", 3) == 3
    with pytest.warns(DeprecationWarning):
        assert "stopped" in m and "stopped_early" not in m
    with pytest.warns(DeprecationWarning):
        assert dict(m.items()) == {"zero_shot_train_accuracy": 0.25, "stopped": "stopped: inert"}
    with pytest.raises(KeyError), pytest.warns(DeprecationWarning):
        m["deployed"]  # noqa: B018
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert m.stopped == "stopped: inert" and m.to_dict()["zero_shot_train_accuracy"] == 0.25


# ------------------------------------------------------------------ checkpoints written before the refactor


def test_a_checkpoint_written_before_runstate_resumes_to_the_same_adapter(task, tmp_path: Path) -> None:  # noqa: ANN001
    train, _ = task
    ck = tmp_path / "ck"
    shutil.copytree(CHECKPOINT_V1, ck)
    resumed = Tuner(CHECKPOINT_V1_CFG, checkpoint_dir=ck, resume=True).fit(Box().client(), train)
    fresh = Tuner(CHECKPOINT_V1_CFG).fit(Box().client(), train)
    assert resumed.n_generations == fresh.n_generations > 2  # the fixture stopped after generation 2
    assert resumed.queries.used == fresh.queries.used + 6 + 1  # generation 3, paid and lost
    assert [h.train_accuracy for h in resumed.history] == [h.train_accuracy for h in fresh.history]
    Adapter.from_result(resumed).save_pretrained(tmp_path / "a")
    Adapter.from_result(fresh).save_pretrained(tmp_path / "b")
    assert (tmp_path / "a" / WEIGHTS_FILE).read_bytes() == (tmp_path / "b" / WEIGHTS_FILE).read_bytes()
    # the v1 checkpoint scored zero-shot on its select half of the check images (issue 23's first rule); a fresh run
    # now scores it, and stops, on every check image (selection.split_check): that one recorded metric differs
    old, new = resumed.metrics.to_dict(), fresh.metrics.to_dict()
    assert old.pop("zero_shot_check_accuracy") == 0.3 and new.pop("zero_shot_check_accuracy") == 0.25
    assert old == new and resumed.n_generations == fresh.n_generations
