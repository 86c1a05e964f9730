"""Selection among DNF trainings by the defender's extraction probe: the probe, the choice, its record."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import fortress.defenses.dnf.recipe as recipe
from fortress.bench.build import check_defense_params
from fortress.data import mnist_splits
from fortress.defenses import DNF, DefenderData, load_defense
from fortress.defenses.dnf import (
    OODConfig,
    ProbeConfig,
    ProbeResult,
    ProtectConfig,
    SelectConfig,
    extraction_probe,
    protect,
)
from fortress.defenses.dnf.training import DNFTrainConfig
from fortress.errors import ConfigError
from fortress.models import StagedBackbone, create_model

TRAIN = DNFTrainConfig(epochs=1, batch_size=128, ood_batch_size=64)
NOISE = OODConfig(kind="noise")
TINY_PROBE = ProbeConfig(iterations=3, batch_size=32, student_steps=2, ngf=4, nz=8)


def victim() -> StagedBackbone:
    torch.manual_seed(0)
    return create_model("lenet5").eval()


def data() -> DefenderData:
    d = mnist_splits()
    return DefenderData(d.train.x[:256], d.train.targets[:256], d.val.x, d.val.targets, 10, dataset="mnist")


def config(**kw: Any) -> ProtectConfig:
    return ProtectConfig(**{"train": TRAIN, "ood": NOISE, "min_ood_exit0": 0.0, "max_attempts": 1, **kw})


def heads(dnf: DNF) -> dict[str, torch.Tensor]:
    return {k: v for k, v in dnf.net.state_dict().items() if not k.startswith("backbone.")}


def scripted_probe(scores: list[float]) -> Any:
    """The probe, replaced by fixed scores in candidate order (the choice is under test, not the probe)."""
    calls: list[DNF] = []

    def probe(dnf: DNF, *_: Any, **__: Any) -> ProbeResult:
        calls.append(dnf)
        return ProbeResult(scores[len(calls) - 1], (1.0, 0.0, 0.0, 0.0), 0.0)

    return probe


@pytest.mark.parametrize(
    ("make", "shown"),
    [
        (lambda: SelectConfig(candidates=0), "select.candidates must be >= 1, got 0"),
        (lambda: ProbeConfig(iterations=0), "iterations too small"),
        (lambda: ProbeConfig(lr_g=0.0), "probe learning rates must be > 0"),
    ],
)
def test_selection_settings_are_refused_with_the_value(make: Any, shown: str) -> None:
    with pytest.raises(ConfigError, match=shown):
        make()


def test_grid_params_read_the_selection() -> None:
    check_defense_params("dnf", {"select": {"candidates": 2, "probe": {"iterations": 5}}})
    with pytest.raises(ConfigError):
        check_defense_params("dnf", {"select": {"candidates": 2, "probe": {"no_such": 1}}})


def test_the_candidate_with_the_lowest_probe_score_is_kept_and_recorded(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(recipe, "extraction_probe", scripted_probe([0.5, 0.2, 0.4]))
    dnf = protect(victim(), data(), config(select=SelectConfig(candidates=3)), out=tmp_path / "d")
    prov = dnf.provenance
    assert prov is not None and prov.selection is not None
    sel = prov.selection
    assert sel.chosen == 1 and [c.train_seed for c in sel.candidates] == [0, 1000, 2000]
    assert [c.probe_student_acc for c in sel.candidates] == [0.5, 0.2, 0.4]
    assert prov.attempts == sel.candidates[1].attempts and all(c.train_seconds > 0 for c in sel.candidates)
    # candidate j is today's recipe with training seed train.seed + 1000·j
    alone = protect(victim(), data(), config(train=dataclasses.replace(TRAIN, seed=1000)))
    assert all(torch.equal(a, b) for a, b in zip(heads(dnf).values(), heads(alone).values(), strict=True))
    assert dnf.thresholds == alone.thresholds
    assert (tmp_path / "d" / "checkpoints" / "candidate-2" / "attempt-0").is_dir()
    loaded = load_defense(tmp_path / "d")
    assert isinstance(loaded, DNF) and loaded.provenance == prov
    assert loaded.hparams()["selection"]["chosen"] == 1
    assert json.loads(json.dumps(dnf.hparams())) == loaded.hparams()


def test_a_candidate_that_fails_the_acceptance_check_is_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recipe, "extraction_probe", scripted_probe([0.5, 0.1]))
    # the acceptance check's measurement, replaced: candidate 0 passes it, candidate 1 (seed 1000) fails
    real_train = recipe._train_accepted

    def train(*args: Any, **kw: Any) -> Any:
        dnf, attempts = real_train(*args, **kw)
        share = 0.0 if args[4] == 1000 else 1.0
        return dnf, [recipe.Attempt(a.head_seed, share) for a in attempts]

    monkeypatch.setattr(recipe, "_train_accepted", train)
    dnf = protect(victim(), data(), config(min_ood_exit0=0.5, select=SelectConfig(candidates=2)))
    assert dnf.provenance is not None and dnf.provenance.selection is not None
    assert dnf.provenance.selection.chosen == 0 and not dnf.provenance.selection.candidates[1].accepted


def test_without_selection_the_recipe_is_one_training_as_before(tmp_path: Path) -> None:
    dnf = protect(victim(), data(), config(), out=tmp_path / "d")
    assert dnf.provenance is not None and dnf.provenance.selection is None
    assert "selection" not in dnf.hparams()
    assert sorted(p.name for p in (tmp_path / "d" / "checkpoints").iterdir()) == ["attempt-0"]


def test_the_probe_is_seeded_and_leaves_the_dnf_as_it_was() -> None:
    dnf = protect(victim(), data(), config())
    before = {k: v.clone() for k, v in dnf.net.state_dict().items()}
    flags = [p.requires_grad for p in dnf.net.parameters()]
    d = data()
    a = extraction_probe(dnf, d.x_val, d.y_val, TINY_PROBE)
    b = extraction_probe(dnf, d.x_val, d.y_val, TINY_PROBE)
    assert (a.student_acc, a.exit_hist) == (b.student_acc, b.exit_hist)
    assert 0.0 <= a.student_acc <= 1.0 and sum(a.exit_hist) == pytest.approx(1.0) and len(a.exit_hist) == 4
    assert all(torch.equal(before[k], v) for k, v in dnf.net.state_dict().items())
    assert [p.requires_grad for p in dnf.net.parameters()] == flags


def test_the_probe_sees_where_its_images_leave() -> None:
    dnf = protect(victim(), data(), config())
    d = data()
    dnf.set_thresholds([2.0, 2.0, 2.0])  # no head fires: every answer is the victim's own
    assert extraction_probe(dnf, d.x_val, d.y_val, TINY_PROBE).exit_hist == (0.0, 0.0, 0.0, 1.0)
    dnf.set_thresholds([0.0, 0.0, 0.0])  # exit 0 answers everything
    assert extraction_probe(dnf, d.x_val, d.y_val, TINY_PROBE).exit_hist == (1.0, 0.0, 0.0, 0.0)
