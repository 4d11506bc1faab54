"""One helper per rule (issue 21): each rule of the product is written once, and every site uses it."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from craft_sdk.errors import AdapterError, ClientError, ConfigError, MissingDependencyError, require

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "craft_sdk"


def _pyproject() -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _packages(extra: str | None, project: dict) -> set[str]:
    """The normalised distribution names an extra installs (``None``: the base install), following ``craft-sdk[...]``."""
    reqs = list(project["dependencies"])
    if extra is not None:
        reqs += project["optional-dependencies"][extra]
    names: set[str] = set()
    for req in reqs:
        name = re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0].lower().replace("_", "-")
        if name == "craft-sdk":
            for inner in re.search(r"\[(.*)\]", req).group(1).split(","):  # type: ignore[union-attr]
                names |= _packages(inner.strip(), project)
        else:
            names.add(name)
    return names


def _require_calls() -> list[tuple[str, str, str | None]]:
    calls = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "require":
                module, extra = (ast.literal_eval(a) for a in node.args[:2])
                calls.append((f"{path.relative_to(ROOT)}:{node.lineno}", module, extra))
    return calls


def test_every_missing_dependency_site_names_an_extra_that_installs_it() -> None:
    project = _pyproject()["project"]
    stdlib = set(sys.stdlib_module_names)
    distributions = {"yaml": "pyyaml", "open-clip": "open-clip-torch"}
    calls = _require_calls()
    assert len(calls) >= 12, calls  # the sites issue 21 counted, all through the one helper
    for site, module, extra in calls:
        assert extra is None or extra in project["optional-dependencies"], f"{site}: no extra {extra!r} in pyproject.toml"
        top = module.split(".")[0]
        if top in stdlib:
            continue
        dist = distributions.get(top.replace("_", "-"), top.replace("_", "-"))
        assert dist in _packages(extra, project), f"{site}: craft-sdk[{extra}] does not install {dist}"


def test_no_site_raises_its_own_missing_dependency_error() -> None:
    """An ``except ImportError`` in the package may fall back (return None), never raise: raising is require's."""
    raising = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ExceptHandler) and getattr(node.type, "id", None) in ("ImportError", "ModuleNotFoundError"):
                if any(isinstance(n, ast.Raise) for n in ast.walk(node)):
                    raising.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert raising == ["craft_sdk/errors.py:" + str(_line_of_require_handler())]


