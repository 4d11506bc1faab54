"""The ``craft-sdk`` command line: a thin layer over the public API.

Each command group lives in its own module and registers itself on ``app``.
"""

from __future__ import annotations

from . import (
    _check,  # noqa: F401  (registers check)
    _demo,  # noqa: F401  (registers demo)
    _serve,  # noqa: F401,E402  (registers serve)
    _sweep,  # noqa: F401,E402  (registers sweep)
    _tune,  # noqa: F401,E402  (registers tune / eval / inspect)
)
from ._app import app, main
from ._predict import predict as _predict_cmd  # noqa: F401  (registers predict / export-onnx)

__all__ = ["app", "main"]
