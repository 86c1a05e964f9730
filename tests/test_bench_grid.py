"""Grid configs: TOML loading, validation with clear messages, cell expansion and stable cell keys."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fortress.bench.build import BUILDERS, BuildContext, build_defense, check_defense_params
from fortress.bench.grid import AttackSpec, Cell, DefenseSpec, GridConfig, config_hash, expand_grid, load_grid
from fortress.config import VictimConfig, dump_toml, load_toml
from fortress.defenses import DEFENSES
from fortress.errors import ConfigError, UnknownComponent
from fortress.models import create_model

ROOT = Path(__file__).resolve().parents[1]

GRID = """
name = "t"
seeds = [0, 1, 2]

[[victims]]
arch = "lenet5-half"
epochs = 1

[[defenses]]
name = "undefended"

[[defenses]]
name = "dnf"
params = { train = { epochs = 1 }, ood = { kind = "noise" } }

[[defenses]]
name = "dnf"
label = "dnf-plain"
params = { head_kind = "plain" }

[[attacks]]
name = "knockoff"
budgets = [100, 200]
pool = "digits28"
output_modes = ["soft", "hard"]

[[attacks]]
name = "dfme"
budgets = [512]
defenses = ["undefended", "dnf"]
"""


def _grid(tmp_path: Path, text: str = GRID) -> GridConfig:
    (tmp_path / "g.toml").write_text(text)
    return load_grid(tmp_path / "g.toml")


def test_expansion_covers_the_product_once_in_order(tmp_path: Path) -> None:
    grid = _grid(tmp_path)
    cells = expand_grid(grid)
    # knockoff: 2 budgets x 2 modes x 3 defenses; dfme: 1 budget x 1 mode x 2 defenses; times 3 seeds
    assert len(cells) == grid.num_cells == 3 * (2 * 2 * 3 + 2)
    assert len({c.key for c in cells}) == len(cells)
    combos = {(c.attack.name, c.attack.budget, c.attack.output_mode, c.defense.display, c.attack.seed) for c in cells}
    assert len(combos) == len(cells)
    assert {c.defense.display for c in cells if c.attack.name == "dfme"} == {"undefended", "dnf"}
    assert [c.attack.seed for c in cells] == sorted(c.attack.seed for c in cells)  # seeds vary slowest
    assert all(c.attack.clone == "lenet5-half" for c in cells)  # clone defaults to the victim's architecture
    assert cells[0].attack.pool == "digits28" and cells[0].victim.epochs == 1


def test_keys_are_stable_and_depend_only_on_the_cell(tmp_path: Path) -> None:
    cells = expand_grid(_grid(tmp_path))
    c = cells[0]
    assert c.key == config_hash(c.canonical()) and len(c.key) == 16
    assert Cell.from_dict(c.to_dict()) == c and Cell.from_dict(c.to_dict()).key == c.key
    assert dataclasses.replace(c, grid="other").key == c.key  # grids may share cells
    assert dataclasses.replace(c, attack=dataclasses.replace(c.attack, seed=9)).key != c.key
    relabelled = dataclasses.replace(c, defense=dataclasses.replace(c.defense, label="x"))
    assert relabelled.key != c.key and relabelled.defense_key == c.defense_key  # same built artifact
    # parameter order in the TOML does not matter
    p1 = DefenseSpec("dnf", params={"a": 1, "b": {"c": 2, "d": 3}})
    p2 = DefenseSpec("dnf", params={"b": {"d": 3, "c": 2}, "a": 1})
    assert dataclasses.replace(c, defense=p1).key == dataclasses.replace(c, defense=p2).key
    # artifacts: one victim, two distinct DNF builds (the plain-head one differs)
    assert len({x.victim_key for x in cells}) == 1
    assert len({x.defense_key for x in cells}) == 3


@pytest.mark.parametrize("name", ["mnist-quick", "mnist-paper"])
def test_checked_in_grid_loads_and_round_trips(tmp_path: Path, name: str) -> None:
    grid = load_grid(ROOT / "benchmarks" / f"{name}.toml")
    assert {d.name for d in grid.defenses} >= {"undefended", "dnf"}
    assert {a.name for a in grid.attacks} >= {"dfme"} and len(grid.seeds) >= 2
    dump_toml(grid, tmp_path / "back.toml")
    back = load_toml(GridConfig, tmp_path / "back.toml")
    assert [c.key for c in expand_grid(back)] == [c.key for c in expand_grid(grid)]


def test_attacks_can_be_limited_to_some_victims(tmp_path: Path) -> None:
    text = GRID.replace(
        '[[victims]]\narch = "lenet5-half"\nepochs = 1\n',
        '[[victims]]\narch = "lenet5-half"\nepochs = 1\n\n[[victims]]\narch = "lenet5"\nepochs = 1\n',
    )
    text += '\n[[attacks]]\nname = "jbda"\nbudgets = [300]\ndefenses = ["dnf"]\nvictims = ["lenet5"]\n'
    grid = _grid(tmp_path, text)
    cells = expand_grid(grid)
    per_victim = 3 * (2 * 2 * 3 + 2)
    assert len(cells) == grid.num_cells == 2 * per_victim + 3
    jbda = [c for c in cells if c.attack.name == "jbda"]
    assert {c.victim.arch for c in jbda} == {"lenet5"} and {c.defense.display for c in jbda} == {"dnf"}
    # a filter that names no victim of the grid is an error naming it
    with pytest.raises(ConfigError, match=r"victims \['vgg'\] are not in the grid"):
        _grid(tmp_path, GRID + '\n[[attacks]]\nname = "jbda"\nvictims = ["vgg"]\n')
    # the filter does not enter the cell keys: adding it to a grid keeps its finished cells
    plain = expand_grid(_grid(tmp_path, GRID))
    limited = expand_grid(
        _grid(
            tmp_path,
            GRID.replace(
                'defenses = ["undefended", "dnf"]', 'defenses = ["undefended", "dnf"]\nvictims = ["lenet5-half"]'
            ),
        )
    )
    assert [c.key for c in plain] == [c.key for c in limited]


@pytest.mark.parametrize(
    ("snippet", "error", "match"),
    [
        ('[[defenses]]\nname = "nope"', UnknownComponent, "unknown defense 'nope'; valid defenses: .*dnf"),
        (
            '[[defenses]]\nname = "dnf"\nlabel = "d2"\nparams = { head_kind = "magic" }',
            ConfigError,
            "head_kind must be one of",
        ),
        ('[[defenses]]\nname = "undefended"', ConfigError, r"labels \['undefended'\] repeat"),
        ('[[defenses]]\nname = "undefended"\nlabel = "u2"\nparams = { x = 1 }', ConfigError, "takes no params"),
        ('[[attacks]]\nname = "dfme"\nbudgets = [0]', ConfigError, "budgets must be positive"),
        ('[[attacks]]\nname = "dfme"\ndefenses = ["ghost"]', ConfigError, r"defenses \['ghost'\] are not in the grid"),
        ('[[attacks]]\nname = "dfme"\nclone = "alexnet"', UnknownComponent, "unknown model 'alexnet'"),
        ('[[attacks]]\nname = "knockoff"\nbudgets = [100, 100]', ConfigError, "same cell twice"),
        ("bogus = 1", ConfigError, r"unknown keys \['bogus'\]"),
    ],
)
def test_bad_grids_fail_with_the_bad_value_named(tmp_path: Path, snippet: str, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        expand_grid(_grid(tmp_path, snippet + "\n" + GRID if snippet.startswith("bogus") else GRID + snippet))


def test_empty_lists_are_rejected() -> None:
    with pytest.raises(ConfigError, match="seeds must list at least one"):
        GridConfig(defenses=(DefenseSpec("undefended"),), attacks=(AttackSpec("dfme"),), seeds=())
    with pytest.raises(ConfigError, match="defenses must list"):
        GridConfig(attacks=(AttackSpec("dfme"),))
    with pytest.raises(ConfigError, match=r"seeds .* repeat"):
        GridConfig(defenses=(DefenseSpec("undefended"),), attacks=(AttackSpec("dfme"),), seeds=(1, 1))


def test_build_step_checks_constructor_and_fit_options() -> None:
    check_defense_params("undefended", {})
    with pytest.raises(ConfigError, match="takes no params"):
        check_defense_params("undefended", {"epsilon": 1.0})
    generic = [n for n in DEFENSES.names() if n not in BUILDERS]  # built by their constructor
    for name in generic:
        with pytest.raises(ConfigError, match="do not fit its constructor"):
            check_defense_params(name, {"no_such_option": 1})
        if not hasattr(DEFENSES.get(name), "fit"):
            with pytest.raises(ConfigError, match="has no fit step"):
                check_defense_params(name, {"fit": {}})
        else:
            with pytest.raises(ConfigError, match=r"fit options .* are unknown"):
                check_defense_params(name, {"fit": {"no_such_option": 1}})
    victim = create_model("lenet5-half")
    assert build_defense("undefended", victim, {}, BuildContext()).victim is victim
    with pytest.raises(ConfigError, match="epochs must be"):
        check_defense_params("dnf", {"train": {"epochs": 0}})


def test_victim_configs_in_grids_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid victim training"):
        _grid(tmp_path, GRID.replace("epochs = 1\n", "epochs = 0\n", 1))
    assert _grid(tmp_path).victims == (VictimConfig(arch="lenet5-half", epochs=1),)


# ------------------------------------------------------------------------------------ data specs


@pytest.mark.parametrize("name", ["mnist-quick", "mnist-paper"])
def test_the_committed_mnist_grids_keep_their_cell_keys(name: str) -> None:
    from fortress.bench.runner import finished_keys

    cells = expand_grid(load_grid(ROOT / "benchmarks" / f"{name}.toml"))
    assert {c.key for c in cells} == finished_keys(ROOT / "benchmarks" / "results" / name / "results.jsonl")
    assert all(c.victim.data is not None and c.victim.data.is_default for c in cells)


def test_the_data_table_reaches_every_victim_that_names_none(tmp_path: Path) -> None:
    npz = tmp_path / "d.npz"
    import numpy as np

    np.savez(npz, x=np.zeros((20, 28, 28), np.uint8), y=np.arange(20) % 2)
    text = GRID + '\n[[victims]]\narch = "lenet5"\ndataset = "mnist"\nepochs = 1\n'
    text += f'\n[data]\nname = "npz"\npath = "{npz}"\noptions = {{ val_size = 2 }}\n'
    grid = _grid(tmp_path, text)
    cells = expand_grid(grid)
    by_arch = {c.victim.arch: c for c in cells}
    assert by_arch["lenet5-half"].victim.data == grid.data and by_arch["lenet5"].victim.spec.is_default
    half = by_arch["lenet5-half"]
    assert half.canonical()["victim"]["data"] == {"name": "npz", "path": str(npz), "options": {"val_size": 2}}
    assert Cell.from_dict(half.to_dict()) == half
    dump_toml(grid, tmp_path / "again.toml")
    assert load_grid(tmp_path / "again.toml") == grid
    with pytest.raises(UnknownComponent, match="unknown dataset 'nope'"):
        _grid(tmp_path, text.replace('name = "npz"', 'name = "nope"'))
    with pytest.raises(ConfigError, match="does not take option"):
        _grid(tmp_path, text.replace("val_size", "colour"))
