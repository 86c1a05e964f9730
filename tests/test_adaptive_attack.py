"""Tests of the adaptive attacks on DNF (DNF paper §5.5, Table 9): DFME plus DNF's entropy loss.

Fast and hermetic: a LeNet-5 victim trained for one epoch on 1,000 embedded digits, tiny DFME
generators and batches (64 queries per iteration), an untrained DNF for the exit-histogram check.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from fortress.attacks import ATTACKS, DFME, AdaptiveEntropy
from fortress.attacks.adaptive import EarlyExitClone, answer_margin
from fortress.attacks.dfme import _disagreement
from fortress.data.embedded import mnist_splits
from fortress.defenses.dnf import DNF
from fortress.defenses.undefended import Undefended
from fortress.errors import ConfigError
from fortress.exits import EarlyExitNet
from fortress.functional import entropy
from fortress.models import StagedBackbone, create_model, train_classifier
from fortress.oracle import LocalOracle

SMALL: dict[str, Any] = {"batch_size": 16, "grad_m": 1, "d_iter": 2, "nz": 16, "ngf": 4}
COST = 16 * (1 + 1 + 2)


@pytest.fixture(scope="module")
def victim() -> StagedBackbone:
    torch.manual_seed(0)
    splits = mnist_splits()
    assert splits.train.y is not None
    model = create_model("lenet5")
    train_classifier(model, splits.train.x[:1000], splits.train.y[:1000], epochs=1, seed=0, max_shift=0)
    return model


def fresh_clone() -> StagedBackbone:
    torch.manual_seed(0)
    return create_model("lenet5-half")


def flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def run(victim: StagedBackbone, budget: int, *, seed: int = 0, **kw: Any) -> tuple[Any, LocalOracle]:
    oracle = LocalOracle(Undefended(victim))
    return AdaptiveEntropy(oracle, budget=budget, seed=seed, **{**SMALL, **kw}).run(fresh_clone()), oracle


def test_registered() -> None:
    assert ATTACKS.get("adaptive-entropy") is AdaptiveEntropy


def test_without_its_additions_it_is_dfme(victim: StagedBackbone) -> None:
    """alpha 0, no push, equal answer weights: the same queries and (up to rounding) the same clone."""
    ours, o1 = run(victim, 3 * COST + 16, alpha=0.0)
    oracle = LocalOracle(Undefended(victim))
    plain = DFME(oracle, budget=3 * COST + 16, **SMALL).run(fresh_clone())
    assert ours.queries_used == plain.queries_used == o1.queries_used == oracle.queries_used == 3 * COST + 16
    assert ours.extras["label_hist"] == plain.extras["label_hist"]
    torch.testing.assert_close(flat(ours.clone), flat(plain.clone), atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["entropy", "ee-entropy"])
def test_spends_exactly_dfmes_budget_and_is_reproducible(victim: StagedBackbone, variant: str) -> None:
    a, oracle = run(victim, 2 * COST + 40, variant=variant, push_weight=1.0, suspect_weight=0.5, seed=3)
    b, _ = run(victim, 2 * COST + 40, variant=variant, push_weight=1.0, suspect_weight=0.5, seed=3)
    c, _ = run(victim, 2 * COST + 40, variant=variant, push_weight=1.0, suspect_weight=0.5, seed=4)
    assert a.queries_used == oracle.queries_used == 2 * COST + 32  # DFME's tail: two student batches
    assert torch.equal(flat(a.clone), flat(b.clone))
    assert not torch.equal(flat(a.clone), flat(c.clone))
    assert not torch.equal(flat(a.clone), flat(fresh_clone()))
    assert 0.0 <= a.extras["answers_below_threshold"] <= 1.0


def test_ee_variant_trains_and_returns_the_staged_clone(victim: StagedBackbone) -> None:
    clone = fresh_clone()
    before = flat(clone)
    oracle = LocalOracle(Undefended(victim))
    result = AdaptiveEntropy(oracle, budget=2 * COST, variant="ee-entropy", **SMALL).run(clone)
    assert result.clone is clone
    assert not torch.equal(flat(clone), before)
    assert all(p.requires_grad for p in clone.parameters())
    hist = result.extras["clone_exit_hist"]
    assert len(hist) == clone.num_stages + 1
    assert sum(hist) == pytest.approx(1.0)


def test_early_exit_clone_answers_like_an_early_exit_net() -> None:
    torch.manual_seed(0)
    ee = EarlyExitClone(create_model("lenet5-half"), exit_after=None, thresholds=(0.3, 0.35, 0.4), seed=0)
    ee.eval()
    x = torch.rand(12, 1, 28, 28)
    with torch.no_grad():
        ref_logits, ref_exits = EarlyExitNet.forward_static(ee.net, x)
        logits, exits = ee.route(ee.all_exits(x))
        torch.testing.assert_close(ee.routed(x), ref_logits)
        torch.testing.assert_close(ee(x), ee.net.backbone(x))
    assert torch.equal(exits, ref_exits)
    torch.testing.assert_close(logits, ref_logits)
    ee.train()
    assert ee.net.backbone.training  # unlike DNF's frozen backbone, the clone's trains


def test_ee_student_loss_reaches_every_parameter(victim: StagedBackbone) -> None:
    """DNF's entropy term touches every head, the routed fit the backbone: all parameters get a gradient."""
    oracle = LocalOracle(Undefended(victim))
    attack = AdaptiveEntropy(oracle, budget=10_000, variant="ee-entropy", **SMALL)
    ee = EarlyExitClone(fresh_clone(), exit_after=None, thresholds=attack.thresholds, seed=0)
    x = torch.rand(16, 1, 28, 28)
    probs = torch.softmax(torch.randn(16, 10), 1)
    grads: dict[str, bool] = {}

    class Spy(torch.optim.SGD):
        def step(self, closure: Any = None) -> Any:
            for name, p in ee.named_parameters():
                grads[name] = p.grad is not None and bool(p.grad.abs().sum() > 0)
            return None

    hist = torch.zeros(10, dtype=torch.int64)
    attack._clone_exits = torch.zeros(4, dtype=torch.int64)
    attack._student_step(ee, Spy(ee.parameters(), lr=0.1), x, probs, hist)
    assert grads
    assert all(grads.values()), [n for n, g in grads.items() if not g]


