"""Pretrain the tiny demo VLM shipped in ``craft_sdk/demo/assets/demo-vlm/`` (CPU, under an hour).

A small open_clip ``CLIP`` (ViT image tower on 32×32 px, standard causal text
transformer with argmax pooling and the standard 49,408-token BPE tokenizer) is
trained with the symmetric CLIP loss and AdamW on captioned images from
:mod:`craft_sdk.demo.synth`. Batch ``i`` of step ``s`` depends only on
``(seed, s, i)``, so a run is reproducible from ``--seed`` and ``--steps`` on the
same machine and thread count, with the same torch and Pillow and the DejaVu
fonts (/usr/share/fonts/truetype/dejavu/) that the generator samples from. The
result is written as an open_clip local-dir (``open_clip_config.json`` + fp16
``open_clip_model.safetensors`` + ``checksum.sha256``), then loaded back through
open_clip and scored zero-shot ("a photo of a {name}.") on every demo task; the
numbers go to ``zero_shot.json`` and ``TRAINING.md``. ``--eval-only`` re-scores
an exported model after the demo tasks change.

Example::

    PYTHONPATH=. python examples/pretrain_demo_vlm.py --seed 0
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

# Sleep instead of spinning in OpenMP barriers: on a shared 2-core machine spinning threads make
# each step ~4x slower whenever another process holds a core. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from open_clip.transform import PreprocessCfg, image_transform_v2  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from craft_sdk.demo import list_demo_tasks, load_demo_task  # noqa: E402
from craft_sdk.demo.synth import SynthGenerator  # noqa: E402

logger = logging.getLogger("pretrain_demo_vlm")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "craft_sdk" / "demo" / "assets" / "demo-vlm"
TEMPLATE = "a photo of a {}."
EVAL_SHOTS, EVAL_SEED = 16, 0
MODEL_CFG: dict[str, Any] = {
    "embed_dim": 128,
    "quick_gelu": False,
    "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 128, "head_width": 32, "layers": 4, "mlp_ratio": 4.0},
    "text_cfg": {
        "context_length": 16,
        "vocab_size": 49408,
        "width": 96,
        "heads": 4,
        "layers": 4,
        "mlp_ratio": 4.0,
        "pool_type": "argmax",
        "no_causal_mask": False,
    },
}
PREPROCESS_CFG: dict[str, Any] = {
    "size": 32,
    "mode": "RGB",
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
    "fill_color": 0,
}

_GEN: SynthGenerator | None = None


def _worker_batch(args: tuple[int, int, int]) -> tuple[np.ndarray, list[str]]:
    global _GEN
    if _GEN is None:
        _GEN = SynthGenerator()
    n, seed, step = args
    return _GEN.batch(n, seed, step)


class Batches:
    """Synth batches for steps ``start..stop-1``, generated ``prefetch`` ahead in worker processes."""

    def __init__(self, n: int, seed: int, start: int, stop: int, workers: int, prefetch: int = 4) -> None:
        self.args = [(n, seed, s) for s in range(start, stop)]
        self.pool = mp.get_context("spawn").Pool(workers) if workers > 0 else None
        self.prefetch = prefetch

    def __iter__(self):  # type: ignore[no-untyped-def]
        if self.pool is None:
            yield from map(_worker_batch, self.args)
            return
        queue: collections.deque = collections.deque()
        todo = iter(self.args)
        for a in todo:
            queue.append(self.pool.apply_async(_worker_batch, (a,)))
            if len(queue) >= self.prefetch:
                break
        while queue:
            result = queue.popleft().get()
            nxt = next(todo, None)
            if nxt is not None:
                queue.append(self.pool.apply_async(_worker_batch, (nxt,)))
            yield result

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] to the normalized float [N, 3, H, W] that ``PREPROCESS_CFG`` produces."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(PREPROCESS_CFG["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(PREPROCESS_CFG["std"]).view(1, 3, 1, 1)
    return (x - mean) / std


def clip_loss(model: open_clip.CLIP, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the batch (CLIP)."""
    img = F.normalize(model.encode_image(images), dim=-1)
    txt = F.normalize(model.encode_text(texts), dim=-1)
    logits = model.logit_scale.exp() * img @ txt.T
    target = torch.arange(len(images), device=images.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def param_groups(model: open_clip.CLIP, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only; gains, biases, logit scale and the token embedding are not decayed."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        skip = p.ndim < 2 or "logit_scale" in name or "token_embedding" in name or "positional" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 5% of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


@torch.no_grad()
def zero_shot(model: open_clip.CLIP, preprocess: Any, tokenizer: Any, task: str) -> float:
    """Zero-shot accuracy (%) of ``TEMPLATE`` on the test split of demo task ``task``."""
    model.eval()
    splits = load_demo_task(task, shots=EVAL_SHOTS, seed=EVAL_SEED)
    test = splits.test
    assert test is not None
    txt = F.normalize(model.encode_text(tokenizer([TEMPLATE.format(c) for c in test.class_names])), dim=-1)
    correct = 0
    for i in range(0, len(test), 512):
        x = torch.stack([preprocess(im) for im in test.images[i : i + 512]])
        pred = (F.normalize(model.encode_image(x), dim=-1) @ txt.T).argmax(1).numpy()
        correct += int((pred == test.labels[i : i + 512]).sum())
    return 100.0 * correct / len(test)


def export(model: open_clip.CLIP, out: Path) -> str:
    """Write the open_clip local-dir (fp16 weights) and return the weights' sha256."""
    out.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG}
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().cpu().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    weights = out / "open_clip_model.safetensors"
    # one metadata key: safetensors writes several in a random order, which would make the sha256 unstable
    save_file(state, str(weights), metadata={"format": "pt"})
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    (out / "checksum.sha256").write_text(digest + "\n")
    return digest


def evaluate_export(out: Path) -> dict[str, float]:
    """Load ``out`` back through open_clip (``local-dir:``) and score every demo task zero-shot."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    return {task: zero_shot(model, preprocess, tokenizer, task) for task in list_demo_tasks()}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1600, help="planned optimizer steps (sets the LR schedule)")
    p.add_argument("--minutes", type=float, default=45.0, help="wall-clock cap on training; stops early if hit")
    p.add_argument("--stop-step", type=int, default=None, help="stop after this many steps (to replay a capped run)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="torch device; the shipped model was trained on cpu")
    p.add_argument("--workers", type=int, default=1, help="data-generation processes (0: in the main process)")
    p.add_argument("--eval-every", type=int, default=400)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--snapshot-dir", type=Path, default=None, help="also export the model here at every eval")
    p.add_argument("--log-file", type=Path, default=Path("pretrain_demo_vlm.log"))
    p.add_argument("--eval-only", action="store_true", help="only re-score the model in --out on the demo tasks")
    return p.parse_args()


def setup_logging(log_file: Path) -> None:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in (logging.StreamHandler(sys.stderr), logging.FileHandler(log_file)):
        handler.setFormatter(fmt)
        root.addHandler(handler)


def train(args: argparse.Namespace, model: open_clip.CLIP, tokenizer: Any) -> dict[str, Any]:
    """The training loop; returns what TRAINING.md records."""
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    stop = min(args.steps, args.stop_step or args.steps)
    batches = Batches(args.batch_size, args.seed, 0, stop, args.workers)
    losses: collections.deque[float] = collections.deque(maxlen=50)
    t0, step, capped = time.time(), 0, False
    try:
        for step, (images, captions) in enumerate(batches, start=1):
            model.train()
            for group in opt.param_groups:
                group["lr"] = lr_at(step - 1, args.steps, args.lr, args.warmup)
            loss = clip_loss(model, to_tensor(images).to(args.device), tokenizer(captions).to(args.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.item())
            elapsed = time.time() - t0
            if step % 25 == 0 or step == stop:
                logger.info(
                    "step %d/%d loss %.4f (avg50 %.4f) lr %.2e scale %.1f  %.2f s/step  %.1f min",
                    step, stop, losses[-1], np.mean(losses), opt.param_groups[0]["lr"],
                    model.logit_scale.exp().item(), elapsed / step, elapsed / 60,
                )  # fmt: skip
            if args.eval_every and step % args.eval_every == 0:
                _monitor(model.cpu(), tokenizer, args.snapshot_dir)
                model.to(args.device)
            if elapsed > args.minutes * 60:
                logger.warning("wall-clock cap of %.1f min reached at step %d of %d", args.minutes, step, stop)
                capped = True
                break
    finally:
        batches.close()
    return {"steps": step, "planned_steps": args.steps, "capped": capped,
            "final_loss": float(np.mean(losses)), "last_loss": losses[-1], "train_minutes": (time.time() - t0) / 60}  # fmt: skip


def _monitor(model: open_clip.CLIP, tokenizer: Any, snapshot_dir: Path | None) -> None:
    preprocess = image_transform_v2(PreprocessCfg(**PREPROCESS_CFG), is_train=False)
    acc = {t: round(zero_shot(model, preprocess, tokenizer, t), 1) for t in list_demo_tasks()}
    logger.info("zero-shot (fp32, in memory): %s", acc)
    if snapshot_dir is not None:
        export(model, snapshot_dir)


def write_zero_shot(out: Path, acc: dict[str, float]) -> None:
    """``zero_shot.json``: the numbers the tests check the shipped model against."""
    record = {
        "template": TEMPLATE, "shots": EVAL_SHOTS, "seed": EVAL_SEED, "split": "test",
        "accuracy": {k: round(v, 2) for k, v in acc.items()}, "chance": {t: 10.0 for t in acc},
    }  # fmt: skip
    (out / "zero_shot.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _table_rows(acc: dict[str, float]) -> str:
    return "\n".join(f"| `{t}` | {v:.2f} | 10.0 |" for t, v in acc.items())


def refresh_zero_shot(out: Path) -> dict[str, float]:
    """Re-score an exported model (after the demo tasks changed) and update its records in place."""
    acc = evaluate_export(out)
    write_zero_shot(out, acc)
    doc = out / "TRAINING.md"
    lines = [ln for ln in doc.read_text().splitlines() if not re.fullmatch(r"\| `[^`]+` \| [\d.]+ \| [\d.]+ \|", ln)]
    at = lines.index("|---|---|---|") + 1
    note = f"Zero-shot numbers re-measured with `--eval-only` on {time.strftime('%Y-%m-%d')} (demo tasks revised)."
    lines[at:at] = _table_rows(acc).splitlines()
    text = "\n".join(lines) + "\n"
    doc.write_text(text if note in text else text.replace("\n## Config", f"\n{note}\n\n## Config"))
    return acc


def write_report(
    out: Path, args: argparse.Namespace, stats: dict[str, Any], acc: dict[str, float], n_params: int
) -> None:
    """``zero_shot.json`` (read by the tests) and ``TRAINING.md``."""
    size = (out / "open_clip_model.safetensors").stat().st_size
    write_zero_shot(out, acc)
    rows = _table_rows(acc)
    cmd = "PYTHONPATH=. python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]))] + sys.argv[1:])
    capped = f" (stopped by the wall-clock cap; replay with `--stop-step {stats['steps']}`)" if stats["capped"] else ""
    text = f"""# Demo VLM: how it was trained

A tiny open_clip `CLIP` pretrained from scratch on CPU on procedurally generated
captioned images (`craft_sdk.demo.synth`). It exists to make the demos and tests
of craft-sdk run offline; it is not a general-purpose model.

- Command: `{cmd}`
- Seed: {args.seed}
- Steps: {stats["steps"]} of {stats["planned_steps"]} planned{capped}, batch {args.batch_size}
- Optimizer: AdamW lr {args.lr} (warm-up {args.warmup}, cosine to 5%), betas (0.9, 0.98), weight decay {args.weight_decay}
- Training wall time: {stats["train_minutes"]:.1f} min; total {stats["total_minutes"]:.1f} min
  ({args.threads} torch threads, {args.workers} data worker(s), shared 2-core machine)
- Final loss (mean of last 50 steps): {stats["final_loss"]:.4f}
- Parameters: {n_params:,}; weights file {size / 1e6:.2f} MB (fp16)
- Software: torch {torch.__version__}, open_clip {open_clip.__version__}, numpy {np.__version__}, Python {platform.python_version()}

## Zero-shot accuracy (%), template `{TEMPLATE}`

Test split of `load_demo_task(name, shots={EVAL_SHOTS}, seed={EVAL_SEED})`, model loaded
with `open_clip.create_model_and_transforms("local-dir:...")` from the fp16 file.

| task | zero-shot | chance |
|---|---|---|
{rows}

## Config

```json
{json.dumps({"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG}, indent=2, sort_keys=True)}
```
"""
    (out / "TRAINING.md").write_text(text)


def main() -> None:
    args = parse_args()
    setup_logging(args.log_file)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.eval_only:
        _print_accuracy(refresh_zero_shot(args.out))
        return
    t_start = time.time()
    model = open_clip.CLIP(**MODEL_CFG).to(args.device)
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=MODEL_CFG["text_cfg"]["context_length"])
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model: %s parameters; args: %s", f"{n_params:,}", vars(args))
    stats = train(args, model, tokenizer)
    digest = export(model, args.out)
    logger.info("wrote %s (sha256 %s)", args.out, digest)
    acc = evaluate_export(args.out)
    stats["total_minutes"] = (time.time() - t_start) / 60
    write_report(args.out, args, stats, acc, n_params)
    print(f"steps {stats['steps']}, final loss {stats['final_loss']:.4f}, {stats['total_minutes']:.1f} min")
    _print_accuracy(acc)


def _print_accuracy(acc: dict[str, float]) -> None:
    for task, value in acc.items():
        print(f"zero-shot {task:>20s}: {value:6.2f}%  (chance 10.0%)")


if __name__ == "__main__":
    main()
