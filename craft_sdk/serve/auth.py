"""API-key authentication, written once: the FastAPI dependency every metered route depends on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from fastapi import Request, Security
from fastapi.security import HTTPBearer

from .checks import Problem
from .state import KeyRing

BEARER = HTTPBearer(auto_error=False, description="an API key issued by the model owner")


class HasKeys(Protocol):
    """What authentication reads: the server's current :class:`KeyRing` (``ServerState`` has one)."""

    keys: KeyRing


def authenticator(state: HasKeys) -> Callable[..., str]:
    """The dependency that returns the calling key's name, or answers 401 (``WWW-Authenticate: Bearer``).

    The key is checked in constant time over every key (:meth:`KeyRing.identify`); ``Security(BEARER)``
    only documents the scheme in the OpenAPI schema (``auto_error=False``: the 401 is this function's).
    """

    def authenticate(request: Request, _: Any = Security(BEARER)) -> str:
        key = state.keys.identify(request.headers.get("authorization"))
        if key is None:
            raise Problem(401, "unauthorized", "missing or invalid API key", headers={"WWW-Authenticate": "Bearer"})
        return key

    return authenticate
