"""The demo pipeline on tiny budgets: records, plot and the DESIGN §3 record fields."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fortress.bench.demo import demo_config, run_demo
from fortress.bench.records import read_records
from fortress.config import AttackConfig, OODConfig, ProtectConfig, VictimConfig
from fortress.defenses.dnf import DNFTrainConfig

REQUIRED = [
    "defense",
    "attack",
    "dataset",
    "victim_arch",
    "clone_arch",
    "budget",
    "queries_used",
    "seed",
    "victim_acc",
    "defended_acc",
    "clone_acc",
    "clone_fidelity",
    "exit_hist_id",
    "exit_hist_attack",
    "mean_l1_perturbation",
    "defense_s_per_1k_queries",
    "wall_s",
    "config",
]


def test_tiny_demo_writes_records_and_plot(tmp_path: Path) -> None:
    cfg = dataclasses.replace(
        demo_config(quick=True),
        victim=VictimConfig(epochs=2),
        protect=ProtectConfig(train=DNFTrainConfig(epochs=1), ood=OODConfig(kind="noise")),
        attacks=(
            AttackConfig(name="dfme", budget=3 * 256 * 7, params={"batch_size": 256}),
            AttackConfig(name="knockoff", budget=300, pool="digits28", params={"epochs": 2}),
        ),
    )
    events: list[str] = []
    result = run_demo(cfg, tmp_path, event=lambda stage, done, total: events.append(stage))
    recs = read_records(tmp_path / "results.jsonl")
    assert len(recs) == 4 == len(result.records)
    assert [(r.attack, r.defense) for r in recs] == [
        ("dfme", "undefended"),
        ("dfme", "dnf"),
        ("knockoff", "undefended"),
        ("knockoff", "dnf"),
    ]
    for r in recs:
        d = dataclasses.asdict(r)
        for key in REQUIRED:
            assert key in d
        assert r.queries_used <= r.budget
        assert 0.0 <= (r.clone_acc or 0.0) <= 1.0
        assert r.config["attack"]["name"] == r.attack
        assert r.config["demo"]["victim"]["epochs"] == 2
    dnf = [r for r in recs if r.defense == "dnf"]
    assert all(len(r.exit_hist_attack) == 4 and len(r.exit_hist_id) == 4 for r in dnf)
    assert result.plot is not None and result.plot.stat().st_size > 1000
    assert (tmp_path / "victim" / "model.safetensors").exists() and (tmp_path / "dnf" / "dnf.safetensors").exists()
    assert "train victim" in events and any(e.startswith("dfme vs dnf") for e in events)
    # a second run appends: nothing already written is lost
    run_demo(cfg, tmp_path)
    assert len(read_records(tmp_path / "results.jsonl")) == 8


def test_full_and_quick_configs_use_equal_budgets_per_attack() -> None:
    for quick in (True, False):
        cfg = demo_config(quick=quick)
        names = [a.name for a in cfg.attacks]
        assert names == ["dfme", "knockoff"]
        assert cfg.victim.arch == "lenet5"


def test_the_demo_takes_dnfs_utility_budget() -> None:
    from fortress.errors import ConfigError

    for quick in (True, False):
        assert demo_config(quick=quick).protect.max_utility_drop == 0.5  # ProtectConfig's default
        assert demo_config(quick=quick, max_utility_drop=0).protect.max_utility_drop == 0
    with pytest.raises(ConfigError, match="max_utility_drop"):
        demo_config(max_utility_drop=-1)


def test_the_demo_trains_the_victim_with_the_recipe_for_its_data() -> None:
    from fortress.data.spec import DataSpec

    assert demo_config().victim == VictimConfig()  # the embedded digits: paper App. G
    full, quick = demo_config(data=DataSpec("fashion-mnist")), demo_config(quick=True, data=DataSpec("fashion-mnist"))
    assert (full.victim.epochs, full.victim.max_shift, full.victim.hflip) == (15, 0, True)
    assert (quick.victim.epochs, quick.victim.hflip) == (3, True)
