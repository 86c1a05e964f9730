"""Faults a demanding operator tries, against the real server (uvicorn on a loopback port, its own process).

Every limit and every input format gets the documented status and a JSON body naming the limit,
and nothing is charged; JSON is strict; a missing or damaged ledger is one line naming the file;
reservations of a killed process are released, a live one's are not; flags and profile counts are
shared by every server on a ledger; saved weights are fsynced. The heavy runs (SIGKILL bursts,
memory under 100 concurrent large bodies, two real servers) are in ``test_serve_faults_slow.py``.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from fortress.cli import app as cli_app
from fortress.errors import ArtifactError, BudgetExceeded
from fortress.monitor import calibrate_exit_sprt
from fortress.serve import KeyStore, ServeSettings, create_app
from fortress.serve.keys import init_ledger
from helpers import sharp_random_dnf
from serve_harness import Served, npy_body, raw_request

SHAPE = (1, 28, 28)
MAX_BATCH = 4
MAX_BODY = 2**20


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One real server with small limits (batch 4, body 1 MiB, timeout 2 s) and three keys."""
    root = tmp_path_factory.mktemp("faults")
    sharp_random_dnf().save(root / "dnf")
    keys = root / "keys.db"
    store = KeyStore(keys, create=True)
    user, secret = store.add("user", budget=1000)
    _, broke = store.add("broke", budget=0)
    args = ("--max-batch", str(MAX_BATCH), "--max-body-mb", "1", "--timeout", "2")
    server = Served(root / "dnf", keys, root / "server.log", *args)
    yield {"server": server, "store": store, "user": user, "secret": secret, "broke": broke, "root": root}
    server.stop()
    store.close()


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((h, w), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _head(path: str = "/v1/predict", *lines: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(f"{ln}\r\n" for ln in lines) + "\r\n").encode()


IMG = np.full((1, *SHAPE), 0.5, np.float32)

# name, how to send, expected status, error code, fragment naming the limit
LIMITS: list[tuple[str, str, Any, int, str, str]] = [
    (
        "1 MiB API-key header",
        "raw",
        lambda s: _head("/v1/predict", "X-API-Key: " + "k" * 2**20),
        431,
        "headers_too_large",
        "16384 bytes",
    ),
    (
        "64 KiB X-Request-ID",
        "raw",
        lambda s: _head("/v1/predict", f"X-API-Key: {s}", "X-Request-ID: " + "r" * 65536),
        431,
        "headers_too_large",
        "16384 bytes",
    ),
    (
        "20 KiB request line",
        "raw",
        lambda s: _head("/v1/predict?" + "q" * 20000, f"X-API-Key: {s}"),
        431,
        "headers_too_large",
        "16384 bytes",
    ),
    (
        "malformed Content-Length",
        "raw",
        lambda s: _head("/v1/predict", f"X-API-Key: {s}", "Content-Length: 12abc"),
        400,
        "bad_request",
        "Content-Length must be one non-negative integer",
    ),
    (
        "conflicting Content-Length",
        "raw",
        lambda s: _head("/v1/predict", f"X-API-Key: {s}", "Content-Length: 2", "Content-Length: 3"),
        400,
        "bad_request",
        "Content-Length",
    ),
    (
        "unsupported Transfer-Encoding",
        "raw",
        lambda s: _head("/v1/predict", f"X-API-Key: {s}", "Transfer-Encoding: gzip"),
        501,
        "not_implemented",
        "chunked",
    ),
    (
        "declared body over the limit, no key",
        "raw",
        lambda s: _head("/v1/predict", f"Content-Length: {MAX_BODY + 1}") + b"x" * 1000,
        413,
        "body_too_large",
        "limit of 1,048,576 bytes",
    ),
    (
        "chunked body over the limit",
        "chunked",
        lambda s: (b"x" * 65536 for _ in range(20)),
        413,
        "body_too_large",
        "limit of 1,048,576 bytes",
    ),
    (
        "body slower than the timeout",
        "raw",
        lambda s: (
            _head("/v1/predict", f"X-API-Key: {s}", "Content-Type: application/json", "Content-Length: 100") + b'{"npy"'
        ),
        408,
        "request_timeout",
        "within 2 s",
    ),
    ("no API key", "json", lambda s: (None, npy_body(IMG)), 401, "unauthorized", "missing API key"),
    ("4 KiB API key", "json", lambda s: ("k" * 4096, npy_body(IMG)), 401, "unauthorized", "over the limit of 256"),
    ("budget 0, 900 KB body", "json", lambda s: ("BROKE", b"x" * 900_000), 429, "budget_exceeded", "budget of 0"),
    ("text/plain body", "ctype", lambda s: b"hello", 415, "unsupported_media_type", "application/json"),
    (
        "5 images as JSON arrays",
        "json",
        lambda s: (s, json.dumps({"images": np.zeros((5, *SHAPE)).tolist()})),
        413,
        "too_large",
        "max batch of 4",
    ),
    ("5 images as .npy", "json", lambda s: (s, npy_body(np.zeros((5, *SHAPE)))), 413, "too_large", "max batch of 4"),
    ("5 PNG files", "files", lambda s: [_png(28, 28)] * 5, 413, "too_large", "max batch of 4"),
    ("6 tiny parts", "files", lambda s: [b"x"] * 6, 413, "too_large", "upload of 6 files is over"),
    (
        "27-wide JSON image",
        "json",
        lambda s: (s, json.dumps({"images": np.zeros((1, 1, 28, 27)).tolist()})),
        422,
        "invalid_input",
        "images[0][0][0] has 27 values, expected 28",
    ),
    (
        "27-wide .npy image",
        "json",
        lambda s: (s, npy_body(np.zeros((1, 1, 28, 27)))),
        422,
        "invalid_input",
        "expected (C, H, W) = (1, 28, 28)",
    ),
    ("27-wide PNG", "files", lambda s: [_png(27, 28)], 422, "invalid_input", "expected 28x28"),
]


def _send(srv: Served, how: str, make: Any, secret: str, broke: str) -> tuple[int, dict[str, str], bytes]:
    url = f"{srv.url}/v1/predict"
    if how == "raw":
        return raw_request(srv.port, make(secret))
    if how == "chunked":
        headers = {"X-API-Key": secret, "content-type": "application/json"}
        r = httpx.post(url, content=make(secret), headers=headers, timeout=30)
    elif how == "ctype":
        r = httpx.post(url, content=make(secret), headers={"X-API-Key": secret, "content-type": "text/plain"})
    elif how == "files":
        files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(make(secret))]
        r = httpx.post(url, files=files, headers={"X-API-Key": secret}, timeout=30)
    else:
        key, body = make(secret)
        headers = {"content-type": "application/json"}
        if key is not None:
            headers["X-API-Key"] = broke if key == "BROKE" else key
        r = httpx.post(url, content=body, headers=headers, timeout=30)
    return r.status_code, dict(r.headers), r.content


