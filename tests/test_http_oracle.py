"""HttpOracle keeps the oracle contract over HTTP: the same answers, counts, refusals and errors as a
LocalOracle over the served defense, so an attack gives the same clone through either."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from torch import Tensor

from fortress.bench.pipeline import resolve_target, run_attack
from fortress.config import AttackConfig
from fortress.defenses import DNF, Defense, load_defense
from fortress.errors import BudgetExceeded, ConfigError, InvalidInput
from fortress.oracle import HttpOracle, LocalOracle, OracleUnavailable
from fortress.serve import KeyStore, ServeSettings, create_app
from helpers import sharp_random_dnf


def scrambled_dnf() -> DNF:
    return sharp_random_dnf()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("http") / "dnf"
    scrambled_dnf().save(out)
    return out


class Served:
    def __init__(self, client: TestClient, store: KeyStore, defense: Defense) -> None:
        self.client, self.store, self.defense = client, store, defense

    def oracle(self, budget: int | None = None, mode: str = "soft", top_k: int = 1, **kw: object) -> HttpOracle:
        _, secret = self.store.add("o", budget=budget, output_mode=mode, top_k=top_k)
        return HttpOracle("http://testserver", secret, client=self.client, **kw)  # type: ignore[arg-type]

    def used(self, oracle: HttpOracle) -> int:
        return self.store.authenticate(oracle._headers["X-API-Key"]).used


@pytest.fixture
def served(tmp_path: Path, saved: Path) -> Iterator[Served]:
    s = ServeSettings(saved, tmp_path / "keys.db", max_batch=16)
    store = KeyStore(s.keys_path, create=True)
    with TestClient(create_app(s)) as client:
        yield Served(client, store, load_defense(saved))
    store.close()


def images(n: int, seed: int = 0) -> Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("mode", "top_k"), [("soft", 1), ("hard", 1), ("topk", 2)])
def test_answers_and_counts_equal_a_local_oracle(served: Served, mode: str, top_k: int) -> None:
    remote = served.oracle(mode=mode, top_k=top_k)
    local = LocalOracle(served.defense, output_mode=mode, top_k=top_k)
    assert (remote.output_mode, remote.top_k, remote.num_classes, remote.input_shape) == (
        local.output_mode,
        local.top_k,
        local.num_classes,
        local.input_shape,
    )
    for i, n in enumerate([1, 5, 16, 40]):  # 40 > max_batch: sent in three pieces
        x = images(n, seed=i)
        a, b = remote.query(x), local.query(x)
        assert a.dtype == b.dtype == torch.float32
        if n <= 16:  # one request: bit-identical
            assert torch.equal(a, b)
        else:  # pieces of 16 against one batch of 40: float rounding may differ in the last bits
            assert torch.allclose(a, b, atol=1e-6) and torch.equal(a.argmax(1), b.argmax(1))
    assert remote.queries_used == local.queries_used == served.used(remote) == 62
    assert remote.log.batches == local.log.batches == 4


def test_budget_refusals_match_the_local_oracle(served: Served) -> None:
    remote = served.oracle(budget=20)
    local = LocalOracle(served.defense, budget=20)
    for oracle in (remote, local):
        oracle.query(images(12))
        with pytest.raises(BudgetExceeded) as exc:
            oracle.query(images(9))
        assert (exc.value.requested, exc.value.used, exc.value.budget) == (9, 12, 20)
        assert oracle.queries_used == 12 and oracle.log.refused == 1
        oracle.query(images(8))
        assert oracle.budget_left == 0
    assert remote.server_used == served.used(remote) == 20


def test_a_batch_over_max_batch_is_refused_whole_before_any_piece_is_sent(served: Served) -> None:
    remote = served.oracle(budget=30)
    remote.query(images(10))
    with pytest.raises(BudgetExceeded):
        remote.query(images(32))  # two pieces of 16: the first would fit, the whole does not
    assert served.used(remote) == 10


def test_client_side_budget_is_checked_first(served: Served) -> None:
    remote = served.oracle()
    capped = HttpOracle("http://testserver", remote._headers["X-API-Key"], client=served.client, budget=5)
    with pytest.raises(BudgetExceeded):
        capped.query(images(6))
    assert served.used(remote) == 0


def test_bad_images_are_refused_locally_with_the_local_message(served: Served) -> None:
    remote = served.oracle()
    local = LocalOracle(served.defense)
    bad = images(3)
    bad[1, 0, 3, 3] = float("nan")
    for x in (bad, images(2)[:, :, :20], images(2).double()):
        msgs = []
        for oracle in (remote, local):
            with pytest.raises(InvalidInput) as exc:
                oracle.query(x)
            msgs.append(str(exc.value))
        assert msgs[0] == msgs[1]
    assert served.used(remote) == 0


def test_rejected_and_unreachable_servers(served: Served) -> None:
    with pytest.raises(ConfigError, match="rejected the API key"):
        HttpOracle("http://testserver", "fk_wrong", client=served.client)
    _, secret = served.store.add("r")
    oracle = HttpOracle("http://testserver", secret, client=served.client)
    served.store.revoke(served.store.authenticate(secret).key_id)
    with pytest.raises(ConfigError, match="403"):
        oracle.query(images(1))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(OracleUnavailable, match="did not answer"):
        HttpOracle(f"http://127.0.0.1:{port}", secret, timeout_s=2)
    with pytest.raises(ConfigError, match="http"):
        HttpOracle("ftp://x", secret)


def test_resolve_target_rules(served: Served) -> None:
    cfg = AttackConfig(name="knockoff", budget=10)
    with pytest.raises(ConfigError, match="API key"):
        resolve_target("http://127.0.0.1:9", cfg, reference=served.defense)
    with pytest.raises(ConfigError, match="reference"):
        resolve_target("http://127.0.0.1:9", cfg, api_key="k")
    with pytest.raises(ConfigError, match="reference"):
        resolve_target(served.oracle(), cfg)
    with pytest.raises(ConfigError, match="api_budget"):
        resolve_target(LocalOracle(served.defense), cfg, api_budget=5)
    with pytest.raises(ConfigError, match="URL"):
        resolve_target("/not/a/url", cfg)
    oracle, ref = resolve_target(served.defense, cfg)
    assert isinstance(oracle, LocalOracle) and ref is served.defense and oracle.budget == 10


def test_an_attack_over_http_equals_the_same_attack_locally(served: Served) -> None:
    cfg = AttackConfig(name="knockoff", budget=96, seed=3, pool="mnist-attacker", params={"epochs": 2})
    local = run_attack(served.defense, cfg)
    remote_oracle = served.oracle(budget=96)
    remote = run_attack(remote_oracle, cfg, reference=served.defense)
    assert remote.queries_used == local.queries_used == served.used(remote_oracle) == 96
    assert remote.clone_acc == local.clone_acc
    assert remote.clone_fidelity == local.clone_fidelity
    assert remote.defended_acc == local.defended_acc
    # the clone's training trajectory itself is identical, loss for loss (a stronger check than accuracy)
    losses = local.extra["attack_extras"]["train_loss"]
    assert remote.extra["attack_extras"]["train_loss"] == losses and len(losses) == 2
