"""Shared fixtures: tiny random-init open_clip models saved as local-dir folders, small image sets."""

from __future__ import annotations

import json
import os
from pathlib import Path

# The suite decides its own thread count, not the environment (issue 19): float reductions in torch, OpenMP,
# MKL and OpenBLAS change with the number of threads, so a determinism test whose two runs used different
# counts (this process and a child, or a developer's exported OMP_NUM_THREADS and a new user's unset one)
# compares different floats. Set before torch is imported, so this process and every subprocess a test
# starts (they inherit os.environ) run at one thread; torch.set_num_threads below covers an earlier import.
SUITE_THREADS = 1
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
for _var in THREAD_VARS:
    os.environ[_var] = str(SUITE_THREADS)

import numpy as np
import pytest
from PIL import Image

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16, "pool_type": "avg"},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def save_tiny_model(directory: Path, seed: int = 0, cfg: dict | None = None) -> Path:
    """Create a random-init tiny CLIP and save it as an open_clip local-dir (config + safetensors)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    cfg = cfg or TINY_CFG
    directory.mkdir(parents=True, exist_ok=True)
    preprocess = {"size": cfg["vision_cfg"]["image_size"], "mean": [0.5] * 3, "std": [0.5] * 3}
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{directory}")  # config only: random init
    with torch.no_grad():  # a less degenerate random model: diverse image features, strong token embeddings
        tower = getattr(model, "text", model)
        tower.token_embedding.weight.normal_(0, 0.5)
        model.logit_scale.fill_(float(np.log(50.0)))
        model.visual.conv1.weight.mul_(10.0)
        model.visual.positional_embedding.mul_(0.1)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "open_clip_model.safetensors"))
    return directory


def random_images(n: int, seed: int, size: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


CLASS_NAMES = ("annual crop land", "forest", "river", "sea or lake", "highway", "pasture land")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-clip")


@pytest.fixture(scope="session")
def tiny_client(tiny_model_dir: Path):
    from craft_sdk.client.openclip import OpenCLIPClient

    return OpenCLIPClient(f"local-dir:{tiny_model_dir}")


def suite_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess a test starts: this process's, with the suite's thread count explicit."""
    return {**os.environ, **{var: str(SUITE_THREADS) for var in THREAD_VARS}, **extra}


def _torch():  # noqa: ANN202
    try:  # the torch-free deploy venv runs tests/test_deploy_torchfree.py with this conftest
        import torch
    except ImportError:
        return None
    return torch


def pytest_configure(config: pytest.Config) -> None:
    torch = _torch()
    if torch is not None:
        torch.set_num_threads(SUITE_THREADS)


@pytest.fixture(autouse=True)
def _suite_thread_count():  # noqa: ANN202
    """Every test starts at the suite's torch thread count, and a test that changes it cannot leak the change."""
    torch = _torch()
    if torch is not None and torch.get_num_threads() != SUITE_THREADS:
        torch.set_num_threads(SUITE_THREADS)
    yield