def test_every_limit_and_format_is_a_json_error_naming_the_limit(served: dict[str, Any]) -> None:
    srv, store, user = served["server"], served["store"], served["user"]
    failures = []
    for name, how, make, status, code, fragment in LIMITS:
        got, _, body = _send(srv, how, make, served["secret"], served["broke"])
        try:
            err = json.loads(body)
        except ValueError:
            err = {}
        if got != status or err.get("error") != code or fragment not in str(err.get("message")):
            failures.append(f"{name}: {got} {body[:300]!r}")
    assert not failures, "\n".join(failures)
    rec = store.get(user.key_id)
    assert rec.used == 0 and rec.reserved == 0  # nothing charged for any refusal
    # a valid request still works on every connection kind, and the ledger counts exactly it
    r = httpx.post(
        f"{srv.url}/v1/predict",
        content=npy_body(IMG),
        headers={"X-API-Key": served["secret"], "content-type": "application/json"},
    )
    assert r.status_code == 200 and store.get(user.key_id).used == 1


def test_request_ids_are_bounded_and_logs_never_echo_large_values(served: dict[str, Any]) -> None:
    srv = served["server"]
    long_id = "abc-" + "x" * 196
    headers = {"X-API-Key": served["secret"], "X-Request-ID": long_id, "content-type": "application/json"}
    r = httpx.post(f"{srv.url}/v1/predict", content=npy_body(IMG), headers=headers)
    assert r.status_code == 200 and r.headers["x-request-id"] != long_id and len(r.headers["x-request-id"]) <= 64
    good = httpx.post(f"{srv.url}/v1/predict", content=npy_body(IMG), headers={**headers, "X-Request-ID": "trace-7"})
    assert good.headers["x-request-id"] == "trace-7"
    raw_request(srv.port, _head("/v1/predict", "X-Request-ID: " + "r" * 65536))
    time.sleep(0.3)
    log = srv.log.read_text(errors="replace")
    assert long_id not in log and "r" * 1000 not in log and "k" * 1000 not in log
    assert max(len(line) for line in log.splitlines()) < 2000


def _image_with(token: str, row: int, col: int) -> bytes:
    """A JSON body of one valid 1x28x28 image whose element [0][0][row][col] is ``token``."""
    rows = [["0.5"] * 28 for _ in range(28)]
    rows[row][col] = token
    text = ", ".join("[" + ", ".join(r) + "]" for r in rows)
    return ('{"images": [[[' + text + "]]]}").encode()


