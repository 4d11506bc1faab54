"""The model owner's side of the black box: ``craft-sdk serve`` (needs the ``[serve]`` extra).

``import craft_sdk.serve`` imports neither fastapi nor uvicorn; they are loaded
when an app is created or run.
"""

from __future__ import annotations

from .app import Problem, create_app
from .config import ServerConfig, load_api_keys
from .runner import BackgroundServer, is_loopback, run_server

__all__ = ["BackgroundServer", "Problem", "ServerConfig", "create_app", "is_loopback", "load_api_keys", "run_server"]