def _line_of_require_handler() -> int:
    tree = ast.parse((PACKAGE / "errors.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "require")
    return next(n.lineno for n in ast.walk(fn) if isinstance(n, ast.ExceptHandler))


def test_require_names_the_install_and_stays_catchable_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    assert require("json", "train", "anything") is json
    monkeypatch.setitem(sys.modules, "yaml", None)  # as if not installed
    with pytest.raises(MissingDependencyError) as info:
        require("yaml", "train", "reading a YAML sweep spec", otherwise="use .toml / .json")
    assert str(info.value) == (
        "reading a YAML sweep spec needs pyyaml: pip install 'craft-sdk[train]' (or pip install pyyaml); or use .toml / .json"
    )
    for before in (ImportError, ConfigError, AdapterError, ClientError):  # each type the sites raised before
        with pytest.raises(before):
            require("yaml", "train", "x")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingDependencyError, match=r"needs onnxruntime: pip install craft-sdk \(or pip install onnxruntime\)$"):
        require("onnxruntime", None, "running refiner.onnx")


def test_require_names_the_missing_dependency_of_a_dependency(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "craft_outer_pkg.py").write_text("import craft_inner_missing_pkg\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingDependencyError, match=r"^X needs craft_inner_missing_pkg: pip install 'craft-sdk\[hub\]'"):
        require("craft_outer_pkg", "hub", "X")


# ------------------------------------------------------------------ model-string schemes


def test_each_model_scheme_resolves_through_the_one_table(tiny_model_dir: Path) -> None:
    from craft_sdk import create_client
    from craft_sdk.cli._app import is_remote as cli_is_remote
    from craft_sdk.client.chat import ChatVLMClient
    from craft_sdk.client.embed import EmbeddingClient
    from craft_sdk.client.http import HTTPClient
    from craft_sdk.client.openclip import OpenCLIPClient
    from craft_sdk.client.schemes import SCHEMES, is_remote, parse_model
    from craft_sdk.client.zeroshot import TextOnlyClient, ZeroShotAPIClient

    local = f"local-dir:{tiny_model_dir}"
    examples = {  # one model string per row of the table, and the client create_client builds for it
        "text-only:": (f"text-only:{local}", TextOnlyClient, False),
        "zeroshot+http://": ("zeroshot+http://127.0.0.1:9/v1/zero-shot/m", ZeroShotAPIClient, True),
        "zeroshot+https://": ("zeroshot+https://127.0.0.1:9/v1/zero-shot/m", ZeroShotAPIClient, True),
        "chat+http://": ("chat+http://127.0.0.1:9/v1?model=m", ChatVLMClient, True),
        "chat+https://": ("chat+https://127.0.0.1:9/v1?model=m", ChatVLMClient, True),
        "embed+http://": ("embed+http://127.0.0.1:9/v1?model=m", EmbeddingClient, True),
        "embed+https://": ("embed+https://127.0.0.1:9/v1?model=m", EmbeddingClient, True),
        "http://": ("http://127.0.0.1:9", HTTPClient, True),
        "https://": ("https://127.0.0.1:9", HTTPClient, True),
        "local-dir:": (local, OpenCLIPClient, False),
        "demo": ("demo", None, False),
        "craft-demo-vlm": ("craft-demo-vlm", None, False),
    }
    assert sorted(examples) == sorted(s.prefix for s in SCHEMES)
    for scheme in SCHEMES:
        model, cls, remote = examples[scheme.prefix]
        ref = parse_model(model)
        assert (ref.kind, ref.target) == (scheme.kind, model.removeprefix(scheme.strip)), scheme
        assert is_remote(model) is remote and cli_is_remote(model) is remote and is_remote(f"text-only:{model}") is remote
        if cls is not None:
            client = create_client(model, **({"api_key": "k" * 16} if remote else {}))
            assert type(client) is cls, (model, type(client))
    assert parse_model("ViT-B-32").kind == "open_clip" and parse_model("demo2").kind == "open_clip"
    assert parse_model("ftp://x").kind == "open_clip" and not is_remote("ftp://x")


def test_no_module_parses_a_model_scheme_itself() -> None:
    """Outside client/schemes.py no ``startswith`` / ``removeprefix`` / ``==`` tests a scheme's prefix."""
    from craft_sdk.client.schemes import SCHEMES

    prefixes = {s.prefix for s in SCHEMES if not s.exact} | {s.strip for s in SCHEMES if s.strip}
    names = {s.prefix for s in SCHEMES if s.exact}  # compared whole (a model id may start with one: card.py)
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "schemes.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("startswith", "removeprefix"):
                args = [a for arg in node.args for a in ast.walk(arg) if isinstance(a, ast.Constant)]
                found += [f"{path.relative_to(ROOT)}:{node.lineno}" for a in args if a.value in prefixes]
            if isinstance(node, ast.Compare) and getattr(node.left, "attr", None) != "kind" and any(isinstance(c, ast.Constant) and c.value in prefixes | names
                                                     for n in node.comparators for c in ast.walk(n)):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []


# ------------------------------------------------------------------ adapter file names


def test_adapter_file_names_are_defined_once(tmp_path: Path) -> None:
    from craft_sdk import adapter
    from craft_sdk.adapter import card, hub
    from craft_sdk.adapter.files import ADAPTER_FILES, CARD_FILE, CONFIG_FILE, ONNX_FILE, WEIGHTS_FILE

    assert ADAPTER_FILES == ("adapter_config.json", "adapter_model.safetensors", "refiner.onnx", "README.md")
    assert (adapter.CONFIG_FILE, adapter.WEIGHTS_FILE, adapter.ONNX_FILE, card.CARD_FILE) == (CONFIG_FILE, WEIGHTS_FILE, ONNX_FILE, CARD_FILE)
    assert hub.ADAPTER_FILES is ADAPTER_FILES
    literal = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).as_posix() == "adapter/files.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and node.value in ADAPTER_FILES:
                literal.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert literal == []


# ------------------------------------------------------------------ API-key authentication


def test_every_metered_route_authenticates_through_the_one_dependency(tiny_client) -> None:  # noqa: ANN001
    """Every route but health answers 401 without a valid key, and documents the one bearer scheme (serve/auth.py)."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from craft_sdk.serve import create_app

    app = create_app(tiny_client, {"alice": "k" * 32})
    paths = app.openapi()["paths"]
    routes = [(m.upper(), p) for p, ops in paths.items() for m in ops if p != "/v1/health"]
    assert {"/v1/predict", "/v1/usage", "/v1/chat/completions", "/v1/embeddings", "/v1/zero-shot/{name}"} <= set(paths)
    with TestClient(app) as c:
        for method, path in routes:
            assert paths[path][method.lower()]["security"] == [{"HTTPBearer": []}], path
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k" * 32}):
                got = c.request(method, path.replace("{name}", "m"), headers=headers)
                assert got.status_code == 401 and got.headers["www-authenticate"] == "Bearer", (path, got.status_code)
        assert c.get("/v1/usage", headers={"Authorization": "Bearer " + "k" * 32}).status_code == 200
        assert "security" not in paths["/v1/health"]["get"] and c.get("/v1/health").status_code == 200


# ------------------------------------------------------------------ the query cost of one call


def test_the_ledger_and_the_server_meter_bill_the_one_query_cost(tiny_client) -> None:  # noqa: ANN001
    """A MeteredClient over HTTP and the server's meter count the same queries, both from wire.query_cost."""
    pytest.importorskip("fastapi")
    from conftest import random_images

    from craft_sdk.client.http import HTTPClient
    from craft_sdk.client.ledger import MeteredClient, QueryLedger
    from craft_sdk.serve import BackgroundServer, create_app
    from craft_sdk.wire import query_cost

    caps = tiny_client.capabilities()
    rng = np.random.default_rng(0)
    one = rng.normal(0, 0.01, (caps.n_ctx, caps.ctx_dim)).astype(np.float32)
    batch = rng.normal(0, 0.01, (3, caps.n_ctx, caps.ctx_dim)).astype(np.float32)
    assert [query_cost(o) for o in (None, one, batch)] == [1, 1, 3]
    key = "k" * 32
    with BackgroundServer(create_app(tiny_client, {"alice": key})) as srv, HTTPClient(srv.url, api_key=key) as http:
        metered = MeteredClient(http, QueryLedger(100))
        images = random_images(2, seed=5)
        for offsets in (None, one, batch):
            before = srv.app.state.craft.store.usage("alice")["used"]
            was = metered.ledger.used
            metered.predict(images, ["a", "b"], offsets=offsets)
            billed = srv.app.state.craft.store.usage("alice")["used"] - before
            assert billed == metered.ledger.used - was == query_cost(offsets)
