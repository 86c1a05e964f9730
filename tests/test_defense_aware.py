"""Attacks that know the defense: top-1 training, smoothing over re-queries, D-DAE's shadow recovery."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from fortress.attacks import ATTACKS, DDAE, JBDA, KnockoffNets, Smoothing
from fortress.attacks.answers import jittered_copies, smoothed_answers, top1_rows
from fortress.attacks.ddae import fit_recovery
from fortress.bench.shadow import perturb_factory, perturb_factory_for
from fortress.data.embedded import mnist_splits
from fortress.defenses import RandP, ReverseSigmoid, Undefended
from fortress.errors import ConfigError
from fortress.models import StagedBackbone, create_model
from fortress.oracle import LocalOracle


@pytest.fixture(scope="module")
def victim() -> StagedBackbone:
    torch.manual_seed(0)
    return create_model("lenet5").eval()


@pytest.fixture(scope="module")
def digits() -> Tensor:
    return mnist_splits().attacker.x[:120]


def params_of(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# -- top-1 ----------------------------------------------------------------------------------------
def test_top1_rows_are_one_hot_of_the_argmax() -> None:
    rows = torch.softmax(torch.randn(7, 5), dim=1)
    hot = top1_rows(rows)
    assert torch.equal(hot.argmax(1), rows.argmax(1)) and torch.equal(hot.sum(1), torch.ones(7))


@pytest.mark.parametrize(
    ("cls", "settings"),
    [
        (KnockoffNets, {"epochs": 2, "batch_size": 32}),
        (KnockoffNets, {"strategy": "adaptive", "num_actions": 4, "epochs": 1}),
        (JBDA, {"seed_size": 20, "epochs_per_round": 1}),
    ],
)
def test_top1_on_soft_answers_trains_exactly_like_a_hard_label_oracle(
    cls: Any, settings: dict[str, Any], victim: StagedBackbone, digits: Tensor
) -> None:
    clones = []
    for mode, top1 in (("hard", False), ("soft", True)):
        torch.manual_seed(3)
        clone = create_model("lenet5-half")
        cls(LocalOracle(Undefended(victim), output_mode=mode), budget=60, seed=1, top1=top1, **settings).run(
            clone, digits
        )
        clones.append(params_of(clone))
    assert torch.equal(clones[0], clones[1])


# -- smoothing ------------------------------------------------------------------------------------
def test_jittered_copies_keep_the_original_first() -> None:
    x = torch.rand(3, 1, 8, 8)
    copies = jittered_copies(x, 4, max_shift=1, noise_std=0.05, generator=torch.Generator().manual_seed(0))
    assert copies.shape == (12, 1, 8, 8)
    assert torch.equal(copies[::4], x)
    assert not torch.equal(copies[1::4], x) and copies.min() >= 0 and copies.max() <= 1


def test_averaging_re_queries_shrinks_random_noise(victim: StagedBackbone, digits: Tensor) -> None:
    """Against a defense that draws fresh noise for every query, the mean of r answers is closer to the truth."""
    defense = RandP(victim, epsilon=0.6, seed=0)
    oracle = LocalOracle(defense)
    with torch.no_grad():
        clean = torch.softmax(victim(digits), dim=1)
    one = oracle.query(digits)
    mean = smoothed_answers(
        lambda x, _: oracle.query(x),
        digits,
        repeats=8,
        max_shift=0,
        noise_std=0.0,
        batch_size=256,
        generator=torch.Generator().manual_seed(0),
    )
    assert oracle.queries_used == 9 * digits.shape[0]
    assert (mean - clean).abs().sum(1).mean() < 0.7 * (one - clean).abs().sum(1).mean()


def test_smoothing_spends_repeats_queries_per_image(victim: StagedBackbone, digits: Tensor) -> None:
    oracle = LocalOracle(Undefended(victim), budget=100)
    result = Smoothing(oracle, budget=100, repeats=3, epochs=1, query_batch_size=40).run(
        create_model("lenet5-half"), digits
    )
    assert result.queries_used == oracle.queries_used == 99  # 33 images × 3
    assert result.extras["transfer_set_size"] == 33
    with pytest.raises(ConfigError, match="repeats=5"):
        Smoothing(oracle, budget=4, repeats=5)


# -- D-DAE ----------------------------------------------------------------------------------------
def test_recovery_learns_to_undo_a_known_perturbation() -> None:
    """On rows perturbed by reverse sigmoid, the recovery network gets much closer to the clean rows."""
    torch.manual_seed(0)
    clean = torch.softmax(3 * torch.randn(3000, 10), dim=1)
    from fortress.defenses.reverse_sigmoid import reverse_sigmoid

    perturbed = reverse_sigmoid(clean, 0.7, 0.4)
    _, q = fit_recovery(
        clean,
        perturbed,
        hidden=64,
        epochs=20,
        batch_size=128,
        lr=1e-3,
        threshold=0.5,
        generator=torch.Generator().manual_seed(0),
    )
    assert q["detector_acc"] > 0.9
    assert q["l1_after"] < 0.5 * q["l1_before"]


def test_ddae_recovers_the_victims_answers_through_a_simulated_defense(victim: StagedBackbone, digits: Tensor) -> None:
    defense = ReverseSigmoid(victim, beta=0.7, gamma=0.4)
    oracle = LocalOracle(defense, budget=100)
    attack = DDAE(
        oracle,
        budget=100,
        perturb_factory=perturb_factory("reverse-sigmoid", beta=0.7, gamma=0.4),
        shadow_epochs=2,
        recovery_epochs=40,
        refine_rounds=1,
        epochs=1,
    )
    result = attack.run(create_model("lenet5-half"), digits)
    assert result.queries_used == oracle.queries_used == 100  # the shadow work is free
    assert len(result.extras["recovery"]) == len(result.extras["flagged"]) == 2
    assert result.extras["flagged"][-1] > 0.5  # most answers are recognised as perturbed
    assert attack.hparams()["perturb_factory"] == "reverse-sigmoid(beta=0.7, gamma=0.4)"


def test_ddae_needs_the_defenses_algorithm(victim: StagedBackbone) -> None:
    with pytest.raises(ConfigError, match="ddae needs perturb_factory"):
        ATTACKS.get("ddae")(LocalOracle(Undefended(victim)), budget=10)


# -- the perturb factory --------------------------------------------------------------------------
def test_perturb_factory_defends_a_shadow_as_the_registered_defense(victim: StagedBackbone) -> None:
    x = torch.rand(4, 1, 28, 28)
    simulated = perturb_factory("reverse-sigmoid", beta=0.5, gamma=0.3)(victim)
    assert torch.allclose(simulated(x), ReverseSigmoid(victim, beta=0.5, gamma=0.3)(x))
    with pytest.raises(ConfigError, match="cannot be simulated"):
        perturb_factory("dnf")
    with pytest.raises(ConfigError, match="must be a fortress StagedBackbone"):
        perturb_factory("rounding")(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="cannot build defense 'reverse-sigmoid'"):
        perturb_factory("reverse-sigmoid", beta=-1.0)(victim)


def test_perturb_factory_for_a_saved_defense(tmp_path: Any, victim: StagedBackbone) -> None:
    ReverseSigmoid(victim, beta=0.3, gamma=0.1).save(tmp_path / "rs")
    factory = perturb_factory_for(tmp_path / "rs", seed=1)  # reverse sigmoid takes no seed: ignored
    assert repr(factory) == "reverse-sigmoid(beta=0.3, gamma=0.1)"
    x = torch.rand(2, 1, 28, 28)
    assert torch.allclose(factory(victim)(x), ReverseSigmoid(victim, beta=0.3, gamma=0.1)(x))


def test_perturb_factory_for_a_saved_surrogate_defense_takes_the_attackers_seed(
    tmp_path: Any, victim: StagedBackbone
) -> None:
    from fortress.defenses import MAD

    MAD(victim, epsilon=0.5, seed=0).save(tmp_path / "mad")
    factory = perturb_factory_for(tmp_path / "mad", seed=7)
    assert factory.params["seed"] == 7 and factory.params["epsilon"] == 0.5
    x = torch.rand(3, 1, 28, 28)
    assert torch.allclose(factory(victim)(x), MAD(victim, epsilon=0.5, seed=7)(x))
