"""The exit-timing side channel of a served DNF, measured from the attacker's side.

DNF's early exits answer faster than the final exit (paper §4.2), so the response time of a single
query can tell which exit answered — which is what DNF hides: out-of-distribution queries leave at
exit 0. :func:`bench_timing` plays the attacker against the real server (``fortress serve`` in a
subprocess on a free loopback port) in each compute mode: it sends single-image requests one at a
time, a shuffled mix of in-distribution test digits (which leave late) and noise/patches (which leave
early), records each response time, and fits a simple classifier on the latency alone. The true exit
of every query comes from the same defense run locally. Accuracy on held-out queries, next to the
majority-class rate (chance), says how much the channel leaks; a batch-64 load run under concurrency
says what each mode costs in throughput and server CPU.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.tree import DecisionTreeClassifier
from torch import Tensor

from fortress.data.defaults import load_pool
from fortress.data.spec import DataSpec
from fortress.defenses import DNF, load_defense
from fortress.errors import ConfigError, FortressError

__all__ = ["ExitInference", "ModeTiming", "TimingReport", "bench_timing", "exit_inference", "timing_queries"]

log = logging.getLogger(__name__)

MODES = ("dynamic", "full", "padded")


@dataclass(frozen=True)
class ExitInference:
    """How well latency alone predicts a label, on held-out queries.

    Attributes:
        accuracy: the classifier's accuracy on the test half.
        chance: the test half's rate of the training half's majority label (what guessing achieves).
        n_train: queries the classifier was fitted on.
        n_test: queries it was scored on.
    """

    accuracy: float
    chance: float
    n_train: int
    n_test: int


def exit_inference(
    latency_s: np.ndarray, labels: np.ndarray, *, max_depth: int = 1, test_fraction: float = 0.5, seed: int = 0
) -> ExitInference:
    """Fit a decision tree on log-latency to predict ``labels``; score it on a held-out split.

    A depth-1 tree is a threshold on latency (early exit or not); a deeper one cuts latency into
    intervals (the exit index).

    Args:
        latency_s: ``(N,)`` response times in seconds (positive).
        labels: ``(N,)`` integer labels (e.g. exit index, or ``exit == 0``).
        max_depth: depth of the tree.
        test_fraction: share of queries held out for scoring.
        seed: seeds the split.

    Example:
        >>> lat = np.r_[np.full(50, 0.002), np.full(50, 0.004)]
        >>> exit_inference(lat, np.r_[np.zeros(50), np.ones(50)].astype(int)).accuracy
        1.0
    """
    lat = np.asarray(latency_s, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if lat.shape != y.shape:
        raise ConfigError(f"latency_s has {lat.size} entries but labels {y.size}")
    if lat.size < 4 or not np.all(lat > 0):
        raise ConfigError(f"need at least 4 positive latencies, got {lat.size} (min {lat.min(initial=0):g})")
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = np.random.default_rng(seed).permutation(lat.size)
    n_test = max(1, min(lat.size - 1, round(lat.size * test_fraction)))
    test, train = order[:n_test], order[n_test:]
    feat = np.log(lat).reshape(-1, 1)
    tree = DecisionTreeClassifier(max_depth=max_depth, min_samples_leaf=5, random_state=seed)
    tree.fit(feat[train], y[train])
    acc = float((tree.predict(feat[test]) == y[test]).mean())
    values, counts = np.unique(y[train], return_counts=True)
    chance = float((y[test] == values[counts.argmax()]).mean())
    return ExitInference(accuracy=acc, chance=chance, n_train=int(train.size), n_test=int(test.size))


def timing_queries(n: int, *, seed: int = 0, id_images: Tensor | None = None) -> tuple[Tensor, list[str]]:
    """``n`` single-image queries, shuffled: half ID test images, a quarter noise, a quarter patches.

    Args:
        n: queries (at least 4).
        seed: seeds the choice and the order.
        id_images: the ID test images (default: the embedded MNIST test digits); noise and patches
            are drawn at their shape.

    Returns:
        Images ``(n, C, H, W)`` and each image's source (``"id"``, ``"noise"``, ``"patches"``).
    """
    if n < 4:
        raise ConfigError(f"need at least 4 queries, got {n}")
    if id_images is None:
        from fortress.data.resolve import resolve_data

        id_images = resolve_data().test.x
    c, h, w = (int(v) for v in id_images.shape[1:])
    gen = torch.Generator().manual_seed(seed)
    n_id, n_noise = n // 2, n // 4
    noise, patches = load_pool("noise", (c, h, w)).x, load_pool("patches", (c, h, w)).x
    parts = [("id", id_images), ("noise", noise), ("patches", patches)]
    xs, kinds = [], []
    for (kind, pool), k in zip(parts, (n_id, n_noise, n - n_id - n_noise), strict=True):
        idx = torch.randperm(pool.shape[0], generator=gen)[:k]
        if idx.numel() < k:
            raise ConfigError(f"the {kind} pool holds {pool.shape[0]} images, fewer than the {k} asked for")
        xs.append(pool[idx])
        kinds += [kind] * k
    perm = torch.randperm(n, generator=gen)
    return torch.cat(xs)[perm], [kinds[i] for i in perm.tolist()]


@dataclass(frozen=True)
class ModeTiming:
    """One compute mode, measured.

    Attributes:
        mode: ``dynamic``, ``full`` or ``padded``.
        early: latency → "exit 0 or not".
        exit_index: latency → exit index.
        latency_by_exit: per true exit: ``n``, ``mean_ms``, ``p50_ms``, ``p90_ms``.
        images_per_s: throughput at ``batch`` images per request under ``concurrency`` clients.
        server_cpu_ms_per_1k: server process CPU time per 1,000 images in the throughput run, its
            warm-up batches included (``None`` where ``/proc`` is missing).
        p50_ms_batch: median latency of the throughput run's requests.
        errors: non-200 answers (both runs).
    """

    mode: str
    early: ExitInference
    exit_index: ExitInference
    latency_by_exit: dict[int, dict[str, float]]
    images_per_s: float
    server_cpu_ms_per_1k: float | None
    p50_ms_batch: float
    errors: int


@dataclass(frozen=True)
class TimingReport:
    """Every mode's figures and the run's settings."""

    modes: list[ModeTiming]
    queries: int
    exit_hist: list[int]
    batch: int
    concurrency: int
    requests: int
    threads: int
    workers: int
    seed: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _npy_body(x: Tensor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(x.numpy(), dtype=np.float32), allow_pickle=False)
    return json.dumps({"npy": base64.b64encode(buf.getvalue()).decode()}).encode()


def _cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (Linux ``/proc``), or ``None``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def _server(model_dir: Path, compute: str, *, workers: int, threads: int) -> Iterator[tuple[str, str, int]]:
    """``fortress serve`` in a subprocess on a free loopback port; yields ``(url, api key, pid)``."""
    import httpx

    from fortress.serve.keys import KeyStore

    with tempfile.TemporaryDirectory(prefix="fortress-timing-") as tmp:
        keys = Path(tmp) / "keys.db"
        store = KeyStore(keys, create=True)
        _, secret = store.add("timing")
        store.close()
        port = _free_port()
        cmd = [sys.executable, "-m", "fortress", "serve", str(model_dir), "--port", str(port), "--keys", str(keys)]
        cmd += ["--compute", compute, "--workers", str(workers), "--threads", str(threads), "--no-profiles"]
        url = f"http://127.0.0.1:{port}"
        with (Path(tmp) / "server.log").open("wb") as out:
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
            try:
                deadline = time.monotonic() + 60
                while True:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        tail = (Path(tmp) / "server.log").read_text(errors="replace")[-2000:]
                        raise FortressError(f"the {compute} server did not come up: {tail}")
                    try:
                        if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                            break
                    except httpx.HTTPError:
                        time.sleep(0.1)
                yield url, secret, proc.pid
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
                    try:
                        proc.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()


def _probe(url: str, key: str, bodies: Sequence[bytes], warmup: int) -> tuple[np.ndarray, int]:
    """Send ``bodies`` one at a time; return each response time (s) and the count of non-200 answers."""
    import httpx

    lat = np.empty(len(bodies))
    errors = 0
    headers = {"X-API-Key": key, "content-type": "application/json"}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        for i in range(warmup):  # let the server reach its steady state (and padded its calibration)
            client.post("/v1/predict", content=bodies[i % len(bodies)])
        for i, body in enumerate(bodies):
            t0 = time.perf_counter()
            r = client.post("/v1/predict", content=body)
            lat[i] = time.perf_counter() - t0
            errors += r.status_code != 200
    return lat, errors


def _load(url: str, key: str, bodies: Sequence[bytes], requests: int, concurrency: int) -> dict[str, float]:
    """``requests`` batches from ``concurrency`` client threads: wall time, p50 latency, errors."""
    import httpx

    headers = {"X-API-Key": key, "content-type": "application/json"}
    per = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]

    def client(i: int) -> tuple[list[float], int]:
        out, errors = [], 0
        with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
            http.post("/v1/predict", content=bodies[i % len(bodies)])  # connection and warm-up, not counted
            barrier.wait()
            for j in range(per[i]):
                t0 = time.perf_counter()
                r = http.post("/v1/predict", content=bodies[(i + j * concurrency) % len(bodies)])
                out.append(time.perf_counter() - t0)
                errors += r.status_code != 200
        return out, errors

    barrier = threading.Barrier(concurrency + 1)
    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(client, i) for i in range(concurrency)]
        barrier.wait()
        t0 = time.perf_counter()
        results = [f.result() for f in futures]
        wall = time.perf_counter() - t0
    lat = np.concatenate([np.asarray(r[0]) for r in results])
    return {"wall_s": wall, "p50_ms": float(np.median(lat) * 1e3), "errors": float(sum(r[1] for r in results))}


def bench_timing(
    model_dir: Path,
    *,
    modes: Sequence[str] = MODES,
    queries: int = 600,
    batch: int = 64,
    requests: int = 100,
    concurrency: int = 4,
    workers: int = 2,
    threads: int = 1,
    warmup: int = 30,
    seed: int = 0,
    data: DataSpec | None = None,
) -> TimingReport:
    """Measure the exit-timing channel and the throughput of each compute mode against the real server.

    Args:
        model_dir: a saved DNF (``fortress protect``).
        modes: compute modes to serve (``dynamic``, ``full``, ``padded``).
        queries: single-image queries timed per mode (half ID test digits, half noise/patches).
        batch: images per request in the throughput run.
        requests: requests in the throughput run.
        concurrency: client threads in the throughput run.
        workers: the server's inference workers (``--workers``).
        threads: the server's torch threads (``--threads``).
        warmup: untimed requests sent before the probe.
        seed: seeds the queries and the classifier's train/test split.
        data: the ID data (default: the spec the model remembers, else the embedded digits).

    Returns:
        A :class:`TimingReport`; the same queries are sent, in the same order, to every mode.

    Example:
        >>> rep = bench_timing(Path("dnf-out"), modes=["dynamic", "full"], queries=400)
        >>> [(m.mode, m.early.accuracy, m.early.chance) for m in rep.modes]
    """
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ConfigError(f"modes must be among {', '.join(MODES)}, got {list(modes)}")
    for label, value in (("batch", batch), ("requests", requests), ("concurrency", concurrency)):
        if value < 1:
            raise ConfigError(f"{label} must be >= 1, got {value}")
    defense = load_defense(Path(model_dir))
    if not isinstance(defense, DNF):
        raise ConfigError(f"{model_dir} holds defense {defense.name!r}; the timing channel needs a DNF")
    defense.compute = "dynamic"
    from fortress.bench.pipeline import data_for

    x, _ = timing_queries(queries, seed=seed, id_images=data_for(defense.victim, data).test.x)
    with torch.inference_mode():
        exits = defense.respond(x).exits
    assert exits is not None
    y = exits.numpy()
    bodies = [_npy_body(x[i : i + 1]) for i in range(queries)]
    gen = torch.Generator().manual_seed(seed + 1)
    big = [_npy_body(x[torch.randint(queries, (batch,), generator=gen)]) for _ in range(8)]
    rows = []
    for mode in modes:
        log.info("timing %s: %d single-image queries, then %d batches of %d", mode, queries, requests, batch)
        with _server(Path(model_dir), mode, workers=workers, threads=threads) as (url, key, pid):
            lat, errors = _probe(url, key, bodies, warmup)
            cpu0 = _cpu_s(pid)
            load = _load(url, key, big, requests, concurrency)
            cpu1 = _cpu_s(pid)
        ms = lat * 1e3
        by_exit = {
            int(e): {
                "n": float((y == e).sum()),
                "mean_ms": float(ms[y == e].mean()),
                "p50_ms": float(np.median(ms[y == e])),
                "p90_ms": float(np.quantile(ms[y == e], 0.9)),
            }
            for e in np.unique(y)
        }
        cpu = None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) * 1e6 / ((requests + concurrency) * batch)
        rows.append(
            ModeTiming(
                mode=mode,
                early=exit_inference(lat, (y == 0).astype(np.int64), max_depth=1, seed=seed),
                exit_index=exit_inference(lat, y, max_depth=3, seed=seed),
                latency_by_exit=by_exit,
                images_per_s=requests * batch / load["wall_s"],
                server_cpu_ms_per_1k=cpu,
                p50_ms_batch=load["p50_ms"],
                errors=errors + int(load["errors"]),
            )
        )
    return TimingReport(
        modes=rows,
        queries=queries,
        exit_hist=torch.bincount(exits, minlength=defense.num_exits).tolist(),
        batch=batch,
        concurrency=concurrency,
        requests=requests,
        threads=threads,
        workers=workers,
        seed=seed,
    )
