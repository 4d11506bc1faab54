"""GPU check (run by benchmarks/gpu_check.sh on a lent GPU machine, at most ~5 minutes).

Measures, for a random-init ViT-B-32 black box on CUDA:
* queries per second at 10 / 100 / 1,000 classes with the full population (40)
  batched in one call, for the default ``prefix`` path and the ``cut`` path, against
  the reference style (one candidate at a time, full 77 tokens);
* a full 8,000-query ``craft`` tune of 16 shots x 10 classes (224 px random images).
Writes $OUT/gpu_check.json (or ./gpu_check.json) and prints a table.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_query import EUROSAT, class_names, useful_flops  # noqa: E402

from craft_sdk.client.openclip import OpenCLIPClient  # noqa: E402


def timed(client, names, mode, population, reps=5):  # noqa: ANN001, ANN201
    client._auto = mode == "auto"  # "auto" = prefix, or cut for < 50 classes on a GPU
    client.mode = "prefix" if mode == "auto" else mode
    caps = client.capabilities()
    off = np.random.default_rng(0).normal(0, caps.ctx_rms, (population, caps.n_ctx, caps.ctx_dim)).astype(np.float32)
    with torch.inference_mode():
        client.encode_text(names, "a photo of a", off)
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            client.encode_text(names, "a photo of a", off)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    return float(np.median(times)) / population


def main() -> None:
    out = Path(os.environ.get("OUT", "."))
    info = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    client = OpenCLIPClient("ViT-B-32", pretrained=None, device="cuda", max_tokens=1 << 22)
    rows = []
    for n in (10, 100, 1000):
        names = class_names(n)
        flops = useful_flops(client, names)
        ref = timed(client, names, "full", 1, reps=3)
        for mode in ("auto", "prefix", "cut"):
            sec = timed(client, names, mode, 40)
            rows.append({"classes": n, "mode": mode, "queries_per_s": 1 / sec, "ms_per_query": sec * 1e3,
                         "reference_ms_per_query": ref * 1e3, "speedup_vs_reference": ref / sec,
                         "useful_tflops": flops / sec / 1e12})
            print(rows[-1], flush=True)
    from PIL import Image

    from craft_sdk import ImageDataset, TuneConfig
    from craft_sdk.tuner.train import Tuner

    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in range(160)]
    ds = ImageDataset(imgs, np.repeat(np.arange(10), 16), tuple(EUROSAT))
    client.mode, client._auto = "prefix", True
    t = time.perf_counter()
    r = Tuner(TuneConfig(mode="craft", budget=8000)).fit(client, ds)
    tune = {"wall_s": time.perf_counter() - t, "queries_used": r.queries.used, "generations": r.n_generations}
    print("tune", tune, flush=True)
    (out / "gpu_check.json").write_text(json.dumps({"info": info, "rows": rows, "tune": tune}, indent=2))


if __name__ == "__main__":
    main()
