"""The old import paths of issue 21's moves still work for one release: they warn and give the same objects."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import suite_env

from craft_sdk import _deprecation

MOVED = dict(_deprecation.MOVED)


@pytest.mark.parametrize("old, new", sorted(MOVED.items()))
def test_an_old_path_warns_and_is_the_new_module(old: str, new: str) -> None:
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    moved = [w for w in caught if issubclass(w.category, DeprecationWarning) and old in str(w.message)]
    assert len(moved) == 1 and f"moved to {new}" in str(moved[0].message)
    assert module is importlib.import_module(new) and module.__name__ == new
    public = [n for n in vars(module) if not n.startswith("_")]
    assert public and all(getattr(module, n) is getattr(sys.modules[new], n) for n in public)


def test_the_moved_table_is_every_old_path() -> None:
    assert MOVED == {
        "craft_sdk.classifier": "craft_sdk.deploy.classifier", "craft_sdk.stream": "craft_sdk.deploy.stream",
        "craft_sdk.sinks": "craft_sdk.deploy.sinks", "craft_sdk.canary": "craft_sdk.deploy.canary",
        "craft_sdk.export": "craft_sdk.adapter.export", "craft_sdk.hub": "craft_sdk.adapter.hub",
        "craft_sdk.card": "craft_sdk.adapter.card", "craft_sdk.demo.runner": "craft_sdk.apps.demo",
        "craft_sdk.tuner.mlp": "craft_sdk.mlp", "craft_sdk.tuner.canary": "craft_sdk.client.canary",
        "craft_sdk.tuner.projection": "craft_sdk.projection",
    }
    for old in MOVED:  # the old files are gone (git records plain renames), so the finder is what answers
        assert not (Path(_deprecation.__file__).parent.parent / (old.replace(".", "/") + ".py")).exists()


def test_an_unknown_module_is_still_an_import_error() -> None:
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("craft_sdk.no_such_module")


def test_the_old_names_are_the_same_objects() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from craft_sdk.classifier import CraftClassifier
        from craft_sdk.demo.runner import run_demo
        from craft_sdk.export import OnnxRefiner, export_onnx
        from craft_sdk.hub import resolve_adapter_dir
        from craft_sdk.sinks import PredictionSink
        from craft_sdk.stream import predict_stream
    import craft_sdk
    from craft_sdk.adapter.export import export_onnx as new_export
    from craft_sdk.adapter.hub import resolve_adapter_dir as new_resolve
    from craft_sdk.adapter.runtime import OnnxRefiner as new_refiner
    from craft_sdk.apps.demo import run_demo as new_run_demo
    from craft_sdk.deploy import PredictionSink as new_sink
    from craft_sdk.deploy import predict_stream as new_stream

    assert CraftClassifier is craft_sdk.CraftClassifier and export_onnx is new_export is craft_sdk.export_onnx
    assert (OnnxRefiner, resolve_adapter_dir, run_demo, PredictionSink, predict_stream) == (
        new_refiner, new_resolve, new_run_demo, new_sink, new_stream)


def test_the_package_and_the_new_paths_import_without_a_deprecation_warning() -> None:
    """Nothing inside craft_sdk imports an old path (each would warn at import)."""
    code = (
        "import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
        "import craft_sdk, craft_sdk.cli, craft_sdk.deploy, craft_sdk.adapter.export, craft_sdk.apps.demo, craft_sdk.api\n"
        "import craft_sdk.tuner.train, craft_sdk.tuner.templates\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=suite_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_adapter_raw_scores_is_deprecated_for_the_deploy_query_policy() -> None:
    """The query policy moved to deploy/query.py; the old method warns and sends the same queries (3 for an ensemble)."""
    import numpy as np
    from test_text_prompts import Spy, ensemble_adapter, pictures

    from craft_sdk.deploy.query import raw_scores

    adapter, images = ensemble_adapter(), pictures(4)[0]
    old_client, new_client = Spy(), Spy()
    with pytest.warns(DeprecationWarning, match="deploy.query.raw_scores"):
        old = adapter.raw_scores(old_client, images)
    new = raw_scores(adapter, new_client, images)
    assert old.shape == (4, len(adapter.config.class_names)) and len(new_client.sent) == 3
    np.testing.assert_array_equal(old, new)
    assert old_client.sent == new_client.sent


def test_importing_an_old_path_leaves_the_new_module_its_own_spec_and_reload_works() -> None:
    """The import system sets ``__spec__`` on what create_module returns; the finder puts the new one back."""
    code = (
        "import importlib, warnings; warnings.simplefilter('ignore', DeprecationWarning)\n"
        "import craft_sdk.classifier as old, craft_sdk.deploy.classifier as new\n"
        "assert old is new and new.__spec__.name == 'craft_sdk.deploy.classifier', new.__spec__\n"
        "new.MARK = 1\n"
        "again = importlib.reload(new)\n"
        "assert again is new and new.__name__ == 'craft_sdk.deploy.classifier' and new.__spec__.name == new.__name__\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=suite_env(), timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_python_dash_m_on_an_old_path_runs_the_new_module_without_a_traceback() -> None:
    out = subprocess.run([sys.executable, "-W", "always::DeprecationWarning", "-m", "craft_sdk.tuner.mlp"],
                         capture_output=True, text=True, env=suite_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and out.stderr.count("craft_sdk.tuner.mlp moved to craft_sdk.mlp") == 1
