"""The grid runner on a tiny grid: records, cached artifacts, resume after Ctrl-C, Ray == local, bench-speed."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fortress.bench.grid import GridConfig, expand_grid, load_grid
from fortress.bench.records import ResultRecord, read_records
from fortress.bench.report import make_report
from fortress.bench.runner import GridProgress, GridRun, finished_keys, run_grid
from fortress.cli import app
from fortress.errors import ConfigError

TINY = """
name = "tiny"
seeds = [0, 1]

[[victims]]
arch = "lenet5-half"
epochs = 1

[[defenses]]
name = "undefended"

[[defenses]]
name = "dnf"
params = { max_attempts = 1, min_ood_exit0 = 0.0, train = { epochs = 1 }, ood = { kind = "noise" } }

[[attacks]]
name = "knockoff"
budgets = [100, 200]
pool = "digits28"
params = { epochs = 1 }
"""


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[GridConfig, Path, GridRun, list[GridProgress]]:
    root = tmp_path_factory.mktemp("grid")
    grid = load_grid(_write(root / "tiny.toml", TINY))
    events: list[GridProgress] = []
    run = run_grid(grid, root / "local", on_progress=events.append)
    return grid, root / "local", run, events


def _by_key(records: list[ResultRecord]) -> dict[str, ResultRecord]:
    return {str(r.config["cell_key"]): r for r in records}


def test_every_cell_gives_one_record_with_its_config(tiny: Any) -> None:
    grid, out, run, events = tiny
    recs = read_records(out / "results.jsonl")
    cells = expand_grid(grid)
    assert not run.failed and len(run.records) == len(recs) == len(cells) == 8
    by_key = _by_key(recs)
    assert set(by_key) == {c.key for c in cells}
    for c in cells:
        r = by_key[c.key]
        assert (r.defense, r.attack, r.budget, r.seed) == (
            c.defense.display,
            "knockoff",
            c.attack.budget,
            c.attack.seed,
        )
        assert r.config["cell"]["attack"] == dataclasses.asdict(c.attack) and r.config["grid"] == "tiny"
        assert r.queries_used <= r.budget and r.extra["id_s_per_1k_queries"] > 0
    assert all(len(r.exit_hist_id) == 4 for r in recs if r.defense == "dnf")
    # progress: done + running + left == total at every event, ending at all done
    assert all(e.done + e.running + e.left == e.total == 8 for e in events)
    assert (events[-1].done, events[-1].running, events[-1].left) == (8, 0, 0)
    # artifacts: built once each, marked complete
    arts = sorted(p.name for p in (out / "artifacts").iterdir())
    assert len(arts) == 3 and sum(a.startswith("victim-") for a in arts) == 1
    assert all((out / "artifacts" / a / "built.json").is_file() for a in arts)
    assert (out / "grid.toml").is_file() and not (out / ".grid.lock").exists()


def test_resume_skips_finished_cells_and_plain_rerun_refuses(tiny: Any) -> None:
    grid, out, _, _ = tiny
    with pytest.raises(ConfigError, match="already holds 8 records; pass resume"):
        run_grid(grid, out)
    again = run_grid(grid, out, resume=True)
    assert (again.skipped, len(again.records)) == (8, 0)
    assert len(read_records(out / "results.jsonl")) == 8


def _copy_run(src: Path, dst: Path, keep_records: int) -> None:
    shutil.copytree(src / "artifacts", dst / "artifacts")
    lines = (src / "results.jsonl").read_text().splitlines(keepends=True)
    (dst / "results.jsonl").write_text("".join(lines[:keep_records]))


def test_torn_last_line_is_cut_and_missing_cells_rerun(tiny: Any, tmp_path: Path) -> None:
    grid, out, _, _ = tiny
    _copy_run(out, tmp_path, keep_records=3)
    with (tmp_path / "results.jsonl").open("a") as fh:
        fh.write('{"defense": "dnf", "att')  # a record cut short by a kill
    run = run_grid(grid, tmp_path, resume=True)
    assert (run.skipped, len(run.records)) == (3, 5)
    recs = read_records(tmp_path / "results.jsonl")
    assert sorted(_by_key(recs)) == sorted(c.key for c in expand_grid(grid)) and len(recs) == 8
    # cached artifacts were reused (none rebuilt), and the seeded results equal the first run's
    first = _by_key(read_records(out / "results.jsonl"))
    assert all(r.clone_acc == first[k].clone_acc for k, r in _by_key(recs).items())


def test_ctrl_c_then_resume_completes_without_duplicates_or_losses(tiny: Any, tmp_path: Path) -> None:
    _, out, _, _ = tiny
    grid_file = _write(tmp_path / "g.toml", TINY.replace("seeds = [0, 1]", "seeds = [0, 1, 2]"))
    expected = {c.key for c in expand_grid(load_grid(grid_file))}
    shutil.copytree(out / "artifacts", tmp_path / "run" / "artifacts")  # same victim and defenses: cached
    results = tmp_path / "run" / "results.jsonl"
    cmd = [sys.executable, "-m", "fortress", "bench", str(grid_file), "--out", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # a test run started in the background inherits SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: give the child the default disposition, as a terminal's Ctrl-C has
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not (results.is_file() and results.read_bytes().count(b"\n") >= 1):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no record appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    first = finished_keys(results)
    assert 1 <= len(first) < len(expected), "the interrupt came too late to test anything"
    res = CliRunner().invoke(app, ["bench", str(grid_file), "--out", str(tmp_path / "run"), "--resume"])
    assert res.exit_code == 0, res.output
    assert f"{len(expected) - len(first)} cells run, {len(first)} already done" in res.output
    # no terminal here: one plain progress line per finished cell instead of the bar
    lines = [line for line in res.output.splitlines() if line.startswith("[")]
    assert len(lines) == len(expected) - len(first)
    assert lines[-1].startswith(f"[{len(expected)}/{len(expected)}]") and "left 0" in lines[-1]
    assert all(" · finished " in line and "seed" in line for line in lines)  # one line each, never wrapped
    keys = [str(r.config["cell_key"]) for r in read_records(results)]
    assert len(keys) == len(set(keys)) == len(expected) and set(keys) == expected


def test_failed_cell_is_reported_and_the_rest_still_run(tiny: Any, tmp_path: Path) -> None:
    _, out, _, _ = tiny
    shutil.copytree(out / "artifacts", tmp_path / "artifacts")
    text = TINY.replace("budgets = [100, 200]", "budgets = [100]") + (
        '\n[[attacks]]\nname = "knockoff"\nbudgets = [50]\npool = "digits28"\nparams = { epochs = -1 }\n'
    )
    grid = load_grid(_write(tmp_path / "g.toml", text))
    run = run_grid(grid, tmp_path, resume=True)
    assert len(run.records) == 4 and len(run.failed) == 4
    assert all("knockoff/soft@50" in cell and "epochs" in err for cell, err in run.failed)
    assert len(read_records(tmp_path / "results.jsonl")) == 4


def test_report_from_grid_records(tiny: Any, tmp_path: Path) -> None:
    _, out, _, _ = tiny
    rep = make_report(out, tmp_path)
    assert {p.name for p in rep.plots} >= {"clone_vs_budget.png", "tradeoff.png"}
    md = rep.tables["clone_accuracy"][0].read_text()
    assert "knockoff soft @100" in md and "| dnf |" in md


def test_ray_executor_gives_the_local_records(tiny: Any, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    grid, out, _, _ = tiny
    victim = next((out / "artifacts").glob("victim-*"))
    shutil.copytree(victim, tmp_path / "artifacts" / victim.name)  # Ray builds the defenses, not the victim
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        events: list[GridProgress] = []
        run = run_grid(grid, tmp_path, executor="ray", on_progress=events.append)
    finally:
        ray.shutdown()
    assert not run.failed and len(run.records) == 8
    assert max(e.running for e in events) == 2 and events[-1].done == 8
    local, remote = _by_key(read_records(out / "results.jsonl")), _by_key(read_records(tmp_path / "results.jsonl"))
    assert set(local) == set(remote)
    timing = {"wall_s", "defense_s_per_1k_queries", "extra", "checkpoints"}
    for key, a in local.items():
        b = remote[key]
        da, db = dataclasses.asdict(a), dataclasses.asdict(b)
        assert {k: v for k, v in da.items() if k not in timing} == {k: v for k, v in db.items() if k not in timing}
        assert a.extra["oracle_log"]["exit_counts"] == b.extra["oracle_log"]["exit_counts"]


def test_bench_speed_times_defenses_side_by_side(tiny: Any, tmp_path: Path) -> None:
    _, out, _, _ = tiny
    dnf_dir = next((out / "artifacts").glob("dnf-*"))
    args = ["bench-speed", str(dnf_dir), "--defense", "undefended", "--defense", "dnf", "--repeats", "2"]
    res = CliRunner().invoke(app, [*args, "--batch-size", "64", "--json", str(tmp_path / "s.json")])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "s.json").read_text())
    costs = {(c["defense"], c["traffic"]): c for c in data["costs"]}
    assert set(costs) == {(d, t) for d in ("undefended", "dnf") for t in ("id_test", "dfme_synthetic", "noise")}
    assert all(costs[("undefended", t)]["ratio"] == 1.0 for t in ("id_test", "noise"))
    assert {f["traffic"] for f in data["forward"]} == {"id_test", "dfme_synthetic", "noise"}
    assert all(f["speedup"] > 0 and abs(sum(f["exit_hist"]) - 1) < 1e-6 for f in data["forward"])
    assert "forward_all vs forward_dynamic" in res.output
    flops = {(c["defense"], c["traffic"]): c for c in data["flops"]}
    assert set(flops) == set(costs) and all(flops[("undefended", t)]["ratio"] == 1.0 for t in ("id_test", "noise"))
    [exits] = data["exits"]
    assert exits["defense"] == "dnf" and exits["mflops"] == sorted(exits["mflops"])
    for t, hist in exits["exit_hist"].items():  # per query: the per-exit costs weighted by where queries left
        mixed = sum(h * m for h, m in zip(hist, exits["mflops"], strict=True))
        assert abs(flops[("dnf", t)]["mflops_per_query"] - mixed) < 1e-3 * mixed
    assert "MFLOPs per query" in res.output