BAD_JSON: list[tuple[bytes, str]] = [
    (_image_with('"0.5"', 3, 5), "images[0][0][3][5] is the string '0.5', expected a number"),
    (_image_with("true", 0, 0), "images[0][0][0][0] is true, expected a number"),
    (_image_with("false", 27, 27), "images[0][0][27][27] is false"),
    (_image_with("null", 1, 2), "images[0][0][1][2] is null"),
    (_image_with("1e999", 1, 2), "NaN or infinite"),
    (b'{"npy": null}', '"npy" is null'),
    (b'{"images": null}', '"images" is null'),
    (_image_with("0.5", 0, 0)[:-1] + b', "npy": null}', "exactly one"),
    (b'{"npy": "AAAA", "npy": "AAAA"}', '"npy" twice'),
    (b'{"images": [[[[NaN]]]]}', "'NaN', not a JSON number"),
    (b'{"images": [[[[0.5]]]]}', "images[0][0][0] has 1 values, expected 28"),
    (b'{"npy": "AAAA"} trailing', "unexpected data after the JSON object"),
]


@pytest.mark.parametrize(("body", "fragment"), BAD_JSON, ids=range(len(BAD_JSON)))
def test_json_is_strict_and_names_the_first_offending_element(
    served: dict[str, Any], body: bytes, fragment: str
) -> None:
    srv, store, user = served["server"], served["store"], served["user"]
    before = store.get(user.key_id).used
    headers = {"X-API-Key": served["secret"], "content-type": "application/json"}
    r = httpx.post(f"{srv.url}/v1/predict", content=body, headers=headers)
    assert r.status_code == 422 and r.json()["error"] == "invalid_input", r.text
    assert fragment in r.json()["message"], r.text
    assert store.get(user.key_id).used == before


# --------------------------------------------------------------------------------------------------
# the key ledger: missing, empty, damaged, foreign


def _damaged(path: Path) -> Path:
    store = KeyStore(path, create=True)
    for i in range(300):  # several table pages
        store.add(f"user-{i}", budget=10)
    store.close()
    data = bytearray(path.read_bytes())
    assert len(data) > 3 * 4096 and not Path(f"{path}-wal").exists()
    for page in range(1, len(data) // 4096):  # every table page's own header; the file's header (page 1) intact
        data[page * 4096 : page * 4096 + 12] = b"\x2a" * 12
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="damaged"):  # checked here, so a miss fails instead of serving
        KeyStore(path)
    return path


@pytest.mark.parametrize("case", ["missing", "empty", "damaged", "foreign", "directory"])
def test_a_missing_or_damaged_ledger_is_one_line_naming_the_file(tmp_path: Path, case: str) -> None:
    path = tmp_path / "keys.db"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "damaged":
        _damaged(path)
    elif case == "foreign":
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE t (x)")
    elif case == "directory":
        path.mkdir()
    sharp_random_dnf().save(tmp_path / "dnf")
    runner = CliRunner()
    for args in (["serve", str(tmp_path / "dnf"), "--keys", str(path)], ["keys", "list", "--keys", str(path)]):
        res = runner.invoke(cli_app, args)
        assert res.exit_code == 1, res.output
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and str(path) in res.output.replace("\n", ""), res.output
        assert "Traceback" not in res.output
    if case == "missing":
        assert not path.exists()  # nothing was created behind the operator's back
        with pytest.raises(ArtifactError, match="fortress keys init"):
            create_app(ServeSettings(tmp_path / "dnf", path))


def test_the_real_serve_command_refuses_a_missing_ledger(tmp_path: Path) -> None:
    sharp_random_dnf().save(tmp_path / "dnf")
    cmd = [sys.executable, "-m", "fortress", "serve", str(tmp_path / "dnf"), "--keys", str(tmp_path / "typo.db")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "no key ledger at" in res.stderr and "typo.db" in res.stderr
    assert len([ln for ln in res.stderr.splitlines() if ln.strip()]) <= 2  # the line (wrapped at most once)
    assert not (tmp_path / "typo.db").exists()
    init_ledger(tmp_path / "ok.db")
    with pytest.raises(ArtifactError, match="already exists"):
        init_ledger(tmp_path / "ok.db")


# --------------------------------------------------------------------------------------------------
# reservations: a killed process's are released, a live one's are not

_HOLDER = """
import sys, time
from pathlib import Path
from fortress.serve.keys import KeyStore
store = KeyStore(Path(sys.argv[1]))
store.reserve(sys.argv[2], 30)
print("reserved", flush=True)
time.sleep(600)
"""


def test_reservations_of_a_killed_process_are_released_and_a_live_ones_kept(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    store = KeyStore(path, create=True)
    key, _ = store.add("k", budget=50)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path), key.key_id], stdout=subprocess.PIPE, env=env)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"reserved"
        other = KeyStore(path)  # opening the ledger while the holder lives: its reservation stays
        assert other.get(key.key_id).reserved == 30
        with pytest.raises(BudgetExceeded):
            other.reserve(key.key_id, 30)  # 30 + 30 > 50, and the holder is alive
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        res = other.reserve(key.key_id, 30)  # the refusal now finds the holder dead and releases its 30
        assert other.get(key.key_id).reserved == 30
        other.commit(res)
        assert other.get(key.key_id).used == 30 and other.get(key.key_id).reserved == 0
        assert len(list(Path(f"{path}-owners").glob("*.lock"))) == 1  # the dead holder's lock file is gone
        other.close()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert store.get(key.key_id).used == 30
    store.close()


