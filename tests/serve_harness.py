"""A real ``fortress serve`` for fault tests: its own process on a free loopback port, killable, measurable."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def npy_body(x: np.ndarray[Any, Any]) -> bytes:
    """A JSON ``{"npy": ...}`` predict body."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(x, dtype=np.float32), allow_pickle=False)
    return b'{"npy": "' + base64.b64encode(buf.getvalue()) + b'"}'


class Served:
    """``python -m fortress serve MODEL --keys KEYS ...`` in a subprocess, waited for until healthy.

    Args:
        model: saved model directory.
        keys: the key ledger (must exist).
        log: where the server's stdout and stderr go (appended).
        extra: more ``fortress serve`` options.
    """

    def __init__(self, model: Path, keys: Path, log: Path, *extra: str, startup_s: float = 90.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "fortress", "serve", str(model), "--port", str(self.port), "--keys", str(keys)]
        self._out = log.open("ab")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([*cmd, *extra], stdout=self._out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._out.close()
                raise RuntimeError(f"server exited with {self.proc.returncode}: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not come up: {log.read_text()[-2000:]}")

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs (a crash)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self._out.close()

    def stop(self) -> None:
        """SIGINT (graceful: in-flight requests finish)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


class PeakRss:
    """Sample a process's resident memory every ``every_s`` in a thread; ``peak`` and ``start`` in bytes."""

    def __init__(self, pid: int, every_s: float = 0.01) -> None:
        import psutil

        self._proc = psutil.Process(pid)
        self.start = int(self._proc.memory_info().rss)
        self.peak = self.start
        self._stop = threading.Event()
        self._every = every_s
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, int(self._proc.memory_info().rss))
            except Exception:  # the process ended
                return
            self._stop.wait(self._every)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def raw_request(port: int, data: bytes, *, read_timeout_s: float = 15.0) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` as-is on a fresh connection; return the answer's status, headers and body.

    Reads until the answer is complete (its ``Content-Length``) or the server closes the connection.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout_s) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # answered early: read the answer below
            sock.sendall(data)
        raw = b""
        while True:
            head, sep, body = raw.partition(b"\r\n\r\n")
            if sep:
                lines = head.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
                if "content-length" in headers and len(body) >= int(headers["content-length"]):
                    return int(lines[0].split()[1]), headers, body[: int(headers["content-length"])]
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                chunk = b""
            if not chunk:
                break
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and lines[0].startswith("HTTP/") else 0
    return status, {}, body