def test_single_exit_student_loss_is_dfme_plus_alpha_entropy(victim: StagedBackbone) -> None:
    oracle = LocalOracle(Undefended(victim))
    attack = AdaptiveEntropy(oracle, budget=10_000, alpha=0.3, **SMALL)
    clone = fresh_clone()
    x = torch.rand(16, 1, 28, 28)
    probs = torch.softmax(torch.randn(16, 10), 1)
    with torch.no_grad():
        logits = clone(x)
        expected = _disagreement(logits, probs, "l1").mean() + 0.3 * entropy(logits).mean()
    got = attack._student_step(clone, torch.optim.SGD(clone.parameters(), lr=0.0), x, probs, torch.zeros(10).long())
    assert got == pytest.approx(float(expected), rel=1e-5)


def test_answer_margin_and_the_late_exit_push() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.97, 0.02, 0.01]])
    torch.testing.assert_close(answer_margin(probs), torch.log(torch.tensor([0.5 / 0.3, 0.97 / 0.02])))
    oracle = LocalOracle(Undefended(create_model("lenet5", num_classes=3)))
    attack = AdaptiveEntropy(oracle, budget=10_000, push_weight=2.0, thresholds=(0.9,), **SMALL)
    base = AdaptiveEntropy(oracle, budget=10_000, **SMALL)
    logits = torch.randn(2, 3)
    diff = attack._point_objective(logits, probs) - base._point_objective(logits, probs)
    # row 0 is below the threshold (no penalty); row 1 pays 2·(margin − log(0.9/0.1)); the step descends it
    expected = torch.tensor([0.0, 2.0 * (math.log(0.97 / 0.02) - math.log(9.0))])
    torch.testing.assert_close(diff, expected)
    confident = AdaptiveEntropy(oracle, budget=10_000, push="confident", push_weight=1.0, **SMALL)
    torch.testing.assert_close(
        confident._point_objective(logits, probs) - base._point_objective(logits, probs),
        -(probs * probs.log()).sum(1),
    )


def test_answer_weights_trust_only_what_no_head_can_have_said(victim: StagedBackbone) -> None:
    attack = AdaptiveEntropy(LocalOracle(Undefended(victim)), budget=10_000, suspect_weight=0.25, **SMALL)
    probs = torch.tensor([[0.91, 0.09], [0.92, 0.08], [0.5, 0.5]])
    torch.testing.assert_close(attack.answer_weights(probs), torch.tensor([1.0, 0.25, 1.0]))


def test_against_dnf_the_oracle_logs_every_exit(victim: StagedBackbone) -> None:
    oracle = LocalOracle(DNF(victim, head_kind="plain", seed=0))
    result = AdaptiveEntropy(oracle, budget=2 * COST, variant="ee-entropy", push_weight=1.0, **SMALL).run(fresh_clone())
    assert sum(oracle.log.exit_counts) == result.queries_used == 2 * COST
    assert len(oracle.log.exit_hist) == 4


def test_refuses_label_oracles_and_unstaged_clones(victim: StagedBackbone) -> None:
    with pytest.raises(ConfigError, match="soft"):
        AdaptiveEntropy(LocalOracle(Undefended(victim), output_mode="hard"), budget=10_000)
    attack = AdaptiveEntropy(LocalOracle(Undefended(victim)), budget=10_000, variant="ee-entropy", **SMALL)
    with pytest.raises(ConfigError, match="staged clone"):
        attack.run(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)))
    short = AdaptiveEntropy(
        LocalOracle(Undefended(victim)), budget=10_000, variant="ee-entropy", thresholds=(0.9,), **SMALL
    )
    with pytest.raises(ConfigError, match="1 entries for 3 exit heads"):
        short.run(fresh_clone())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"variant": "ee"}, "'ee'"),
        ({"push": "early"}, "'early'"),
        ({"alpha": -0.1}, "alpha=-0.1"),
        ({"push_weight": -1.0}, "push_weight=-1.0"),
        ({"suspect_weight": 1.5}, "suspect_weight"),
        ({"thresholds": ()}, "thresholds"),
        ({"thresholds": (0.9, 1.0)}, "thresholds"),
        ({"grad_m": 0}, "grad_m"),
    ],
)
def test_rejects_bad_hyper_parameters(victim: StagedBackbone, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        AdaptiveEntropy(LocalOracle(Undefended(victim)), **{"budget": 10_000, **SMALL, **kwargs})


def test_hparams_list_every_hyper_parameter(victim: StagedBackbone) -> None:
    args = {p for p in inspect.signature(AdaptiveEntropy).parameters if p != "oracle"}
    assert set(AdaptiveEntropy(LocalOracle(Undefended(victim)), budget=10_000).hparams()) == args
