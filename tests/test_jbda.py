"""JBDA and its PRADA variants: budget accounting, set growth, sign conventions, reproducibility."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fortress.attacks.base import EvalSet
from fortress.attacks.jbda import JBDA
from fortress.data.embedded import mnist_splits
from fortress.defenses import Undefended
from fortress.errors import BudgetExceeded, ConfigError
from fortress.models import StagedBackbone, create_model
from fortress.oracle import LocalOracle

SMALL: dict[str, Any] = {"epochs_per_round": 1, "batch_size": 64}


@pytest.fixture(scope="module")
def victim() -> StagedBackbone:
    torch.manual_seed(0)
    return create_model("lenet5").eval()


@pytest.fixture(scope="module")
def pool() -> Tensor:
    return mnist_splits().attacker.x  # 200 digits the attacker owns


def make_oracle(victim: StagedBackbone, mode: str = "soft", budget: int | None = None) -> LocalOracle:
    return LocalOracle(Undefended(victim), output_mode=mode, budget=budget)


def fresh_clone(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("lenet5")


def run_jbda(
    victim: StagedBackbone, pool: Tensor, budget: int, mode: str = "soft", seed: int = 0, **kw: Any
) -> tuple[Any, LocalOracle]:
    oracle = make_oracle(victim, mode)
    attack = JBDA(oracle, budget=budget, seed=seed, **{**SMALL, **kw})
    return attack.run(fresh_clone(), pool), oracle


def test_jbda_doubles_the_set_and_spends_exactly_the_budget(victim: StagedBackbone, pool: Tensor) -> None:
    result, oracle = run_jbda(victim, pool, budget=150 * 2**2, seed_size=150)
    assert result.queries_used == oracle.queries_used == 600
    assert oracle.log.batches == 3  # seed set + two augmentation rounds
    assert result.extras["rounds"] == 2
    assert result.extras["round_sizes"] == [150, 300, 600]  # trained after every round, once more at the end
    assert result.extras["set_size"] == 600


def test_jbda_cuts_the_last_round_to_the_budget(victim: StagedBackbone, pool: Tensor) -> None:
    result, oracle = run_jbda(victim, pool, budget=100, seed_size=30)
    assert result.queries_used == oracle.queries_used == 100
    assert result.extras["round_sizes"] == [30, 60, 100]


def test_rounds_stop_the_attack_early(victim: StagedBackbone, pool: Tensor) -> None:
    result, oracle = run_jbda(victim, pool, budget=1000, seed_size=20, rounds=1)
    assert result.queries_used == oracle.queries_used == 40
    assert result.extras["rounds"] == 1


def test_jbself_moves_opposite_to_jbda(victim: StagedBackbone, pool: Tensor) -> None:
    oracle = make_oracle(victim)
    clone = fresh_clone().eval()
    x = pool[:16]
    labels = oracle.query(x).argmax(1)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(clone(xg), labels, reduction="sum"), xg)
    expected_plus = (x + 0.1 * g.sign()).clamp(0, 1)
    expected_minus = (x - 0.1 * g.sign()).clamp(0, 1)
    up = JBDA(oracle, budget=100, seed_size=10, variant="jbda", step=0.1).augment(clone, x, labels)
    down = JBDA(oracle, budget=100, seed_size=10, variant="jbself", step=0.1).augment(clone, x, labels)
    assert torch.allclose(up, expected_plus)
    assert torch.allclose(down, expected_minus)
    assert float(up.min()) >= 0.0 and float(up.max()) <= 1.0
    with torch.no_grad():  # the jbda step raises the label's loss, the jbself step lowers it
        ce = [float(F.cross_entropy(clone(t), labels)) for t in (down, x, up)]
    assert ce[0] < ce[1] < ce[2]


def test_jbtop_queries_k_points_per_seed_point(victim: StagedBackbone, pool: Tensor) -> None:
    result, oracle = run_jbda(victim, pool, budget=20 * 4, seed_size=20, variant="jbtop", top_k=3, pgd_steps=2)
    assert result.queries_used == oracle.queries_used == 80
    assert result.extras["round_sizes"] == [20, 80]


def test_jbtop_stays_in_the_ball_and_targets_other_classes(victim: StagedBackbone, pool: Tensor) -> None:
    oracle = make_oracle(victim)
    clone = fresh_clone().eval()
    x = pool[:8]
    labels = oracle.query(x).argmax(1)
    attack = JBDA(oracle, budget=100, seed_size=10, variant="jbtop", top_k=2, step=0.1, pgd_steps=4)
    adv = attack.augment(clone, x, labels)
    assert adv.shape == (16, *x.shape[1:])
    x0 = x.repeat_interleave(2, dim=0)
    assert float((adv - x0).abs().max()) <= 0.1 + 1e-6
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    targets = attack._top_targets(clone, x, labels)
    assert not (targets == labels.unsqueeze(1)).any()


def test_periodic_step_sign_flips_every_tau_rounds(victim: StagedBackbone, pool: Tensor) -> None:
    attack = JBDA(make_oracle(victim), budget=100, seed_size=10, tau=2)
    assert [attack.step_sign(r) for r in range(6)] == [1, 1, -1, -1, 1, 1]
    assert JBDA(make_oracle(victim), budget=100, seed_size=10).step_sign(5) == 1
    oracle = make_oracle(victim)
    clone = fresh_clone().eval()
    x = pool[:8]
    labels = oracle.query(x).argmax(1)
    flipped = JBDA(oracle, budget=100, seed_size=10, variant="jbda").augment(clone, x, labels, sign=-1.0)
    mirror = JBDA(oracle, budget=100, seed_size=10, variant="jbself").augment(clone, x, labels)
    assert torch.allclose(flipped, mirror)


def test_reservoir_sampling_grows_the_set_by_kappa_after_sigma_rounds(victim: StagedBackbone, pool: Tensor) -> None:
    result, oracle = run_jbda(victim, pool, budget=1000, seed_size=10, kappa=7, sigma=2, rounds=4)
    # rounds 0 and 1 double the set (10 → 20 → 40); rounds 2 and 3 add kappa = 7 points each
    assert result.extras["round_sizes"] == [10, 20, 40, 47, 54]
    assert result.queries_used == oracle.queries_used == 54


def test_jbtr_queries_k_random_targeted_points_per_seed_point(victim: StagedBackbone, pool: Tensor) -> None:
    result, oracle = run_jbda(victim, pool, budget=10 * 3, seed_size=10, variant="jbtr", top_k=2, pgd_steps=2)
    assert result.queries_used == oracle.queries_used == 30
    assert result.extras["round_sizes"] == [10, 30]
    oracle = make_oracle(victim)
    clone = fresh_clone().eval()
    x = pool[:6]
    labels = oracle.query(x).argmax(1)
    attack = JBDA(oracle, budget=100, seed_size=10, variant="jbtr", top_k=3, step=0.1, pgd_steps=3)
    adv = attack.augment(clone, x, labels, generator=torch.Generator().manual_seed(0))
    again = attack.augment(clone, x, labels, generator=torch.Generator().manual_seed(0))
    assert adv.shape == (18, *x.shape[1:]) and torch.equal(adv, again)
    assert float((adv - x.repeat_interleave(3, dim=0)).abs().max()) <= 0.1 + 1e-6
    targets = attack._random_targets(labels.repeat(50), torch.Generator().manual_seed(1))
    assert not (targets == labels.repeat(50)).any()
    assert len(set(targets.tolist())) >= 8  # the random targets cover the classes


@pytest.mark.parametrize("mode", ["hard", "topk"])
def test_jbda_works_with_label_oracles(victim: StagedBackbone, pool: Tensor, mode: str) -> None:
    result, oracle = run_jbda(victim, pool, budget=60, mode=mode, seed_size=15)
    assert result.queries_used == oracle.queries_used == 60


def test_jbda_is_reproducible_under_a_seed(victim: StagedBackbone, pool: Tensor) -> None:
    a, _ = run_jbda(victim, pool, budget=60, seed_size=15, seed=3)
    b, _ = run_jbda(victim, pool, budget=60, seed_size=15, seed=3)
    for p, q in zip(a.clone.parameters(), b.clone.parameters(), strict=True):
        assert torch.equal(p, q)
    assert a.extras == b.extras


def test_jbda_evaluation_spends_no_queries(victim: StagedBackbone, pool: Tensor) -> None:
    test = mnist_splits().test
    assert test.y is not None
    with torch.no_grad():
        eval_set = EvalSet(test.x[:50], test.y[:50], victim(test.x[:50]).argmax(1))
    oracle = make_oracle(victim)
    attack = JBDA(oracle, budget=60, seed_size=15, **SMALL)
    result = attack.run(fresh_clone(), pool, eval_set=eval_set)
    assert result.queries_used == oracle.queries_used == 60
    assert [c.queries for c in result.checkpoints] == [15, 30, 60]
    assert result.clone_acc is not None and result.clone_fidelity is not None


def test_jbda_propagates_the_oracles_budget_refusal(victim: StagedBackbone, pool: Tensor) -> None:
    oracle = make_oracle(victim, budget=50)
    with pytest.raises(BudgetExceeded):
        JBDA(oracle, budget=100, seed_size=30, **SMALL).run(fresh_clone(), pool)
    assert oracle.queries_used <= 50


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"variant": "jbtx"}, "jbtx"),
        ({"tau": 0}, "tau"),
        ({"kappa": 0}, "kappa"),
        ({"sigma": -1}, "sigma"),
        ({"seed_size": 0}, "seed_size"),
        ({"seed_size": 200}, "200"),
        ({"step": 0.0}, "step"),
        ({"step": 1.5}, "1.5"),
        ({"rounds": -1}, "rounds"),
        ({"top_k": 10}, "top_k"),
        ({"pgd_steps": 0}, "pgd_steps"),
        ({"epochs_per_round": 0}, "epochs_per_round"),
        ({"lr": 0.0}, "lr"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_jbda_rejects_bad_hyper_parameters(victim: StagedBackbone, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        JBDA(make_oracle(victim), budget=100, seed_size=kwargs.pop("seed_size", 10), **kwargs)


def test_jbda_needs_a_matching_pool(victim: StagedBackbone, pool: Tensor) -> None:
    attack = JBDA(make_oracle(victim), budget=100, seed_size=10, **SMALL)
    with pytest.raises(ConfigError, match="pool=None"):
        attack.run(fresh_clone(), None)
    with pytest.raises(ConfigError, match="input shape"):
        attack.run(fresh_clone(), torch.rand(20, 3, 28, 28))
    with pytest.raises(ConfigError, match="fewer than seed_size"):
        attack.run(fresh_clone(), pool[:5])


def test_hparams_list_every_hyper_parameter(victim: StagedBackbone) -> None:
    expected = {p for p in inspect.signature(JBDA).parameters if p != "oracle"}
    assert set(JBDA(make_oracle(victim), budget=200).hparams()) == expected
