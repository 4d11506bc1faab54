"""The sweep specification: a grid of tuning runs, read from YAML, TOML or JSON and validated on load.

A spec file names the model, the tasks and the axes of the grid; every
combination (task × shots × mode × hyperparameter combination × seed) is one
:class:`RunSpec`. Example (YAML)::

    name: table3
    model: demo                  # demo | open_clip name (+ pretrained) | local-dir:/path
    tasks: [digits, noisy-shapes, ./data/eurosat]   # demo task names and/or folders
    shots: [1, 2, 4, 8, 16]
    modes: [zero-shot, pg, pr, pg+pr, craft]
    seeds: [0, 1, 2]
    budget: by-shots             # or a number; by-shots = 2000 / 4000 / 8000 (official code)
    params: {popsize: 40}        # fixed TuneConfig options
    grid:                        # hyperparameter axes: a mapping (cartesian product)
      - {lam: [0.0, 0.01]}       # or a list of mappings (union of their products)
      - {beta: [0.0, 0.01]}
    eval_at: [500, 1000, 2000]   # training-query checkpoints for "accuracy vs queries"

Relative task folders are resolved against the spec file's folder. The seed is
both the k-shot sampling seed and the tuning seed (as in ``craft-sdk tune``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from craft_sdk import ConfigError, TuneConfig
from craft_sdk.demo import list_demo_tasks
from craft_sdk.errors import require

SPEC_KEYS = ("name", "model", "pretrained", "tasks", "shots", "modes", "seeds", "budget", "params", "grid", "eval_at")
BY_SHOTS = "by-shots"
AXIS_FIELDS = ("mode", "seed", "budget")
_TUNE_FIELDS = tuple(TuneConfig.__dataclass_fields__)
_SLUG = re.compile(r"[^A-Za-z0-9_.+=-]+")


def budget_for_shots(shots: int) -> int:
    """The official code's budget: 2,000 queries for 1 shot, 4,000 for 2–4, 8,000 for 8 or more.

    Example:
        >>> [budget_for_shots(k) for k in (1, 2, 4, 8, 16)]
        [2000, 4000, 4000, 8000, 8000]
    """
    return 2000 if shots <= 1 else 4000 if shots <= 4 else 8000


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_tuple(key: str, value: Any) -> tuple[Any, ...]:
    items = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if not items:
        raise ConfigError(f"sweep key '{key}' is an empty list; give at least one value")
    if len(set(map(repr, items))) != len(items):
        raise ConfigError(f"sweep key '{key}' has duplicate values {list(items)}; list each value once")
    return items


def _check_ints(key: str, values: tuple[Any, ...], minimum: int) -> None:
    for i, v in enumerate(values):
        if not _is_int(v) or v < minimum:
            raise ConfigError(f"sweep key '{key}[{i}]' must be an integer >= {minimum}, got {v!r}")


def _check_option(where: str, name: str) -> None:
    if name in AXIS_FIELDS:
        raise ConfigError(f"{where}: '{name}' is a grid axis; set it with the top-level '{name}s' key")
    if name not in _TUNE_FIELDS:
        raise ConfigError(f"{where}: unknown tuning option '{name}'; valid: {', '.join(sorted(_TUNE_FIELDS))}")


def _grid_combos(grid: tuple[dict[str, tuple[Any, ...]], ...]) -> list[dict[str, Any]]:
    combos: list[dict[str, Any]] = []
    for block in grid or ({},):
        keys = sorted(block)
        for values in itertools.product(*(block[k] for k in keys)):
            combo = dict(zip(keys, values))
            if combo not in combos:
                combos.append(combo)
    return combos


@dataclass(frozen=True)
class RunSpec:
    """One tuning run of a sweep: everything needed to reproduce it, JSON-ready.

    Args:
        model: model name passed to :func:`craft_sdk.create_client`.
        pretrained: pretrained tag, ``"none"`` (random weights) or None (not passed).
        task: a demo task name or an absolute folder path.
        task_label: short task name for tables and file names.
        shots: training images per class.
        seed: data-sampling and tuning seed.
        config: the full :class:`~craft_sdk.TuneConfig` as a dict.
        combo: the grid's hyperparameter values of this run (for grouping).
        eval_at: training-query checkpoints at which the test set is scored.
    """

    model: str
    pretrained: str | None
    task: str
    task_label: str
    shots: int
    seed: int
    config: dict[str, Any]
    combo: dict[str, Any] = field(default_factory=dict)
    eval_at: tuple[int, ...] = ()

    @property
    def mode(self) -> str:
        return str(self.config["mode"])

    @property
    def is_demo(self) -> bool:
        return self.task in list_demo_tasks()

    @property
    def digest(self) -> str:
        """sha256 of everything that determines the run's result."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    @property
    def run_id(self) -> str:
        """Readable, unique file stem: task, shots, mode, hyperparameters, seed and a digest prefix."""
        combo = "-".join(f"{k}={v}" for k, v in sorted(self.combo.items()))
        parts = [self.task_label, f"{self.shots}shot", self.mode, combo, f"seed{self.seed}", self.digest[:10]]
        return _SLUG.sub("_", "-".join(p for p in parts if p))

    @property
    def combo_label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(self.combo.items()))

    def tune_config(self) -> TuneConfig:
        return TuneConfig.from_dict(self.config)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "pretrained": self.pretrained,
            "task": self.task,
            "task_label": self.task_label,
            "shots": self.shots,
            "seed": self.seed,
            "config": dict(self.config),
            "combo": dict(self.combo),
            "eval_at": list(self.eval_at),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunSpec:
        return cls(**{**data, "eval_at": tuple(data.get("eval_at", ()))})


