"""The attack scaffold: hyper-parameters declared once, the run template, and a new attack in a few lines.

Every check that loops over ``ATTACKS`` covers a newly registered attack without being edited.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import pytest
import torch
from torch import Tensor

import test_attack_contract as contract
from fortress.attacks import ATTACKS, Attack, AttackRun, PoolKind, hp
from fortress.attacks.common import train_clone
from fortress.attacks.hparams import Range, plain
from fortress.defenses import Undefended
from fortress.errors import ConfigError
from fortress.models import StagedBackbone, create_model
from fortress.oracle import LocalOracle, OutputMode
from fortress.registry import Registry

victim, pool, eval_set = contract.victim, contract.pool, contract.eval_set  # the contract's fixtures


# -- a new attack: one class, one registration ----------------------------------------------------
class NoiseFit(Attack):
    """Fit the clone to the victim's answers on uniform noise (a data-free baseline)."""

    name = "noise-fit"
    output_modes = (OutputMode.SOFT, OutputMode.HARD)
    epochs: int = hp(default=5, ge=1)
    batch_size: int = hp(default=64, ge=2, why="BatchNorm needs two samples")

    def _extract(self, run: AttackRun) -> dict[str, Any]:
        x = torch.rand((self.budget, *self.oracle.input_shape), generator=run.rng)
        y = run.query_batches(x, self.batch_size)
        train_clone(run.clone, x, y, epochs=self.epochs, batch_size=self.batch_size, lr=1e-3, generator=run.rng)
        return {}


@pytest.fixture
def scratch(monkeypatch: pytest.MonkeyPatch) -> Registry[type[Attack]]:
    """A scratch registry holding the new attack, standing in for ``ATTACKS`` in the contract checks."""
    registry: Registry[type[Attack]] = Registry("attack")
    registry.add("noise-fit", NoiseFit)
    monkeypatch.setattr(contract, "ATTACKS", registry)
    monkeypatch.setitem(contract.TINY, "noise-fit", ({"epochs": 1, "batch_size": 32}, "hard"))
    return registry