# --------------------------------------------------------------------------------------------------
# monitor state shared by two servers on one ledger (two apps here; two real processes in the slow suite)


def test_flags_and_profiles_are_shared_by_every_server_on_a_ledger(tmp_path: Path) -> None:
    dnf = sharp_random_dnf()
    id_exits = torch.full((2000,), 3)  # an ID profile that never leaves early: this DNF's traffic departs at once
    cal = calibrate_exit_sprt(id_exits, 4, horizon=1000, simulations=100, seed=0).save(tmp_path / "c.json")
    settings = ServeSettings(
        tmp_path / "dnf",
        tmp_path / "keys.db",
        monitor="exit-sprt",
        monitor_calibration=cal,
        monitor_response="degrade-label",
    )
    store = KeyStore(settings.keys_path, create=True)
    user, secret = store.add("user")
    _, admin = store.add("ops", admin=True)
    x = torch.rand(16, *SHAPE, generator=torch.Generator().manual_seed(0))
    body = npy_body(x.numpy())
    hdr = {"X-API-Key": secret, "content-type": "application/json"}
    route = f"/v1/admin/keys/{user.key_id}"
    with TestClient(create_app(settings, defense=dnf)) as a, TestClient(create_app(settings, defense=dnf)) as b:
        assert b.get(f"{route}/profile", headers={"X-API-Key": admin}).json()["verdict"]["flagged"] is False
        first = a.post("/v1/predict", content=body, headers=hdr).json()
        assert first["output_mode"] == "hard"  # flagged by this batch in A: already degraded
        flagged_at = a.get(f"{route}/profile", headers={"X-API-Key": admin}).json()["verdict"]["flagged_at"]
        # B never saw the key's traffic: it treats the key as flagged from its very next request
        assert b.post("/v1/predict", content=body, headers=hdr).json()["output_mode"] == "hard"
        for client in (a, b, b, a):
            client.post("/v1/predict", content=npy_body(x[:5].numpy()), headers=hdr)
        shown = b.get(f"{route}/profile", headers={"X-API-Key": admin}).json()
        assert shown["profile"]["queries"] == store.get(user.key_id).used == 52  # increments, never overwrites
        assert shown["verdict"]["flagged_at"] == flagged_at  # B's writes never cleared A's flag
        # an operator's reset in B reaches A at A's next look at the key
        b.post(f"{route}/reset", headers={"X-API-Key": admin})
        assert a.get(f"{route}/profile", headers={"X-API-Key": admin}).json()["verdict"]["flagged"] is False
        a.post("/v1/predict", content=body, headers=hdr)  # new evidence flags it again
    with TestClient(create_app(settings, defense=dnf)) as c:  # after a restart the key is still flagged
        assert c.get(f"{route}/profile", headers={"X-API-Key": admin}).json()["verdict"]["flagged"] is True
        assert c.post("/v1/predict", content=body, headers=hdr).json()["output_mode"] == "hard"
        assert c.get(f"{route}/profile", headers={"X-API-Key": admin}).json()["profile"]["queries"] == 84
    store.close()


# --------------------------------------------------------------------------------------------------
# durability of saved weights


def test_save_state_fsyncs_the_data_before_the_rename_and_the_folder_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fortress.models import io as model_io

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(model_io.os, "fsync", fsync)
    monkeypatch.setattr(model_io.os, "replace", replace)
    target = tmp_path / "w" / "model.safetensors"
    model_io.save_state({"a": torch.ones(3)}, target)
    kinds = [k for k, _ in events]
    assert kinds == ["fsync", "replace", "fsync"], events
    assert events[0][1].startswith(str(target.parent / ".model.safetensors.")) and events[0][1].endswith(".tmp")
    assert events[1][1] == str(target) and events[2][1] == str(target.parent)
    assert torch.equal(model_io.load_state(target)["a"], torch.ones(3))
    events.clear()
    model_io.atomic_write_text(tmp_path / "w" / "model.json", "{}")
    assert [k for k, _ in events] == ["fsync", "replace", "fsync"] and events[2][1] == str(target.parent)
