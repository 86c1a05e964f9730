"""Tests of the adaptive (gradient-bandit) strategy of Knockoff Nets and its k-means actions.

Hermetic and fast: untrained LeNet victims, random pools of a few hundred images, one epoch.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fortress.attacks import KnockoffNets
from fortress.attacks.bandit import BanditPolicy, kmeans, rank_within
from fortress.defenses.undefended import Undefended
from fortress.errors import BudgetExceeded, ConfigError, InvalidInput
from fortress.models import StagedBackbone, create_model
from fortress.oracle import LocalOracle, Oracle

SMALL: dict[str, Any] = {"strategy": "adaptive", "epochs": 1, "batch_size": 32, "num_actions": 5}


class RecordingOracle(LocalOracle):
    """A local oracle that keeps every image it answered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[Tensor] = []

    def query(self, x: Tensor) -> Tensor:
        out = super().query(x)
        self.seen.append(x.clone())
        return out


class BrightnessOracle(Oracle):
    """Certain (one-hot class 0) on bright images, uniform on dark ones: a known reward landscape."""

    def __init__(self) -> None:
        super().__init__(budget=None, output_mode="soft", top_k=1)
        self.bright = 0

    @property
    def num_classes(self) -> int:
        return 10

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (1, 28, 28)

    def query(self, x: Tensor) -> Tensor:
        self._charge_or_refuse(x.shape[0])
        self.log.queries += x.shape[0]
        self.log.batches += 1
        bright = (x.mean(dim=(1, 2, 3)) > 0.5).unsqueeze(1)
        self.bright += int(bright.sum())
        sure = torch.full((x.shape[0], 10), 1e-6).index_fill_(1, torch.tensor([0]), 1.0)
        return torch.where(bright, sure / sure.sum(1, keepdim=True), torch.full_like(sure, 0.1))


@pytest.fixture(scope="module")
def victim() -> StagedBackbone:
    torch.manual_seed(0)
    return create_model("lenet5")


