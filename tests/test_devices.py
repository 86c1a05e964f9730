"""Devices: resolving ``--device``, refusing an unavailable one before any work, recording it with
every result, leaving CPU results unchanged, and ``fortress bench --dry-run``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fortress.bench.estimate import BuildEstimate, estimate_grid, simulate_wall
from fortress.bench.grid import load_grid
from fortress.bench.pipeline import run_attack, train_victim
from fortress.bench.runner import run_grid
from fortress.cli import app
from fortress.config import AttackConfig, VictimConfig
from fortress.defenses import Undefended
from fortress.device import check_device, device_facts, resolve_device
from fortress.errors import ConfigError
from fortress.models import create_model
from fortress.oracle import LocalOracle

runner = CliRunner()
NO_CUDA = not torch.cuda.is_available()


def test_device_specs_resolve_or_fail_with_one_clear_line() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert check_device("CUDA:3") == "cuda:3"
    with pytest.raises(ConfigError, match=r"unknown device 'tpu'; valid: auto, cpu, cuda, cuda:N, mps"):
        resolve_device("tpu")
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("cuda:x")
    if NO_CUDA:
        assert resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(ConfigError, match=r"^cuda requested but torch.cuda.is_available\(\) is False$"):
            resolve_device("cuda")
        with pytest.raises(ConfigError, match=r"cuda:1 requested but torch.cuda.is_available\(\) is False"):
            resolve_device("cuda:1")
    facts = device_facts("cpu", amp=True)
    assert facts["device"] == "cpu" and facts["torch_version"] == torch.__version__ and facts["amp"] is True


@pytest.mark.skipif(not NO_CUDA, reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize(
    "args",
    [
        ["train-victim", "--out", "{out}", "--epochs", "1"],
        ["protect", "{victim}", "--out", "{out}"],
        ["defend", "randp", "{victim}", "--out", "{out}"],
        ["attack", "dfme", "--target", "{victim}", "--budget", "100", "--out", "{out}"],
        ["bench", "benchmarks/mnist-quick.toml", "--out", "{out}"],
        ["bench", "benchmarks/mnist-quick.toml", "--out", "{out}", "--dry-run"],
        ["bench-speed", "{victim}"],
        ["serve", "{victim}", "--keys", "{out}/keys.db"],
        ["demo", "--out", "{out}", "--quick"],
    ],
)
def test_every_computing_verb_refuses_an_unavailable_device_before_any_work(args: list[str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    filled = [a.format(out=out, victim=tmp_path / "victim") for a in args] + ["--device", "cuda"]
    result = runner.invoke(app, filled)
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert lines == ["error: cuda requested but torch.cuda.is_available() is False"]
    assert not out.exists()


def test_records_carry_the_device_and_cpu_runs_are_unchanged_by_the_option(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    a, acc_a = train_victim(VictimConfig(epochs=1), tmp_path / "a")
    b, acc_b = train_victim(VictimConfig(epochs=1), tmp_path / "b", device="cpu", amp=True)  # amp: GPU only
    assert acc_a == acc_b
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    meta = json.loads((tmp_path / "b" / "model.json").read_text())
    assert json.dumps(meta).count('"amp": true') == 1
    cfg = AttackConfig(name="knockoff", budget=60, params={"epochs": 1, "batch_size": 32, "query_batch_size": 30})
    rec = run_attack(Undefended(a), cfg, device="cpu")
    assert rec.extra["device"] == "cpu" and rec.extra["device_name"].startswith("cpu")
    assert rec.extra["torch_version"] == torch.__version__ and rec.config["device"] == "cpu"
    again = run_attack(Undefended(a), cfg)
    assert again.clone_acc == rec.clone_acc and again.config["device"] == "cpu"


def test_the_oracle_answers_on_the_callers_device() -> None:
    oracle = LocalOracle(Undefended(create_model("lenet5")), budget=8)
    x = torch.rand(8, 1, 28, 28)
    assert oracle.query(x).device == x.device == oracle.defense.device


def test_gpus_per_cell_needs_the_ray_executor(tmp_path: Path) -> None:
    grid = load_grid(Path("benchmarks/mnist-quick.toml"))
    with pytest.raises(ConfigError, match="gpus_per_cell"):
        run_grid(grid, tmp_path / "run", gpus_per_cell=1)
    assert not (tmp_path / "run").exists()


def test_simulated_wall_time_of_builds_and_cells() -> None:
    builds = [BuildEstimate("v", "victim", 10.0), BuildEstimate("d", "defense", 20.0, needs="v")]
    cells = [("v", 5.0), ("d", 5.0), ("d", 5.0)]
    # one worker: everything in a row
    assert simulate_wall(builds, cells, 1) == pytest.approx(45.0)
    # two: the victim (0-10) then the defense (10-30) on one; cell 1 (10-15), cells 2, 3 after the defense
    assert simulate_wall(builds, cells, 2) == pytest.approx(35.0)


TINY_GRID = """
name = "tiny"
seeds = [0, 1]

[[victims]]
arch = "lenet5"
epochs = 1

[[defenses]]
name = "undefended"

[[defenses]]
name = "randp"

[[attacks]]
name = "knockoff"
budgets = [200, 400]
params = { epochs = 2, batch_size = 32, query_batch_size = 50 }
"""


def test_dry_run_lists_every_cell_with_an_estimate_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_GRID)
    out = tmp_path / "run"
    result = runner.invoke(app, ["bench", str(path), "--out", str(out), "--dry-run", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "8 cells, 3 builds on cpu" in result.output and "of wall time with 1 task(s) at once" in result.output
    assert result.output.count("knockoff/soft@") == 8
    assert not out.exists()
    est = estimate_grid(load_grid(path), workers=2)
    assert len(est.cells) == 8 and all(c.seconds > 0 for c in est.cells)
    by_budget = {c.cell.attack.budget: c.attack_s for c in est.cells if c.cell.defense.name == "undefended"}
    assert by_budget[400] > by_budget[200]  # the time grows with the budget
    assert est.wall_s < est.work_s  # two workers at once


def test_a_grid_names_its_device_and_the_command_line_overrides_it(tmp_path: Path) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text('device = "tpu"\n' + TINY_GRID)
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        load_grid(path)
    path.write_text('device = "cuda"\n' + TINY_GRID)
    assert load_grid(path).device == "cuda"
    if NO_CUDA:
        result = runner.invoke(app, ["bench", str(path), "--out", str(tmp_path / "run"), "--dry-run"])
        assert result.exit_code == 1 and "cuda requested" in result.output
        result = runner.invoke(app, ["bench", str(path), "--out", str(tmp_path / "run"), "--device", "tpu"])
        assert result.exit_code == 1 and "unknown device 'tpu'" in result.output
    assert not (tmp_path / "run").exists()
