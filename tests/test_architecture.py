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
    # 0: foundations shared by every layer (errors, file and score helpers, images, datasets, wire codec, the numpy refiner)
    "craft_sdk.errors": 0, "craft_sdk._version": 0, "craft_sdk._fileio": 0, "craft_sdk._lru": 0, "craft_sdk._deprecation": 0,
    "craft_sdk.scores": 0, "craft_sdk.images": 0, "craft_sdk.data": 0, "craft_sdk.wire": 0, "craft_sdk.mlp": 0,
    "craft_sdk.demo": 0,  # shipped data (tasks, synth, assets)
    "craft_sdk.client": 1,  # the only door to the model (and what is scored through it: contexts, canary probes)
    "craft_sdk.tuner": 2,  # prompt search + refiner training
    "craft_sdk.adapter": 3,  # format, io, hub, card, ONNX export/runtime
    "craft_sdk.deploy": 4,  # classifier, stream, sinks, canary checks, the query policy
    "craft_sdk.api": 5,  # the verb-named facade
    # 6: applications built on the public API
    "craft_sdk": 6, "craft_sdk.__main__": 6, "craft_sdk.cli": 6, "craft_sdk.serve": 6, "craft_sdk.sweep": 6,
    "craft_sdk.integrations": 6, "craft_sdk.apps": 6,
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
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
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
