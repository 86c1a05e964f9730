"""Run configs (TOML round trip, validation) and result records (append, torn lines, corruption)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fortress.bench.demo import demo_config
from fortress.bench.records import ResultRecord, append_record, read_records
from fortress.config import AttackConfig, DemoConfig, ProtectConfig, dump_toml, from_dict, load_toml, to_dict
from fortress.errors import ArtifactError, ConfigError


def test_toml_round_trip(tmp_path: Path) -> None:
    cfg = demo_config(quick=True, seeds=(0, 1))
    dump_toml(cfg, tmp_path / "demo.toml")
    back = load_toml(DemoConfig, tmp_path / "demo.toml")
    assert back == cfg


def test_unknown_keys_and_bad_values_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown keys \['bogus'\].*valid keys"):
        from_dict(ProtectConfig, {"bogus": 1})
    with pytest.raises(ConfigError, match="head_kind must be one of"):
        from_dict(ProtectConfig, {"head_kind": "magic"})
    with pytest.raises(ConfigError, match="budget"):
        AttackConfig(budget=0)
    with pytest.raises(ConfigError, match="epochs must be"):
        from_dict(ProtectConfig, {"train": {"epochs": 0}})
    (tmp_path / "bad.toml").write_text("this is = = not toml")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_toml(ProtectConfig, tmp_path / "bad.toml")
    with pytest.raises(ArtifactError, match="not found"):
        load_toml(ProtectConfig, tmp_path / "none.toml")


def _record(seed: int) -> ResultRecord:
    return ResultRecord(
        defense="dnf",
        attack="dfme",
        dataset="mnist",
        victim_arch="lenet5",
        clone_arch="lenet5",
        budget=10,
        queries_used=10,
        seed=seed,
        victim_acc=0.97,
        defended_acc=0.97,
        clone_acc=0.1,
        clone_fidelity=0.1,
        config=to_dict(AttackConfig()),
    )


def test_records_append_and_survive_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "r" / "results.jsonl"
    for s in range(3):
        append_record(path, _record(s))
    with path.open("a") as fh:
        fh.write('{"defense": "dnf", "att')  # an append cut short
    recs = read_records(path)
    assert [r.seed for r in recs] == [0, 1, 2]
    assert recs[0] == _record(0)


def test_corrupt_record_in_the_middle_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    append_record(path, _record(0))
    with path.open("a") as fh:
        fh.write("not json\n")
    append_record(path, _record(1))
    with pytest.raises(ArtifactError, match=":2: corrupt"):
        read_records(path)
    with pytest.raises(ArtifactError, match="not found"):
        read_records(tmp_path / "none.jsonl")


def test_unknown_record_keys_are_kept_in_extra() -> None:
    d = json.loads(_record(0).to_json())
    d["future_field"] = 3
    assert ResultRecord.from_dict(d).extra["future_field"] == 3
