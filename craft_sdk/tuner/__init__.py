"""The tuner: prompt generation (CMA-ES), prediction refinement (MLP) and their alternation.

``TuneConfig`` and the projection are importable without torch; ``Tuner`` needs
the ``[train]`` extra (torch, cma).
"""

from __future__ import annotations

from .config import MODES, TuneConfig

__all__ = ["MODES", "TuneConfig"]
