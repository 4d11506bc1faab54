"""Old import paths kept for one release (issue 21's moves): each warns once and is the module it moved to.

The old files are gone (the moves are plain renames in git); an import finder at the front of
``sys.meta_path`` (installed by ``craft_sdk/__init__.py``) answers the old names in :data:`MOVED`, and only
those (first, so that an editable install's finder cannot hand out a stale copy of an old file):
``import craft_sdk.classifier`` warns (:class:`DeprecationWarning`) and yields
``craft_sdk.deploy.classifier`` itself, so every object, and every monkeypatch of it, is the same.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType

REMOVED_IN = "0.2"

MOVED: dict[str, str] = {
    "craft_sdk.classifier": "craft_sdk.deploy.classifier",
    "craft_sdk.stream": "craft_sdk.deploy.stream",
    "craft_sdk.sinks": "craft_sdk.deploy.sinks",
    "craft_sdk.canary": "craft_sdk.deploy.canary",
    "craft_sdk.export": "craft_sdk.adapter.export",
    "craft_sdk.hub": "craft_sdk.adapter.hub",
    "craft_sdk.card": "craft_sdk.adapter.card",
    "craft_sdk.demo.runner": "craft_sdk.apps.demo",
    "craft_sdk.tuner.mlp": "craft_sdk.mlp",
    "craft_sdk.tuner.canary": "craft_sdk.client.canary",
    "craft_sdk.tuner.projection": "craft_sdk.projection",
}


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old names of moved modules; loading one warns and returns the new module."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED[spec.name]
        _warn(spec.name)
        module = importlib.import_module(new)
        # the import system sets module.__spec__ = spec (the old name's) between create_module and exec_module
        # whatever the module holds; keep the new module's own spec here and put it back in exec_module, so
        # importlib.reload(new module) still reloads it under its own name
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run (the module is the new one, already imported): put its own ``__spec__`` back."""
        old_spec = module.__spec__
        if old_spec is not None and isinstance(old_spec.loader_state, importlib.machinery.ModuleSpec):
            module.__spec__ = old_spec.loader_state

    def get_code(self, fullname: str) -> object:
        """``python -m <old name>`` runs the new module's code (after the warning)."""
        _warn(fullname)
        new_spec = importlib.util.find_spec(MOVED[fullname])
        loader = new_spec.loader if new_spec is not None else None
        if loader is None or not hasattr(loader, "get_code"):
            raise ImportError(f"{MOVED[fullname]} has no code to run")
        return loader.get_code(MOVED[fullname])


def _warn(old: str) -> None:
    warnings.warn(
        f"{old} moved to {MOVED[old]}; import it from there (the old path is removed in craft-sdk {REMOVED_IN})",
        DeprecationWarning,
        stacklevel=3,
    )


def install() -> None:
    """Put the finder at the front of ``sys.meta_path`` (once); it answers only the names in :data:`MOVED`."""
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())
