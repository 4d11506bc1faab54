"""The files of an adapter directory, named once (what ``save_pretrained`` writes, the Hub moves, the card is)."""

from __future__ import annotations

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ONNX_FILE = "refiner.onnx"  # the exported refiner (craft-sdk export)
CARD_FILE = "README.md"  # the model card
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE, ONNX_FILE, CARD_FILE)
