"""Bounded load test of ``fortress serve`` on loopback, next to the model's raw in-process throughput.

For each target (a saved model and a compute mode) it starts the real server (uvicorn, a free
127.0.0.1 port, its own process), creates an unlimited key, and then runs ``--rounds`` rounds, each
one interleaving:

* **raw**: the same model loaded in this process, answering the same batches with
  ``defense.respond`` on ``--threads`` torch threads (no HTTP, no ledger) — the ceiling;
* **served**: a fixed number of ``.npy`` batches sent from an async httpx loop with a fixed
  concurrency; every answer must be 200 and the ledger must count exactly the images sent.

It reports, per round and as medians, requests/s, images/s, p50/p99 latency, the server's CPU time
per request and the ratio served / raw images per second (measured minutes apart at most, on the
same machine, so background load affects both alike).

Usage:
    python benchmarks/serve_load.py --target undefended=/tmp/fx/victim:dynamic \\
        --target dnf-full=/tmp/fx/dnf:full --requests 300 --batch 64 --concurrency 4 --rounds 3

With ``--monitor exit-sprt --monitor-calibration cal.json`` every target runs twice, side by side:
once with monitoring off (``--no-profiles``) and once with profiles and the monitor on (``NAME+mon``).
Extra ``fortress serve`` options go after ``--``.
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
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import torch

from fortress.data.embedded import mnist_splits
from fortress.defenses import DNF, load_defense
from fortress.serve.keys import KeyStore


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _batches(batch: int, count: int, model: str | None = None) -> list[np.ndarray]:
    """``count`` distinct batches (cycled) of the ID test images of the data ``model`` remembers
    (``None``: the embedded MNIST test digits) — the traffic of legitimate users."""
    if model is None:
        x = mnist_splits().test.x.numpy()
    else:
        from fortress.bench.pipeline import data_for

        x = data_for(load_defense(Path(model)).victim).test.x.numpy()
    return [np.ascontiguousarray(x[(np.arange(batch) + i * batch) % len(x)], dtype=np.float32) for i in range(count)]


def _body(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return json.dumps({"npy": base64.b64encode(buf.getvalue()).decode()}).encode()


async def _drive_raw(port: int, key: str, bodies: list[bytes], requests: int, concurrency: int) -> dict[str, Any]:
    """The lightest load generator: keep-alive HTTP/1.1 connections writing pre-built requests.

    It spends a small fraction of the CPU of an HTTP client library, which matters when the client
    and the server share a few cores: the measure is then the server's, not the client's.
    """
    reqs = [
        b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: %s\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (key.encode(), len(b), b)
        for b in bodies
    ]
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    counter = iter(range(requests))

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, i: int) -> int:
        writer.write(reqs[i % len(reqs)])
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        body = await reader.readexactly(length)
        if status == 200 and b'"queries_charged"' not in body:
            raise RuntimeError(f"malformed answer: {body[:200]!r}")
        return status

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await one(reader, writer, 0)  # warm-up (counted in the ledger, not in the timing)
        await ready.wait()
        for i in counter:
            t0 = time.perf_counter()
            status = await one(reader, writer, i)
            latencies.append(time.perf_counter() - t0)
            statuses[status] = statuses.get(status, 0) + 1
        writer.close()

    ready = asyncio.Event()
    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    await asyncio.sleep(0.5)
    t0 = time.perf_counter()
    ready.set()
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {
        "wall_s": wall,
        "statuses": statuses,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
    }


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

        await asyncio.gather(*(client.post("/v1/predict", content=bodies[0]) for _ in range(concurrency)))  # warm-up
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {
        "wall_s": wall,
        "statuses": statuses,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
    }


def _raw(model: str, compute: str, batches: list[np.ndarray], requests: int, threads: int) -> float:
    """Images/s of ``defense.respond`` in this process on the same batches (the model's raw throughput)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        defense = load_defense(Path(model))
        if isinstance(defense, DNF):
            defense.compute = "dynamic" if compute == "padded" else compute  # type: ignore[assignment]
        xs = [torch.from_numpy(b) for b in batches]
        with torch.inference_mode():
            for x in xs[:4]:
                defense.respond(x)
            t0 = time.perf_counter()
            for i in range(requests):
                defense.respond(xs[i % len(xs)])
            wall = time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)
    return requests * int(batches[0].shape[0]) / wall


