"""The package's shape: imports point only down the layers the README names, and functions stay short.

Layers, lowest first (README, "Architecture"): a module may import from its own layer and the
layers below it, never from a layer above — lazy imports inside functions included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "craft_sdk"

# most specific prefix wins
LAYERS: dict[str, int] = {
    # 0: foundations shared by every layer (errors, file and score helpers, images, datasets, wire codec, the numpy
    # refiner, the prompt projection A)
    "craft_sdk.errors": 0, "craft_sdk._version": 0, "craft_sdk._fileio": 0, "craft_sdk._lru": 0, "craft_sdk._deprecation": 0,
    "craft_sdk.scores": 0, "craft_sdk.images": 0, "craft_sdk.data": 0, "craft_sdk.wire": 0, "craft_sdk.mlp": 0,
    "craft_sdk.projection": 0,
    "craft_sdk.demo": 0,  # shipped data (tasks, synth, assets)
    "craft_sdk.client": 1,  # the only door to the model (and what is scored through it: contexts, canary probes)
    "craft_sdk.tuner": 2,  # prompt search + refiner training
    "craft_sdk.adapter": 3,  # format, io, hub, card, ONNX export/runtime
    "craft_sdk.tuning": 4,  # the one composition client -> tuner -> adapter (tune_run)
    "craft_sdk.deploy": 5,  # classifier, stream, sinks, canary checks, the query policy
    "craft_sdk.api": 6,  # the verb-named facade
    # 7: applications built on the public API
    "craft_sdk": 7, "craft_sdk.__main__": 7, "craft_sdk.cli": 7, "craft_sdk.serve": 7, "craft_sdk.sweep": 7,
    "craft_sdk.integrations": 7, "craft_sdk.apps": 7,
}


def layer_of(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in LAYERS:
            return LAYERS[prefix]
    raise KeyError(module)


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_target(node: ast.ImportFrom, package: str) -> str:
    """The absolute module a ``from ... import`` names, relative levels resolved against ``package``."""
    if not node.level:
        return node.module or ""
    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(path: Path, name: str | None = None) -> list[tuple[int, str]]:
    """(line, imported module) for every craft_sdk import, lazy ones included (TYPE_CHECKING blocks skipped)."""
    tree = ast.parse(path.read_text())
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            target = import_target(node, package)
            if target.split(".")[0] != "craft_sdk":
                continue
            if node.module is None:  # from . import x: x may be a module
                found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, target))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "craft_sdk"]
    return found


def test_every_module_has_a_layer() -> None:
    for path in PACKAGE.rglob("*.py"):
        layer_of(module_name(path))


def test_no_module_imports_a_layer_above_it() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = module_name(path)
        for line, target in imports(path):
            if layer_of(target) > layer_of(me):
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} {me} (layer {layer_of(me)}) imports {target} (layer {layer_of(target)})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_check_catches_an_upward_import(tmp_path: Path) -> None:
    """The walker must see a lazy upward import (so the test above can fail)."""
    fake = PACKAGE / "deploy" / "classifier.py"
    lazy = [t for _, t in imports(fake)]
    assert "craft_sdk.adapter" in lazy
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from craft_sdk.api import tune\n")
    assert imports(probe, "craft_sdk.deploy.classifier") == [(2, "craft_sdk.api")]
    assert layer_of("craft_sdk.api") > layer_of("craft_sdk.deploy.classifier")


def test_importing_the_classifier_does_not_import_the_facade() -> None:
    """``import craft_sdk.deploy.classifier`` (module and everything it imports, lazily or not) never reaches ``api``."""
    seen, todo = set(), ["craft_sdk.deploy.classifier"]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        rel = Path(*mod.split(".")[1:])
        path = PACKAGE / rel.with_suffix(".py") if (PACKAGE / rel.with_suffix(".py")).exists() else PACKAGE / rel / "__init__.py"
        if path.exists():
            todo += [t for _, t in imports(path) if t != "craft_sdk"]
    assert "craft_sdk.api" not in seen and "craft_sdk.tuner.train" in seen


def _code_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]  # the docstring does not count
    return len({n.lineno for b in body for n in ast.walk(b) if hasattr(n, "lineno")})


@pytest.mark.parametrize("limit", [80])
def test_no_function_is_over_80_lines_of_code(limit: int) -> None:
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _code_lines(node) > limit:
                long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({_code_lines(node)} lines)")
    assert not long, "functions over 80 lines of code:\n" + "\n".join(long)


# --- the import graph: no cycles, folders are layers, no private names across modules (issue 21) ---


def _graph_imports(path: Path, name: str, modules: set[str]) -> list[tuple[int, str, str | None]]:
    """(line, imported module, imported name or None) for every craft_sdk import: module-level, lazy and
    ``if TYPE_CHECKING`` ones alike. ``from pkg import sub`` resolves to the submodule when it is one."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: list[tuple[int, str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = import_target(node, package)
            if target.split(".")[0] != "craft_sdk":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub, None) if sub in modules else (node.lineno, target, alias.name))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] == "craft_sdk"]
    return found


