"""Architecture stealing by SVD (Carlini et al. 2024; DNF paper §5.4) on tiny constructed victims."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fortress.attacks.arch_steal import ArchSteal, estimate_hidden_width
from fortress.defenses import DNF, Undefended
from fortress.errors import ConfigError
from fortress.models import create_model
from fortress.models.staged import StagedBackbone, from_sequential
from fortress.oracle import LocalOracle

NUM_CLASSES = 20


def bottleneck_victim(width: int, seed: int = 0) -> StagedBackbone:
    """A random MLP whose last hidden layer (``width``) is narrower than its 20 outputs."""
    torch.manual_seed(seed)
    first, hidden, head = nn.Linear(784, 64), nn.Linear(64, width), nn.Linear(width, NUM_CLASSES)
    with torch.no_grad():  # spread the logits (a few nats) while staying far above the probability floor
        first.weight.mul_(3.0)
        hidden.weight.mul_(3.0)
        hidden.bias.fill_(0.1)
        head.bias.normal_(0.0, 1.0)
    seq = nn.Sequential(nn.Flatten(), first, nn.ReLU(), hidden, nn.ReLU(), head)
    return from_sequential(seq, (1, 28, 28), NUM_CLASSES).eval()


def soft_oracle(width: int, budget: int | None = None) -> LocalOracle:
    return LocalOracle(Undefended(bottleneck_victim(width)), budget=budget)


@pytest.mark.parametrize("width", [4, 6, 9])
def test_recovers_bottleneck_width(width: int) -> None:
    oracle = soft_oracle(width, budget=200)
    clone = nn.Linear(1, 1)
    before = {k: v.clone() for k, v in clone.state_dict().items()}
    res = ArchSteal(oracle, budget=200, seed=0).run(clone)
    assert res.extras["hidden_width_estimate"] == width
    assert res.extras["max_recoverable"] == NUM_CLASSES - 1
    n = res.extras["num_queries"]
    assert res.queries_used == n == oracle.queries_used <= 200
    assert n == min(200, 4 * NUM_CLASSES + 16)
    assert res.clone is clone and all(torch.equal(before[k], v) for k, v in clone.state_dict().items())
    s = res.extras["singular_values"]
    assert len(s) == NUM_CLASSES and s == sorted(s, reverse=True)
    assert len(res.extras["log_gaps"]) == NUM_CLASSES - 2
    json.dumps(res.extras)  # JSON-serialisable


def test_bias_adds_one_without_column_centering() -> None:
    res = ArchSteal(soft_oracle(6), budget=100, center_columns=False).run(nn.Linear(1, 1))
    assert res.extras["hidden_width_estimate"] == 7  # W·g + b spans h + 1 dimensions


def test_pool_source_and_budget() -> None:
    pool = torch.rand(50, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    oracle = soft_oracle(6, budget=40)
    res = ArchSteal(oracle, budget=40, num_queries=40, query_source="pool").run(nn.Linear(1, 1), pool)
    assert res.extras["hidden_width_estimate"] == 6
    assert res.queries_used == 40 == oracle.queries_used
    with pytest.raises(ConfigError, match="pool"):
        ArchSteal(soft_oracle(6), budget=40, query_source="pool").run(nn.Linear(1, 1))
    with pytest.raises(ConfigError, match="num_queries=41"):
        ArchSteal(soft_oracle(6), budget=40, num_queries=41)


def test_reproducible_under_seed() -> None:
    a = ArchSteal(soft_oracle(9), budget=60, seed=3).run(nn.Linear(1, 1)).extras
    b = ArchSteal(soft_oracle(9), budget=60, seed=3).run(nn.Linear(1, 1)).extras
    c = ArchSteal(soft_oracle(9), budget=60, seed=4).run(nn.Linear(1, 1)).extras
    assert a == b
    assert a["singular_values"] != c["singular_values"]


def test_refuses_bad_config() -> None:
    victim = bottleneck_victim(4)
    with pytest.raises(ConfigError, match="soft"):
        ArchSteal(LocalOracle(Undefended(victim), output_mode="hard"), budget=100)
    with pytest.raises(ConfigError, match="topk"):
        ArchSteal(LocalOracle(Undefended(victim), output_mode="topk", top_k=3), budget=100)
    oracle = LocalOracle(Undefended(victim))
    with pytest.raises(ConfigError, match="eps"):
        ArchSteal(oracle, budget=100, eps=0.0)
    with pytest.raises(ConfigError, match="query_source"):
        ArchSteal(oracle, budget=100, query_source="gan")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="rank ceiling"):
        ArchSteal(oracle, budget=2)


def test_estimate_helper() -> None:
    assert estimate_hidden_width(torch.tensor([5.0, 4.0, 3.0, 1e-6, 1e-7, 0.0]), 5)[0] == 3
    est, gaps = estimate_hidden_width(torch.zeros(5), 4)
    assert est == 0 and gaps == [0.0, 0.0, 0.0]


def test_runs_against_dnf() -> None:
    torch.manual_seed(0)
    victim = create_model("lenet5").eval()
    dnf = DNF(victim, thresholds=[0.5, 0.5, 0.5], seed=0)
    # Untrained heads are near-uniform, so 0.5 never fires: put each threshold at the head's median
    # confidence on noise (computed off the oracle) so the queries spread over the exits.
    with torch.no_grad():
        conf = torch.softmax(dnf.net.forward_all(torch.rand(64, 1, 28, 28)).mean_logits[:-1], dim=2).amax(dim=2)
    dnf.net.set_thresholds(conf.median(dim=1).values.tolist())
    oracle = LocalOracle(dnf)
    res = ArchSteal(oracle, budget=60, seed=0).run(create_model("lenet5"))
    est = res.extras["hidden_width_estimate"]
    assert isinstance(est, int) and 1 <= est <= oracle.num_classes - 1
    assert res.queries_used == 56
    assert sum(c > 0 for c in oracle.log.exit_counts) >= 2
    json.dumps(res.extras)


def saturating_victim(width: int, scale: float = 40.0) -> StagedBackbone:
    """A bottleneck victim whose answers are saturated (near one-hot) on bright images.

    The logits are multiplied by ``scale`` when the image's mean pixel exceeds 0.5: such answers hit
    the probability floor, so their log-probabilities leave the low-rank subspace.
    """
    base = bottleneck_victim(width)

    class Saturate(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            gain = 1.0 + (scale - 1.0) * (x.flatten(1).mean(1, keepdim=True) > 0.5).float()
            return base(x) * gain

    return from_sequential(nn.Sequential(nn.Identity(), Saturate()), (1, 28, 28), NUM_CLASSES).eval()


def test_saturated_answers_are_dropped_before_the_svd() -> None:
    victim = saturating_victim(5)
    dim, bright = torch.rand(60, 1, 28, 28) * 0.8, 0.6 + 0.4 * torch.rand(60, 1, 28, 28)
    pool = torch.cat([dim, bright])[torch.randperm(120, generator=torch.Generator().manual_seed(0))]
    kept = ArchSteal(LocalOracle(Undefended(victim)), budget=120, num_queries=120, query_source="pool").run(
        nn.Linear(1, 1), pool
    )
    assert kept.extras["rows_used"] < 120  # the bright, saturated answers were left out
    assert kept.extras["hidden_width_estimate"] == 5
    everything = ArchSteal(
        LocalOracle(Undefended(victim)), budget=120, num_queries=120, query_source="pool", min_prob=None
    ).run(nn.Linear(1, 1), pool)
    assert everything.extras["rows_used"] == 120
    assert everything.extras["hidden_width_estimate"] != 5  # saturated rows fill the spectrum


def test_no_estimate_when_every_answer_is_saturated() -> None:
    victim = saturating_victim(5, scale=200.0)
    res = ArchSteal(LocalOracle(Undefended(victim)), budget=40, num_queries=40, query_source="pool").run(
        nn.Linear(1, 1), 0.9 + 0.1 * torch.rand(40, 1, 28, 28)
    )
    assert res.queries_used == 40
    assert res.extras["hidden_width_estimate"] is None and res.extras["rows_used"] < 3


@pytest.mark.parametrize("bad", [-1e-3, 0.05, 1.0])
def test_min_prob_is_validated(bad: float) -> None:
    with pytest.raises(ConfigError, match="min_prob"):
        ArchSteal(soft_oracle(4), budget=100, min_prob=bad)