def run_target(
    name: str, model: str, compute: str, args: argparse.Namespace, extra: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """Serve ``model`` in ``compute`` mode; return one measured row per round."""
    tmp = Path(tempfile.mkdtemp(prefix="fortress-load-"))
    store = KeyStore(tmp / "keys.db", create=True)
    key, secret = store.add("load")
    port = _free_port()
    cmd = [sys.executable, "-m", "fortress", "serve", model, "--port", str(port), "--keys", str(tmp / "keys.db")]
    cmd += ["--compute", compute, "--workers", str(args.workers), "--threads", str(args.threads), *extra]
    log = (tmp / "server.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    batches = _batches(args.batch, 16, model)
    bodies = [_body(b) for b in batches]
    rows = []
    sent = 0
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        server = psutil.Process(proc.pid)
        for r in range(args.rounds):
            raw = _raw(model, compute, batches, args.requests, args.threads)
            cpu0 = sum(server.cpu_times()[:2])
            if args.client == "raw":
                res = asyncio.run(_drive_raw(port, secret, bodies, args.requests, args.concurrency))
            else:
                res = asyncio.run(_drive(url, secret, bodies, args.requests, args.concurrency))
            cpu = sum(server.cpu_times()[:2]) - cpu0
            sent += (args.requests + args.concurrency) * args.batch  # + the warm-up requests
            served = args.requests * args.batch / res["wall_s"]
            rows.append(
                {
                    "target": name,
                    "round": r,
                    "server_flags": list(extra),
                    "model": model,
                    "compute": compute,
                    "requests": args.requests,
                    "batch": args.batch,
                    "concurrency": args.concurrency,
                    "workers": args.workers,
                    "threads": args.threads,
                    "client": args.client,
                    "req_per_s": args.requests / res["wall_s"],
                    "images_per_s": served,
                    "raw_images_per_s": raw,
                    "served_over_raw": served / raw,
                    "p50_ms": res["p50_ms"],
                    "p99_ms": res["p99_ms"],
                    "server_cpu_ms_per_request": 1000 * cpu / (args.requests + args.concurrency),
                    "errors": sum(v for k, v in res["statuses"].items() if k != 200),
                }
            )
            _report(rows[-1], None)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        log.close()
    used = store.get(key.key_id).used
    store.close()
    for row in rows:
        row["ledger_images"] = used
        row["lost_count"] = sent - used
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", action="append", required=True, help="NAME=MODEL_DIR:COMPUTE (repeatable)")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved raw/served rounds per target.")
    parser.add_argument(
        "--client", choices=("raw", "httpx"), default="raw", help="Load generator: pre-built HTTP/1.1, or httpx."
    )
    parser.add_argument("--out", type=Path, default=None, help="Append JSON lines here.")
    parser.add_argument("--monitor", default=None, help="Also run each target with this monitor (side by side).")
    parser.add_argument("--monitor-calibration", type=Path, default=None, help="exit-sprt calibration file.")
    parser.add_argument("serve_args", nargs="*", help="Extra `fortress serve` options (after --).")
    args = parser.parse_args()
    for spec in args.target:
        name, _, rest = spec.partition("=")
        model, _, compute = rest.rpartition(":")
        runs: list[tuple[str, tuple[str, ...]]] = [(name, tuple(args.serve_args))]
        if args.monitor is not None:
            mon: tuple[str, ...] = ("--monitor", args.monitor)
            if args.monitor_calibration is not None:
                mon += ("--monitor-calibration", str(args.monitor_calibration))
            runs = [(name, ("--no-profiles", *args.serve_args)), (f"{name}+mon", (*mon, *args.serve_args))]
        for label, extra in runs:
            rows = run_target(label, model, compute or "dynamic", args, extra)
            if args.out is not None:
                with args.out.open("a") as fh:
                    fh.writelines(json.dumps(row) + "\n" for row in rows)
            med = statistics.median(r["served_over_raw"] for r in rows)
            print(
                f"{label}: median served/raw {med:.2f} over {len(rows)} rounds; "
                f"ledger {rows[-1]['ledger_images']} images, lost {rows[-1]['lost_count']}",
                flush=True,
            )


def _report(row: dict[str, Any], out: Path | None) -> None:
    """Print one measured round (and append it to ``out`` as a JSON line)."""
    print(
        f"{row['target']:14s} round {row['round']}: {row['images_per_s']:7.0f} img/s served, "
        f"{row['raw_images_per_s']:7.0f} raw, ratio {row['served_over_raw']:.2f}; p50 {row['p50_ms']:6.1f} ms "
        f"p99 {row['p99_ms']:6.1f} ms; server CPU {row['server_cpu_ms_per_request']:.1f} ms/request; "
        f"errors {row['errors']}",
        flush=True,
    )
    if out is not None:
        with out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
