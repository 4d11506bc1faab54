"""Remote black box: loopback HTTP (``craft-sdk serve`` + ``HTTPClient``) against the in-process client.

For a random-init ViT-B-32 (the real cost shape: ``OpenCLIPClient("ViT-B-32", pretrained=None)``),
``--images`` images and a population of ``--popsize`` candidate offsets, for each class count it
measures the time to score one population

* in process (``OpenCLIPClient.predict`` on an uploaded handle), and
* over HTTP against a server in a *separate process* (``craft-sdk serve`` on 127.0.0.1, the same
  model and seed), through the real :class:`~craft_sdk.client.http.HTTPClient`,

interleaving the two (median of ``--reps``), and reports queries per second, the HTTP overhead per
population (the round trip minus the model time the server reports in its ``Server-Timing`` header,
so load on a shared machine does not blur it; the plain wall-clock difference is recorded too),
bytes on the wire per query (request and response bodies, counted at the transport),
and whether the HTTP logits are bitwise identical to the in-process ones. float16 logits are
measured too (fewer bytes, not bitwise identical). The one-time image upload is reported apart.

Usage:
    python benchmarks/bench_remote.py [--classes 10 100] [--images 160] [--popsize 40] [--reps 3]
        [--out benchmarks/results/bench_remote.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import secrets
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from _loopback import free_port, start_server  # noqa: E402  (benchmarks/ is the script's folder)

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("cat", "dog", "car", "tree", "river", "house", "bird", "boat", "road", "cloud")


class CountingTransport(httpx.HTTPTransport):
    """Counts request and response body bytes of ``/v1/predict`` calls."""

    def __init__(self) -> None:
        super().__init__(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        self.sent = self.received = self.calls = 0
        self.server_s = 0.0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.url.path.endswith("/predict"):
            response.read()
            self.calls += 1
            self.sent += len(request.content)
            self.received += len(response.content)
            timing = response.headers.get("server-timing", "")
            if "dur=" in timing:
                self.server_s += float(timing.split("dur=")[1].split(",")[0]) / 1000
        return response


def class_names(n: int) -> list[str]:
    return [f"{WORDS[i % len(WORDS)]} number {i}" for i in range(n)]


def timed(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench_classes(local: Any, remotes: dict[str, Any], counters: dict[str, CountingTransport], handles: dict[str, Any],
                  n_classes: int, offsets: np.ndarray, reps: int) -> dict[str, Any]:
    names = class_names(n_classes)
    p = offsets.shape[0]
    # warm-up: prompt tokenization caches on both sides
    want = local.predict(handles["local"], names, offsets=offsets[:2])
    for kind, remote in remotes.items():
        remote.predict(handles[kind], names, offsets=offsets[:2])
    times: dict[str, list[float]] = {"local": [], **{k: [] for k in remotes}}
    overheads: dict[str, list[float]] = {k: [] for k in remotes}
    identical = True
    for _ in range(reps):
        t, want = timed(lambda: local.predict(handles["local"], names, offsets=offsets))
        times["local"].append(t)
        for kind, remote in remotes.items():
            c = counters[kind]
            c.sent = c.received = c.calls = 0
            c.server_s = 0.0
            t, got = timed(lambda r=remote, k=kind: r.predict(handles[k], names, offsets=offsets))
            times[kind].append(t)
            overheads[kind].append(t - c.server_s)  # round trip minus the model's time on the server
            if kind == "float32":
                identical &= bool(np.array_equal(got, want))
    row: dict[str, Any] = {"classes": n_classes, "images": handles["local"].n_images, "popsize": p,
                           "bitwise_identical_float32": identical}
    t_local = statistics.median(times["local"])
    row["in_process_s"] = t_local
    row["in_process_min_s"] = min(times["local"])
    row["in_process_qps"] = p / t_local
    for kind in remotes:
        t = statistics.median(times[kind])
        c = counters[kind]
        row[f"http_{kind}_s"] = t
        row[f"http_{kind}_min_s"] = min(times[kind])
        row[f"http_{kind}_qps"] = p / t
        row[f"http_{kind}_overhead_s"] = statistics.median(overheads[kind])
        row[f"http_{kind}_overhead_pct"] = 100.0 * statistics.median(overheads[kind]) / t_local
        row[f"http_{kind}_wall_diff_pct"] = 100.0 * (t - t_local) / t_local
        row[f"http_{kind}_request_bytes_per_query"] = c.sent / p
        row[f"http_{kind}_response_bytes_per_query"] = c.received / p
    row["raw_times_s"] = times
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--images", type=int, default=160)
    ap.add_argument("--popsize", type=int, default=40)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_remote.json")
    args = ap.parse_args()

    from PIL import Image

    from craft_sdk.client.http import HTTPClient
    from craft_sdk.client.openclip import OpenCLIPClient
    from craft_sdk.wire import encode_images

    load_before = os.getloadavg()
    key = secrets.token_hex(24)
    with tempfile.TemporaryDirectory() as tmp:
        key_file = Path(tmp) / "keys"
        key_file.write_text(key + "\n")
        port = free_port()
        server = start_server(port, key_file, ["--model", "ViT-B-32", "--pretrained", "none"], ROOT)
        try:
            local = OpenCLIPClient("ViT-B-32", pretrained=None)
            caps = local.capabilities()
            rng = np.random.default_rng(0)
            images = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(args.images)]
            offsets = rng.normal(0, caps.ctx_rms, (args.popsize, caps.n_ctx, caps.ctx_dim)).astype(np.float32)
            counters = {k: CountingTransport() for k in ("float32", "float16")}
            url = f"http://127.0.0.1:{port}"
            remotes = {k: HTTPClient(url, api_key=key, transport=counters[k], logits_dtype=k) for k in counters}
            t_up_local, h_local = timed(lambda: local.upload(images))
            t_up_remote, h_remote = timed(lambda: remotes["float32"].upload(images))
            handles = {"local": h_local, "float32": h_remote, "float16": remotes["float16"].upload(images)}  # cached on the server
            assert remotes["float32"].capabilities() == caps, "server and in-process models differ"
            rows = [bench_classes(local, remotes, counters, handles, c, offsets, args.reps) for c in args.classes]
            usage = remotes["float32"].usage()
            for remote in remotes.values():
                remote.close()
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    upload_bytes = len(encode_images([Image.fromarray(im) for im in images]))
    result = {
        "benchmark": "bench_remote",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "model": caps.model_id,
        "command": "python benchmarks/bench_remote.py " + " ".join(sys.argv[1:]),
        "upload": {"images": args.images, "in_process_s": t_up_local, "http_s": t_up_remote, "bytes": upload_bytes},
        "server_queries_billed": usage["used"],
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"\nwrote {args.out}")


def print_table(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(f"{result['model']}  {m['cpus']} CPUs  load {m['load_avg_before'][0]:.1f} -> {m['load_avg_after'][0]:.1f}")
    up = result["upload"]
    print(f"upload of {up['images']} images: {up['bytes'] / 1e6:.1f} MB, in-process {up['in_process_s']:.2f} s, HTTP {up['http_s']:.2f} s")
    head = (f"{'C':>4} {'N':>4} {'P':>3} | {'local s':>8} {'q/s':>6} | {'http s':>8} {'q/s':>6} {'ovh s':>6} {'ovh %':>6} "
            f"{'req B/q':>8} {'resp B/q':>9} {'same':>5} | {'f16 ovh %':>9} {'f16 resp B/q':>12}")
    print(head)
    print("-" * len(head))
    for r in result["rows"]:
        print(f"{r['classes']:>4} {r['images']:>4} {r['popsize']:>3} | {r['in_process_s']:>8.3f} {r['in_process_qps']:>6.2f} | "
              f"{r['http_float32_s']:>8.3f} {r['http_float32_qps']:>6.2f} {r['http_float32_overhead_s']:>6.3f} "
              f"{r['http_float32_overhead_pct']:>6.1f} "
              f"{r['http_float32_request_bytes_per_query']:>8.0f} {r['http_float32_response_bytes_per_query']:>9.0f} "
              f"{str(r['bitwise_identical_float32']):>5} | {r['http_float16_overhead_pct']:>9.1f} {r['http_float16_response_bytes_per_query']:>12.0f}")


if __name__ == "__main__":
    main()
