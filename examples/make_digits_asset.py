"""Write ``craft_sdk/demo/assets/digits.safetensors`` from scikit-learn's copy of the UCI digits.

Run once (needs scikit-learn, which the SDK itself does not need at runtime)::

    python examples/make_digits_asset.py

The asset holds ``images`` (uint8 [1797, 8, 8], values 0..16, the UCI "optdigits"
8×8 down-sampled counts) and ``labels`` (int64 [1797], 0..9), in scikit-learn's
order. It also writes ``digits.safetensors.sha256`` next to it, which
``craft_sdk.demo.tasks`` checks on every load. Source and licence:
``craft_sdk/demo/assets/README.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

ASSETS = Path(__file__).resolve().parents[1] / "craft_sdk" / "demo" / "assets"
METADATA = {
    "source": "UCI ML repository, Optical Recognition of Handwritten Digits (via sklearn.datasets.load_digits)",
    "authors": "E. Alpaydin, C. Kaynak",
    "license": "CC BY 4.0",
    "doi": "10.24432/C50P49",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSETS / "digits.safetensors")
    args = parser.parse_args()

    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.ascontiguousarray(data.images.astype(np.uint8))
    labels = np.ascontiguousarray(data.target.astype(np.int64))
    if not (np.array_equal(images, data.images) and images.max() == 16 and images.shape == (1797, 8, 8)):
        raise SystemExit("unexpected digits data from scikit-learn")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # one metadata key (a sorted JSON string): several keys are written in a random order, changing the sha256
    save_file(
        {"images": images, "labels": labels}, str(args.out), metadata={"info": json.dumps(METADATA, sort_keys=True)}
    )
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    args.out.with_name(args.out.name + ".sha256").write_text(digest + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes), sha256 {digest}")
    print("class counts:", np.bincount(labels).tolist())


if __name__ == "__main__":
    main()
