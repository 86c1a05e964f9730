"""The Attack contract, checked for every registered attack.

Each attack runs with a tiny budget against a toy oracle and must: charge the oracle exactly what it
reports and never more than its budget, stay within a hard oracle budget equal to its own, return a
clone it trained (``arch-steal`` excepted: it steals the width, not the function), never spend a query
on evaluation, and be reproducible under a seed. A newly registered attack fails here until it has
tiny settings in :data:`TINY`.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from fortress.attacks import ATTACKS, EvalSet
from fortress.data.embedded import mnist_splits
from fortress.defenses import Undefended
from fortress.models import StagedBackbone, create_model
from fortress.oracle import LocalOracle

BUDGET = 240


def lifted_floor(model: nn.Module) -> Any:
    """A toy perturbation defense for D-DAE's shadow: every probability lifted by 0.1, renormalised."""

    def perturb(x: Tensor) -> Tensor:
        p = model(x).softmax(1)
        return (p + 0.1) / (1 + 0.1 * p.shape[1])

    return perturb


#: Per attack: (constructor settings small enough for a few seconds, output mode).
TINY: dict[str, tuple[dict[str, Any], str]] = {
    "dfme": ({"batch_size": 16, "grad_m": 1, "d_iter": 2, "nz": 16, "ngf": 4}, "soft"),
    "knockoff": ({"epochs": 1, "batch_size": 32, "query_batch_size": 50}, "soft"),
    "jbda": ({"seed_size": 30, "epochs_per_round": 1}, "hard"),
    "arch-steal": ({"num_queries": 60}, "soft"),
    "activethief": ({"strategy": "k-center", "rounds": 2, "epochs": 1, "batch_size": 32}, "soft"),
    "dfms-hl": (
        {"batch_size": 16, "nz": 8, "dcgan_ngf": 4, "dcgan_epochs": 1, "dcgan_images": 64, "warmup_epochs": 1},
        "hard",
    ),
    "adaptive-entropy": (
        {"variant": "ee-entropy", "batch_size": 16, "grad_m": 1, "d_iter": 2, "nz": 16, "ngf": 4},
        "soft",
    ),
    "disguide": ({"batch_size": 16, "nz": 16, "ngf": 4, "replay_iter": 1}, "soft"),
    "ideal": ({"batch_size": 40, "g_steps": 2, "nz": 16, "ngf": 4, "train_batch_size": 32}, "hard"),
    "exit-aware": (
        {"batch_size": 16, "grad_m": 1, "d_iter": 2, "nz": 16, "ngf": 4, "calib_queries": 16, "min_examples": 2},
        "soft",
    ),
    "smoothing": ({"repeats": 3, "epochs": 1, "batch_size": 32, "query_batch_size": 50}, "soft"),
    "ddae": (
        {
            "perturb_factory": lifted_floor,
            "shadow_epochs": 1,
            "refine_rounds": 0,
            "pair_copies": 1,
            "recovery_epochs": 1,
            "epochs": 1,
            "batch_size": 32,
        },
        "soft",
    ),
}

#: Attacks that do not train a clone.
NO_CLONE = {"arch-steal"}


@pytest.fixture(scope="module")
def victim() -> StagedBackbone:
    torch.manual_seed(0)
    return create_model("lenet5").eval()  # a toy oracle: random weights answer fast and deterministically


@pytest.fixture(scope="module")
def pool() -> Tensor:
    splits = mnist_splits()
    return torch.cat([splits.attacker.x, splits.val.x])  # 500 digits


@pytest.fixture(scope="module")
def eval_set(victim: StagedBackbone) -> EvalSet:
    test = mnist_splits().test
    with torch.no_grad():
        return EvalSet(test.x[:64], test.targets[:64], victim(test.x[:64]).argmax(1))


def params_of(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def run(
    name: str, victim: StagedBackbone, pool: Tensor, *, seed: int = 0, eval_set: EvalSet | None = None
) -> tuple[Any, LocalOracle, Tensor]:
    settings, mode = TINY[name]
    oracle = LocalOracle(Undefended(victim), budget=BUDGET, output_mode=mode)  # hard cap = the attack's budget
    attack = ATTACKS.get(name)(oracle, budget=BUDGET, seed=seed, **settings)
    torch.manual_seed(123)
    clone = create_model("lenet5-half")
    before = params_of(clone)
    result = attack.run(clone, pool, eval_set=eval_set)
    return result, oracle, before


def test_every_registered_attack_has_tiny_settings() -> None:
    assert set(ATTACKS.names()) <= set(TINY), f"add tiny settings for {sorted(set(ATTACKS.names()) - set(TINY))}"


@pytest.mark.parametrize("name", sorted(TINY))
def test_attack_contract(name: str, victim: StagedBackbone, pool: Tensor, eval_set: EvalSet) -> None:
    assert name in ATTACKS.names()
    result, oracle, before = run(name, victim, pool, eval_set=eval_set)
    assert 0 < result.queries_used <= BUDGET
    assert oracle.queries_used == result.queries_used  # evaluation spent nothing; every query is reported
    assert oracle.log.refused == 0
    if name not in NO_CLONE:
        assert not torch.equal(before, params_of(result.clone)), f"{name} returned an untrained clone"
        assert result.clone_acc is not None and result.checkpoints
        assert all(c.queries <= BUDGET for c in result.checkpoints)
    assert result.wall_s > 0


@pytest.mark.parametrize("name", sorted(TINY))
def test_attack_is_reproducible_under_a_seed(name: str, victim: StagedBackbone, pool: Tensor) -> None:
    a, oa, _ = run(name, victim, pool, seed=7)
    b, ob, _ = run(name, victim, pool, seed=7)
    assert a.queries_used == b.queries_used
    assert torch.equal(params_of(a.clone), params_of(b.clone))
    assert oa.log.batches == ob.log.batches
