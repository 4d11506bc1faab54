"""Peak memory of ``craft-sdk predict``'s decoding of very large images, before and after reduced decoding.

Writes ``--n`` PNG files of ``--mpx`` megapixels each (a smooth gradient, so the files are small; decoded
memory does not depend on the content), then decodes them as one predict batch in a fresh process,
twice: at full size (the earlier behaviour, ``reduce_above=None``) and as ``predict`` does now
(``images.PREDICT_MAX_PIXELS``: an image over it is resized to it while decoding, a JPEG decoded at
reduced scale by ``draft`` first, so one image at a time is held at full size). Reports each process's
peak RSS (``ru_maxrss``) and the decoded sizes.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/bench_decode_memory.py [--n 6] [--mpx 88]
        [--out benchmarks/results/bench_decode_memory.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import json, resource, sys
from craft_sdk.images import PREDICT_MAX_PIXELS, read_image
reduce = None if sys.argv[1] == "full" else PREDICT_MAX_PIXELS
images = [read_image(p, max_pixels=1 << 40, reduce_above=reduce) for p in sys.argv[2:]]
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "sizes": [list(im.size) for im in images]}))
"""


def write_pngs(folder: Path, n: int, mpx: float) -> list[str]:
    side = int((mpx * 1e6) ** 0.5)
    row = np.linspace(0, 255, side, dtype=np.float32).astype(np.uint8)
    paths = []
    for i in range(n):
        arr = np.empty((side, side, 3), np.uint8)
        arr[..., 0], arr[..., 1], arr[..., 2] = row[None, :], row[:, None], (i * 40) % 256
        path = folder / f"big{i}.png"
        Image.fromarray(arr).save(path, compress_level=1)
        paths.append(str(path))
        del arr
    return paths


def decode(mode: str, paths: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, *paths], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--mpx", type=float, default=88.0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_decode_memory.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_pngs(Path(tmp), args.n, args.mpx)
        rows = {mode: decode(mode, paths) for mode in ("full", "reduced")}
    print(f"{args.n} PNGs of {args.mpx:g} Mpx, decoded as one batch (peak RSS of a fresh process)")
    print("| decoding | peak RSS (MB) | decoded size |")
    print("|---|---|---|")
    for mode, r in rows.items():
        print(f"| {mode} | {r['peak_mb']:.0f} | {r['sizes'][0][0]}x{r['sizes'][0][1]} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"n": args.n, "mpx": args.mpx, **rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