def _all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def import_graph() -> dict[str, set[str]]:
    modules = _all_modules()
    return {
        name: {t for _, t, _ in _graph_imports(path, name, set(modules)) if t in modules and t != name}
        for name, path in modules.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def folder_of(module: str) -> str:
    """The top-level folder a module lives in (``craft_sdk.tuner.loop`` -> ``craft_sdk.tuner``); a top-level
    file is its own folder."""
    return ".".join(module.split(".")[:2])


def test_there_is_no_import_cycle_between_modules() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles (lazy and TYPE_CHECKING imports count):\n" + "\n".join(" <-> ".join(c) for c in found)


def test_there_is_no_import_cycle_between_folders() -> None:
    folders: dict[str, set[str]] = {}
    for source, targets in import_graph().items():
        if source == "craft_sdk":
            continue  # the package root re-exports the public API; it is the top of every folder
        folders.setdefault(folder_of(source), set()).update(
            folder_of(t) for t in targets if t != "craft_sdk" and folder_of(t) != folder_of(source)
        )
    found = cycles(folders)
    assert not found, "folders importing each other:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_a_folder_is_one_layer() -> None:
    """Every module in a folder has the folder's layer: the folders show the README's layer table."""
    mixed = [
        f"{m} is layer {layer_of(m)} but its folder {folder_of(m)} is layer {layer_of(folder_of(m))}"
        for m in _all_modules()
        if m != "craft_sdk" and layer_of(m) != layer_of(folder_of(m))
    ]
    assert not mixed, "\n".join(mixed)


def test_no_private_name_is_imported_from_another_module() -> None:
    """``from craft_sdk.x import _helper`` couples two modules through a name one of them declared private.
    Private *modules* (``_fileio``) are package-private and may be imported inside the package."""
    modules = _all_modules()
    private = []
    for name, path in modules.items():
        for line, target, imported in _graph_imports(path, name, set(modules)):
            if imported and imported.startswith("_") and not imported.startswith("__") and target != name:
                private.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {imported} from {target}")
    assert not private, "private names imported across modules:\n" + "\n".join(private)


def test_the_graph_checks_can_fail(tmp_path: Path) -> None:
    """The cycle finder sees a two- and a three-module cycle, and the walker sees lazy and TYPE_CHECKING imports."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from craft_sdk.api import tune\n"
        "def f():\n    from craft_sdk.errors import _private\n"
    )
    got = _graph_imports(probe, "craft_sdk.probe", {"craft_sdk.api", "craft_sdk.errors"})
    assert (3, "craft_sdk.api", "tune") in got and (5, "craft_sdk.errors", "_private") in got


def test_one_composition_site() -> None:
    """client → tuner → adapter is composed in one place (issue 21): only ``craft_sdk/tuning.py`` runs a ``Tuner``
    and builds an ``Adapter`` from its result; the facade, the CLI's tune, the demo runner and
    ``CraftClassifier.fit`` call its ``tune_run`` (the classifier directly: the facade is a layer above it)."""
    sites: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
                if name in ("Tuner", "from_result"):
                    sites.setdefault(name, set()).add(path.relative_to(PACKAGE).as_posix())
    assert sites == {"Tuner": {"tuning.py"}, "from_result": {"tuning.py"}}
    for rel in ("api.py", "cli/_tune.py", "apps/demo.py", "deploy/classifier.py"):
        calls = [n.func for n in ast.walk(ast.parse((PACKAGE / rel).read_text())) if isinstance(n, ast.Call)]
        names = {f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None) for f in calls}
        assert "tune_run" in names, f"{rel} does not tune through tune_run"


def _module_path(module: str) -> Path | None:
    rel = Path(*module.split(".")[1:])
    for path in (PACKAGE / rel.with_suffix(".py"), PACKAGE / rel / "__init__.py"):
        if path.exists():
            return path
    return None


def test_the_deploy_package_imports_no_training_module() -> None:
    """deploy/ and everything it imports, transitively (the adapter package, client/, the foundations; lazy
    imports included, ``TYPE_CHECKING`` ones not: they never run), never reaches craft_sdk.tuner: the numpy
    refiner is craft_sdk.mlp, the projection craft_sdk.projection, context scoring, the context rules and
    canary probes are in client/. The one way in is ``CraftClassifier.fit``, which tunes through craft_sdk.tuning
    (lazily): the walk stops there, and at the package root (the facade's re-exports)."""
    stop = {"craft_sdk", "craft_sdk.tuning"}
    seen: dict[str, str] = {}  # module -> the module that imported it
    todo = [(m, "") for m in sorted(_all_modules()) if m.startswith(("craft_sdk.deploy", "craft_sdk.adapter"))]
    while todo:
        mod, parent = todo.pop()
        if mod in seen or mod in stop:
            continue
        seen[mod] = parent
        path = _module_path(mod)
        if path is not None:
            todo += [(t, mod) for _, t in imports(path)]
    found = sorted(f"{m} (imported by {seen[m]})" for m in seen if m == "craft_sdk.tuner" or m.startswith("craft_sdk.tuner."))
    assert found == [], found
    assert {"craft_sdk.adapter.format", "craft_sdk.projection", "craft_sdk.client.contexts", "craft_sdk.mlp"} <= set(seen)
    assert any(t == "craft_sdk.tuning" for _, t in imports(PACKAGE / "deploy" / "classifier.py"))
