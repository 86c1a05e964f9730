"""Tests of DFMS-HL (Sanyal et al., CVPR 2022): exact budgets, label-only use of the oracle, seeds.

Fast and hermetic: a LeNet-5 victim trained for one epoch on 1,000 embedded digits, a 4-channel
DCGAN trained for one epoch on 64 pool images, a few hundred queries per run.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from fortress.attacks import ATTACKS, DFMSHL, EvalSet
from fortress.attacks.dfms_hl import hard_labels
from fortress.data.embedded import mnist_splits
from fortress.defenses.undefended import Undefended
from fortress.errors import BudgetExceeded, ConfigError
from fortress.models import StagedBackbone, create_model, train_classifier
from fortress.oracle import LocalOracle, apply_output_mode

SMALL: dict[str, Any] = {
    "batch_size": 16,
    "nz": 8,
    "dcgan_ngf": 4,
    "dcgan_epochs": 1,
    "dcgan_images": 64,
    "warmup_epochs": 1,
    "warmup_fraction": 0.25,
}


@pytest.fixture(scope="module")
def victim() -> StagedBackbone:
    torch.manual_seed(0)
    splits = mnist_splits()
    assert splits.train.y is not None
    model = create_model("lenet5")
    train_classifier(model, splits.train.x[:1000], splits.train.y[:1000], epochs=1, seed=0, max_shift=0)
    return model


@pytest.fixture(scope="module")
def pool() -> Tensor:
    return mnist_splits().val.x[:100]  # stands in for the attacker's proxy images


@pytest.fixture(scope="module")
def eval_set(victim: StagedBackbone) -> EvalSet:
    test = mnist_splits().test
    assert test.y is not None
    with torch.no_grad():
        return EvalSet(test.x[:100], test.y[:100], victim(test.x[:100]).argmax(1))


def fresh_clone() -> nn.Module:
    torch.manual_seed(0)
    return create_model("lenet5-half")


def flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def run(
    victim: StagedBackbone, pool: Tensor, budget: int, *, mode: str = "hard", seed: int = 0, **kw: Any
) -> tuple[Any, LocalOracle]:
    oracle = LocalOracle(Undefended(victim), output_mode=mode)
    attack = DFMSHL(oracle, budget=budget, seed=seed, **{**SMALL, **kw})
    return attack.run(fresh_clone(), pool), oracle


def test_registered_with_a_default_proxy_pool() -> None:
    assert ATTACKS.get("dfms-hl") is DFMSHL
    assert DFMSHL.default_pool == "patches"


def test_hard_labels_is_the_argmax_of_any_output_mode() -> None:
    probs = torch.softmax(torch.randn(7, 5) * 3, 1)
    for mode in ("soft", "hard", "topk"):
        assert torch.equal(hard_labels(apply_output_mode(probs, mode, 2)), probs.argmax(1))  # type: ignore[arg-type]


@pytest.mark.parametrize("budget", [160, 173])
def test_spends_exactly_its_budget_and_truncates_the_last_batch(
    victim: StagedBackbone, pool: Tensor, budget: int
) -> None:
    result, oracle = run(victim, pool, budget)
    assert result.queries_used == oracle.queries_used == budget
    ex = result.extras
    proxy, generated = DFMSHL(oracle, budget=budget, **SMALL).warmup_split(pool.shape[0])
    assert (ex["warmup_proxy_queries"], ex["warmup_generated_queries"]) == (proxy, generated)
    assert proxy + generated == budget // 4
    alternating = budget - proxy - generated
    assert ex["alternating_steps"] == -(-alternating // SMALL["batch_size"])  # the last one truncated
    assert sum(ex["label_hist"]) == budget


def test_warmup_proxy_share_is_capped_by_the_pool(victim: StagedBackbone) -> None:
    attack = DFMSHL(LocalOracle(Undefended(victim)), budget=10_000, warmup_fraction=0.5, proxy_ratio=0.8)
    assert attack.warmup_split(100) == (100, 4900)
    assert attack.warmup_split(10_000) == (4000, 1000)


def test_soft_and_topk_oracles_give_the_same_clone_as_a_hard_one(victim: StagedBackbone, pool: Tensor) -> None:
    """Only the top-1 label is used, so the answer format cannot matter."""
    hard, _ = run(victim, pool, 96)
    soft, _ = run(victim, pool, 96, mode="soft")
    topk, _ = run(victim, pool, 96, mode="topk")
    assert torch.equal(flat(hard.clone), flat(soft.clone))
    assert torch.equal(flat(hard.clone), flat(topk.clone))
    assert hard.extras["label_hist"] == soft.extras["label_hist"]


def test_is_reproducible_under_a_seed_and_changes_the_clone(victim: StagedBackbone, pool: Tensor) -> None:
    a, _ = run(victim, pool, 96, seed=1)
    b, _ = run(victim, pool, 96, seed=1)
    c, _ = run(victim, pool, 96, seed=2)
    assert torch.equal(flat(a.clone), flat(b.clone))
    assert not torch.equal(flat(a.clone), flat(c.clone))
    assert not torch.equal(flat(a.clone), flat(fresh_clone()))
    assert not a.clone.training


def test_evaluation_spends_no_queries(victim: StagedBackbone, pool: Tensor, eval_set: EvalSet) -> None:
    plain, _ = run(victim, pool, 128)
    oracle = LocalOracle(Undefended(victim), output_mode="hard")
    seen: list[int] = []
    scored = DFMSHL(oracle, budget=128, **SMALL).run(
        fresh_clone(), pool, eval_set=eval_set, eval_every=32, progress=lambda q, b: seen.append(q)
    )
    assert scored.queries_used == oracle.queries_used == 128
    assert torch.equal(flat(scored.clone), flat(plain.clone))
    assert [cp.queries for cp in scored.checkpoints] == [32, 64, 96, 128]
    assert scored.clone_acc is not None
    assert 0 <= scored.clone_acc <= 1
    assert scored.clone_fidelity is not None
    assert seen[-1] == 128
    assert seen == sorted(seen)


def test_propagates_the_oracles_budget_refusal(victim: StagedBackbone, pool: Tensor) -> None:
    oracle = LocalOracle(Undefended(victim), output_mode="hard", budget=50)
    with pytest.raises(BudgetExceeded):
        DFMSHL(oracle, budget=200, **SMALL).run(fresh_clone(), pool)
    assert oracle.queries_used <= 50


def test_warmup_can_be_skipped(victim: StagedBackbone, pool: Tensor) -> None:
    result, oracle = run(victim, pool, 40, warmup_fraction=0.0)
    assert result.extras["warmup_proxy_queries"] == result.extras["warmup_generated_queries"] == 0
    assert oracle.queries_used == 40


def test_needs_a_matching_pool(victim: StagedBackbone) -> None:
    attack = DFMSHL(LocalOracle(Undefended(victim), output_mode="hard"), budget=50, **SMALL)
    with pytest.raises(ConfigError, match="pool"):
        attack.run(fresh_clone(), None)
    with pytest.raises(ConfigError, match="shape"):
        attack.run(fresh_clone(), torch.rand(10, 1, 32, 32))
    with pytest.raises(ConfigError, match="fewer than 2"):
        attack.run(fresh_clone(), torch.rand(1, 1, 28, 28))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 1}, "batch_size"),
        ({"nz": 0}, "nz"),
        ({"dcgan_epochs": 0}, "dcgan_epochs"),
        ({"dcgan_images": 1}, "dcgan_images"),
        ({"lr_gan": 0.0}, "lr_gan=0.0"),
        ({"warmup_fraction": 1.5}, "warmup_fraction"),
        ({"proxy_ratio": -0.1}, "proxy_ratio"),
        ({"warmup_epochs": 0}, "warmup_epochs"),
        ({"diversity_weight": -1.0}, "diversity_weight"),
        ({"student_optimizer": "rmsprop"}, "'rmsprop'"),
        ({"momentum_s": 1.0}, "momentum_s"),
        ({"max_shift": -1}, "max_shift"),
        ({"budget": 0}, "budget"),
    ],
)
def test_rejects_bad_hyper_parameters(victim: StagedBackbone, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        DFMSHL(LocalOracle(Undefended(victim)), **{"budget": 100, **kwargs})


def test_hparams_list_every_hyper_parameter(victim: StagedBackbone) -> None:
    args = {p for p in inspect.signature(DFMSHL).parameters if p != "oracle"}
    assert set(DFMSHL(LocalOracle(Undefended(victim)), budget=10).hparams()) == args
