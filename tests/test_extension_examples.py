"""A new data set or monitor is one block of code and one registration: the docs' examples, run.

The code blocks under "Adding a data set" (docs/data.md) and "Writing a monitor"
(docs/monitoring.md) are executed as written; the data set then goes through the CLI (train a
victim, protect it, attack it) and the monitor flags attack-like answers alone and in a union.
The attack and defense examples are tested in tests/test_attack_scaffold.py and
tests/test_defense_scaffold.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from fortress.bench.records import read_records
from fortress.cli import app
from fortress.data import DATASETS
from fortress.data.resolve import resolve_data
from fortress.data.spec import DataSpec
from fortress.errors import UnknownComponent
from fortress.monitor import MONITORS, AnyOf, ExitSPRT, create_monitor

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _example(doc: str, heading: str) -> str:
    """The first Python block under ``## {heading}`` in ``docs/{doc}``."""
    text = (ROOT / "docs" / doc).read_text(encoding="utf-8")
    section = text[text.index(f"## {heading}\n") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, f"no python block under {heading!r} in {doc}"
    return match.group(1)


@pytest.fixture
def stripes() -> Iterator[dict[str, Any]]:
    namespace: dict[str, Any] = {}
    exec(compile(_example("data.md", "Adding a data set"), "docs/data.md", "exec"), namespace)
    yield namespace
    DATASETS.remove("stripes")


@pytest.fixture
def low_confidence() -> Iterator[dict[str, Any]]:
    namespace: dict[str, Any] = {}
    exec(compile(_example("monitoring.md", "Writing a monitor"), "docs/monitoring.md", "exec"), namespace)
    yield namespace
    MONITORS.remove("low-confidence")


def test_the_registry_forgets_a_removed_name(stripes: dict[str, Any]) -> None:
    assert "stripes" in DATASETS
    DATASETS.remove("stripes")
    with pytest.raises(UnknownComponent, match="unknown dataset 'stripes'"):
        DATASETS.get("stripes")
    DATASETS.add("stripes", stripes["DatasetInfo"]("stripes", "again", needs_path=False, load=stripes["stripes"]))


def test_a_registered_data_set_is_split_like_any_labelled_set(stripes: dict[str, Any]) -> None:
    data = resolve_data(DataSpec("stripes"))
    sizes = (len(data.train), len(data.val), len(data.test), len(data.attacker))
    assert sum(sizes) == 600 and min(sizes) > 0
    assert data.image_shape == (1, 28, 28) and data.classes == ("vertical", "horizontal")
    for split in (data.train, data.test):  # stratified: both classes in every split
        assert set(split.targets.tolist()) == {0, 1}
    assert resolve_data(DataSpec("stripes")).describe() == data.describe()  # deterministic
    assert resolve_data(DataSpec("stripes", options={"n": 300})).describe()["sha256"] != data.describe()["sha256"]


def test_a_registered_data_set_goes_through_the_cli(stripes: dict[str, Any], tmp_path: Path) -> None:
    victim, dnf, attacks = tmp_path / "victim", tmp_path / "dnf", tmp_path / "attacks"
    res = runner.invoke(app, ["train-victim", "--data", "stripes", "--epochs", "3", "--out", str(victim)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["protect", str(victim), "--out", str(dnf), "--epochs", "1", "--ood", "noise"])
    assert res.exit_code == 0, res.output
    argv = ["attack", "knockoff", "--target", str(dnf), "--budget", "100", "--pool", "patches", "--out", str(attacks)]
    res = runner.invoke(app, argv)
    assert res.exit_code == 0, res.output
    (record,) = read_records(attacks / "results.jsonl")
    assert record.dataset == "stripes" and record.queries_used == 100
    assert record.victim_acc > 0.9  # two orientations: easy for LeNet-5


def test_a_registered_monitor_flags_low_confidence_keys(low_confidence: dict[str, Any]) -> None:
    monitor = create_monitor("low-confidence", min_queries=50)
    sure = torch.eye(10)[torch.arange(64) % 10]
    unsure = torch.full((64, 10), 0.1)
    images = torch.rand(64, 1, 28, 28)
    for _ in range(3):
        assert not monitor.observe("benign", images, sure, None).flagged
    verdict = monitor.observe("attacker", images, unsure, None)
    assert verdict.flagged and verdict.flagged_at == 64 and verdict.score == 1.0
    assert monitor.verdict("benign").queries == 192 and not monitor.verdict("benign").flagged
    monitor.reset("attacker")
    assert not monitor.verdict("attacker").flagged


def test_a_registered_monitor_joins_a_union(low_confidence: dict[str, Any], tmp_path: Path) -> None:
    from fortress.monitor import calibrate_exit_sprt

    id_exits = torch.tensor([2] * 950 + [1] * 40 + [0] * 10)  # held-out ID traffic: mostly the final exit
    calibration = calibrate_exit_sprt(id_exits, 3, horizon=1000, simulations=200).save(tmp_path / "cal.json")
    union = create_monitor("exit-sprt+low-confidence", calibration=calibration)
    assert isinstance(union, AnyOf) and isinstance(union.members[0], ExitSPRT)
    unsure = torch.full((128, 10), 0.1)
    final_exit = torch.full((128,), 2)  # exits like ID traffic: only the second detector can flag
    assert union.observe("k", torch.rand(128, 1, 28, 28), unsure, final_exit).flagged