@pytest.fixture(scope="module")
def pool() -> Tensor:
    return torch.rand(240, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def clone(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("lenet5-half")


def flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def pool_rows(images: Tensor, pool: Tensor) -> Tensor:
    """Index of each image in ``pool`` (exact match)."""
    d = torch.cdist(images.flatten(1), pool.flatten(1))
    assert bool((d.min(1).values < 0.1).all())  # cdist is approximate; distinct rows are ~11 apart
    return d.argmin(1)


# -- budget, pool and reproducibility ------------------------------------------------------------


@pytest.mark.parametrize(("budget", "bb"), [(137, 8), (50, 1), (64, 64)])
def test_adaptive_spends_exactly_its_budget_and_never_requeries(
    victim: StagedBackbone, pool: Tensor, budget: int, bb: int
) -> None:
    oracle = RecordingOracle(Undefended(victim))
    result = KnockoffNets(oracle, budget=budget, bandit_batch_size=bb, **SMALL).run(clone(), pool)
    assert result.queries_used == oracle.queries_used == budget
    assert result.extras["transfer_set_size"] == budget
    assert sum(result.extras["action_counts"]) == budget
    rows = pool_rows(torch.cat(oracle.seen), pool)
    assert rows.unique().numel() == budget
    assert all(b.shape[0] <= bb for b in oracle.seen)


def test_adaptive_stops_at_the_pool_and_queries_every_image_once(victim: StagedBackbone, pool: Tensor) -> None:
    oracle = RecordingOracle(Undefended(victim), output_mode="hard")
    result = KnockoffNets(oracle, budget=500, bandit_batch_size=16, **SMALL).run(clone(), pool[:90])
    assert result.queries_used == 90 and result.extras["stopped_at_pool"] is True
    assert sorted(pool_rows(torch.cat(oracle.seen), pool[:90]).tolist()) == list(range(90))
    assert all(p == 0.0 for p in result.extras["policy"])  # every action exhausted


def test_adaptive_propagates_the_oracles_budget_refusal(victim: StagedBackbone, pool: Tensor) -> None:
    oracle = LocalOracle(Undefended(victim), budget=20)
    with pytest.raises(BudgetExceeded):
        KnockoffNets(oracle, budget=100, bandit_batch_size=8, **SMALL).run(clone(), pool)
    assert oracle.queries_used == 16


def test_adaptive_is_reproducible_under_a_seed(victim: StagedBackbone, pool: Tensor) -> None:
    def go(seed: int) -> tuple[Any, Tensor]:
        oracle = RecordingOracle(Undefended(victim))
        res = KnockoffNets(oracle, budget=60, seed=seed, **SMALL).run(clone(), pool)
        return res, torch.cat(oracle.seen)

    (a, xa), (b, xb), (_, xc) = go(3), go(3), go(4)
    assert torch.equal(xa, xb) and torch.equal(flat(a.clone), flat(b.clone))
    assert a.extras["policy"] == b.extras["policy"]
    assert not torch.equal(xa, xc)


def test_rewards_use_the_online_clone(victim: StagedBackbone, pool: Tensor) -> None:
    def seen(online: int) -> Tensor:
        oracle = RecordingOracle(Undefended(victim))
        KnockoffNets(oracle, budget=80, reward="loss", online_steps=online, bandit_lr=5.0, **SMALL).run(clone(), pool)
        return torch.cat(oracle.seen)

    assert not torch.equal(seen(0), seen(3))


# -- the bandit learns ---------------------------------------------------------------------------


def test_adaptive_policy_prefers_the_rewarding_action() -> None:
    gen = torch.Generator().manual_seed(0)
    bright = 0.7 + 0.3 * torch.rand(300, 1, 28, 28, generator=gen)
    dark = 0.3 * torch.rand(300, 1, 28, 28, generator=gen)
    pool = torch.cat([dark, bright])
    labels = torch.cat([torch.zeros(300), torch.ones(300)]).long()
    oracle = BrightnessOracle()
    attack = KnockoffNets(oracle, budget=200, reward="cert", bandit_lr=1.0, **SMALL)
    result = attack.run(clone(), pool, pool_labels=labels)
    counts = result.extras["action_counts"]
    assert result.extras["num_actions"] == 2
    assert counts[1] > 2 * counts[0]  # bright images are certain: the policy moved to them
    assert result.extras["policy"][1] > 0.8


def test_random_strategy_ignores_the_landscape() -> None:
    gen = torch.Generator().manual_seed(0)
    pool = torch.cat([0.3 * torch.rand(300, 1, 28, 28, generator=gen), 0.7 + 0.3 * torch.rand(300, 1, 28, 28)])
    oracle = BrightnessOracle()
    KnockoffNets(oracle, budget=200, epochs=1).run(clone(), pool)
    assert 70 < oracle.bright < 130  # about half the picks are bright


# -- the pieces against naive references ---------------------------------------------------------


def naive_update(h_group: Tensor, h_leaf: Tensor, parent: Tensor, g: int, a: int, adv: float, lr: float) -> None:
    """One sample of the gradient-bandit rule, written out per entry (every leaf available)."""
    pg = torch.softmax(h_group, 0)
    siblings = (parent == g).nonzero().squeeze(1)
    pl = torch.softmax(h_leaf[siblings], 0)
    new_g = h_group.clone()
    for j in range(h_group.shape[0]):
        new_g[j] += lr * adv * ((1.0 if j == g else 0.0) - pg[j])
    new_l = h_leaf.clone()
    for pos, j in enumerate(siblings.tolist()):
        new_l[j] += lr * adv * ((1.0 if j == a else 0.0) - pl[pos])
    h_group.copy_(new_g)
    h_leaf.copy_(new_l)


def test_bandit_update_matches_the_per_sample_rule() -> None:
    parent = torch.tensor([0, 0, 1, 1, 1, 2])
    policy = BanditPolicy(parent, 3, lr=0.3)
    policy.h_group = torch.tensor([0.2, -0.1, 0.5])
    policy.h_leaf = torch.tensor([0.1, 0.4, -0.3, 0.0, 0.2, 0.7])
    ref_g, ref_l = policy.h_group.clone(), policy.h_leaf.clone()
    avail = torch.ones(6, dtype=torch.bool)
    for g, a, adv in [(1, 3, 0.8), (0, 0, -0.5), (2, 5, 0.3)]:
        policy.update(torch.tensor([g]), torch.tensor([a]), torch.tensor([adv]), avail)
        naive_update(ref_g, ref_l, parent, g, a, adv, 0.3)
    assert torch.allclose(policy.h_group, ref_g, atol=1e-6)
    assert torch.allclose(policy.h_leaf, ref_l, atol=1e-6)


def test_batched_bandit_update_is_the_mean_of_per_sample_steps() -> None:
    parent = torch.tensor([0, 0, 1, 1, 1])
    avail = torch.tensor([True, True, True, False, True])
    g, a, adv = torch.tensor([0, 1, 1, 0]), torch.tensor([1, 2, 4, 1]), torch.tensor([0.5, -0.2, 0.9, 0.1])
    batched = BanditPolicy(parent, 2, lr=0.4)
    batched.update(g, a, adv, avail)
    total_g, total_l = torch.zeros(2), torch.zeros(5)
    for i in range(4):  # every sample's step from the same starting point, then averaged
        single = BanditPolicy(parent, 2, lr=0.4)
        single.update(g[i : i + 1], a[i : i + 1], adv[i : i + 1], avail)
        total_g += single.h_group
        total_l += single.h_leaf
    assert torch.allclose(batched.h_group, total_g / 4, atol=1e-6)
    assert torch.allclose(batched.h_leaf, total_l / 4, atol=1e-6)
    assert batched.h_leaf[3] == 0  # an exhausted leaf has probability 0 and does not move


def test_policy_sampling_respects_availability_and_probabilities() -> None:
    parent = torch.tensor([0, 0, 1])
    policy = BanditPolicy(parent, 2, lr=0.1)
    policy.h_group = torch.tensor([0.0, float(torch.log(torch.tensor(3.0)))])
    avail = torch.tensor([True, False, True])
    gen = torch.Generator().manual_seed(0)
    g, a = policy.sample(20_000, avail, gen)
    assert not bool((a == 1).any()) and torch.equal(parent[a], g)
    assert abs(float((a == 2).float().mean()) - 0.75) < 0.02
    assert torch.allclose(policy.marginal(avail), torch.tensor([0.25, 0.0, 0.75]))


def test_rewards_match_their_definitions(victim: StagedBackbone) -> None:
    attack = KnockoffNets(LocalOracle(Undefended(victim)), budget=10, diversity_window=3, **SMALL)
    gen = torch.Generator().manual_seed(0)
    recent = torch.softmax(torch.randn(2, 10, generator=gen), 1)
    y = torch.softmax(3 * torch.randn(4, 10, generator=gen), 1)
    logits = torch.randn(4, 10, generator=gen)
    raw = attack._rewards(y, logits, recent)
    stream = torch.cat([recent, y])
    for i in range(4):
        p = 2 + i
        window = stream[max(0, p - 2) : p + 1].mean(0)
        top = y[i].sort(descending=True).values
        assert torch.isclose(raw[i, 0], top[0] - top[1])
        assert torch.isclose(raw[i, 1], (y[i] - window).clamp_min(0).sum(), atol=1e-6)
        assert torch.isclose(raw[i, 2], -(y[i] * F.log_softmax(logits[i], 0)).sum(), atol=1e-5)


def test_rank_within_counts_earlier_equal_ids() -> None:
    ids = torch.tensor([2, 0, 2, 2, 1, 0])
    assert rank_within(ids, 3).tolist() == [0, 0, 1, 2, 0, 1]


def test_kmeans_finds_separated_blobs_and_is_seeded() -> None:
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = torch.arange(3).repeat_interleave(40)
    pts = centres[truth] + 0.5 * torch.randn(120, 2, generator=gen)
    lab = kmeans(pts, 3, generator=torch.Generator().manual_seed(1))
    assert lab.min() >= 0 and lab.max() < 3
    for c in range(3):  # each true blob is one cluster, and the clusters differ
        assert lab[truth == c].unique().numel() == 1
    assert lab[[0, 40, 80]].unique().numel() == 3
    assert torch.equal(lab, kmeans(pts, 3, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(ConfigError, match="k=121"):
        kmeans(pts, 121)


def test_actions_come_from_labels_groups_or_clusters(victim: StagedBackbone, pool: Tensor) -> None:
    attack = KnockoffNets(LocalOracle(Undefended(victim)), budget=10, **{**SMALL, "num_actions": 4})
    gen = torch.Generator().manual_seed(0)
    groups = torch.arange(240) % 3
    leaf, parent = attack.actions(pool, None, groups, gen)
    assert parent.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert torch.equal(parent[leaf], groups)  # clusters never mix groups
    labels = torch.arange(240) % 5
    leaf, parent = attack.actions(pool, labels, groups, gen)
    assert leaf.unique().numel() == 15 and parent.shape[0] == 15
    assert torch.equal(parent[leaf], groups)
    same = (labels.unsqueeze(0) == labels.unsqueeze(1)) & (groups.unsqueeze(0) == groups.unsqueeze(1))
    assert torch.equal(leaf.unsqueeze(0) == leaf.unsqueeze(1), same)
    leaf, parent = attack.actions(pool, None, None, gen)
    assert parent.tolist() == [0] * 4 and leaf.unique().numel() == 4


# -- settings and errors --------------------------------------------------------------------------


def test_adaptive_hparams_name_every_constructor_argument(victim: StagedBackbone) -> None:
    params = set(inspect.signature(KnockoffNets.__init__).parameters) - {"self", "oracle"}
    assert set(KnockoffNets(LocalOracle(Undefended(victim)), budget=10, **SMALL).hparams()) == params


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"reward": "surprise"}, "'surprise'"),
        ({"num_actions": 0}, "num_actions"),
        ({"bandit_lr": 0.0}, "bandit_lr"),
        ({"bandit_batch_size": 0}, "bandit_batch_size"),
        ({"online_steps": -1}, "online_steps"),
        ({"diversity_window": 0}, "diversity_window"),
    ],
)
def test_adaptive_rejects_bad_settings(victim: StagedBackbone, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        KnockoffNets(LocalOracle(Undefended(victim)), budget=10, **{**SMALL, **kwargs})


def test_adaptive_rejects_bad_pool_ids(victim: StagedBackbone, pool: Tensor) -> None:
    attack = KnockoffNets(LocalOracle(Undefended(victim)), budget=10, **SMALL)
    with pytest.raises(InvalidInput, match=r"pool_labels must have shape \(240,\)"):
        attack.run(clone(), pool, pool_labels=torch.zeros(5, dtype=torch.long))
    with pytest.raises(InvalidInput, match="pool_groups must be an integer tensor"):
        attack.run(clone(), pool, pool_groups=torch.zeros(240))
