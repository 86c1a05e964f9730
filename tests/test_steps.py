"""The single steps on saved artifacts that the CLI verbs call, without the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fortress.bench.records import read_records
from fortress.bench.steps import attack_saved, calibrate_saved, defend_saved, is_url
from fortress.catalog import REGISTRIES, registered
from fortress.config import AttackConfig
from fortress.data import mnist_splits
from fortress.defenses import DEFENSES, load_defense
from fortress.errors import ArtifactError, ConfigError, UnknownComponent
from fortress.models import MODELS, create_model, evaluate_accuracy, save_model

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def victim_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained LeNet-5 (the steps do not care how good the victim is)."""
    torch.manual_seed(0)
    return save_model(create_model("lenet5"), tmp_path_factory.mktemp("steps") / "victim")


def test_defend_saved_builds_saves_and_scores_the_defense(victim_dir: Path, tmp_path: Path) -> None:
    events: list[tuple[str, float, float]] = []
    made = defend_saved("undefended", victim_dir, tmp_path / "d", {}, event=lambda *e: events.append(e))
    assert events == [("build undefended", 0, 1), ("build undefended", 1, 1)]
    test = mnist_splits().test
    assert made.accuracy == pytest.approx(evaluate_accuracy(made.defense.victim, test.x, test.targets))
    assert made.exit_hist == [] and made.out == tmp_path / "d"
    assert load_defense(tmp_path / "d").name == "undefended"


@pytest.mark.parametrize(
    ("name", "params", "error"),
    [("nope", {}, UnknownComponent), ("mad", {"no_such_option": 1}, ConfigError), ("dnf", {"train": 3}, ConfigError)],
)
def test_defend_saved_checks_the_request_before_loading_anything(
    name: str, params: dict[str, object], error: type[Exception], tmp_path: Path
) -> None:
    with pytest.raises(error):
        defend_saved(name, tmp_path / "no-victim-here", tmp_path / "out", params)
    assert not (tmp_path / "out").exists()


def test_defend_saved_reports_a_missing_victim(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not found"):
        defend_saved("undefended", tmp_path / "missing", tmp_path / "out", {})


def test_attack_saved_appends_one_record_per_run(victim_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "undefended"
    defend_saved("undefended", victim_dir, target, {})
    cfg = AttackConfig(name="knockoff", budget=40, pool="digits28", params={"epochs": 1})
    events: list[tuple[str, float, float]] = []
    first = attack_saved(str(target), cfg, tmp_path / "run", event=lambda *e: events.append(e))
    assert {e[0] for e in events} == {"knockoff vs undefended"} and events[-1][1:] == (40, 40)
    assert first.results == tmp_path / "run" / "results.jsonl"
    assert first.record.queries_used == 40 and first.record.config["target"] == str(target)
    attack_saved(str(target), cfg, tmp_path / "run")
    assert [r.queries_used for r in read_records(first.results)] == [40, 40]


def test_a_url_target_needs_its_key_before_any_query(victim_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs an API key"):
        attack_saved("http://127.0.0.1:9", AttackConfig(name="knockoff", budget=10), tmp_path, reference=None)
    assert not (tmp_path / "results.jsonl").exists()


def test_is_url() -> None:
    assert is_url("http://host:8000") and is_url("https://x")
    assert not is_url("runs/dnf") and not is_url("httpdir")


def test_calibrate_saved_needs_a_defense_with_exits(victim_dir: Path, tmp_path: Path) -> None:
    defend_saved("undefended", victim_dir, tmp_path / "u", {})
    with pytest.raises(ConfigError, match="reports none"):
        calibrate_saved(tmp_path / "u", tmp_path / "cal.json")
    assert not (tmp_path / "cal.json").exists()


def test_catalog_lists_every_registry_in_order() -> None:
    from fortress.cli.components import ListWhat

    reg = registered()
    assert tuple(reg) == REGISTRIES == tuple(w.value for w in ListWhat)
    assert reg["defenses"] == DEFENSES.names() and reg["models"] == MODELS.names()


def test_tables_and_steps_load_without_the_cli() -> None:
    code = (
        "import sys; import fortress.bench.tables, fortress.bench.steps, fortress.config, fortress.catalog; "
        "assert 'typer' not in sys.modules and 'fortress.cli' not in sys.modules, sorted(sys.modules)"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": str(SRC)}, timeout=120
    )
    assert res.returncode == 0, res.stderr
