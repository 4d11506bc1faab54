"""Loopback ``craft-sdk serve`` for the benchmark scripts: a free port, start, wait until healthy."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(port: int, key_file: Path, serve_args: list[str], cwd: Path, timeout_s: float = 300.0) -> subprocess.Popen:
    """``craft-sdk serve <serve_args> --port PORT --api-key-file KEY_FILE``, returned once /v1/health answers 200."""
    cmd = [sys.executable, "-m", "craft_sdk.cli", "serve", *serve_args, "--port", str(port), "--api-key-file", str(key_file)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd, env=env)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.5)
    raise RuntimeError("server did not come up")