def test_a_new_attack_passes_the_attack_contract(
    scratch: Registry[type[Attack]],
    victim: StagedBackbone,
    pool: Tensor,
    eval_set: Any,
) -> None:
    contract.test_attack_contract("noise-fit", victim, pool, eval_set)
    contract.test_attack_is_reproducible_under_a_seed("noise-fit", victim, pool)
    result, oracle, _ = contract.run("noise-fit", victim, pool)
    assert result.queries_used == oracle.queries_used == contract.BUDGET  # exact budget accounting
    assert oracle.log.batches == -(-contract.BUDGET // 32)
    assert sum(result.extras["label_hist"]) == contract.BUDGET
    assert "noise-fit" not in ATTACKS  # the real registry is untouched


def test_a_new_attack_gets_a_checked_signature_and_hparams(victim: StagedBackbone) -> None:
    oracle = LocalOracle(Undefended(victim))
    assert list(inspect.signature(NoiseFit).parameters) == ["oracle", "budget", "seed", "epochs", "batch_size"]
    assert NoiseFit(oracle, budget=10, epochs=2).hparams() == {"budget": 10, "seed": 0, "epochs": 2, "batch_size": 64}
    with pytest.raises(ConfigError, match=r"batch_size must be >= 2 \(BatchNorm needs two samples\), got batch_size=1"):
        NoiseFit(oracle, budget=10, batch_size=1)
    with pytest.raises(ConfigError, match="needs an oracle in output mode soft, hard"):
        NoiseFit(LocalOracle(Undefended(victim), output_mode="topk"), budget=10)
    with pytest.raises(TypeError):
        NoiseFit(oracle, 10)  # hyper-parameters are keyword-only


# -- hyper-parameters: every registered attack ----------------------------------------------------
def constructed(name: str, victim: StagedBackbone, **changes: Any) -> Attack:
    settings, mode = contract.TINY[name]
    oracle = LocalOracle(Undefended(victim), output_mode=mode)
    return ATTACKS.get(name)(oracle, budget=contract.BUDGET * 100, seed=3, **{**settings, **changes})


def another_value(default: Any, hint: Any, spec: Range | None) -> Any:
    """A valid value different from ``default`` for a field of type ``hint`` (``None``: no idea)."""
    optional = get_origin(hint) in (Union, types.UnionType)
    base = next(a for a in get_args(hint) if a is not type(None)) if optional else hint
    low = None if spec is None else (spec.ge if spec.ge is not None else spec.gt)
    if get_origin(base) is Literal:
        return next(c for c in get_args(base) if c != default)
    if base is bool:
        return not default
    if base is int:
        return int(low or 0) + 3 if default is None else default + 1
    if base is float:
        return 0.25 if not default else default / 2
    if default is None or default == ():
        return (0.5,) if get_args(base) == (float,) else (0,)
    if isinstance(default, tuple):
        return tuple(v * 0.99 for v in default)
    return None


@pytest.mark.parametrize("name", ATTACKS.names())
def test_hparams_record_every_constructor_argument_as_given(name: str, victim: StagedBackbone) -> None:
    """Drift check: hparams() names every constructor argument, with the value given (or the default)."""
    cls = ATTACKS.get(name)
    params = inspect.signature(cls).parameters
    attack = constructed(name, victim)
    recorded = attack.hparams()
    assert set(recorded) == set(params) - {"oracle"}
    given = {"budget": contract.BUDGET * 100, "seed": 3, **contract.TINY[name][0]}
    for p in set(params) - {"oracle"}:
        if p in given:
            assert recorded[p] == plain(given[p]), p
        elif params[p].default is not None:  # None may stand for a value derived at construction
            assert recorded[p] == plain(params[p].default), p
    # every setting, changed one at a time, is recorded as changed
    hints = get_type_hints(cls)
    probes = [f for f in dataclasses.fields(cls) if f.name != "oracle" and f.name not in given]
    refused = []
    for f in probes:
        value = another_value(f.default, hints[f.name], f.metadata.get("fortress.range"))
        assert value is not None, f"no probe value for {name}.{f.name}"
        try:
            changed = constructed(name, victim, **{f.name: value}).hparams()[f.name]
        except ConfigError:
            refused.append(f.name)  # a check across settings refused this combination
            continue
        assert changed == plain(value) and changed != plain(f.default), f.name
    assert len(refused) <= 0.2 * len(probes), refused


@pytest.mark.parametrize("name", ATTACKS.names())
def test_every_declared_range_is_enforced_naming_the_value(name: str, victim: StagedBackbone) -> None:
    for f in dataclasses.fields(ATTACKS.get(name)):
        spec: Range | None = f.metadata.get("fortress.range")
        if spec is None:
            continue
        for bad in (
            None if spec.ge is None else spec.ge - 1,
            spec.gt,
            None if spec.le is None else spec.le + 1,
            spec.lt,
        ):
            if bad is None:
                continue
            bad = int(bad) if f.default is None else type(f.default)(bad)  # the optional ranged fields are ints
            with pytest.raises(ConfigError, match=f"{f.name} must be .*, got {f.name}={bad!r}"):
                constructed(name, victim, **{f.name: bad})


@pytest.mark.parametrize("name", ATTACKS.names())
def test_each_attack_declares_its_pool(name: str) -> None:
    cls = ATTACKS.get(name)
    assert isinstance(cls.pool_kind, PoolKind)
    assert (cls.default_pool is None) == (
        name in {"dfme", "adaptive-entropy", "arch-steal", "disguide", "ideal", "exit-aware"}
    )


def test_declared_types_are_checked_and_normalised(victim: StagedBackbone) -> None:
    oracle = LocalOracle(Undefended(victim))
    with pytest.raises(ConfigError, match="loss must be one of l1, kl, got loss='mse'"):
        ATTACKS.get("dfme")(oracle, budget=10_000, loss="mse")
    with pytest.raises(ConfigError, match=r"batch_size must be an integer, got batch_size=64\.5"):
        ATTACKS.get("dfme")(oracle, budget=10_000, batch_size=64.5)
    with pytest.raises(ConfigError, match="lr_s must be a finite number, got lr_s=nan"):
        ATTACKS.get("dfme")(oracle, budget=10_000, lr_s=float("nan"))
    with pytest.raises(ConfigError, match="eps must be a finite number, got eps=inf"):
        ATTACKS.get("arch-steal")(oracle, budget=100, eps=float("inf"))
    attack = ATTACKS.get("dfme")(oracle, budget=10_000, lr_s=1, lr_milestones=[0.5], tail_student_steps=0)
    assert attack.hparams()["lr_s"] == 1.0 and isinstance(attack.hparams()["lr_s"], float)
    assert attack.hparams()["lr_milestones"] == [0.5] and attack.lr_milestones == (0.5,)
    assert attack.hparams()["tail_student_steps"] is False


# -- the run template -----------------------------------------------------------------------------
class Steps(Attack):
    """Ten queries per step, a step boundary after each: exercises the checkpoint cadences."""

    name = "steps"

    def _extract(self, run: AttackRun) -> dict[str, Any]:
        while run.queries_left > 0:
            run.query(torch.rand(10, *self.oracle.input_shape, generator=run.rng))
            run.step_done()
        return {"steps": self.budget // 10}


@pytest.mark.parametrize(
    ("cadence", "eval_every", "queries", "reports"),
    [
        ("budget", 25, [30, 50, 80, 100], 10),  # the first step past each multiple of 25
        ("budget", None, [10, 20, 30, 40, 50, 60, 70, 80, 90, 100], 10),  # default: a tenth of the budget
        ("round", 25, [10, 40, 70, 100], 10),  # 25 queries since the last checkpoint
        ("round", None, [10, 20, 30, 40, 50, 60, 70, 80, 90, 100], 10),  # every round
        ("end", 25, [100], 10),  # eval_every is ignored
    ],
)
def test_checkpoint_cadences(
    victim: StagedBackbone,
    eval_set: Any,
    monkeypatch: pytest.MonkeyPatch,
    cadence: str,
    eval_every: int | None,
    queries: list[int],
    reports: int,
) -> None:
    monkeypatch.setattr(Steps, "cadence", cadence)
    oracle = LocalOracle(Undefended(victim), budget=100)
    seen: list[int] = []
    result = Steps(oracle, budget=100).run(
        create_model("lenet5-half"), eval_set=eval_set, eval_every=eval_every, progress=lambda q, b: seen.append(q)
    )
    assert [c.queries for c in result.checkpoints] == queries
    assert seen == [10 * (i + 1) for i in range(reports)]
    assert oracle.queries_used == result.queries_used == 100  # scoring checkpoints spent nothing
    assert result.extras["steps"] == 10 and sum(result.extras["label_hist"]) == 100
    assert result.clone_acc == result.checkpoints[-1].clone_acc


def test_run_validates_before_the_first_query(victim: StagedBackbone, pool: Tensor) -> None:
    oracle = LocalOracle(Undefended(victim), output_mode="hard")
    knockoff = ATTACKS.get("knockoff")(oracle, budget=50, epochs=1)
    with pytest.raises(ConfigError, match="eval_every must be >= 1"):
        knockoff.run(create_model("lenet5-half"), pool, eval_every=0)
    with pytest.raises(ConfigError, match="knockoff needs a pool of natural images"):
        knockoff.run(create_model("lenet5-half"))
    with pytest.raises(ConfigError, match="input shape"):
        knockoff.run(create_model("lenet5-half"), torch.rand(4, 3, 28, 28))
    assert oracle.queries_used == 0


def test_the_run_seeds_torch_and_its_generator(victim: StagedBackbone) -> None:
    """Two runs with one seed draw the same numbers, whatever the caller's global RNG state was."""
    draws = []
    for caller_seed in (1, 2):
        torch.manual_seed(caller_seed)
        result = Steps(LocalOracle(Undefended(victim)), budget=30, seed=4).run(create_model("lenet5-half"))
        draws.append((torch.rand(1), result.extras["label_hist"]))
    assert draws[0][1] == draws[1][1] and torch.equal(draws[0][0], draws[1][0])
