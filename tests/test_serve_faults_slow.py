"""Heavy fault runs against real servers: SIGKILL during bursts, memory under 100 concurrent large bodies,
two server processes sharing one ledger. Each prints the figures it measured (``-s`` shows them)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from fortress.monitor import calibrate_exit_sprt
from fortress.serve import KeyStore
from helpers import sharp_random_dnf
from serve_harness import PeakRss, Served, npy_body

pytestmark = pytest.mark.slow

SHAPE = (1, 28, 28)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("slow-faults")
    sharp_random_dnf().save(root / "dnf")
    return root / "dnf"


def _post(client: httpx.Client, secret: str, x: np.ndarray[Any, Any]) -> httpx.Response:
    headers = {"X-API-Key": secret, "content-type": "application/json"}
    return client.post("/v1/predict", content=npy_body(x), headers=headers)


def _once(url: str, secret: str, x: np.ndarray[Any, Any]) -> dict[str, Any]:
    with httpx.Client(base_url=url, timeout=60) as http:
        out: dict[str, Any] = _post(http, secret, x).json()
    return out


# --------------------------------------------------------------------------------------------------
# 1. a crash never charges for an answer that was not sent


def _burst_until_killed(srv: Served, secret: str, clients: int, kill_after_s: float) -> dict[str, int]:
    answered = [0] * clients
    lost = [0] * clients  # rows of requests that got no answer (in flight at the kill)
    stop = threading.Event()

    def client(i: int) -> None:
        rng = np.random.default_rng(i)
        with httpx.Client(base_url=srv.url, timeout=30) as http:
            while not stop.is_set():
                n = int(rng.integers(1, 33))
                x = rng.random((n, *SHAPE), dtype=np.float32)
                try:
                    r = _post(http, secret, x)
                except httpx.HTTPError:
                    lost[i] += n
                    return
                if r.status_code == 200 and r.json()["queries_charged"] == n:
                    answered[i] += n
                else:
                    lost[i] += n
                    return

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(kill_after_s)
    srv.kill()
    stop.set()
    for t in threads:
        t.join()
    return {"answered": sum(answered), "in_flight": sum(lost)}


def test_sigkill_during_bursts_charges_only_answered_rows(model: Path, tmp_path: Path) -> None:
    """Three runs of 20 concurrent clients, the server SIGKILLed mid-burst; the ledger is then opened again."""
    rows = []
    for run in range(3):
        keys = tmp_path / f"keys{run}.db"
        store = KeyStore(keys, create=True)
        key, secret = store.add("burst")
        store.close()
        srv = Served(model, keys, tmp_path / f"server{run}.log", "--workers", "2")
        got = _burst_until_killed(srv, secret, clients=20, kill_after_s=random.Random(run).uniform(1.5, 3.5))
        reopened = KeyStore(keys)  # opening the ledger releases what the killed process held
        rec = reopened.get(key.key_id)
        reopened.close()
        window = rec.used - got["answered"]
        rows.append({**got, "charged": rec.used, "reserved_after_open": rec.reserved, "charged_not_received": window})
        print(f"SIGKILL run {run}: {json.dumps(rows[-1])}")
        assert rec.reserved == 0  # nothing stays reserved for the dead process
        assert rec.used >= got["answered"]  # every answer sent was charged (the charge precedes the send)
        assert window <= got["in_flight"]  # any excess is an answer charged while leaving: its rows were in flight
    assert sum(r["answered"] for r in rows) > 0


# --------------------------------------------------------------------------------------------------
# 2. large bodies from nobody (or from an exhausted key) cost no memory, and do not slow a valid client


def _latencies(srv: Served, secret: str, n: int) -> list[float]:
    x = np.random.default_rng(0).random((64, *SHAPE), dtype=np.float32)
    body = npy_body(x)
    out = []
    headers = {"X-API-Key": secret, "content-type": "application/json"}
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        for _ in range(n):
            t0 = time.perf_counter()
            r = http.post("/v1/predict", content=body, headers=headers)
            out.append(time.perf_counter() - t0)
            assert r.status_code == 200
    return out


_ABUSER = r"""
import json, os, socket, sys, threading
os.nice(19)  # the attacker's own CPU is not the server's to pay for: on a shared box it yields first
port, count, size, headers = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rounds = int(sys.argv[5])
body = b'{"images": [' + b"0.5," * (size // 4) + b"0.5]}"
results = []

def abuse():
    head = "POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + headers
    head += "Content-Length: %d\r\n\r\n" % len(body)
    raw = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
            sock.sendall(head.encode())
            try:
                sock.sendall(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # answered early: the answer is in the receive queue
            while b"\r\n\r\n" not in raw or len(raw.partition(b"\r\n\r\n")[2]) < 40:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                raw += chunk
    except OSError as exc:
        results.append([0, type(exc).__name__])
        return
    head_b, _, rest = raw.partition(b"\r\n\r\n")
    try:
        results.append([int(head_b.split()[1]), json.loads(rest[: rest.rfind(b"}") + 1])["error"]])
    except (ValueError, KeyError, IndexError):
        results.append([0, "unreadable answer"])

print("ready", flush=True)
sys.stdin.readline()
def abuser():
    for _ in range(rounds):  # a new upload as soon as the last one was answered: count always in flight
        abuse()

threads = [threading.Thread(target=abuser) for _ in range(count)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(results), flush=True)
"""


def _abusers(port: int, count: int, size: int, headers: str, rounds: int = 1) -> subprocess.Popen[str]:
    """``count`` concurrent uploads of a ``size``-byte JSON body, ``rounds`` times over, from a process of their own.

    The process starts and waits; a line on its stdin sets it off; it prints the answers' (status, error).
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", _ABUSER, str(port), str(count), str(size), headers, str(rounds)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.parametrize("rounds", [1, 20], ids=["burst", "sustained"])
@pytest.mark.parametrize("who", ["unauthenticated", "budget-0"])
def test_100_concurrent_30mib_bodies_cost_no_memory_and_no_latency(
    model: Path, tmp_path: Path, who: str, rounds: int
) -> None:
    """100 uploads of 30 MiB at once (burst), or 100 kept in flight for 2,000 uploads (sustained).

    Memory stays flat in both. The valid client's p99 is held to 2x its idle p99 under the burst;
    under the sustained run (a flood of ~500 new connections a second on the same two cores as the
    server) it is measured and printed, not held to a bound.
    """
    keys = tmp_path / "keys.db"
    store = KeyStore(keys, create=True)
    _, secret = store.add("valid")
    _, broke = store.add("broke", budget=0)
    store.close()
    with Served(model, keys, tmp_path / "server.log", "--workers", "2") as srv:
        _latencies(srv, secret, 20)  # warm-up
        idle = _latencies(srv, secret, 200)
        headers = "" if who == "unauthenticated" else f"X-API-Key: {broke}\r\n"
        abusers = _abusers(srv.port, 100, 30 * 2**20, headers, rounds=rounds)
        loaded: list[float] = []
        with PeakRss(srv.pid) as rss:
            assert abusers.stdin is not None and abusers.stdout is not None
            abusers.stdin.write("go\n")
            abusers.stdin.flush()
            # the valid client's requests while 100 uploads are in flight (one batch of 100, or 100 kept going)
            while abusers.poll() is None or len(loaded) < 30:
                loaded.extend(_latencies(srv, secret, 1))
            results = [tuple(r) for r in json.loads(abusers.stdout.read())]
        p99_idle, p99_loaded = float(np.percentile(idle, 99)), float(np.percentile(loaded, 99))
        expected = (401, "unauthorized") if who == "unauthenticated" else (429, "budget_exceeded")
        figures = {
            "who": who,
            "uploads": len(results),
            "rss_start_mb": round(rss.start / 2**20, 1),
            "rss_growth_mb": round(rss.growth_mb, 1),
            "p99_idle_ms": round(1000 * p99_idle, 1),
            "p99_under_abuse_ms": round(1000 * p99_loaded, 1),
            "valid_requests_during_abuse": len(loaded),
            "answers": {f"{s} {c}": results.count((s, c)) for s, c in set(results)},
        }
        print(f"100 x 30 MiB: {json.dumps(figures)}")
        assert rss.growth_mb < 100
        assert results.count(expected) == 100 * rounds  # every upload got the JSON refusal
        if rounds == 1:
            assert p99_loaded <= 2 * p99_idle


def test_garbage_json_from_a_key_with_budget_costs_bounded_memory(model: Path, tmp_path: Path) -> None:
    """A key that may query sends 30 MiB bodies that are not a batch: read within the body budget, refused early."""
    keys = tmp_path / "keys.db"
    store = KeyStore(keys, create=True)
    key, secret = store.add("valid", budget=10**6)
    store.close()
    with Served(model, keys, tmp_path / "server.log", "--workers", "2") as srv:
        _latencies(srv, secret, 5)
        results: list[tuple[int, str]] = []
        with PeakRss(srv.pid) as rss:
            procs = [_abusers(srv.port, 10, 30 * 2**20, f"X-API-Key: {secret}\r\n") for _ in range(2)]
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            for proc in procs:
                assert proc.stdout is not None
                results += [tuple(r) for r in json.loads(proc.stdout.read())]
                proc.wait()
        print(f"20 x 30 MiB malformed JSON from a key with budget: growth {rss.growth_mb:.1f} MB, answers {results}")
        assert results.count((422, "invalid_input")) == 20
        assert rss.growth_mb < 2 * 32 + 100  # the body budget (2 bodies of 32 MiB) plus a bounded decode
        reopened = KeyStore(keys)
        assert reopened.get(key.key_id).used == 5 * 64
        reopened.close()


# --------------------------------------------------------------------------------------------------
# 3. two server processes on one ledger: budgets exact, flags and profiles shared, a late start harmless


def _concurrently(fn: Callable[[int], None], n: int) -> None:
    threads = [threading.Thread(target=fn, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_two_server_processes_share_budgets_flags_and_profiles(model: Path, tmp_path: Path) -> None:
    id_exits = torch.full((2000,), 3)
    cal = calibrate_exit_sprt(id_exits, 4, horizon=1000, simulations=100, seed=0).save(tmp_path / "cal.json")
    mon = ("--monitor", "exit-sprt", "--monitor-calibration", str(cal), "--monitor-response", "degrade-label")
    keys = tmp_path / "keys.db"
    store = KeyStore(keys, create=True)
    race, race_secret = store.add("race", budget=500)
    user, user_secret = store.add("user")
    _, admin = store.add("ops", admin=True)
    servers: list[Served] = []
    granted: list[int] = []
    lock = threading.Lock()

    def client(i: int, srv: Served) -> None:
        rng = np.random.default_rng(100 + i)
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            for _ in range(12):
                n = int(rng.integers(1, 33))
                r = _post(http, race_secret, rng.random((n, *SHAPE), dtype=np.float32))
                assert r.status_code in (200, 429), r.text
                if r.status_code == 200:
                    with lock:
                        granted.append(n)

    try:
        a = Served(model, keys, tmp_path / "a.log", *mon)
        servers.append(a)
        # B starts while A serves a burst: A's reservations in flight are not released by B's opening
        burst = threading.Thread(target=_concurrently, args=(lambda i: client(i, a), 5))
        burst.start()
        time.sleep(0.5)
        b = Served(model, keys, tmp_path / "b.log", *mon)
        servers.append(b)
        burst.join()
        _concurrently(lambda i: client(i, a if i % 2 else b), 6)
        rec = store.get(race.key_id)
        print(f"two servers, budget 500: granted {sum(granted)}, ledger used {rec.used}, reserved {rec.reserved}")
        assert sum(granted) == rec.used <= 500 and rec.reserved == 0 and rec.used > 500 - 32
        # a flag raised in A holds in B from B's next request; profile counts are the queries answered
        x = np.random.default_rng(0).random((16, *SHAPE), dtype=np.float32)
        assert _once(a.url, user_secret, x)["output_mode"] == "hard"  # flagged by this very batch in A
        assert _once(b.url, user_secret, x)["output_mode"] == "hard"  # B never saw the key before
        for srv in (a, b, a, b):
            _once(srv.url, user_secret, x[:3])
        route = f"/v1/admin/keys/{user.key_id}/profile"
        prof_a = httpx.get(f"{a.url}{route}", headers={"X-API-Key": admin}).json()
        prof_b = httpx.get(f"{b.url}{route}", headers={"X-API-Key": admin}).json()
        used = store.get(user.key_id).used
        print(
            f"two servers, profiles: ledger {used}, profile via A {prof_a['profile']['queries']}, via B "
            f"{prof_b['profile']['queries']}; flagged_at A {prof_a['verdict']['flagged_at']} "
            f"B {prof_b['verdict']['flagged_at']}"
        )
        assert prof_a["profile"]["queries"] == prof_b["profile"]["queries"] == used == 44
        assert prof_a["verdict"]["flagged"] and prof_b["verdict"]["flagged"]
        assert prof_a["verdict"]["flagged_at"] == prof_b["verdict"]["flagged_at"]
        for srv in servers:
            srv.stop()
        again = Served(model, keys, tmp_path / "c.log", *mon)  # after a restart the key is still flagged
        servers.append(again)
        assert _once(again.url, user_secret, x)["output_mode"] == "hard"
    finally:
        for srv in servers:
            srv.stop()
        store.close()
