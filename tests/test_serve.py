"""The prediction API in process (Starlette's TestClient): answers equal the local defense's, budgets
are exact, keys are hashed and checked, every bad input is a 4xx JSON error, and a bounded
schemathesis run over the OpenAPI schema finds no 5xx and no schema violation."""

from __future__ import annotations

import base64
import io
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from torch import Tensor
from typer.testing import CliRunner

from fortress.cli import app as cli_app
from fortress.defenses import DNF, Undefended, load_defense
from fortress.errors import BudgetExceeded, ConfigError
from fortress.models import create_model, from_sequential, save_model
from fortress.oracle import LocalOracle
from fortress.serve import KeyRejected, KeyStore, ServeSettings, create_app
from fortress.serve.decode import decode_npy
from fortress.serve.metrics import Metrics
from helpers import sharpen_heads

SHAPE = (1, 28, 28)


def _npy(x: np.ndarray[Any, Any]) -> str:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=x.dtype.hasobject)
    return base64.b64encode(buf.getvalue()).decode()


def _png(arr: np.ndarray[Any, Any]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random LeNet-5 saved as a victim, and a DNF over it whose queries leave at every exit."""
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    victim = create_model("lenet5").eval()
    save_model(victim, root / "victim")
    sharpen_heads(DNF(victim, thresholds=[0.5, 0.7, 0.9], seed=0)).save(root / "dnf")
    return {"victim": root / "victim", "dnf": root / "dnf"}


class Server:
    """A TestClient over a fresh app with its own key ledger."""

    def __init__(self, client: TestClient, store: KeyStore) -> None:
        self.client = client
        self.store = store

    def key(self, budget: int | None = None, mode: str = "soft", top_k: int = 1, admin: bool = False) -> str:
        return self.store.add("t", budget=budget, output_mode=mode, top_k=top_k, admin=admin)[1]

    def post(self, key: str | None, **kw: Any) -> Any:
        return self.client.post("/v1/predict", headers={"X-API-Key": key} if key else {}, **kw)


def make_server(tmp: Path, model_dir: Path, **settings: Any) -> Iterator[Server]:
    s = ServeSettings(model_dir, tmp / "keys.db", **settings)
    store = KeyStore(s.keys_path, create=True)
    with TestClient(create_app(s), raise_server_exceptions=False) as client:
        yield Server(client, store)
    store.close()


@pytest.fixture
def dnf_server(tmp_path: Path, model_dirs: dict[str, Path]) -> Iterator[Server]:
    yield from make_server(tmp_path, model_dirs["dnf"], max_batch=64, max_body_bytes=2**19)


def images(n: int, seed: int = 0) -> Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# Answers


@pytest.mark.parametrize("mode", ["soft", "hard", "topk"])
def test_answers_equal_the_local_oracle_in_every_mode(
    dnf_server: Server, model_dirs: dict[str, Path], mode: str
) -> None:
    local = LocalOracle(load_defense(model_dirs["dnf"]), output_mode=mode, top_k=3)
    key = dnf_server.key(mode=mode, top_k=3)
    x = images(40)
    expected = local.query(x)
    r = dnf_server.post(key, json={"npy": _npy(x.numpy())})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["output_mode"] == mode
    assert body["labels"] == expected.argmax(1).tolist()
    # the same float32 model; a CPU may pick kernels by batch size (dynamic compute answers each exit's
    # rows as a sub-batch), so the values agree to rounding, not always bit for bit
    if mode == "hard":
        assert body["probabilities"] is None
    else:
        got = torch.tensor(body["probabilities"], dtype=torch.float32)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
        assert torch.equal(got == 0, expected == 0)  # the modes' zeros are exact
    # the JSON-array path carries the same answers
    r2 = dnf_server.post(key, json={"images": x[:8].tolist()})
    assert r2.status_code == 200, r2.text
    assert r2.json()["labels"] == body["labels"][:8]
    if mode != "hard":
        torch.testing.assert_close(
            torch.tensor(r2.json()["probabilities"]), torch.tensor(body["probabilities"][:8]), rtol=1e-4, atol=1e-6
        )


def test_png_uploads_answer_like_the_decoded_images(dnf_server: Server, model_dirs: dict[str, Path]) -> None:
    rng = np.random.default_rng(0)
    pix = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    key = dnf_server.key()
    files = [("files", (f"{i}.png", _png(p), "image/png")) for i, p in enumerate(pix)]
    r = dnf_server.post(key, files=files)
    assert r.status_code == 200, r.text
    x = torch.from_numpy(pix).float().div(255).unsqueeze(1)
    expected = LocalOracle(load_defense(model_dirs["dnf"])).query(x)
    assert torch.equal(torch.tensor(r.json()["probabilities"], dtype=torch.float32), expected)


def test_full_and_dynamic_compute_give_the_same_answers(tmp_path: Path, model_dirs: dict[str, Path]) -> None:
    x = _npy(images(64, seed=3).numpy())
    answers = []
    for compute in ("dynamic", "full"):
        for srv in make_server(tmp_path / compute, model_dirs["dnf"], compute=compute):
            answers.append(srv.post(srv.key(), json={"npy": x}).json()["probabilities"])
    # dynamic runs later stages on fewer rows, so float rounding may differ in the last bits; never the label
    dyn, full = torch.tensor(answers[0]), torch.tensor(answers[1])
    assert torch.allclose(dyn, full, atol=1e-5) and torch.equal(dyn.argmax(1), full.argmax(1))


def test_info_and_health_reveal_nothing_secret(dnf_server: Server) -> None:
    assert dnf_server.client.get("/v1/health").json() == {"status": "ok"}
    key = dnf_server.key(budget=50, mode="topk", top_k=2)
    info = dnf_server.client.get("/v1/info", headers={"X-API-Key": key}).json()
    assert info["input_shape"] == [1, 28, 28] and info["num_classes"] == 10
    assert (info["output_mode"], info["top_k"], info["budget"], info["queries_used"]) == ("topk", 2, 50, 0)
    text = json.dumps(info).lower()
    for secret in ("threshold", "dnf", "lenet", "exit", "compute", "fk_"):
        assert secret not in text.replace('"model": "dnf"', "")


# --------------------------------------------------------------------------------------------------
# Keys and budgets


def test_budget_is_exact_and_a_refused_batch_charges_nothing(dnf_server: Server) -> None:
    key = dnf_server.key(budget=100)
    assert dnf_server.post(key, json={"npy": _npy(images(60).numpy())}).status_code == 200
    r = dnf_server.post(key, json={"npy": _npy(images(41).numpy())})
    assert r.status_code == 429
    assert (r.json()["requested"], r.json()["used"], r.json()["budget"]) == (41, 60, 100)
    assert "nothing was charged" in r.json()["message"]
    r = dnf_server.post(key, json={"npy": _npy(images(40).numpy())})
    assert r.status_code == 200 and r.json()["budget_left"] == 0 and r.json()["queries_used"] == 100
    assert dnf_server.post(key, json={"npy": _npy(images(1).numpy())}).status_code == 429


def test_invalid_input_charges_nothing(dnf_server: Server) -> None:
    key = dnf_server.key(budget=10)
    bad = images(4)
    bad[0, 0, 0, 0] = 2.0
    assert dnf_server.post(key, json={"npy": _npy(bad.numpy())}).status_code == 422
    assert dnf_server.client.get("/v1/info", headers={"X-API-Key": key}).json()["queries_used"] == 0


def test_concurrent_charges_never_pass_the_budget(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "k.db", create=True)
    key, _ = store.add("c", budget=1000)
    granted: list[int] = []
    lock = threading.Lock()

    def client(sizes: list[int]) -> None:
        for n in sizes:
            try:
                store.charge(key.key_id, n)
            except BudgetExceeded:
                continue
            with lock:
                granted.append(n)

    rng = np.random.default_rng(0)
    threads = [threading.Thread(target=client, args=(rng.integers(1, 40, 30).tolist(),)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 8 x 30 batches of ~20 ask for ~4,800: the budget fills exactly to what was granted, never past it
    assert sum(granted) == store.get(key.key_id).used <= 1000
    assert store.get(key.key_id).used >= 1000 - 39
    store.close()


def test_ledger_is_wal_hashed_and_durable(tmp_path: Path) -> None:
    path = tmp_path / "k.db"
    store = KeyStore(path, create=True)
    key, secret = store.add("alice", budget=5)
    assert store.journal_mode == "wal"
    store.charge(key.key_id, 3)
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    token = secret.split("_", 2)[2]  # fk_<key id>_<token>; the token itself may contain "_"
    assert secret.encode() not in raw and token.encode() not in raw
    reopened = KeyStore(path)
    assert reopened.authenticate(secret).used == 3
    with pytest.raises(BudgetExceeded):
        reopened.charge(key.key_id, 3)
    with sqlite3.connect(path) as db, pytest.raises(sqlite3.IntegrityError):  # the DB itself holds the invariant
        db.execute("UPDATE api_keys SET used = 6 WHERE key_id = ?", (key.key_id,))
    reopened.close()


def test_keys_reject_bad_settings_and_revoke_by_name(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "k.db", create=True)
    with pytest.raises(ConfigError, match="output mode"):
        store.add("x", output_mode="logits")
    with pytest.raises(ConfigError, match="budget"):
        store.add("x", budget=-1)
    store.add("bob")
    store.add("bob")
    with pytest.raises(ConfigError, match="2 active keys"):
        store.revoke("bob")
    _, secret = store.add("carol")
    assert store.revoke("carol").revoked_at is not None
    with pytest.raises(KeyRejected) as exc:
        store.authenticate(secret)
    assert exc.value.status == 403
    with pytest.raises(KeyRejected) as exc:
        store.authenticate("fk_nope")
    assert exc.value.status == 401
    store.close()


def test_auth_statuses(dnf_server: Server) -> None:
    key = dnf_server.key()
    body = {"npy": _npy(images(2).numpy())}
    assert dnf_server.post(None, json=body).status_code == 401
    assert dnf_server.post("fk_wrong", json=body).status_code == 401
    bearer = dnf_server.client.post("/v1/predict", json=body, headers={"Authorization": f"Bearer {key}"})
    assert bearer.status_code == 200
    dnf_server.store.revoke(dnf_server.store.authenticate(key).key_id)
    r = dnf_server.post(key, json=body)
    assert r.status_code == 403 and r.json()["error"] == "forbidden"


def test_metrics_need_an_admin_key_and_count_exits_per_key(dnf_server: Server) -> None:
    key, admin = dnf_server.key(), dnf_server.key(admin=True)
    assert dnf_server.post(key, json={"npy": _npy(images(30).numpy())}).status_code == 200
    assert dnf_server.client.get("/metrics", headers={"X-API-Key": key}).status_code == 403
    text = dnf_server.client.get("/metrics", headers={"X-API-Key": admin}).text
    kid = dnf_server.store.authenticate(key).key_id
    assert f'fortress_queries_total{{key="{kid}"}} 30' in text
    prefix = f'fortress_exits_total{{key="{kid}"'
    exits = [int(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)]
    assert sum(exits) == 30
    assert 'fortress_requests_total{route="/v1/predict",status="200"} 1' in text
    assert key not in text


def test_metrics_histogram_is_cumulative() -> None:
    m = Metrics()
    for s in (0.0005, 0.003, 0.003, 20.0):
        m.observe_request("/r", 200, s)
    lines = dict(line.rsplit(" ", 1) for line in m.render().splitlines() if line.startswith("fortress_request_latency"))
    assert lines['fortress_request_latency_seconds_bucket{route="/r",le="0.001"}'] == "1"
    assert lines['fortress_request_latency_seconds_bucket{route="/r",le="0.005"}'] == "3"
    assert lines['fortress_request_latency_seconds_bucket{route="/r",le="+Inf"}'] == "4"
    assert lines['fortress_request_latency_seconds_count{route="/r"}'] == "4"


# --------------------------------------------------------------------------------------------------
# Hardening: every bad input is a 4xx JSON error that says what was wrong


def _npy_bytes(x: np.ndarray[Any, Any]) -> bytes:
    return base64.b64decode(_npy(x))


NOISE = np.random.default_rng(2).integers(0, 256, (28, 28), dtype=np.uint8)
GOOD = np.random.default_rng(1).random((2, *SHAPE), dtype=np.float32)
TRUNC = base64.b64encode(_npy_bytes(GOOD)[:-100]).decode()
JSON = "application/json"
BAD_INPUTS: list[tuple[str, bytes | None, str, int, str]] = [
    ("nan", b'{"images": [[[[NaN]]]]}', JSON, 422, "images[0][0][0][0] is 'NaN', not a JSON number"),
    ("nan-full", json.dumps({"images": [[[[0.5] * 28] * 27 + [[float("nan")] * 28]]]}).encode(), JSON, 422, "NaN"),
    ("inf", json.dumps({"images": [[[[float("inf")] * 28] * 28]]}).encode(), JSON, 422, "'Infinity', not a JSON"),
    (
        "overflow",
        json.dumps({"images": [[[[0.5] * 28] * 28]]}).replace("0.5", "1e999", 1).encode(),
        JSON,
        422,
        "NaN or infinite",
    ),
    ("range", json.dumps({"npy": _npy(GOOD * 255)}).encode(), JSON, 422, "expected [0, 1]"),
    ("negative", json.dumps({"npy": _npy(-GOOD)}).encode(), JSON, 422, "expected [0, 1]"),
    ("shape", json.dumps({"npy": _npy(GOOD[:, :, :20])}).encode(), JSON, 422, "expected (C, H, W) = (1, 28, 28)"),
    ("3d", json.dumps({"npy": _npy(GOOD[:, 0])}).encode(), JSON, 422, "4-d"),
    ("uint8", json.dumps({"npy": _npy((GOOD * 255).astype(np.uint8))}).encode(), JSON, 422, "1/255"),
    ("pickle", json.dumps({"npy": _npy(np.array([{"a": 1}], dtype=object))}).encode(), JSON, 422, "dtype object"),
    ("truncated", json.dumps({"npy": TRUNC}).encode(), JSON, 422, "truncated"),
    ("not-npy", json.dumps({"npy": base64.b64encode(b"hello world").decode()}).encode(), JSON, 422, ".npy"),
    ("base64", b'{"npy": "***"}', JSON, 422, "base64"),
    ("both", json.dumps({"npy": _npy(GOOD), "images": GOOD.tolist()}).encode(), JSON, 422, "exactly one"),
    ("neither", b"{}", JSON, 422, "exactly one"),
    ("extra", b'{"npy": "", "x": 1}', JSON, 422, "x"),
    (
        "ragged",
        json.dumps({"images": [[[[0.1] * 28] * 28], [[[0.1] * 27] * 28]]}).encode(),
        JSON,
        422,
        "images[1][0][0] has 27 values, expected 28",
    ),
    ("empty", b'{"images": []}', JSON, 422, "empty batch"),
    ("strings", b'{"images": [[[["a"]]]]}', JSON, 422, "images[0][0][0][0] is the string 'a'"),
    ("not-json", b"{nope", JSON, 422, "expected a field name at byte 1"),
    ("batch", json.dumps({"npy": _npy(np.zeros((65, *SHAPE), np.float32))}).encode(), JSON, 413, "max batch of 64"),
    ("body", json.dumps({"images": [[[[0.123456789] * 28] * 28]] * 64}).encode(), JSON, 413, "limit"),
    ("media", b"x", "text/plain", 415, "application/json"),
    ("no-media", b"x", "", 415, "application/json"),
]


@pytest.mark.parametrize(("name", "body", "ctype", "status", "fragment"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_json_input_is_a_clear_4xx(
    dnf_server: Server, name: str, body: bytes, ctype: str, status: int, fragment: str
) -> None:
    key = dnf_server.key(budget=1000)
    r = dnf_server.client.post("/v1/predict", content=body, headers={"X-API-Key": key, "content-type": ctype})
    assert r.status_code == status, (name, r.text)
    err = r.json()
    assert err["error"] and fragment in err["message"], err
    assert "Traceback" not in r.text and r.headers["x-request-id"] == err["request_id"]
    assert dnf_server.store.authenticate(key).used == 0


@pytest.mark.parametrize(
    ("files", "fragment"),
    [
        ([("files", ("a.png", b"not a png", "image/png"))], "not a PNG"),
        ([("files", ("a.png", _png(np.zeros((20, 28), np.uint8)), "image/png"))], "expected 28x28"),
        ([("files", ("a.png", _png(NOISE)[:200], "image/png"))], "not a readable PNG"),
        ([("other", ("a.png", _png(np.zeros((28, 28), np.uint8)), "image/png"))], "unexpected form field"),
        ([("files", ("a.png", _png(np.zeros((28, 28), np.uint8)), "image/png"))] * 65, "max batch"),
    ],
    ids=["garbage", "size", "truncated", "field", "batch"],
)
def test_bad_png_uploads_are_clear_4xx(dnf_server: Server, files: list[Any], fragment: str) -> None:
    r = dnf_server.post(dnf_server.key(), files=files)
    assert 400 <= r.status_code < 500 and fragment in r.json()["message"], r.text


def test_rgb_and_palette_pngs_are_converted_to_the_model_channels(dnf_server: Server) -> None:
    rgb = _png(np.full((28, 28, 3), 255, np.uint8))
    r = dnf_server.post(dnf_server.key(), files=[("files", ("c.png", rgb, "image/png"))])
    assert r.status_code == 200


def test_decode_npy_reads_fortran_order_and_float64() -> None:
    x = np.asfortranarray(np.random.default_rng(0).random((3, *SHAPE)))
    out = decode_npy(_npy(x), SHAPE, 8)
    assert out.dtype == torch.float32 and torch.equal(out, torch.from_numpy(x.astype(np.float32)))


class _Slow(Undefended):
    def _respond(self, x: Tensor) -> Any:
        time.sleep(0.5)
        return super()._respond(x)


class _Broken(Undefended):
    def _respond(self, x: Tensor) -> Any:
        raise RuntimeError("secret internal detail")


def test_timeout_is_503_and_refunds(tmp_path: Path, model_dirs: dict[str, Path]) -> None:
    s = ServeSettings(model_dirs["victim"], tmp_path / "k.db", request_timeout_s=0.1)
    store = KeyStore(s.keys_path, create=True)
    _, key = store.add("t", budget=10)
    with TestClient(create_app(s, defense=_Slow(create_model("lenet5"))), raise_server_exceptions=False) as c:
        r = c.post("/v1/predict", json={"npy": _npy(GOOD)}, headers={"X-API-Key": key})
        assert r.status_code == 503 and "nothing was charged" in r.json()["message"]
        time.sleep(0.8)  # the abandoned batch finishes computing meanwhile: it is released, not charged
    rec = store.authenticate(key)
    assert rec.used == 0 and rec.reserved == 0
    store.close()


def test_a_server_fault_is_a_json_500_without_details_and_refunds(tmp_path: Path, model_dirs: dict[str, Path]) -> None:
    s = ServeSettings(model_dirs["victim"], tmp_path / "k.db")
    store = KeyStore(s.keys_path, create=True)
    _, key = store.add("t", budget=10)
    with TestClient(create_app(s, defense=_Broken(create_model("lenet5"))), raise_server_exceptions=False) as c:
        r = c.post("/v1/predict", json={"npy": _npy(GOOD)}, headers={"X-API-Key": key})
    assert r.status_code == 500
    assert "secret internal detail" not in r.text and "Traceback" not in r.text
    assert r.json()["request_id"] == r.headers["x-request-id"]
    rec = store.authenticate(key)
    assert rec.used == 0 and rec.reserved == 0
    store.close()


def test_unknown_routes_and_methods_are_json(dnf_server: Server) -> None:
    r = dnf_server.client.get("/nope")
    assert r.status_code == 404 and r.json()["error"] == "http_404"
    r = dnf_server.client.delete("/v1/predict")
    assert r.status_code == 405 and "POST" in r.headers["allow"]


def test_settings_validate() -> None:
    with pytest.raises(ConfigError, match="compute"):
        ServeSettings(Path("m"), Path("k"), compute="fast")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_batch"):
        ServeSettings(Path("m"), Path("k"), max_batch=0)


# --------------------------------------------------------------------------------------------------
# OpenAPI fuzzing


def test_openapi_schema_lists_the_routes_and_both_body_types(dnf_server: Server) -> None:
    spec = dnf_server.client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/info", "/v1/health", "/metrics"} <= set(spec["paths"])
    content = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert set(content) == {"application/json", "multipart/form-data"}
    assert {"429", "422", "413", "401", "403"} <= set(spec["paths"]["/v1/predict"]["post"]["responses"])


#: Fuzz cases on POST /v1/predict (each other operation gets a tenth); FORTRESS_FUZZ_EXAMPLES raises it.
FUZZ_EXAMPLES = int(os.environ.get("FORTRESS_FUZZ_EXAMPLES", "100"))


def test_schemathesis_fuzz_finds_no_5xx_and_no_schema_violation(tmp_path: Path, model_dirs: dict[str, Path]) -> None:
    """Every operation of the OpenAPI schema, fuzzed (valid and invalid bodies, both content types)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )

    # a tiny DNF (4x4 inputs) keeps valid bodies small, so hypothesis spends its time on variety
    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8, 3))
    tiny = DNF(from_sequential(seq, (1, 4, 4), 3, cut_after=[1]), thresholds=[0.5], seed=0)
    s = ServeSettings(model_dirs["dnf"], tmp_path / "k.db", max_batch=8)
    store = KeyStore(s.keys_path, create=True)
    _, key = store.add("fuzz", budget=10_000, admin=True)
    store.close()
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(s, defense=tiny))
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    statuses: list[int] = []
    operations = [op.ok() for op in schema.get_all_operations()]  # type: ignore[union-attr]  # Err raises
    for operation in operations:

        @settings(
            max_examples=FUZZ_EXAMPLES if operation.method.upper() == "POST" else FUZZ_EXAMPLES // 10,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def run(case: Any) -> None:
            response = case.call_and_validate(headers={"X-API-Key": key}, checks=checks)
            statuses.append(response.status_code)

        run()
    assert len(statuses) >= FUZZ_EXAMPLES
    assert all(code < 500 for code in statuses)
    print(f"schemathesis: {len(statuses)} cases over {len(operations)} operations, statuses {sorted(set(statuses))}")


def test_import_fortress_does_not_import_the_web_stack() -> None:
    code = "import sys, fortress, fortress.oracle; print('fastapi' in sys.modules, 'httpx' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False False"


# --------------------------------------------------------------------------------------------------
# CLI


def test_keys_cli_add_list_revoke(tmp_path: Path) -> None:
    runner = CliRunner()
    db = str(tmp_path / "k.db")
    res = runner.invoke(cli_app, ["keys", "add", "alice", "--keys", db])  # no ledger yet: one line, nothing created
    assert res.exit_code == 1 and f"fortress keys init {db}" in res.output and not Path(db).exists()
    assert runner.invoke(cli_app, ["keys", "init", db]).exit_code == 0
    res = runner.invoke(cli_app, ["keys", "init", db])
    assert res.exit_code == 1 and "already exists" in res.output
    res = runner.invoke(cli_app, ["keys", "add", "alice", "--keys", db, "--budget", "500", "--output-mode", "hard"])
    assert res.exit_code == 0, res.output
    secret = res.stdout.strip().splitlines()[-1]
    assert secret.startswith("fk_")
    res = runner.invoke(cli_app, ["keys", "list", "--keys", db])
    assert res.exit_code == 0 and "alice" in res.output and "500" in res.output and secret not in res.output
    kid = secret.split("_")[1]
    res = runner.invoke(cli_app, ["keys", "revoke", kid, "--keys", db])
    assert res.exit_code == 0 and "revoked" in res.output
    res = runner.invoke(cli_app, ["keys", "revoke", "nobody", "--keys", db])
    assert res.exit_code == 1 and "no API key" in res.output
    res = runner.invoke(cli_app, ["keys", "add", "x", "--keys", db, "--output-mode", "logits"])
    assert res.exit_code == 1 and "unknown output mode" in res.output


def test_serve_cli_reports_a_missing_model_in_one_line(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli_app, ["serve", str(tmp_path / "missing"), "--keys", str(tmp_path / "k.db")])
    assert res.exit_code == 1 and "error:" in res.output and "Traceback" not in res.output


def test_attack_cli_on_a_url_needs_a_key_and_a_reference(tmp_path: Path) -> None:
    args = ["attack", "knockoff", "--target", "http://127.0.0.1:9", "--budget", "10", "--out", str(tmp_path)]
    res = CliRunner().invoke(cli_app, args)
    assert res.exit_code == 1 and "API key" in res.output
