"""The model owner's side of the black box: ``craft-sdk serve`` (needs the ``[serve]`` extra).

``import craft_sdk.serve`` imports neither fastapi nor uvicorn; they are loaded
when an app is created or run.
"""

from __future__ import annotations

from .app import create_app, default_route_sets
from .checks import Problem
from .config import ServerConfig, load_api_keys
from .deps import ServerState
from .runner import BackgroundServer, is_loopback, run_server
from .store import MemoryStore, SQLiteStore, Store, open_store

__all__ = [
    "BackgroundServer",
    "MemoryStore",
    "Problem",
    "SQLiteStore",
    "ServerConfig",
    "ServerState",
    "Store",
    "create_app",
    "default_route_sets",
    "is_loopback",
    "load_api_keys",
    "open_store",
    "run_server",
]
