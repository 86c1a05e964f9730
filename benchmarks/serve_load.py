"""Bounded load test of ``fortress serve`` on loopback: requests/s, images/s and p50/p99 latency.

For each target (a saved model and a compute mode) it starts the real server (uvicorn, a free
127.0.0.1 port, its own process), creates an unlimited key, sends a fixed number of batches from
an async httpx loop with a fixed concurrency, and checks that every answer is 200 and that the
key ledger counts exactly the images sent (no lost count).

Usage:
    python benchmarks/serve_load.py --target undefended=/tmp/fx/victim:dynamic \\
        --target dnf-dynamic=/tmp/fx/dnf:dynamic --target dnf-full=/tmp/fx/dnf:full \\
        --requests 300 --batch 64 --concurrency 4 --workers 2 --threads 1

With ``--monitor exit-sprt --monitor-calibration cal.json`` every target runs twice, side by side:
once with monitoring off (``--no-profiles``) and once with profiles and the monitor on (``NAME+mon``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from fortress.data.embedded import mnist_splits
from fortress.serve.keys import KeyStore


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bodies(batch: int, count: int) -> list[bytes]:
    """``count`` distinct npy request bodies of real test digits (cycled)."""
    x = mnist_splits().test.x.numpy()
    out = []
    for i in range(count):
        idx = (np.arange(batch) + i * batch) % len(x)
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(x[idx], dtype=np.float32), allow_pickle=False)
        out.append(json.dumps({"npy": base64.b64encode(buf.getvalue()).decode()}).encode())
    return out


async def _drive(url: str, key: str, bodies: list[bytes], requests: int, concurrency: int) -> dict[str, Any]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    counter = iter(range(requests))
    headers = {"X-API-Key": key, "content-type": "application/json"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60, limits=limits) as client:

        async def worker() -> None:
            for i in counter:
                t0 = time.perf_counter()
                r = await client.post("/v1/predict", content=bodies[i % len(bodies)])
                latencies.append(time.perf_counter() - t0)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

        await client.post("/v1/predict", content=bodies[0])  # warm-up (not counted below)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {
        "wall_s": wall,
        "statuses": statuses,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "mean_ms": float(lat.mean()),
    }


def run_target(
    name: str, model: str, compute: str, args: argparse.Namespace, extra: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Serve ``model`` in ``compute`` mode and load it; return the measured row."""
    tmp = Path(tempfile.mkdtemp(prefix="fortress-load-"))
    store = KeyStore(tmp / "keys.db", create=True)
    key, secret = store.add("load")
    port = _free_port()
    cmd = [sys.executable, "-m", "fortress", "serve", model, "--port", str(port), "--keys", str(tmp / "keys.db")]
    cmd += ["--compute", compute, "--workers", str(args.workers), "--threads", str(args.threads), *extra]
    log = (tmp / "server.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        bodies = _bodies(args.batch, 16)
        res = asyncio.run(_drive(url, secret, bodies, args.requests, args.concurrency))
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        log.close()
    used = store.get(key.key_id).used
    store.close()
    expected = (args.requests + 1) * args.batch  # + the warm-up request
    return {
        "target": name,
        "server_flags": list(extra),
        "model": model,
        "compute": compute,
        "requests": args.requests,
        "batch": args.batch,
        "concurrency": args.concurrency,
        "workers": args.workers,
        "threads": args.threads,
        "req_per_s": args.requests / res["wall_s"],
        "images_per_s": args.requests * args.batch / res["wall_s"],
        "p50_ms": res["p50_ms"],
        "p99_ms": res["p99_ms"],
        "errors": sum(v for k, v in res["statuses"].items() if k != 200),
        "ledger_images": used,
        "lost_count": expected - used,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", action="append", required=True, help="NAME=MODEL_DIR:COMPUTE (repeatable)")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="Append JSON lines here.")
    parser.add_argument("--monitor", default=None, help="Also run each target with this monitor (side by side).")
    parser.add_argument("--monitor-calibration", type=Path, default=None, help="exit-sprt calibration file.")
    args = parser.parse_args()
    rows = []
    for spec in args.target:
        name, _, rest = spec.partition("=")
        model, _, compute = rest.rpartition(":")
        runs: list[tuple[str, tuple[str, ...]]] = [(name, ())]
        if args.monitor is not None:
            mon: tuple[str, ...] = ("--monitor", args.monitor)
            if args.monitor_calibration is not None:
                mon += ("--monitor-calibration", str(args.monitor_calibration))
            runs = [(name, ("--no-profiles",)), (f"{name}+mon", mon)]
        for label, extra in runs:
            row = run_target(label, model, compute or "dynamic", args, extra)
            rows.append(row)
            _report(row, args.out)


def _report(row: dict[str, Any], out: Path | None) -> None:
    """Print one measured row and append it to ``out`` as a JSON line."""
    print(
        f"{row['target']:14s} {row['req_per_s']:8.1f} req/s {row['images_per_s']:9.0f} img/s "
        f"p50 {row['p50_ms']:7.1f} ms p99 {row['p99_ms']:7.1f} ms errors {row['errors']} lost {row['lost_count']}",
        flush=True,
    )
    if out is not None:
        with out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
