"""The ART bridge: a fortress Oracle as an ART BlackBoxClassifier, and ART's extraction attacks through it.

ART is part of the ``dev`` extra, so these tests run in the default suite (a missing ART is an
install error, not a skip).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor

from fortress.attacks import EvalSet
from fortress.data.embedded import mnist_splits
from fortress.defenses import Undefended
from fortress.errors import BudgetExceeded, ConfigError
from fortress.integrations.art import as_art_classifier, run_art_extraction
from fortress.models import StagedBackbone, create_model, train_classifier
from fortress.oracle import LocalOracle


@pytest.fixture(scope="module")
def victim() -> StagedBackbone:
    torch.manual_seed(0)
    splits = mnist_splits()
    model = create_model("lenet5")
    train_classifier(model, splits.train.x[:800], splits.train.targets[:800], epochs=1, seed=0, max_shift=0)
    return model


@pytest.fixture(scope="module")
def pool() -> Tensor:
    return mnist_splits().val.x[:120]


def flat(model: torch.nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("mode", ["soft", "hard", "topk"])
def test_art_predictions_are_the_oracle_answers_and_are_charged(victim: StagedBackbone, mode: str) -> None:
    x = mnist_splits().test.x[:37]
    oracle = LocalOracle(Undefended(victim), budget=100, output_mode=mode, top_k=2)
    reference = LocalOracle(Undefended(victim), output_mode=mode, top_k=2).query(x)
    preds = as_art_classifier(oracle).predict(x.numpy(), batch_size=10)
    np.testing.assert_allclose(preds, reference.numpy(), rtol=1e-6, atol=1e-7)
    assert oracle.queries_used == 37
    assert oracle.log.batches == 4  # ART batches of 10: the oracle sees ART's batching


def test_budget_passing_batch_raises_out_of_art_and_charges_nothing(victim: StagedBackbone) -> None:
    oracle = LocalOracle(Undefended(victim), budget=15)
    art_victim = as_art_classifier(oracle)
    art_victim.predict(np.random.rand(10, 1, 28, 28).astype(np.float32))
    with pytest.raises(BudgetExceeded):
        art_victim.predict(np.random.rand(10, 1, 28, 28).astype(np.float32))
    assert oracle.queries_used == 10


@pytest.mark.parametrize("attack", ["knockoff", "copycat"])
def test_art_extraction_spends_exactly_its_budget_and_trains_the_clone(
    victim: StagedBackbone, pool: Tensor, attack: str
) -> None:
    oracle = LocalOracle(Undefended(victim), budget=1000)
    torch.manual_seed(1)
    clone = create_model("lenet5-half")
    before = flat(clone)
    test = mnist_splits().test
    result = run_art_extraction(
        oracle,
        clone,
        pool,
        attack=attack,  # type: ignore[arg-type]
        budget=90,
        seed=0,
        epochs=1,
        batch_size_query=32,
        eval_set=EvalSet(test.x[:100], test.targets[:100]),
    )
    assert result.queries_used == 90 == oracle.queries_used
    assert not torch.equal(before, flat(result.clone))
    assert result.clone_acc is not None and 0.0 <= result.clone_acc <= 1.0
    assert result.extras["art_attack"] == attack and result.extras["use_probability"] is True


def test_art_extraction_is_reproducible_under_a_seed(victim: StagedBackbone, pool: Tensor) -> None:
    outs = []
    for _ in range(2):
        oracle = LocalOracle(Undefended(victim))
        torch.manual_seed(3)
        clone = create_model("lenet5-half")
        run_art_extraction(oracle, clone, pool, attack="knockoff", budget=60, seed=5, epochs=1)
        outs.append(flat(clone))
    assert torch.equal(outs[0], outs[1])


def test_pool_smaller_than_budget_stops_at_the_pool(victim: StagedBackbone, pool: Tensor) -> None:
    oracle = LocalOracle(Undefended(victim), output_mode="hard")
    result = run_art_extraction(oracle, create_model("lenet5-half"), pool[:40], budget=500, epochs=1)
    assert result.queries_used == 40
    assert result.extras["use_probability"] is False


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"attack": "jbda"}, "attack must be one of knockoff, copycat"),
        ({"budget": 0}, "budget must be a positive"),
    ],
)
def test_bad_settings_are_refused(victim: StagedBackbone, pool: Tensor, kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"budget": 10, **kwargs}
    with pytest.raises(ConfigError, match=match):
        run_art_extraction(LocalOracle(Undefended(victim)), create_model("lenet5-half"), pool, **args)  # type: ignore[arg-type]


def test_pool_of_the_wrong_shape_is_refused(victim: StagedBackbone) -> None:
    with pytest.raises(ConfigError, match=r"\(C, H, W\) = \(1, 28, 28\)"):
        run_art_extraction(
            LocalOracle(Undefended(victim)), create_model("lenet5-half"), torch.rand(5, 3, 32, 32), budget=5
        )
