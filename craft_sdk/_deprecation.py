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
}


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old names of moved modules; loading one warns and returns the new module."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new}; import it from there (the old path is removed in craft-sdk {REMOVED_IN})",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(new)  # its attributes (__name__, __spec__...) are kept as they are

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module is the new one, already imported."""


def install() -> None:
    """Put the finder at the front of ``sys.meta_path`` (once); it answers only the names in :data:`MOVED`."""
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())
