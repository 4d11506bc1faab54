"""Demo tasks and the embedded demo VLM, for trying craft-sdk without downloads.

``load_demo_task("digits")`` gives a few-shot split of the real UCI handwritten
digits; ``noisy-shapes`` and ``digits-on-texture`` are procedurally generated under
a shift from the demo model's pretraining. :func:`demo_vlm_dir` is a tiny
open_clip CLIP pretrained on CPU on :mod:`craft_sdk.demo.synth` images; load it
with ``open_clip.create_model_and_transforms("local-dir:" + str(demo_vlm_dir()))``.
"""

from __future__ import annotations

from pathlib import Path

from .tasks import ASSETS_DIR, DemoTaskInfo, demo_task_info, list_demo_tasks, load_demo_task

__all__ = ["DemoTaskInfo", "demo_task_info", "demo_vlm_dir", "list_demo_tasks", "load_demo_task"]


def demo_vlm_dir() -> Path:
    """Folder of the shipped demo VLM (open_clip ``local-dir`` layout, with ``checksum.sha256``)."""
    return ASSETS_DIR / "demo-vlm"
