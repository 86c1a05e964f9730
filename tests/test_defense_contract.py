"""The Defense contract, checked for every registered defense.

Each defense is built with its defaults around a toy victim and must answer valid probability rows,
report the ℓ1 distance it added and whether top-1 changed (and report them truthfully), be
deterministic under a seed, leave the victim untouched, and survive save/load with identical answers.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from torch import Tensor

from fortress.data.embedded import mnist_splits
from fortress.defenses import DEFENSES, Defense, load_defense
from fortress.errors import InvalidInput
from fortress.models import StagedBackbone, create_model


def victim() -> StagedBackbone:
    torch.manual_seed(0)
    return create_model("lenet5").eval()


def build(name: str, seed: int = 0) -> Defense:
    cls = DEFENSES.get(name)
    kwargs = {"seed": seed} if "seed" in inspect.signature(cls).parameters else {}
    return cls(victim(), **kwargs)


@pytest.fixture(scope="module")
def queries() -> Tensor:
    torch.manual_seed(1)
    digits = mnist_splits().test.x[:24]
    return torch.cat([digits, torch.rand(24, 1, 28, 28)])  # in-distribution and noise rows


@pytest.mark.parametrize("name", DEFENSES.names())
def test_answers_are_probability_rows_with_truthful_reports(name: str, queries: Tensor) -> None:
    defense = build(name)
    out = defense.respond(queries)
    p = out.probs
    assert p.shape == (queries.shape[0], 10) and p.dtype == torch.float32
    assert torch.isfinite(p).all() and (p >= 0).all()
    torch.testing.assert_close(p.sum(1), torch.ones(p.shape[0]), atol=1e-5, rtol=0)
    with torch.no_grad():
        own = torch.softmax(defense.victim(queries), dim=1)
    if out.l1 is not None:
        torch.testing.assert_close(out.l1.float(), (p - own).abs().sum(1), atol=1e-4, rtol=1e-4)
    if out.top1_changed is not None:
        assert torch.equal(out.top1_changed, p.argmax(1) != own.argmax(1))
    if out.exits is not None:
        assert defense.num_exits is not None and out.exits.shape == (queries.shape[0],)
        assert int(out.exits.min()) >= 0 and int(out.exits.max()) < defense.num_exits


@pytest.mark.parametrize("name", DEFENSES.names())
def test_deterministic_under_a_seed(name: str, queries: Tensor) -> None:
    a, b = build(name, seed=3), build(name, seed=3)
    torch.testing.assert_close(a(queries), b(queries), atol=0, rtol=0)


@pytest.mark.parametrize("name", DEFENSES.names())
def test_victim_is_left_untouched(name: str, queries: Tensor) -> None:
    defense = build(name)
    before = {k: v.clone() for k, v in defense.victim.state_dict().items()}
    defense(queries)
    assert all(torch.equal(before[k], v) for k, v in defense.victim.state_dict().items())


@pytest.mark.parametrize("name", DEFENSES.names())
def test_bad_input_is_refused_by_name(name: str) -> None:
    defense = build(name)
    with pytest.raises(InvalidInput, match=r"NaN|finite"):
        defense(torch.full((2, 1, 28, 28), float("nan")))
    with pytest.raises(InvalidInput, match=r"\(1, 28, 28\)"):
        defense(torch.rand(2, 3, 32, 32))


@pytest.mark.parametrize("name", DEFENSES.names())
def test_save_and_load_give_identical_answers(name: str, queries: Tensor, tmp_path: Path) -> None:
    defense = build(name, seed=5)
    defense.save(tmp_path / name)
    loaded = load_defense(tmp_path / name)
    assert type(loaded) is type(defense)
    assert loaded.hparams() == defense.hparams()
    fresh = build(name, seed=5)  # stochastic defenses: compare first calls of equally seeded instances
    torch.testing.assert_close(loaded(queries), fresh(queries), atol=1e-6, rtol=1e-5)
