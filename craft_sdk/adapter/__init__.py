"""The adapter layer: what a tuned adapter is, on disk, on the Hub, as a model card and as ONNX.

Modules, lowest first (none imports one after it): ``files`` (the file names), ``card`` (model
cards), ``hub`` (the Hugging Face Hub round trip), ``io`` (atomic disk I/O), ``runtime`` (running an
exported ``refiner.onnx``), ``format`` (the :class:`Adapter` and :class:`AdapterConfig` dataclasses,
their validation, save/load/push), ``export`` (writing ``refiner.onnx``). Every name importable from
``craft_sdk.adapter`` before the split still is, from here.
"""

from __future__ import annotations

from .files import ADAPTER_FILES, CARD_FILE, CONFIG_FILE, ONNX_FILE, WEIGHTS_FILE
from .format import (
    CANARY_TENSOR,
    FORMAT_VERSION,
    MAX_PROJECTION_ELEMENTS,
    PROMPT_KINDS,
    Adapter,
    AdapterConfig,
    AnyPromptSpec,
    CalibrationSpec,
    DiscretePromptSpec,
    EnsemblePromptSpec,
    PromptSpec,
    RefinerSpec,
    check_compatible,
    describe_prompt,
    provider_usage,
)

__all__ = [
    "ADAPTER_FILES", "CANARY_TENSOR", "CARD_FILE", "CONFIG_FILE", "FORMAT_VERSION", "MAX_PROJECTION_ELEMENTS", "ONNX_FILE",
    "PROMPT_KINDS", "WEIGHTS_FILE", "Adapter", "AdapterConfig", "AnyPromptSpec", "CalibrationSpec", "DiscretePromptSpec",
    "EnsemblePromptSpec", "PromptSpec", "RefinerSpec", "check_compatible", "describe_prompt", "provider_usage",
]
