"""Deploy footprint: adapter size, refiner latency and peak memory, ONNX Runtime vs numpy vs torch.

For a 10-class and a 1,000-class adapter built synthetically with the paper's
shapes (3-layer refiner, hidden 512; prompt offset 4 x 512 from z in R^512) it
measures

* the adapter directory on disk (``adapter_config.json`` + ``adapter_model.safetensors``)
  and ``refiner.onnx``;
* refiner latency per batch of 1 and of 256 (median of many calls, one thread each);
* peak RSS of a *separate process* that loads the adapter and runs the refiner:
  ONNX Runtime (torch blocked from import), plain numpy, and the training-time torch
  ``Refiner``; plus a bare ``python + numpy`` process for reference;

and compares with a white-box deployment that must hold the whole CLIP ViT-B-32
(parameter count of ``open_clip.create_model("ViT-B-32")`` x 4 bytes, fp32).

Usage:
    OMP_NUM_THREADS=1 python benchmarks/bench_deploy.py [--classes 10 1000] [--out benchmarks/results/bench_deploy.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HIDDEN, LAYERS, N_CTX, CTX_DIM, INTRINSIC = 512, 3, 4, 512, 512
BACKENDS = ("onnx", "numpy", "torch")
MB = 1024 * 1024


# ----------------------------------------------------------------- child process


def _time(fn: Callable[[], Any], reps: int, warmup: int = 20) -> dict[str, Any]:
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter_ns(), time.process_time_ns()
        fn()
        cpu.append((time.process_time_ns() - c0) / 1e6)
        wall.append((time.perf_counter_ns() - t0) / 1e6)
    k = max(len(wall) // 10, 1)  # medians of 10 consecutive rounds: how much the machine drifts during the run
    rounds = [statistics.median(wall[i : i + k]) for i in range(0, len(wall) - k + 1, k)]
    wall.sort()
    return {
        "median_ms": statistics.median(wall),
        "p90_ms": wall[int(0.9 * (len(wall) - 1))],
        "round_medians_ms": [min(rounds), max(rounds)],
        "cpu_median_ms": statistics.median(cpu),  # CPU time of the process: robust to other jobs' load
        "reps": reps,
    }


def child(backend: str, adapter_dir: str, reps: int) -> dict[str, Any]:
    """Load the adapter, build the refiner for ``backend``, time it; report peak RSS."""
    t0 = time.perf_counter()
    out: dict[str, Any] = {"backend": backend}
    if backend == "python":
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return out
    from craft_sdk import load_adapter

    adapter = load_adapter(adapter_dir)
    assert adapter.refiner is not None
    c = adapter.n_classes
    if backend == "onnx":
        from craft_sdk.adapter.export import OnnxRefiner

        refine: Callable[[np.ndarray], np.ndarray] = OnnxRefiner(Path(adapter_dir) / "refiner.onnx", adapter, threads=1)
    elif backend == "numpy":
        refine = adapter.refine
    else:
        import torch

        from craft_sdk.tuner.refiner import Refiner

        torch.set_num_threads(1)
        module = Refiner(adapter.refiner, residual=True).eval()

        def refine(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return module(torch.from_numpy(x)).numpy()

    out["load_s"] = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    x1 = rng.normal(0, 10, (1, c)).astype(np.float32)
    x256 = rng.normal(0, 10, (256, c)).astype(np.float32)
    out["max_abs_diff_vs_numpy"] = float(np.abs(refine(x256) - adapter.refine(x256)).max())
    out["latency_b1"] = _time(lambda: refine(x1), reps)
    out["latency_b256"] = _time(lambda: refine(x256), max(reps // 8, 50))
    out["torch_imported"] = "torch" in sys.modules and sys.modules["torch"] is not None
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if backend == "onnx":  # after the RSS reading: what a second core buys when it is free
        two = OnnxRefiner(Path(adapter_dir) / "refiner.onnx", adapter, threads=2)
        out["latency_b256_2threads"] = _time(lambda: two(x256), max(reps // 8, 50))
    return out


def run_child(backend: str, adapter_dir: Path | None, reps: int) -> dict[str, Any]:
    prelude = "import sys; sys.modules['torch'] = None\n" if backend in ("onnx", "numpy", "python") else ""
    code = (
        f"{prelude}import json, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
        "import bench_deploy\n"
        f"print(json.dumps(bench_deploy.child({backend!r}, {str(adapter_dir)!r}, {reps})))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"{backend} child failed: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------- parent


def make_adapter(n_classes: int, root: Path) -> Path:
    """A synthetic adapter with the paper's shapes, saved with its refiner.onnx."""
    from craft_sdk import Adapter, AdapterConfig, export_onnx, mlp
    from craft_sdk.adapter import PromptSpec, RefinerSpec
    from craft_sdk.projection import project, projection_matrix

    spec = PromptSpec(N_CTX, CTX_DIM, INTRINSIC, seed=0, std=0.01)
    z = np.random.default_rng(1).normal(size=INTRINSIC)
    offset = project(projection_matrix(0, N_CTX * CTX_DIM, INTRINSIC, 0.01), z, N_CTX, CTX_DIM)
    weights = mlp.init_weights(n_classes, HIDDEN, LAYERS, residual=False, seed=2)
    config = AdapterConfig(
        model_id="open_clip/ViT-B-32/bench",
        class_names=tuple(f"class {i}" for i in range(n_classes)),
        template="a photo of a",
        prompt=spec,
        refiner=RefinerSpec(LAYERS, HIDDEN, True),
    )
    directory = root / f"adapter_{n_classes}"
    Adapter(config, z, offset, weights).save_pretrained(directory)
    export_onnx(directory)
    return directory


