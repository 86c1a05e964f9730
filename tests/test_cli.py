"""The CLI end to end on tiny settings: every verb runs, and every bad input is one line + non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fortress.bench.records import read_records
from fortress.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def victim_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "victim"
    res = runner.invoke(app, ["train-victim", "--out", str(out), "--epochs", "2"])
    assert res.exit_code == 0, res.output
    assert "ID test accuracy" in res.output
    return out


@pytest.fixture(scope="module")
def dnf_dir(victim_dir: Path) -> Path:
    out = victim_dir.parent / "dnf"
    res = runner.invoke(app, ["protect", str(victim_dir), "--out", str(out), "--epochs", "1", "--ood", "noise"])
    assert res.exit_code == 0, res.output
    assert "defended ID accuracy" in res.output
    return out


def test_list_shows_every_registry() -> None:
    res = runner.invoke(app, ["list"])
    assert res.exit_code == 0
    for word in ("attacks", "dfme", "knockoff", "defenses", "dnf", "undefended", "models", "lenet5", "datasets"):
        assert word in res.output
    res = runner.invoke(app, ["list", "models"])
    assert "resnet34-8x" in res.output and "dfme" not in res.output


def test_list_unknown_registry_fails() -> None:
    res = runner.invoke(app, ["list", "weapons"])
    assert res.exit_code != 0


def test_saved_artifacts_are_safetensors_and_json_only(victim_dir: Path, dnf_dir: Path) -> None:
    files = [p for p in dnf_dir.rglob("*") if p.is_file()]
    assert files
    assert {p.suffix for p in files} <= {".safetensors", ".json"}
    assert {p.suffix for p in victim_dir.iterdir()} == {".safetensors", ".json"}


def test_attack_appends_records_against_dnf_and_victim(victim_dir: Path, dnf_dir: Path, tmp_path: Path) -> None:
    for target in (dnf_dir, victim_dir):
        res = runner.invoke(
            app,
            [
                "attack",
                "knockoff",
                "--target",
                str(target),
                "--budget",
                "200",
                "--out",
                str(tmp_path),
                "--pool",
                "digits28",
                "--param",
                "epochs=2",
            ],
        )
        assert res.exit_code == 0, res.output
    recs = read_records(tmp_path / "results.jsonl")
    assert [r.defense for r in recs] == ["dnf", "undefended"]
    assert all(r.queries_used == 200 and r.budget == 200 for r in recs)
    assert recs[0].exit_hist_attack and abs(sum(recs[0].exit_hist_attack) - 1) < 1e-6
    assert recs[0].config["attack_hparams"]["epochs"] == 2


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["attack", "nosuch", "--target", "{victim}", "--budget", "10", "--out", "{tmp}"], "unknown attack 'nosuch'"),
        (["attack", "knockoff", "--target", "{tmp}/missing", "--budget", "10", "--out", "{tmp}"], "not found"),
        (["attack", "knockoff", "--target", "{victim}", "--budget", "0", "--out", "{tmp}"], "budget"),
        (
            ["attack", "knockoff", "--target", "{victim}", "--budget", "10", "--out", "{tmp}", "--param", "x"],
            "KEY=VALUE",
        ),
        (
            ["attack", "knockoff", "--target", "{victim}", "--budget", "10", "--out", "{tmp}", "--pool", "nope"],
            "unknown dataset",
        ),
        (
            ["attack", "dfme", "--target", "{victim}", "--budget", "10", "--out", "{tmp}", "--output-mode", "hard"],
            "output mode",
        ),
        (["train-victim", "--out", "{tmp}/v", "--arch", "alexnet"], "unknown model 'alexnet'"),
        (["train-victim", "--out", "{tmp}/v", "--epochs", "0"], "invalid victim"),
        (["protect", "{tmp}/missing", "--out", "{tmp}/d"], "not found"),
        (["protect", "{victim}", "--out", "{tmp}/d", "--thresholds", "a,b"], "comma-separated"),
        (
            ["protect", "{victim}", "--out", "{tmp}/d", "--thresholds", "0.9", "--epochs", "1", "--ood", "noise"],
            "thresholds",
        ),
    ],
)
def test_bad_input_gives_one_line_and_nonzero_exit(
    args: list[str], needle: str, victim_dir: Path, tmp_path: Path
) -> None:
    filled = [a.replace("{victim}", str(victim_dir)).replace("{tmp}", str(tmp_path)) for a in args]
    res = runner.invoke(app, filled)
    assert res.exit_code == 1, res.output
    assert needle in res.output
    assert "Traceback" not in res.output
    assert len([ln for ln in res.output.strip().splitlines() if ln.startswith("error:")]) == 1


def test_corrupt_weights_are_reported_and_results_kept(victim_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    (bad).mkdir()
    (bad / "model.json").write_text((victim_dir / "model.json").read_text())
    (bad / "model.safetensors").write_bytes(b"\x00garbage")
    results = tmp_path / "results.jsonl"
    results.write_text('{"keep": "me"}\n')
    res = runner.invoke(app, ["attack", "knockoff", "--target", str(bad), "--budget", "10", "--out", str(tmp_path)])
    assert res.exit_code == 1
    assert "corrupt" in res.output
    assert results.read_text() == '{"keep": "me"}\n'


def test_protect_resumes_from_checkpoint(victim_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "dnf"
    args = ["protect", str(victim_dir), "--out", str(out), "--epochs", "2", "--ood", "noise"]
    assert runner.invoke(app, args).exit_code == 0
    states = sorted((out / "checkpoints").glob("attempt-*/dnf-checkpoint.json"))
    assert states  # one checkpoint per training attempt
    before = {p: json.loads(p.read_text()) for p in states}
    assert all(st["report"]["epochs_done"] == 2 for st in before.values())
    res = runner.invoke(app, args)  # everything done: each attempt resumes at epoch 2 and trains nothing more
    assert res.exit_code == 0
    for p, st in before.items():
        assert json.loads(p.read_text())["report"]["loss"] == st["report"]["loss"]
    meta = json.loads((out / "defense.json").read_text())
    assert 1 <= len(meta["provenance"]["attempts"]) <= 3


def test_python_dash_m_entry_point(tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "fortress",
            "attack",
            "dfme",
            "--target",
            str(tmp_path / "x"),
            "--budget",
            "5",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env={**env, "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert res.returncode == 1
    assert res.stderr.strip().count("\n") == 0 and "error:" in res.stderr


def test_api_quota_exhausted_mid_attack_is_one_line_and_keeps_results(victim_dir: Path, tmp_path: Path) -> None:
    results = tmp_path / "results.jsonl"
    ok = runner.invoke(
        app,
        [
            "attack",
            "knockoff",
            "--target",
            str(victim_dir),
            "--budget",
            "100",
            "--out",
            str(tmp_path),
            "--param",
            "epochs=1",
        ],
    )
    assert ok.exit_code == 0, ok.output
    before = results.read_text()
    res = runner.invoke(
        app,
        [
            "attack",
            "knockoff",
            "--target",
            str(victim_dir),
            "--budget",
            "300",
            "--api-budget",
            "100",
            "--out",
            str(tmp_path),
            "--param",
            "epochs=1",
        ],
    )
    assert res.exit_code == 1
    assert "query budget exhausted" in res.output
    assert "nothing was charged" in res.output
    assert results.read_text() == before


def test_defend_builds_saves_and_the_attack_verb_loads_it(victim_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "am"
    res = runner.invoke(
        app, ["defend", "adaptive-misinformation", str(victim_dir), "--out", str(out), "--fit-param", "epochs=1"]
    )
    assert res.exit_code == 0, res.output
    assert "defended ID test accuracy" in res.output
    meta = json.loads((out / "defense.json").read_text())
    assert meta["defense"] == "adaptive-misinformation"
    res = runner.invoke(
        app,
        [
            "attack",
            "knockoff",
            "--target",
            str(out),
            "--budget",
            "60",
            "--pool",
            "mnist-attacker",
            "--out",
            str(tmp_path),
            "--param",
            "epochs=1",
        ],
    )
    assert res.exit_code == 0, res.output
    [rec] = read_records(tmp_path / "results.jsonl")
    assert rec.defense == "adaptive-misinformation" and rec.queries_used == 60


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["defend", "nope"], "unknown defense 'nope'"),
        (["defend", "dnf", "--param", "train.epochs=0"], "epochs must be >= 1"),
        (["defend", "dnf", "--param", "ood.kind=moon"], "ood.kind must be one of"),
        (["defend", "mad", "--param", "epsilon=-1"], "epsilon"),
    ],
)
def test_defend_refuses_bad_requests_in_one_line(
    victim_dir: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    res = runner.invoke(app, [*args[:2], str(victim_dir), "--out", str(tmp_path / "d"), *args[2:]])
    assert res.exit_code == 1
    assert message in res.output and res.output.count("\n") == 1
    assert not (tmp_path / "d" / "defense.json").exists()


def test_defend_dnf_builds_what_protect_builds(victim_dir: Path, dnf_dir: Path, tmp_path: Path) -> None:
    """`defend dnf` runs the grid's DNF build (the DNF recipe): with protect's settings it saves the same model."""
    out = tmp_path / "dnf"
    res = runner.invoke(
        app,
        ["defend", "dnf", str(victim_dir), "--out", str(out), "--param", "train.epochs=1", "--param", "ood.kind=noise"],
    )
    assert res.exit_code == 0, res.output
    assert "dnf saved to" in res.output and "defended ID test accuracy" in res.output
    assert sorted((out / "checkpoints").glob("attempt-*/dnf-checkpoint.json"))  # the recipe's resumable training
    made, protected = json.loads((out / "defense.json").read_text()), json.loads((dnf_dir / "defense.json").read_text())
    assert made["defense"] == "dnf"
    assert made["params"] == protected["params"]  # thresholds (after the utility guard) included
    weights = sorted(p.relative_to(out) for p in out.rglob("*.safetensors") if "checkpoints" not in p.parts)
    assert weights
    for rel in weights:
        assert (out / rel).read_bytes() == (dnf_dir / rel).read_bytes(), rel


def test_list_shows_the_monitors() -> None:
    res = runner.invoke(app, ["list", "monitors"])
    assert res.exit_code == 0 and "exit-sprt" in res.output and "prada" in res.output


def test_monitor_calibrate_writes_a_calibration_the_monitor_loads(dnf_dir: Path, tmp_path: Path) -> None:
    from fortress.data import mnist_splits
    from fortress.defenses import load_defense
    from fortress.monitor import ExitCalibration

    out = tmp_path / "cal.json"
    res = runner.invoke(app, ["monitor", "calibrate", str(dnf_dir), "--out", str(out), "--views", "1"])
    assert res.exit_code == 0, res.output
    cal = ExitCalibration.load(out)
    n = 2 * len(mnist_splits().val.x)  # the validation split and one shifted, noisy copy of it
    assert sum(cal.id_counts) == n and cal.num_exits == len(cal.id_counts) == load_defense(dnf_dir).num_exits
    assert f"ID exits {list(cal.id_counts)} over {n:,} held-out queries" in res.output.replace("\n", " ")


def test_monitor_calibrate_refuses_a_defense_without_exits(victim_dir: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["defend", "undefended", str(victim_dir), "--out", str(tmp_path / "u")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["monitor", "calibrate", str(tmp_path / "u"), "--out", str(tmp_path / "c.json")])
    assert res.exit_code == 1 and res.output.startswith("error:") and "reports none" in res.output


@pytest.mark.parametrize("verb", ["demo", "train-victim", "protect", "defend", "attack", "bench"])
def test_every_seeded_verb_takes_threads(verb: str) -> None:
    res = runner.invoke(app, [verb, "--help"])
    assert res.exit_code == 0 and "--threads" in res.output


def test_threads_are_pinned_and_recorded(victim_dir: Path, tmp_path: Path) -> None:
    """Whatever the process had, a seeded verb runs at --threads (default 1), and its record says so."""
    import torch

    from fortress.reproducibility import runtime_facts

    args = ["attack", "knockoff", "--target", str(victim_dir), "--budget", "100", "--out", str(tmp_path)]
    args += ["--pool", "digits28", "--param", "epochs=1"]
    try:
        torch.set_num_threads(2)
        assert runner.invoke(app, args).exit_code == 0
        assert torch.get_num_threads() == 1
        assert runner.invoke(app, [*args, "--threads", "2"]).exit_code == 0
    finally:
        torch.set_num_threads(1)
    first, second = read_records(tmp_path / "results.jsonl")
    assert (first.extra["torch_threads"], second.extra["torch_threads"]) == (1, 2)
    facts = runtime_facts()
    for key in ("torch_version", "torch_deterministic", "cpu_capability", "numpy_version", "fortress_version"):
        assert first.extra[key] == facts[key]
    res = runner.invoke(app, [*args, "--threads", "0"])
    assert res.exit_code != 0 and "threads" in res.output.lower()


def test_monitor_calibrate_dadd_writes_a_bundle_the_union_loads(dnf_dir: Path, tmp_path: Path) -> None:
    from fortress.defenses import load_defense
    from fortress.monitor import DADD, AnyOf, ExitSPRT, create_monitor

    out = tmp_path / "cal.json"
    args = ["monitor", "calibrate", str(dnf_dir), "--out", str(out), "--views", "1", "--dadd"]
    res = runner.invoke(app, [*args, "--dadd-horizon", "200", "--dadd-streams", "10"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cal.exit-sprt.json").is_file() and (tmp_path / "cal.dadd.json").is_file()
    dnf = load_defense(dnf_dir)
    mon = create_monitor("exit-sprt+dadd", calibration=out, features=dnf.victim.penultimate)
    assert isinstance(mon, AnyOf) and [type(m) for m in mon.members] == [ExitSPRT, DADD]
    assert "dadd calibration: threshold" in res.output


def test_monitor_calibrate_step_joins_the_bundle_and_the_served_union_loads_it(dnf_dir: Path, tmp_path: Path) -> None:
    from fortress.monitor import AnyOf, ExitSPRT, Step, StepCalibration, create_monitor

    out = tmp_path / "cal.json"
    args = ["monitor", "calibrate", str(dnf_dir), "--out", str(out), "--views", "1", "--step"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "step calibration: threshold" in res.output
    assert json.loads(out.read_text())["members"] == {"exit-sprt": "cal.exit-sprt.json", "step": "cal.step.json"}
    cal = StepCalibration.load(tmp_path / "cal.step.json")
    assert cal.threshold >= cal.floor and len(cal.per_scenario) == 15
    mon = create_monitor("exit-sprt+step", calibration=out)
    assert isinstance(mon, AnyOf) and [type(m) for m in mon.members] == [ExitSPRT, Step]
