"""Tests of the extraction attacks (DFME, Knockoff Nets) and their shared helpers.

Fast and hermetic: a LeNet-5 victim trained for one epoch on 1,000 embedded digits, tiny DFME
generators and batches, a few hundred queries per attack.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from fortress.attacks import ATTACKS, DFME, EvalSet, KnockoffNets
from fortress.attacks.common import (
    centered_log_probs,
    class_diversity_loss,
    safe_log,
    soft_cross_entropy,
    train_clone,
)
from fortress.attacks.dfme import _disagreement, zo_gradient
from fortress.data.embedded import mnist_splits
from fortress.defenses.undefended import Undefended
from fortress.errors import BudgetExceeded, ConfigError
from fortress.generative.dfme import DFMEGenerator, to_unit
from fortress.models import StagedBackbone, create_model, from_sequential, train_classifier
from fortress.oracle import LocalOracle, OutputMode

#: A small DFME: batch 16, m 1, 2 student steps → 64 queries per iteration.
SMALL_DFME: dict[str, Any] = {"batch_size": 16, "grad_m": 1, "d_iter": 2, "nz": 16, "ngf": 4}
SMALL_COST = 16 * (1 + 1 + 2)
#: A small knockoff: one short epoch is enough to move the weights.
SMALL_KNOCKOFF: dict[str, Any] = {"epochs": 2, "batch_size": 32, "query_batch_size": 25}


@pytest.fixture(scope="module")
def victim() -> StagedBackbone:
    torch.manual_seed(0)
    splits = mnist_splits()
    assert splits.train.y is not None
    model = create_model("lenet5")
    train_classifier(model, splits.train.x[:1000], splits.train.y[:1000], epochs=1, seed=0, max_shift=0)
    return model


@pytest.fixture(scope="module")
def eval_set(victim: StagedBackbone) -> EvalSet:
    test = mnist_splits().test
    assert test.y is not None
    x, y = test.x[:200], test.y[:200]
    with torch.no_grad():
        return EvalSet(x, y, victim(x).argmax(1))


@pytest.fixture(scope="module")
def pool() -> Tensor:
    return mnist_splits().val.x  # 300 digits the attacker owns


def make_oracle(victim: StagedBackbone, mode: str = "soft", budget: int | None = None) -> LocalOracle:
    return LocalOracle(Undefended(victim), output_mode=mode, budget=budget)


def fresh_clone(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("lenet5-half")


def flat_params(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def run_dfme(victim: StagedBackbone, budget: int, seed: int = 0, **kw: Any) -> tuple[Any, LocalOracle]:
    oracle = make_oracle(victim)
    attack = DFME(oracle, budget=budget, seed=seed, **{**SMALL_DFME, **kw})
    return attack.run(fresh_clone()), oracle


def run_knockoff(
    victim: StagedBackbone, pool: Tensor, budget: int, seed: int = 0, mode: str = "soft", **kw: Any
) -> tuple[Any, LocalOracle]:
    oracle = make_oracle(victim, mode)
    attack = KnockoffNets(oracle, budget=budget, seed=seed, **{**SMALL_KNOCKOFF, **kw})
    return attack.run(fresh_clone(), pool), oracle


# -- shared helpers ------------------------------------------------------------------------------


def test_centered_log_probs_recovers_centred_logits() -> None:
    logits = torch.randn(5, 10) * 3
    got = centered_log_probs(torch.softmax(logits, 1))
    torch.testing.assert_close(got, logits - logits.mean(1, keepdim=True), atol=1e-4, rtol=0)
    assert torch.isfinite(safe_log(torch.zeros(3))).all()


def test_soft_cross_entropy_matches_cross_entropy_on_one_hot() -> None:
    logits, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
    one_hot = torch.nn.functional.one_hot(y, 4).float()
    torch.testing.assert_close(soft_cross_entropy(logits, one_hot), torch.nn.functional.cross_entropy(logits, y))


def test_class_diversity_loss_is_lowest_for_even_coverage() -> None:
    even = torch.eye(10) * 20
    collapsed = torch.zeros(10, 10)
    collapsed[:, 3] = 20
    assert float(class_diversity_loss(even)) == pytest.approx(-torch.log(torch.tensor(10.0)).item(), abs=1e-3)
    assert float(class_diversity_loss(collapsed)) == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize(("size", "channels"), [(28, 1), (32, 3)])
def test_generator_shapes_and_range(size: int, channels: int) -> None:
    gen = DFMEGenerator(nz=8, ngf=4, out_channels=channels, image_size=size)
    z = torch.randn(4, 8)
    with torch.no_grad():
        pre = gen(z, pre_x=True)
        img = to_unit(gen(z))
    assert pre.shape == img.shape == (4, channels, size, size)
    assert float(img.min()) >= 0
    assert float(img.max()) <= 1
    torch.testing.assert_close(img, to_unit(torch.tanh(pre)))
    with pytest.raises(ConfigError, match="multiple of 4"):
        DFMEGenerator(image_size=30)


def test_train_clone_fits_soft_targets() -> None:
    torch.manual_seed(0)
    x = torch.rand(64, 1, 28, 28)
    targets = torch.softmax(torch.randn(64, 10) * 3, 1)
    clone = create_model("lenet5-half")
    losses = train_clone(clone, x, targets, epochs=15, batch_size=16, lr=3e-3, generator=torch.Generator())
    assert losses[-1] < losses[0]
    assert not clone.training


def test_attacks_are_registered() -> None:
    assert ATTACKS.get("dfme") is DFME
    assert ATTACKS.get("knockoff") is KnockoffNets


# -- DFME ----------------------------------------------------------------------------------------


def test_dfme_zo_gradient_agrees_with_autograd() -> None:
    """The forward-difference estimate of DFME's generator objective points along the true gradient,
    with the right scale (d/ε and the batch mean)."""
    torch.manual_seed(0)
    shape = (1, 8, 8)  # a tiny generator output: d = 64
    victim = from_sequential(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)), shape, 10)
    clone = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    oracle = make_oracle(victim)

    def objective_oracle(points: Tensor) -> Tensor:  # what the attack computes, through the oracle
        images = to_unit(torch.tanh(points))
        return -_disagreement(clone(images), oracle.query(images), "l1")

    def objective_white_box(points: Tensor) -> Tensor:  # the same objective, differentiable
        images = to_unit(torch.tanh(points))
        return -_disagreement(clone(images), torch.softmax(victim(images), 1), "l1")

    x = torch.randn(4, *shape)
    with torch.no_grad():
        est, base = zo_gradient(x, objective_oracle, m=200, epsilon=1e-3, generator=torch.Generator().manual_seed(1))
    xr = x.clone().requires_grad_(True)
    objective_white_box(xr).mean().backward()
    true = xr.grad
    assert true is not None
    assert est.shape == x.shape
    assert oracle.queries_used == 4 * 201
    torch.testing.assert_close(base, objective_white_box(x).detach(), atol=1e-4, rtol=1e-4)
    cos = torch.nn.functional.cosine_similarity(est.flatten(), true.flatten(), dim=0)
    assert float(cos) > 0.6
    # E[estimate] = true gradient: the projection on the true direction has unit scale
    scale = float((est * true).sum() / (true * true).sum())
    assert 0.75 < scale < 1.25


def test_dfme_cost_per_iteration(victim: StagedBackbone) -> None:
    budget = 3 * SMALL_COST
    result, oracle = run_dfme(victim, budget)
    assert result.extras["iterations"] == 3
    assert result.extras["tail_student_steps"] == 0
    assert result.extras["cost_per_iteration"] == SMALL_COST
    assert result.queries_used == oracle.queries_used == budget
    assert sum(result.extras["label_hist"]) == 3 * 2 * 16  # student-step queries only


def test_dfme_cost_with_g_iter_m_and_reuse(victim: StagedBackbone) -> None:
    cost = 16 * (2 * (3 + 1) + 2 - 1)
    oracle = make_oracle(victim)
    attack = DFME(
        oracle,
        budget=2 * cost,
        **{**SMALL_DFME, "grad_m": 3, "g_iter": 2, "reuse_base_queries": True, "diversity_weight": 0.0},
    )
    assert attack.cost_per_iteration == cost
    result = attack.run(fresh_clone())
    assert result.extras["iterations"] == 2
    assert oracle.queries_used == 2 * cost
    assert sum(result.extras["label_hist"]) == 2 * 2 * 16  # the reused base batch trains the student too


def test_dfme_never_exceeds_budget_and_spends_the_tail(victim: StagedBackbone) -> None:
    budget = 5 * SMALL_COST + 40  # 40 left after 5 iterations: two student-only batches of 16
    result, oracle = run_dfme(victim, budget)
    assert result.extras["iterations"] == 5
    assert result.extras["tail_student_steps"] == 2
    assert result.queries_used == oracle.queries_used == 5 * SMALL_COST + 32 <= budget
    result, oracle = run_dfme(victim, budget, tail_student_steps=False)
    assert result.queries_used == oracle.queries_used == 5 * SMALL_COST


def test_dfme_propagates_the_oracles_budget_refusal(victim: StagedBackbone) -> None:
    oracle = make_oracle(victim, budget=150)
    attack = DFME(oracle, budget=10 * SMALL_COST, **SMALL_DFME)
    with pytest.raises(BudgetExceeded, match="query budget exhausted") as info:
        attack.run(fresh_clone())
    assert info.value.budget == 150
    assert oracle.queries_used <= 150
    assert oracle.queries_used == info.value.used  # the refused batch charged nothing
    assert oracle.log.refused == 1


def test_dfme_is_reproducible_under_a_seed(victim: StagedBackbone) -> None:
    budget = 2 * SMALL_COST
    a, _ = run_dfme(victim, budget, seed=3)
    b, _ = run_dfme(victim, budget, seed=3)
    c, _ = run_dfme(victim, budget, seed=4)
    assert a.queries_used == b.queries_used == c.queries_used
    assert torch.equal(flat_params(a.clone), flat_params(b.clone))
    assert not torch.equal(flat_params(a.clone), flat_params(c.clone))
    assert a.extras["label_hist"] == b.extras["label_hist"]


def test_dfme_changes_the_clone(victim: StagedBackbone) -> None:
    result, _ = run_dfme(victim, 2 * SMALL_COST)
    assert not torch.equal(flat_params(result.clone), flat_params(fresh_clone()))
    assert not result.clone.training


def test_dfme_evaluation_spends_no_queries(victim: StagedBackbone, eval_set: EvalSet) -> None:
    budget = 4 * SMALL_COST
    plain, _ = run_dfme(victim, budget)
    oracle = make_oracle(victim)
    seen: list[tuple[int, int]] = []
    attack = DFME(oracle, budget=budget, **SMALL_DFME)
    scored = attack.run(
        fresh_clone(), eval_set=eval_set, eval_every=SMALL_COST, progress=lambda q, b: seen.append((q, b))
    )
    assert scored.queries_used == plain.queries_used == oracle.queries_used
    assert torch.equal(flat_params(scored.clone), flat_params(plain.clone))
    assert [cp.queries for cp in scored.checkpoints] == [SMALL_COST * k for k in (1, 2, 3, 4)]
    assert scored.clone_acc is not None
    assert 0 <= scored.clone_acc <= 1
    assert scored.clone_fidelity is not None
    assert seen[-1] == (budget, budget)
    assert len(seen) == 4
    assert plain.checkpoints == []
    assert plain.clone_acc is None


def test_dfme_options_run(victim: StagedBackbone) -> None:
    result, oracle = run_dfme(
        victim,
        2 * SMALL_COST,
        diversity_weight=1.0,
        loss="kl",
        student_optimizer="sgd",
        lr_s=0.01,
        lr_milestones=(0.5,),
    )
    assert result.queries_used == oracle.queries_used == 2 * SMALL_COST
    assert all(torch.isfinite(p).all() for p in result.clone.parameters())


@pytest.mark.parametrize("mode", ["hard", "topk"])
def test_dfme_refuses_non_soft_oracles(victim: StagedBackbone, mode: str) -> None:
    with pytest.raises(ConfigError, match="soft"):
        DFME(make_oracle(victim, mode), budget=10_000)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 1}, "batch_size"),
        ({"grad_m": 0}, "grad_m"),
        ({"g_iter": 0}, "g_iter"),
        ({"d_iter": 0}, "d_iter"),
        ({"grad_epsilon": 0.0}, "grad_epsilon"),
        ({"lr_s": -1.0}, "lr_s=-1.0"),
        ({"lr_g": 0.0}, "lr_g=0.0"),
        ({"loss": "mse"}, "'mse'"),
        ({"student_optimizer": "rmsprop"}, "'rmsprop'"),
        ({"momentum_s": 1.0}, "momentum_s"),
        ({"weight_decay_s": -1.0}, "weight_decay_s"),
        ({"lr_milestones": (0.5, 0.3)}, "lr_milestones"),
        ({"lr_milestones": (1.5,)}, "lr_milestones"),
        ({"lr_gamma": 0.0}, "lr_gamma"),
        ({"diversity_weight": -1.0}, "diversity_weight"),
        ({"nz": 0}, "nz"),
        ({"budget": SMALL_COST - 1}, "below the cost of one DFME iteration"),
        ({"budget": 0}, "budget"),
    ],
)
def test_dfme_rejects_bad_hyper_parameters(victim: StagedBackbone, kwargs: dict[str, Any], match: str) -> None:
    params = {"budget": 10_000, **SMALL_DFME, **kwargs}
    with pytest.raises(ConfigError, match=match):
        DFME(make_oracle(victim), **params)


def constructor_args(cls: type) -> set[str]:
    return {p for p in inspect.signature(cls).parameters if p != "oracle"}


def test_hparams_list_every_hyper_parameter(victim: StagedBackbone) -> None:
    oracle = make_oracle(victim)
    assert set(DFME(oracle, budget=10_000).hparams()) == constructor_args(DFME)
    assert set(KnockoffNets(oracle, budget=10).hparams()) == constructor_args(KnockoffNets)


# -- Knockoff Nets -------------------------------------------------------------------------------


def test_knockoff_spends_exactly_its_budget(victim: StagedBackbone, pool: Tensor) -> None:
    result, oracle = run_knockoff(victim, pool, budget=110)
    assert result.queries_used == oracle.queries_used == 110
    assert oracle.log.batches == 5  # batches of 25, the last one partial
    assert result.extras["transfer_set_size"] == 110
    assert result.extras["stopped_at_pool"] is False
    assert sum(result.extras["label_hist"]) == 110


@pytest.mark.parametrize("mode", ["hard", "topk"])
def test_knockoff_works_with_label_oracles_and_stops_at_the_pool(
    victim: StagedBackbone, pool: Tensor, mode: str
) -> None:
    result, oracle = run_knockoff(victim, pool[:80], budget=500, mode=mode)
    assert result.queries_used == oracle.queries_used == 80
    assert result.extras["stopped_at_pool"] is True
    assert result.extras["pool_size"] == 80
    assert not torch.equal(flat_params(result.clone), flat_params(fresh_clone()))


def test_knockoff_propagates_the_oracles_budget_refusal(victim: StagedBackbone, pool: Tensor) -> None:
    oracle = make_oracle(victim, budget=60)
    attack = KnockoffNets(oracle, budget=200, **SMALL_KNOCKOFF)
    with pytest.raises(BudgetExceeded, match="over the budget of 60"):
        attack.run(fresh_clone(), pool)
    assert oracle.queries_used == 50  # two batches of 25; the third was refused and not charged
    assert oracle.log.refused == 1


def test_knockoff_is_reproducible_under_a_seed(victim: StagedBackbone, pool: Tensor) -> None:
    a, _ = run_knockoff(victim, pool, budget=100, seed=1)
    b, _ = run_knockoff(victim, pool, budget=100, seed=1)
    c, _ = run_knockoff(victim, pool, budget=100, seed=2)
    assert a.queries_used == b.queries_used == c.queries_used == 100
    assert torch.equal(flat_params(a.clone), flat_params(b.clone))
    assert not torch.equal(flat_params(a.clone), flat_params(c.clone))


def test_knockoff_evaluation_spends_no_queries(victim: StagedBackbone, pool: Tensor, eval_set: EvalSet) -> None:
    plain, _ = run_knockoff(victim, pool, budget=100)
    oracle = make_oracle(victim)
    attack = KnockoffNets(oracle, budget=100, **SMALL_KNOCKOFF)
    scored = attack.run(fresh_clone(), pool, eval_set=eval_set, eval_every=10)
    assert scored.queries_used == plain.queries_used == oracle.queries_used == 100
    assert torch.equal(flat_params(scored.clone), flat_params(plain.clone))
    assert [cp.queries for cp in scored.checkpoints] == [100]  # one checkpoint, after training
    assert scored.clone_acc is not None


def test_knockoff_needs_a_matching_pool(victim: StagedBackbone) -> None:
    attack = KnockoffNets(make_oracle(victim), budget=10)
    with pytest.raises(ConfigError, match="pool"):
        attack.run(fresh_clone(), None)
    with pytest.raises(ConfigError, match=r"\(1, 32, 32\)"):
        attack.run(fresh_clone(), torch.rand(5, 1, 32, 32))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strategy": "bandit"}, "'bandit'"),
        ({"query_batch_size": 0}, "query_batch_size"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"optimizer": "adagrad"}, "'adagrad'"),
        ({"lr": 0.0}, "lr"),
        ({"momentum": -0.1}, "momentum"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"lr_step": 0}, "lr_step"),
        ({"lr_gamma": 2.0}, "lr_gamma"),
        ({"max_shift": -1}, "max_shift"),
        ({"budget": 0}, "budget"),
    ],
)
def test_knockoff_rejects_bad_hyper_parameters(victim: StagedBackbone, kwargs: dict[str, Any], match: str) -> None:
    params = {"budget": 100, **kwargs}
    with pytest.raises(ConfigError, match=match):
        KnockoffNets(make_oracle(victim), **params)


def test_output_mode_enum_accepted(victim: StagedBackbone) -> None:
    oracle = LocalOracle(Undefended(victim), output_mode=OutputMode.HARD)
    assert KnockoffNets(oracle, budget=10).oracle.output_mode is OutputMode.HARD