def whitebox_bytes() -> tuple[int, int]:
    """(parameter count, fp32 bytes) of a random-init open_clip ViT-B-32."""
    import open_clip

    model = open_clip.create_model("ViT-B-32", pretrained=None)
    n = sum(p.numel() for p in model.parameters())
    return n, 4 * n


def machine() -> dict[str, Any]:
    model_name = "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model_name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    import onnxruntime

    versions = {"python": platform.python_version(), "numpy": np.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        import torch

        versions["torch"] = torch.__version__
    except ImportError:
        pass
    return {"cpu": model_name, "cores": os.cpu_count(), "platform": platform.platform(), "versions": versions}


def bench(classes: list[int], reps: int) -> dict[str, Any]:
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    baseline = run_child("python", None, reps)["peak_rss_mb"]
    with tempfile.TemporaryDirectory() as tmp:
        for c in classes:
            d = make_adapter(c, Path(tmp))
            adapter_bytes = sum(p.stat().st_size for p in d.iterdir() if p.name != "refiner.onnx")
            onnx_bytes = (d / "refiner.onnx").stat().st_size
            results = {b: run_child(b, d, reps) for b in BACKENDS}
            rows.append({"classes": c, "adapter_bytes": adapter_bytes, "onnx_bytes": onnx_bytes, "backends": results})
    n_params, wb = whitebox_bytes()
    for row in rows:
        deploy = row["adapter_bytes"] + row["onnx_bytes"]
        row["whitebox_over_deploy_files"] = wb / deploy
        row["whitebox_over_onnx_process_rss"] = wb / (row["backends"]["onnx"]["peak_rss_mb"] * MB)
        row["onnx_rss_over_torch_rss"] = row["backends"]["onnx"]["peak_rss_mb"] / row["backends"]["torch"]["peak_rss_mb"]
    ten = next((r for r in rows if r["classes"] == 10), None)
    targets = {
        "onnx_rss_under_quarter_of_torch": all(r["onnx_rss_over_torch_rss"] < 0.25 for r in rows),
        "adapter_plus_onnx_10_classes_under_3MB": None if ten is None else ten["adapter_bytes"] + ten["onnx_bytes"] < 3e6,
        "refiner_b256_10_classes_under_1ms": None if ten is None else ten["backends"]["onnx"]["latency_b256"]["median_ms"] < 1.0,
    }
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "OMP_NUM_THREADS=1 python " + " ".join(sys.argv),
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "threads": "1 per backend (ORT intra_op=1, torch.set_num_threads(1), OMP/OPENBLAS=1)",
        "python_numpy_baseline_rss_mb": baseline,
        "whitebox": {"model": "ViT-B-32", "params": n_params, "fp32_bytes": wb},
        "rows": rows,
        "targets": targets,
    }


def table(res: dict[str, Any]) -> str:
    head = (
        f"{'classes':>7} {'backend':>7} {'adapter':>9} {'onnx':>9} {'b=1 ms':>8} {'b=256 ms':>9} "
        f"{'b=256 cpu':>9} {'peak RSS':>9} {'load s':>7}"
    )
    lines = [head, "-" * len(head)]
    for row in res["rows"]:
        for b in BACKENDS:
            r = row["backends"][b]
            lines.append(
                f"{row['classes']:>7} {b:>7} {row['adapter_bytes'] / MB:>7.2f}MB {row['onnx_bytes'] / MB:>7.2f}MB "
                f"{r['latency_b1']['median_ms']:>8.3f} {r['latency_b256']['median_ms']:>9.3f} "
                f"{r['latency_b256']['cpu_median_ms']:>9.3f} "
                f"{r['peak_rss_mb']:>7.1f}MB {r['load_s']:>7.2f}"
            )
    for row in res["rows"]:
        two = row["backends"]["onnx"]["latency_b256_2threads"]
        one = row["backends"]["onnx"]["latency_b256"]
        lines.append(
            f"{row['classes']} classes, ONNX Runtime, batch 256: 1 thread {one['median_ms']:.3f} ms (round medians "
            f"{one['round_medians_ms'][0]:.3f}-{one['round_medians_ms'][1]:.3f}); 2 threads {two['median_ms']:.3f} ms "
            f"({two['round_medians_ms'][0]:.3f}-{two['round_medians_ms'][1]:.3f})"
        )
    lines.append(f"python + numpy baseline process: {res['python_numpy_baseline_rss_mb']:.1f} MB peak RSS")
    wb = res["whitebox"]
    lines.append(f"white-box ViT-B-32: {wb['params']:,} params = {wb['fp32_bytes'] / MB:.1f} MB fp32")
    for row in res["rows"]:
        lines.append(
            f"{row['classes']} classes: white-box / (adapter + onnx) = {row['whitebox_over_deploy_files']:.0f}x; "
            f"white-box / ONNX process RSS = {row['whitebox_over_onnx_process_rss']:.1f}x; "
            f"ONNX RSS / torch RSS = {row['onnx_rss_over_torch_rss']:.3f}"
        )
    lines.append(f"targets: {res['targets']}")
    lines.append(f"load average before/after: {res['load_average_before']} / {res['load_average_after']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 1000])
    parser.add_argument("--reps", type=int, default=2000, help="timed calls at batch 1 (batch 256: reps / 8)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_deploy.json"))
    args = parser.parse_args()
    res = bench(args.classes, args.reps)
    print(table(res))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