ZERO_SHOT_KEYS = ("template",)  # the grid keys a zero-shot run depends on


@dataclass(frozen=True)
class SweepSpec:
    """A grid of tuning runs; validated on construction (one-line :class:`~craft_sdk.ConfigError`).

    Args:
        tasks: demo task names (``digits``, ``demo:digits``) and/or dataset folders.
        model: ``demo`` (default), an open_clip name, or ``local-dir:/path``.
        pretrained: tag for open_clip names; ``"none"`` asks for random weights.
        shots: training images per class, one run per value.
        modes: tuning modes (``zero-shot``, ``pg``, ``pr``, ``pg+pr``, ``craft``).
        seeds: seeds, one run per value.
        budget: queries per run, or ``"by-shots"`` (:func:`budget_for_shots`).
        params: fixed :class:`~craft_sdk.TuneConfig` options for every run.
        grid: hyperparameter axes: a mapping ``option -> values`` or a list of such
            mappings (their products are joined).
        eval_at: training-query counts at which the current model (prompt + refiner) is scored on the
            test set (evaluation only; charged to the ``eval`` category).
        name: a label for reports.
        base_dir: folder that relative task paths are resolved against.

    Example:
        >>> spec = SweepSpec(tasks=("digits",), shots=(1, 2), modes=("pg", "craft"), seeds=(0, 1))
        >>> len(spec.runs()), spec.runs()[0].config["budget"]
        (8, 2000)
    """

    tasks: tuple[str, ...]
    model: str = "demo"
    pretrained: str | None = None
    shots: tuple[int, ...] = (16,)
    modes: tuple[str, ...] = ("craft",)
    seeds: tuple[int, ...] = (0,)
    budget: int | str = BY_SHOTS
    params: Mapping[str, Any] = field(default_factory=dict)
    grid: Any = ()
    eval_at: tuple[int, ...] = ()
    name: str = "sweep"
    base_dir: Path | None = None

    def __post_init__(self) -> None:
        for key in ("tasks", "shots", "modes", "seeds"):
            object.__setattr__(self, key, _as_tuple(key, getattr(self, key)))
        object.__setattr__(self, "eval_at", _as_tuple("eval_at", self.eval_at) if self.eval_at else ())
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"sweep key 'name' must be a non-empty string, got {self.name!r}")
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError(f"sweep key 'model' must be a model name such as 'demo', got {self.model!r}")
        if self.pretrained is not None and not isinstance(self.pretrained, str):
            raise ConfigError(f"sweep key 'pretrained' must be a tag string or 'none', got {self.pretrained!r}")
        _check_ints("shots", self.shots, 1)
        _check_ints("seeds", self.seeds, 0)
        _check_ints("eval_at", self.eval_at, 1)
        object.__setattr__(self, "eval_at", tuple(sorted(self.eval_at)))
        self._check_modes()
        self._check_budget()
        object.__setattr__(self, "tasks", tuple(self._resolve_task(i, t) for i, t in enumerate(self.tasks)))
        labels = [self._task_label(t) for t in self.tasks]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"sweep key 'tasks' has two tasks with the same name {labels}; rename a folder")
        self._check_params()
        object.__setattr__(self, "grid", self._normalise_grid(self.grid))
        self.runs()  # every run's TuneConfig is valid, or a one-line error now

    # ------------------------------------------------------------ validation

    def _check_modes(self) -> None:
        from craft_sdk.tuner.config import MODES

        for i, mode in enumerate(self.modes):
            if mode not in MODES:
                raise ConfigError(f"sweep key 'modes[{i}]' is {mode!r}; use one of {', '.join(MODES)}")

    def _check_budget(self) -> None:
        b = self.budget
        if b == BY_SHOTS or (_is_int(b) and int(b) >= 1):
            return
        raise ConfigError(f"sweep key 'budget' must be a positive integer or '{BY_SHOTS}', got {b!r}")

    def _check_params(self) -> None:
        if not isinstance(self.params, Mapping):
            raise ConfigError(
                f"sweep key 'params' must be a mapping of tuning options, got {type(self.params).__name__}"
            )
        for name in self.params:
            _check_option("sweep key 'params'", str(name))
        object.__setattr__(self, "params", dict(self.params))

    def _normalise_grid(self, grid: Any) -> tuple[dict[str, tuple[Any, ...]], ...]:
        blocks = [grid] if isinstance(grid, Mapping) else list(grid or ())
        out = []
        for b, block in enumerate(blocks):
            where = f"sweep key 'grid[{b}]'"
            if not isinstance(block, Mapping) or not block:
                raise ConfigError(f"{where} must be a non-empty mapping 'option: [values]', got {block!r}")
            for name in block:
                _check_option(where, str(name))
                if name in self.params:
                    raise ConfigError(f"{where}: '{name}' is also in 'params'; set it in one place")
            out.append({str(k): _as_tuple(f"grid[{b}].{k}", v) for k, v in block.items()})
        return tuple(out)

    def _resolve_task(self, i: int, task: Any) -> str:
        if not isinstance(task, str) or not task.strip():
            raise ConfigError(f"sweep key 'tasks[{i}]' must be a demo task name or a folder, got {task!r}")
        name = task[5:] if task.startswith("demo:") else task
        if name in list_demo_tasks():
            return name
        path = Path(task).expanduser()
        if not path.is_absolute() and self.base_dir is not None:
            path = Path(self.base_dir) / path
        if not path.is_dir():
            raise ConfigError(
                f"sweep key 'tasks[{i}]' {task!r} is neither a demo task ({', '.join(list_demo_tasks())}) nor a folder"
            )
        return str(path.resolve())

    @staticmethod
    def _task_label(task: str) -> str:
        return Path(task).name if Path(task).is_absolute() else task

    # ------------------------------------------------------------- expansion

    def budget_for(self, shots: int) -> int:
        """Query budget of a run with ``shots`` shots."""
        return budget_for_shots(shots) if self.budget == BY_SHOTS else int(self.budget)

    def combos(self) -> list[dict[str, Any]]:
        """The grid's hyperparameter combinations ([{}] without a grid)."""
        return _grid_combos(self.grid)

    def runs(self) -> list[RunSpec]:
        """Every run of the grid, in a stable order (task, shots, mode, combination, seed)."""
        runs = []
        pretrained = self.pretrained
        for task, shots, mode, combo, seed in itertools.product(
            self.tasks, self.shots, self.modes, self.combos(), self.seeds
        ):
            if mode == "zero-shot":  # zero-shot ignores every hyperparameter but the template: run it once per value
                combo = {k: v for k, v in combo.items() if k in ZERO_SHOT_KEYS}
                if any(r.mode == mode and (r.task, r.shots, r.seed, r.combo) == (task, shots, seed, combo) for r in runs):
                    continue
            options = {**self.params, **combo, "mode": mode, "seed": seed, "budget": self.budget_for(shots)}
            try:
                config = TuneConfig.from_dict(options).to_dict()
            except (ConfigError, TypeError) as exc:
                where = ", ".join([f"mode={mode}", f"shots={shots}"] + [f"{k}={v!r}" for k, v in sorted(combo.items())])
                raise ConfigError(f"sweep run ({where}): {exc}") from None
            label = self._task_label(task)
            runs.append(RunSpec(self.model, pretrained, task, label, shots, seed, config, combo, self.eval_at))
        return runs

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (resolved task paths, grid as a list of mappings)."""
        return {
            "name": self.name,
            "model": self.model,
            "pretrained": self.pretrained,
            "tasks": list(self.tasks),
            "shots": list(self.shots),
            "modes": list(self.modes),
            "seeds": list(self.seeds),
            "budget": self.budget,
            "params": dict(self.params),
            "grid": [{k: list(v) for k, v in b.items()} for b in self.grid],
            "eval_at": list(self.eval_at),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base_dir: str | Path | None = None) -> SweepSpec:
        """Build from a parsed file; unknown keys raise a one-line :class:`~craft_sdk.ConfigError`."""
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"a sweep spec must be a mapping of keys ({', '.join(SPEC_KEYS)}), got {type(data).__name__}"
            )
        unknown = sorted(set(map(str, data)) - set(SPEC_KEYS))
        if unknown:
            raise ConfigError(f"unknown sweep key(s) {unknown}; valid keys: {', '.join(SPEC_KEYS)}")
        if "tasks" not in data:
            raise ConfigError("sweep spec has no 'tasks'; list demo task names (digits, ...) and/or folders")
        kwargs = {k: v for k, v in data.items() if v is not None or k == "pretrained"}
        _reject_non_finite(kwargs)
        return cls(**kwargs, base_dir=Path(base_dir) if base_dir is not None else None)


def _reject_non_finite(obj: Any, where: str = "spec") -> None:
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ConfigError(f"sweep {where} is {obj}; use a finite number")
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _reject_non_finite(v, f"key '{k}'")
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _reject_non_finite(v, where)


def _parse_text(text: str, suffix: str, path: Path) -> Any:
    if suffix in (".yaml", ".yml"):
        yaml = require("yaml", "train", "reading a YAML sweep spec", otherwise="use .toml / .json")
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:
            tomllib = require("tomli", "train", "reading a TOML sweep spec on Python 3.10")
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    if suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
        except RecursionError:
            raise ConfigError(f"{path} is nested too deeply to be a sweep spec") from None
    raise ConfigError(f"sweep spec {path} must end in .yaml, .yml, .toml or .json")


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep spec file (``.yaml``/``.yml``, ``.toml`` or ``.json``).

    Args:
        path: the spec file; relative task folders in it are resolved against its folder.

    Raises:
        ConfigError: one line naming the bad key or value and the fix.

    Example:
        >>> spec = load_spec("benchmarks/sweeps/table3.yaml")  # doctest: +SKIP
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep spec {p} does not exist")
    data = _parse_text(p.read_text(encoding="utf-8"), p.suffix.lower(), p)
    return SweepSpec.from_dict(data if data is not None else {}, base_dir=p.parent)


def as_spec(spec: SweepSpec | Mapping[str, Any] | str | Path) -> SweepSpec:
    """A :class:`SweepSpec` from a spec, a mapping or a spec file path."""
    if isinstance(spec, SweepSpec):
        return spec
    if isinstance(spec, Mapping):
        return SweepSpec.from_dict(spec)
    return load_spec(spec)


def run_order(runs: Iterable[RunSpec]) -> list[RunSpec]:
    """Runs ordered most expensive first (budget, then shots), so parallel workers finish together."""
    return sorted(runs, key=lambda r: (-int(r.config["budget"]) * (r.mode != "zero-shot"), -r.shots))
