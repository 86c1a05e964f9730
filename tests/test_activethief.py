"""Tests of ActiveThief (Pal et al., AAAI 2020): budget, selection strategies, k-center and DeepFool.

Hermetic and fast: untrained LeNet victims and clones, random pools, one epoch per round.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from fortress.attacks import ATTACKS, ActiveThief
from fortress.attacks.activethief import _softmax_outputs, deepfool_norms, k_center_greedy
from fortress.defenses.undefended import Undefended
from fortress.errors import BudgetExceeded, ConfigError
from fortress.models import StagedBackbone, create_model
from fortress.oracle import LocalOracle

SMALL: dict[str, Any] = {"rounds": 2, "epochs": 1, "batch_size": 16}
STRATEGIES = ["random", "uncertainty", "k-center", "dfal", "dfal+k-center"]


class RecordingOracle(LocalOracle):
    """A local oracle that keeps every image it answered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[Tensor] = []

    def query(self, x: Tensor) -> Tensor:
        out = super().query(x)
        self.seen.append(x.clone())
        return out


@pytest.fixture(scope="module")
def victim() -> StagedBackbone:
    torch.manual_seed(0)
    return create_model("lenet5")


@pytest.fixture(scope="module")
def pool() -> Tensor:
    return torch.rand(90, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def clone(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("lenet5-half")


def flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# -- budget and never re-querying ----------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_spends_exactly_its_budget_without_requerying(
    victim: StagedBackbone, pool: Tensor, strategy: str
) -> None:
    oracle = RecordingOracle(Undefended(victim))
    attack = ActiveThief(oracle, budget=47, strategy=strategy, **SMALL)  # type: ignore[arg-type]
    result = attack.run(clone(), pool)
    assert result.queries_used == oracle.queries_used == 47
    assert [b.shape[0] for b in oracle.seen] == [15, 16, 16]  # seed 47 // 3, then 32 split evenly
    assert result.extras["round_sizes"] == [15, 31, 47] and result.extras["rounds"] == 2
    selected = torch.tensor(result.extras["selected"])
    assert selected.unique().numel() == 47
    assert torch.equal(torch.cat(oracle.seen), pool[selected])  # queried images are the pool's own


def test_round_sizes_split_the_rest_and_honour_initial_seed(victim: StagedBackbone) -> None:
    oracle = LocalOracle(Undefended(victim))
    assert ActiveThief(oracle, budget=103, rounds=4).round_sizes() == [20, 21, 21, 21, 20]
    assert ActiveThief(oracle, budget=10, rounds=4, seed_size=8).round_sizes() == [8, 1, 1]
    assert ActiveThief(oracle, budget=5, seed_size=5).round_sizes() == [5]
    assert ActiveThief(oracle, budget=10).round_sizes() == [1] * 10  # empty rounds are dropped


def test_a_too_small_pool_is_a_clear_error(victim: StagedBackbone, pool: Tensor) -> None:
    attack = ActiveThief(LocalOracle(Undefended(victim)), budget=100, **SMALL)
    with pytest.raises(ConfigError, match="pool holds 90 images, fewer than the budget of 100"):
        attack.run(clone(), pool)
    with pytest.raises(ConfigError, match="pool"):
        attack.run(clone(), None)


def test_the_oracles_refusal_propagates(victim: StagedBackbone, pool: Tensor) -> None:
    oracle = LocalOracle(Undefended(victim), budget=30)
    with pytest.raises(BudgetExceeded):
        ActiveThief(oracle, budget=47, **SMALL).run(clone(), pool)
    assert oracle.queries_used == 15


@pytest.mark.parametrize("mode", ["hard", "topk"])
def test_label_oracles_work(victim: StagedBackbone, pool: Tensor, mode: str) -> None:
    oracle = LocalOracle(Undefended(victim), output_mode=mode)
    result = ActiveThief(oracle, budget=40, strategy="uncertainty", **SMALL).run(clone(), pool)
    assert result.queries_used == 40 and sum(result.extras["label_hist"]) == 40
    assert not torch.equal(flat(result.clone), flat(clone()))


def test_seeded_runs_repeat_and_evaluation_is_free(victim: StagedBackbone, pool: Tensor) -> None:
    from fortress.attacks import EvalSet

    def go(seed: int, with_eval: bool) -> Any:
        oracle = LocalOracle(Undefended(victim))
        ev = EvalSet(pool[:20], torch.zeros(20, dtype=torch.long)) if with_eval else None
        res = ActiveThief(oracle, budget=40, seed=seed, strategy="k-center", **SMALL).run(clone(), pool, eval_set=ev)
        assert oracle.queries_used == 40
        return res

    a, b, c = go(1, False), go(1, True), go(2, False)
    assert a.extras["selected"] == b.extras["selected"]
    assert torch.equal(flat(a.clone), flat(b.clone))
    assert a.extras["selected"] != c.extras["selected"]
    assert [cp.queries for cp in b.checkpoints] == [13, 27, 40]


def test_warm_start_differs_from_retraining(victim: StagedBackbone, pool: Tensor) -> None:
    runs = [
        ActiveThief(LocalOracle(Undefended(victim)), budget=40, retrain_from_scratch=s, **SMALL).run(clone(), pool)
        for s in (True, False)
    ]
    assert not torch.equal(flat(runs[0].clone), flat(runs[1].clone))


# -- the selection strategies against naive references ------------------------------------------


def naive_k_center(cands: Tensor, centers: Tensor, k: int) -> list[int]:
    chosen: list[int] = []
    pts = [c for c in centers]
    for _ in range(k):
        best, best_d = -1, -1.0
        for i in range(cands.shape[0]):
            if i in chosen:
                continue
            d = min((float((cands[i] - c).norm()) for c in pts), default=float("inf"))
            if d > best_d:
                best, best_d = i, d
        chosen.append(best)
        pts.append(cands[best])
    return chosen


def test_k_center_matches_the_naive_greedy_rule() -> None:
    gen = torch.Generator().manual_seed(0)
    cands, centers = torch.rand(60, 4, generator=gen), torch.rand(7, 4, generator=gen)
    assert k_center_greedy(cands, centers, 12).tolist() == naive_k_center(cands, centers, 12)
    assert k_center_greedy(cands, torch.zeros(0, 4), 5).tolist() == naive_k_center(cands, torch.zeros(0, 4), 5)
    dup = torch.zeros(4, 2)  # identical candidates are still picked at most once
    assert sorted(k_center_greedy(dup, torch.ones(1, 2), 4).tolist()) == [0, 1, 2, 3]


def test_uncertainty_picks_the_highest_entropy(victim: StagedBackbone, pool: Tensor) -> None:
    attack = ActiveThief(LocalOracle(Undefended(victim)), budget=10, strategy="uncertainty")
    model = clone()
    picks = attack.select(model, pool[:5], pool[5:], 7, torch.Generator())
    p = _softmax_outputs(model, pool[5:])
    entropy = torch.tensor([-(row * row.log()).sum() for row in p])
    assert set(picks.tolist()) == set(entropy.argsort(descending=True)[:7].tolist())


def test_dfal_picks_the_smallest_deepfool_norms(victim: StagedBackbone, pool: Tensor) -> None:
    model = clone()
    attack = ActiveThief(LocalOracle(Undefended(victim)), budget=10, strategy="dfal")
    picks = attack.select(model, pool[:5], pool[5:], 6, torch.Generator())
    norms = deepfool_norms(model, pool[5:])
    assert set(picks.tolist()) == set(norms.argsort()[:6].tolist())
    short = ActiveThief(LocalOracle(Undefended(victim)), budget=10, strategy="dfal+k-center", dfal_shortlist=20)
    picks = short.select(model, pool[:5], pool[5:], 6, torch.Generator())
    assert set(picks.tolist()) <= set(norms.argsort()[:20].tolist())


def test_deepfool_is_exact_on_a_linear_model() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(16, 4)
    model = nn.Sequential(nn.Flatten(), linear)
    x = 0.5 + 0.01 * torch.randn(9, 1, 4, 4)
    w, b = linear.weight.detach(), linear.bias.detach()
    f = x.flatten(1) @ w.T + b
    lab = f.argmax(1)
    fd = (f - f.gather(1, lab.unsqueeze(1))).abs()
    wd = (w.unsqueeze(0) - w[lab].unsqueeze(1)).norm(dim=2)
    ratio = (fd / wd.clamp_min(1e-12)).scatter(1, lab.unsqueeze(1), float("inf"))
    best = ratio.argmin(1)
    expected = 1.02 * (fd[torch.arange(9), best] + 1e-4) / wd[torch.arange(9), best]
    got = deepfool_norms(model, x, overshoot=0.02)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_deepfool_is_batch_independent_and_flips_the_clone(pool: Tensor) -> None:
    model = clone()
    whole = deepfool_norms(model, pool[:12], chunk=256)
    pieces = deepfool_norms(model, pool[:12], chunk=5)
    assert torch.allclose(whole, pieces, rtol=1e-4, atol=1e-6)
    assert bool(torch.isfinite(whole).all()) and bool((whole > 0).all())


# -- settings, errors, registry -------------------------------------------------------------------


def test_hparams_name_every_constructor_argument(victim: StagedBackbone) -> None:
    params = set(inspect.signature(ActiveThief.__init__).parameters) - {"self", "oracle"}
    assert set(ActiveThief(LocalOracle(Undefended(victim)), budget=10).hparams()) == params


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strategy": "coreset"}, "'coreset'"),
        ({"rounds": 0}, "rounds"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"deepfool_iters": 0}, "deepfool_iters"),
        ({"seed_size": 0}, "seed_size"),
        ({"seed_size": 11}, "seed_size"),
        ({"lr": 0.0}, "lr"),
        ({"overshoot": -0.1}, "overshoot"),
        ({"dfal_candidates": 0}, "dfal_candidates"),
        ({"dfal_shortlist": 0}, "dfal_shortlist"),
        ({"budget": 0}, "budget"),
    ],
)
def test_bad_settings_are_rejected(victim: StagedBackbone, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ActiveThief(LocalOracle(Undefended(victim)), **{"budget": 10, **kwargs})


def test_registered_with_a_default_pool() -> None:
    assert ATTACKS.get("activethief") is ActiveThief
    assert ActiveThief.default_pool == "patches"
