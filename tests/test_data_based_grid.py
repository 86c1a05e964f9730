"""The data-based side-by-side grid (benchmarks/data-based-mnist.toml) in miniature, end to end.

The committed grid is shrunk (tiny victim, budgets and epochs; its defense-aware and filtered attack
specs kept as they are) and run through ``fortress bench`` into ``fortress report``: D-DAE gets the
cell's defense algorithm from the grid, the records name strategy and variant, and the report shows
each defense's worst attacker variant.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fortress.bench.grid import AttackSpec, GridConfig, load_grid
from fortress.bench.records import read_records
from fortress.cli import app
from fortress.config import VictimConfig, dump_toml
from fortress.errors import ConfigError

GRIDS = Path(__file__).resolve().parents[1] / "benchmarks"

#: Defenses of the committed grid kept in the miniature: one of each way D-DAE meets a defense it
#: can simulate (nothing to undo, a matched perturbation, a surrogate-based one, a label-only one);
#: the defenses it cannot simulate are refused at load (last test).
KEPT = ("undefended", "reverse-sigmoid-matched", "mad-matched", "top1")

#: Tiny settings per attack (the committed grid's strategy, variant and other parameters stay).
TINY_PARAMS: dict[str, dict[str, Any]] = {
    "knockoff": {"epochs": 1},
    "smoothing": {"epochs": 1},
    "ddae": {"epochs": 1, "shadow_epochs": 1, "recovery_epochs": 1, "refine_rounds": 0},
    "jbda": {"epochs_per_round": 1, "seed_size": 20},
}


def _tiny(grid: GridConfig) -> GridConfig:
    defenses = tuple(d for d in grid.defenses if d.display in KEPT)
    attacks = tuple(
        dataclasses.replace(
            a,
            budgets=(60,),
            pool="digits28" if a.pool is not None else None,
            defenses=None if a.defenses is None else tuple(x for x in a.defenses if x in KEPT),
            params={**a.params, **TINY_PARAMS[a.name]},
        )
        for a in grid.attacks
    )
    return dataclasses.replace(
        grid,
        name="tiny",
        seeds=(0,),
        victims=(VictimConfig(arch="lenet5-half", epochs=1),),
        defenses=defenses,
        attacks=attacks,
    )


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> tuple[GridConfig, Path]:
    root = tmp_path_factory.mktemp("data-based")
    grid = _tiny(load_grid(GRIDS / "data-based-mnist.toml"))
    dump_toml(grid, root / "tiny.toml")
    cli = CliRunner()
    res = cli.invoke(app, ["bench", str(root / "tiny.toml"), "--out", str(root / "run")])
    assert res.exit_code == 0, res.output
    res = cli.invoke(app, ["report", str(root / "run")])
    assert res.exit_code == 0, res.output
    return grid, root / "run"


def test_every_strategy_and_variant_runs_and_is_named_in_its_record(ran: Any) -> None:
    grid, out = ran
    recs = read_records(out / "results.jsonl")
    assert len(recs) == grid.num_cells == 6 * 4
    names = {r.attack for r in recs}
    assert names == {
        "knockoff-random/naive",
        "knockoff-random/top-1",
        "knockoff-random/smoothing",
        "knockoff-random/D-DAE",
        "jbda-tr/naive",
        "jbda-tr/top-1",
    }
    for r in recs:
        cell = r.config["cell"]
        assert r.attack == f"{cell['strategy']}/{cell['variant']}" and r.queries_used <= r.budget == 60
    jbtr = [r for r in recs if r.attack.startswith("jbda-tr")]
    assert all(r.config["attack_hparams"]["variant"] == "jbtr" for r in jbtr)
    assert {r.config["attack_hparams"]["top1"] for r in jbtr} == {True, False}


def test_ddae_gets_the_defense_as_built_and_not_what_the_attacker_cannot_know(ran: Any) -> None:
    _, out = ran
    ddae = {r.defense: r for r in read_records(out / "results.jsonl") if r.attack == "knockoff-random/D-DAE"}
    assert set(ddae) == {"undefended", "reverse-sigmoid-matched", "mad-matched", "top1"}
    for r in ddae.values():
        known = r.config["defense_knowledge"]
        assert known["algorithm"] == r.config["cell"]["defense"]["name"]
        assert r.config["attack_hparams"]["perturb_factory"].startswith(known["algorithm"] + "(")
    rs = ddae["reverse-sigmoid-matched"]
    matched = rs.config["utility_match"]
    assert matched["parameter"] == "beta" and rs.config["defense_knowledge"]["params"]["beta"] == matched["value"]
    assert rs.config["defense_knowledge"]["params"]["gamma"] == 0.2 and rs.config["defense_knowledge"]["replaced"] == []
    mad = ddae["mad-matched"].config["defense_knowledge"]
    assert mad["params"]["epsilon"] == ddae["mad-matched"].config["utility_match"]["value"]
    assert mad["replaced"] == ["seed"] and mad["params"]["seed"] == 1000  # the defender's is 0
    assert "perturb_factory" not in json.dumps(rs.config["cell"])  # not a grid setting: the cell key is unchanged


def test_the_report_shows_each_defenses_worst_variant(ran: Any) -> None:
    _, out = ran
    recs = read_records(out / "results.jsonl")
    with (out / "report" / "worst_variant.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {r["defense"] for r in rows} == set(KEPT)
    for row in rows:
        mine = [r for r in recs if r.defense == row["defense"] and r.attack.startswith(row["strategy"] + "/")]
        worst = max(mine, key=lambda r: r.clone_acc)  # one seed: the mean is the value
        assert float(row["worst_clone_acc"]) == pytest.approx(100 * worst.clone_acc, abs=1e-3)
        assert row["worst_variant"] == worst.attack.split("/", 1)[1]
        assert int(row["variants"]) == len(mine)
    md = (out / "report" / "report.md").read_text()
    assert "worst attacker variant" in md.lower()


def test_a_defense_aware_attack_against_a_defense_it_cannot_simulate_is_refused_at_load(tmp_path: Path) -> None:
    grid = load_grid(GRIDS / "data-based-mnist.toml")
    ddae = next(a for a in grid.attacks if a.name == "ddae")
    bad = dataclasses.replace(grid, attacks=(dataclasses.replace(ddae, defenses=None),))
    dump_toml(bad, tmp_path / "bad.toml")
    with pytest.raises(ConfigError, match=r"simulates the defense.*am-fpr0.005.*meco.*dnf"):
        load_grid(tmp_path / "bad.toml")
    given = dataclasses.replace(grid, attacks=(AttackSpec("ddae", params={"perturb_factory": "mad"}),))
    dump_toml(given, tmp_path / "given.toml")
    with pytest.raises(ConfigError, match="built from each cell's defense"):
        load_grid(tmp_path / "given.toml")


@pytest.mark.parametrize("name", ["data-based-mnist.toml", "data-based-fashion.toml"])
def test_the_committed_grids_load_with_their_cells(name: str) -> None:
    grid = load_grid(GRIDS / name)
    assert len(grid.defenses) == 15 and grid.seeds == (0, 1, 2)
    # 9 defenses under 6 attack specs but D-DAE against AM, MeCo and DNF; the six closed-loop rows under
    # the 5 specs other than D-DAE (which names the defenses it runs against)
    assert grid.num_cells == 3 * (6 * 9 - 3 + 6 * 5)
    loops = {d.display: d.loop() for d in grid.defenses if d.monitor is not None}
    assert {k: (v.monitor, v.response, v.keys) for k, v in loops.items()} == {
        "dnf+monitor": ("exit-sprt+dadd+step", "degrade-exit0", 1),
        "dnf+monitor-100keys": ("exit-sprt+dadd+step", "degrade-exit0", 100),
        "dnf+monitor-misinform": ("exit-sprt+dadd+step", "misinform", 1),
        "dnf+monitor-misinform-100keys": ("exit-sprt+dadd+step", "misinform", 100),
        "dnf+monitor-misinform-id": ("exit-sprt+dadd+step", "misinform-id", 1),
        "dnf+monitor-misinform-id-100keys": ("exit-sprt+dadd+step", "misinform-id", 100),
    }
    plain = next(d for d in grid.defenses if d.display == "dnf")
    assert all(d.params == plain.params for d in grid.defenses if d.monitor is not None)  # one DNF build
    assert {(a.strategy, a.variant) for a in grid.attacks} == {
        ("knockoff-random", "naive"),
        ("knockoff-random", "top-1"),
        ("knockoff-random", "smoothing"),
        ("knockoff-random", "D-DAE"),
        ("jbda-tr", "naive"),
        ("jbda-tr", "top-1"),
    }


def test_the_committed_results_are_cells_of_the_committed_grid() -> None:
    from fortress.bench.grid import expand_grid
    from fortress.bench.runner import finished_keys

    results = GRIDS / "results" / "data-based-mnist" / "results.jsonl"
    done = finished_keys(results)
    assert done and done <= {c.key for c in expand_grid(load_grid(GRIDS / "data-based-mnist.toml"))}
