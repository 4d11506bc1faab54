"""The ``craft-sdk`` command line: a thin layer over the public API.

Each command group lives in its own module and registers itself on ``app``.
"""

from __future__ import annotations

from . import _demo  # noqa: F401  (registers demo)
from . import _tune  # noqa: F401,E402  (registers tune / eval / inspect)
from . import _sweep  # noqa: F401,E402  (registers sweep)
from . import _serve  # noqa: F401,E402  (registers serve)
from ._app import app, main
from ._predict import predict as _predict_cmd  # noqa: F401  (registers predict / export-onnx)

__all__ = ["app", "main"]
