#!/usr/bin/env bash
# GPU check for a lent GPU machine (at most ~5 minutes). The machine has torch but not
# open_clip/cma: carry them as wheels in .whl/ (see benchmarks/README or BENCHMARKS.md).
# Usage (device tool): carry=[".whl"], command: bash benchmarks/gpu_check.sh
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
timeout 280 python3 benchmarks/gpu_check.py
