"""End to end: the real server (``fortress serve``, uvicorn, a free 127.0.0.1 port, its own process).

Answers equal the local defense's; budgets are exact under concurrent clients; usage survives a
restart; a revoked or missing key is refused; ``fortress attack --target URL`` spends exactly the
queries the server counts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fortress.bench.records import read_records
from fortress.cli import app as cli_app
from fortress.defenses import load_defense
from fortress.oracle import HttpOracle, LocalOracle
from fortress.serve import KeyStore
from helpers import sharp_random_dnf


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RealServer:
    """``python -m fortress serve`` in a subprocess; stopped with SIGTERM (graceful)."""

    def __init__(self, model: Path, keys: Path, log: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "fortress", "serve", str(model), "--port", str(self.port), "--keys", str(keys)]
        self._log = log.open("ab")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([*cmd, *extra], stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not come up: {log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    root = tmp_path_factory.mktemp("e2e")
    sharp_random_dnf().save(root / "dnf")
    keys = root / "keys.db"
    store = KeyStore(keys, create=True)
    state: dict[str, object] = {"root": root, "keys": keys, "store": store}
    state["server"] = RealServer(root / "dnf", keys, root / "server.log")
    yield state
    server = state["server"]
    assert isinstance(server, RealServer)
    server.stop()  # the one running now (a test restarts it)
    store.close()


def test_answers_over_real_http_equal_the_local_defense(env: dict[str, object]) -> None:
    store, server, root = env["store"], env["server"], env["root"]
    assert isinstance(store, KeyStore) and isinstance(server, RealServer) and isinstance(root, Path)
    _, secret = store.add("eq")
    local = LocalOracle(load_defense(root / "dnf"))
    with HttpOracle(server.url, secret) as remote:
        for n in (1, 7, 64):
            x = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(n))
            assert torch.equal(remote.query(x), local.query(x))
        assert remote.queries_used == store.authenticate(secret).used == 72


def test_budgets_are_exact_under_concurrent_clients(env: dict[str, object]) -> None:
    store, server = env["store"], env["server"]
    assert isinstance(store, KeyStore) and isinstance(server, RealServer)
    key, secret = store.add("race", budget=500)
    _, admin = store.add("ops", admin=True)
    granted: list[int] = []
    statuses: list[int] = []
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=server.url, headers={"X-API-Key": secret}, timeout=30) as http:
            for _ in range(12):
                n = int(rng.integers(1, 33))
                x = rng.random((n, 1, 28, 28), dtype=np.float32)
                r = http.post("/v1/predict", json={"images": x.tolist()})
                with lock:
                    statuses.append(r.status_code)
                    if r.status_code == 200:
                        granted.append(n)

    threads = [threading.Thread(target=client, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(statuses) <= {200, 429} and 429 in statuses  # 6 x 12 batches of ~16 ask for ~1,200
    used = store.get(key.key_id).used
    assert sum(granted) == used and 500 - 32 < used <= 500
    metrics = httpx.get(f"{server.url}/metrics", headers={"X-API-Key": admin}).text
    assert f'fortress_queries_total{{key="{key.key_id}"}} {used}' in metrics


def test_usage_survives_a_restart_and_revocation_is_immediate(env: dict[str, object]) -> None:
    store, server, root, keys = env["store"], env["server"], env["root"], env["keys"]
    assert isinstance(store, KeyStore) and isinstance(server, RealServer) and isinstance(root, Path)
    assert isinstance(keys, Path)
    _, secret = store.add("durable", budget=100)
    body = {"images": np.full((30, 1, 28, 28), 0.5, np.float32).tolist()}
    assert httpx.post(f"{server.url}/v1/predict", json=body, headers={"X-API-Key": secret}).status_code == 200
    server.stop()
    again = RealServer(root / "dnf", keys, root / "server2.log", "--compute", "full")
    env["server"] = again
    info = httpx.get(f"{again.url}/v1/info", headers={"X-API-Key": secret}).json()
    assert info["queries_used"] == 30 and info["budget"] == 100
    res = CliRunner().invoke(cli_app, ["keys", "revoke", secret.split("_")[1], "--keys", str(keys)])
    assert res.exit_code == 0, res.output
    r = httpx.post(f"{again.url}/v1/predict", json=body, headers={"X-API-Key": secret})
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    assert httpx.post(f"{again.url}/v1/predict", json=body).status_code == 401
    assert httpx.post(f"{again.url}/v1/predict", json=body, headers={"X-API-Key": "fk_x"}).status_code == 401


def test_attack_cli_against_the_server_spends_what_the_server_counts(env: dict[str, object]) -> None:
    store, server, root = env["store"], env["server"], env["root"]
    assert isinstance(store, KeyStore) and isinstance(server, RealServer) and isinstance(root, Path)
    key, secret = store.add("attacker", budget=64)
    out = root / "attack"
    args = ["attack", "knockoff", "--target", server.url, "--api-key", secret, "--reference", str(root / "dnf")]
    args += ["--budget", "64", "--pool", "mnist-attacker", "--param", "epochs=1", "--out", str(out)]
    res = CliRunner().invoke(cli_app, args)
    assert res.exit_code == 0, res.output
    rec = read_records(out / "results.jsonl")[-1]
    assert rec.queries_used == store.get(key.key_id).used == 64
    assert rec.config["target"] == server.url and rec.defense == "dnf"
    res = CliRunner().invoke(cli_app, args)  # the key's budget is spent: refused, one line
    assert res.exit_code == 1 and "budget" in res.output
