"""Grid configs: TOML loading, validation with clear messages, cell expansion and stable cell keys."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fortress.bench.build import (
    BUILDERS,
    BuildContext,
    build_defense,
    check_defense_params,
    seeded_params,
    training_seed,
)
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


def test_train_seeds_build_a_defense_once_per_seed_and_keep_the_default_seed_keys(tmp_path: Path) -> None:
    plain = expand_grid(_grid(tmp_path))
    seeded_text = GRID.replace(
        'params = { train = { epochs = 1 }, ood = { kind = "noise" } }',
        'params = { train = { epochs = 1 }, ood = { kind = "noise" } }\ntrain_seeds = [0, 3, 4]',
    )
    grid = _grid(tmp_path, seeded_text)
    cells = expand_grid(grid)
    dnf_cells = [c for c in plain if c.defense.display == "dnf"]
    assert len(cells) == grid.num_cells == len(plain) + 2 * len(dnf_cells)
    assert len({c.key for c in cells}) == len(cells)
    # training seed 0 is what the params already hold: the same cells, keys and artifacts as before
    assert {c.key for c in plain} <= {c.key for c in cells}
    by_seed = {s: [c for c in cells if c.defense.display == "dnf" and c.defense_seed == s] for s in (0, 3, 4)}
    assert {c.defense_key for c in by_seed[0]} == {c.defense_key for c in dnf_cells}
    assert len({c.defense_key for s in by_seed for c in by_seed[s]}) == 3  # three builds
    built = by_seed[3][0].defense
    assert built.params == {"train": {"epochs": 1, "seed": 3}, "ood": {"kind": "noise", "seed": 3}}
    assert built.train_seeds is None and "trained with seed 3" in by_seed[3][0].describe()
    assert Cell.from_dict(by_seed[3][0].to_dict()) == by_seed[3][0]
    # the TOML round trip keeps the axis
    dump_toml(grid, tmp_path / "back.toml")
    assert [c.key for c in expand_grid(load_toml(GridConfig, tmp_path / "back.toml"))] == [c.key for c in cells]


@pytest.mark.parametrize(
    ("seeds", "match"),
    [
        ("[1, 1]", r"train_seeds must list distinct non-negative seeds, got \[1, 1\]"),
        ("[]", r"train_seeds must list distinct non-negative seeds, got \[\]"),
        ("[-1]", r"train_seeds must list distinct non-negative seeds, got \[-1\]"),
    ],
)
def test_bad_train_seeds_are_named(tmp_path: Path, seeds: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _grid(tmp_path, GRID.replace('name = "dnf"\n', f'name = "dnf"\ntrain_seeds = {seeds}\n', 1))


def test_train_seeds_need_a_defense_that_draws_a_seed(tmp_path: Path) -> None:
    text = GRID.replace('name = "undefended"\n', 'name = "undefended"\ntrain_seeds = [0, 1]\n', 1)
    with pytest.raises(ConfigError, match="defense 'undefended' draws no training seed"):
        _grid(tmp_path, text)


def test_seeded_params_set_every_seed_of_the_build_and_only_those_that_differ() -> None:
    assert seeded_params("dnf", {}, 0) == {}
    assert seeded_params("dnf", {"search": {"n_trials": 4}}, 2) == {
        "search": {"n_trials": 4, "seed": 2},
        "train": {"seed": 2},
        "ood": {"seed": 2},
    }
    assert seeded_params("dnf", {"train": {"seed": 5}}, 5) == {"train": {"seed": 5}, "ood": {"seed": 5}}
    assert training_seed("dnf", {"train": {"seed": 5}, "ood": {"seed": 5}}) == 5
    assert training_seed("dnf", {"train": {"seed": 5}}) is None  # the seeds differ: no single training seed
    # defenses built by their constructor: the constructor's seed and the fit table's seed
    assert seeded_params("meco", {"fit": {}}, 2) == {"fit": {"seed": 2}, "seed": 2}
    assert training_seed("meco", {"fit": {}}) == 0
    assert training_seed("undefended", {}) is None
    params = {"train": {"epochs": 1}}
    seeded_params("dnf", params, 7)
    assert params == {"train": {"epochs": 1}}  # the caller's table is not modified


def test_dnf_cells_key_the_utility_budget_and_a_zero_budget_keeps_the_earlier_keys(tmp_path: Path) -> None:
    from fortress.bench.grid import defense_key_params

    assert DefenseSpec("dnf").canonical()["params"] == {"max_utility_drop": 0.5}  # the default, written out
    assert DefenseSpec("dnf", params={"max_utility_drop": 0.5}).canonical() == DefenseSpec("dnf").canonical()
    pinned = DefenseSpec("dnf", params={"max_utility_drop": 0, "train": {"epochs": 4}})
    assert pinned.canonical()["params"] == {"train": {"epochs": 4}}  # as keyed before the budget existed
    assert defense_key_params("randp", {"max_utility_drop": 0}) == {"max_utility_drop": 0}  # DNF's option only
    text = GRID.replace("params = { train = { epochs = 1 }", "params = { max_utility_drop = 0, train = { epochs = 1 }")
    cell = next(c for c in expand_grid(_grid(tmp_path, text)) if c.defense.display == "dnf")
    again = Cell.from_dict(cell.to_dict())  # what a worker rebuilds keeps the pinned budget
    assert again == cell and again.defense.params["max_utility_drop"] == 0 and again.key == cell.key
