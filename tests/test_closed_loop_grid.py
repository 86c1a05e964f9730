"""DNF + monitor + response as a grid defense row (a ``monitor`` table): keys, validation, records, report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fortress.bench.grid import expand_grid, load_grid
from fortress.bench.records import read_records
from fortress.bench.report import make_report
from fortress.bench.runner import ARTIFACTS, run_grid
from fortress.errors import ConfigError

DNF = 'params = { max_attempts = 1, min_ood_exit0 = 0.0, train = { epochs = 1 }, ood = { kind = "noise" } }'
GRID = f"""
name = "loop"
seeds = [0]

[[victims]]
arch = "lenet5-half"
epochs = 1

[[defenses]]
name = "undefended"

[[defenses]]
name = "dnf"
{DNF}

[[defenses]]
name = "dnf"
label = "dnf+monitor"
{DNF}
monitor = {{ monitor = "exit-sprt+dadd+step" }}

[[defenses]]
name = "dnf"
label = "dnf+monitor-5keys"
{DNF}
monitor = {{ monitor = "exit-sprt+dadd", keys = 5 }}

[[attacks]]
name = "knockoff"
budgets = [300]
pool = "patches"
params = {{ epochs = 1 }}
"""


def _grid(tmp_path: Path, text: str = GRID) -> Any:
    path = tmp_path / "g.toml"
    path.write_text(text)
    return load_grid(path)


def test_a_monitor_table_shares_the_dnf_build_and_keys_its_cells_apart(tmp_path: Path) -> None:
    grid = _grid(tmp_path)
    grid.validate()
    cells = {c.defense.display: c for c in expand_grid(grid)}
    assert cells["dnf"].defense_key == cells["dnf+monitor"].defense_key == cells["dnf+monitor-5keys"].defense_key
    assert len({c.key for c in cells.values()}) == 4
    plain = _grid(tmp_path, GRID.split('[[defenses]]\nname = "dnf"\nlabel = "dnf+monitor"')[0] + GRID.split("\n\n")[-1])
    assert {c.key for c in expand_grid(plain)} == {cells["undefended"].key, cells["dnf"].key}  # rows without: unchanged


@pytest.mark.parametrize(
    ("table", "match"),
    [
        ('{ monitor = "exit-sprt+nope" }', "distinct monitors"),
        ('{ response = "throttle" }', "response must be one of"),
        ("{ keys = 0 }", "keys >= 1"),
        ('{ monitor = "exit-sprt", keys = 10 }', "must include 'dadd'"),
        ("{ alpha = 2.0 }", "alpha"),
        ("{ budget = 3 }", "budget"),
    ],
)
def test_bad_monitor_tables_are_refused_before_anything_runs(tmp_path: Path, table: str, match: str) -> None:
    text = GRID.replace('{ monitor = "exit-sprt+dadd+step" }', table)
    with pytest.raises(ConfigError, match=match):
        _grid(tmp_path, text).validate()


def test_a_monitor_table_needs_dnf(tmp_path: Path) -> None:
    text = GRID.replace('[[defenses]]\nname = "undefended"', '[[defenses]]\nname = "undefended"\nmonitor = {}')
    with pytest.raises(ConfigError, match="needs a dnf defense"):
        _grid(tmp_path, text).validate()


def test_closed_loop_rows_run_record_their_flags_and_get_a_report_table(tmp_path: Path) -> None:
    grid = _grid(tmp_path)
    run = run_grid(grid, tmp_path / "run")
    assert run.failed == [] and len(run.records) == 4
    recs = {r.defense: r for r in read_records(tmp_path / "run" / "results.jsonl")}
    assert "monitor" not in recs["dnf"].extra
    one, many = recs["dnf+monitor"].extra["monitor"], recs["dnf+monitor-5keys"].extra["monitor"]
    assert one["keys"] == 1 and many["keys"] == 5 and many["queries"] == 300
    assert one["id_test"]["queries"] == 1000 and "flagged_at" in one["id_test"]
    for m in (one, many):
        assert m["keys_flagged"] == len(m["flags"])
        assert m["first_flag"] == min((f["query"] for f in m["flags"]), default=None)
        assert all(set(f) == {"key", "by", "query"} and 1 <= f["query"] <= 300 for f in m["flags"])
    # the evaluation is off-budget on the DNF itself: the same defended accuracy as the plain row
    assert recs["dnf+monitor"].defended_acc == recs["dnf"].defended_acc
    assert recs["dnf+monitor"].config["cell"]["defense"]["monitor"] == {"monitor": "exit-sprt+dadd+step"}
    cal_dirs = list((tmp_path / "run" / ARTIFACTS).glob("dnf-*/monitor-*"))
    assert len(cal_dirs) == 1 and {p.name for p in cal_dirs[0].iterdir()} == {
        "cal.exit-sprt.json",
        "cal.dadd.json",
        "cal.step.json",
    }
    report = make_report(tmp_path / "run")
    md = report.tables["closed_loop"][0].read_text()
    assert "dnf+monitor-5keys" in md and "exit-sprt+dadd+step" in md and "/ 5" in md
    rows = (report.tables["closed_loop"][1]).read_text().splitlines()
    assert len(rows) == 3  # header + the two loop rows
    assert json.loads(json.dumps(many))  # plain JSON
