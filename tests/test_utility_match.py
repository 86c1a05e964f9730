"""Matched utility: a perturbation defense set to the strongest strength that keeps a stated utility."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fortress.bench.build import MATCH_FILE, BuildContext, build_defense, check_defense_params, read_utility_match
from fortress.data import mnist_splits
from fortress.defenses import MAD, RandP, ReverseSigmoid
from fortress.defenses.utility_match import STRENGTH, UtilityTarget, match_utility
from fortress.errors import ConfigError
from fortress.models import create_model, evaluate_accuracy, train_classifier


@pytest.fixture(scope="module")
def victim() -> torch.nn.Module:
    """A LeNet-5 trained briefly on the embedded digits (confident on most digits, not on all)."""
    torch.manual_seed(0)
    net = create_model("lenet5")
    train, val = mnist_splits().train, mnist_splits().val
    train_classifier(net, train.x[:2000], train.targets[:2000], epochs=2, lr=3e-3, seed=0)
    assert evaluate_accuracy(net, val.x, val.targets) > 0.8
    return net.eval()


def _top1(defense: object, x: torch.Tensor) -> torch.Tensor:
    return defense.respond(x).probs.argmax(1)  # type: ignore[attr-defined,no-any-return]


@pytest.mark.parametrize("make", [lambda v: RandP(v, seed=3), lambda v: ReverseSigmoid(v), lambda v: MAD(v)])
def test_top1_kept_is_the_boundary_of_what_keeps_it(make: object, victim: torch.nn.Module) -> None:
    val = mnist_splits().val
    defense = make(victim)  # type: ignore[operator]
    target = UtilityTarget(max_drop=0.0, measure="top1", steps=8)
    found = match_utility(defense, val.x, val.targets, target)
    param = STRENGTH[defense.name].parameter
    assert getattr(defense, param) == found.value and found.parameter == param
    assert found.top1_changed == 0.0 and found.drop_pp == pytest.approx(0.0, abs=1e-9)
    with torch.no_grad():
        assert torch.equal(_top1(defense, val.x), victim(val.x).argmax(1))  # the deployed defense keeps every top-1
    step = STRENGTH[defense.name].high / 2**target.steps
    failing = [v for v, _, changed in found.trials if changed > 0]
    assert found.value > 0 and failing and min(failing) <= found.value + step + 1e-12  # nothing stronger keeps it


def test_accuracy_target_allows_the_stated_drop_and_is_deterministic(victim: torch.nn.Module) -> None:
    val = mnist_splits().val
    a = match_utility(RandP(victim, seed=1), val.x, val.targets, UtilityTarget(max_drop=2.0, steps=6))
    b = match_utility(RandP(victim, seed=1), val.x, val.targets, UtilityTarget(max_drop=2.0, steps=6))
    assert a == b and 0 < a.drop_pp <= 2.0 + 1e-9
    strict = match_utility(RandP(victim, seed=1), val.x, val.targets, UtilityTarget(max_drop=0.0, steps=6))
    assert strict.value <= a.value


def test_the_build_step_matches_and_records_it(victim: torch.nn.Module, tmp_path: Path) -> None:
    params = {"seed": 2, "match_utility": {"max_drop": 0.5, "steps": 5}}
    defense = build_defense("randp", victim, params, BuildContext(out=tmp_path))  # type: ignore[arg-type]
    saved = json.loads((tmp_path / MATCH_FILE).read_text())
    assert saved == read_utility_match(tmp_path) and saved["value"] == defense.hparams()["epsilon"]
    assert saved["drop_pp"] <= 0.5 and saved["target"] == {"max_drop": 0.5, "measure": "accuracy", "steps": 5}
    assert read_utility_match(tmp_path / "elsewhere") is None


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("undefended", {"match_utility": {}}, "takes no params"),
        ("meco", {"match_utility": {}}, "no strength to match"),
        ("randp", {"epsilon": 1.0, "match_utility": {}}, "give one"),
        ("mad", {"match_utility": {"max_drop": -1}}, "max_drop"),
        ("grad2", {"match_utility": {"loss": 1}}, "unknown keys"),
        ("reverse-sigmoid", {"match_utility": 0.5}, "must be a table"),
    ],
)
def test_bad_match_requests_are_refused_when_the_grid_loads(name: str, params: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        check_defense_params(name, params)
