"""The console tables, rendered to text without the CLI: every figure lands in its column, formatted."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console
from rich.table import Table

from fortress.bench.records import ResultRecord
from fortress.bench.speed import DefenseCost, SpeedSuite
from fortress.bench.tables import (
    RECORD_COLUMNS,
    exit_hist,
    key_profile_lines,
    keys_table,
    percent,
    records_table,
    speed_tables,
    timing_table,
)
from fortress.bench.timing import ExitInference, ModeTiming, TimingReport
from fortress.serve.keys import KeyStore


def render(table: Table) -> str:
    out = io.StringIO()
    Console(file=out, width=250, color_system=None).print(table)
    return out.getvalue()


def cells(table: Table) -> list[list[str]]:
    """Rows of cell texts (column by column, as added)."""
    columns = [[str(c) for c in col.cells] for col in table.columns]
    return [list(row) for row in zip(*columns, strict=True)]


def record(**kw: object) -> ResultRecord:
    base: dict[str, object] = {
        "defense": "dnf",
        "attack": "dfme",
        "dataset": "mnist",
        "victim_arch": "lenet5",
        "clone_arch": "lenet5",
        "budget": 150_000,
        "queries_used": 149_760,
        "seed": 3,
        "victim_acc": 0.99,
        "defended_acc": 0.9871,
        "clone_acc": 0.2345,
        "clone_fidelity": 0.25,
        "exit_hist_id": [0.02, 0.08, 0.9],
        "exit_hist_attack": [0.775, 0.2, 0.025],
        "clone_acc_best": 0.31,
    }
    return ResultRecord(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(("v", "text"), [(0.97125, "97.12"), (1.0, "100.00"), (0.0, "0.00"), (None, "—")])
def test_percent(v: float | None, text: str) -> None:
    assert percent(v) == text


@pytest.mark.parametrize(("h", "text"), [([0.8, 0.15, 0.05], "80/15/5"), ([1.0], "100"), ([], "—")])
def test_exit_hist(h: list[float], text: str) -> None:
    assert exit_hist(h) == text


def test_records_table_puts_each_figure_in_its_column() -> None:
    table = records_table([record(), record(defense="undefended", exit_hist_attack=[], clone_acc=None)], "t")
    assert [c.header for c in table.columns] == list(RECORD_COLUMNS)
    dnf, undefended = cells(table)
    assert dnf == ["dnf", "dfme", "3", "150,000", "149,760", "23.45", "31.00", "25.00", "98.71", "78/20/2 (2/8/90)"]
    assert undefended[0] == "undefended" and undefended[5] == "—" and undefended[-1] == "—"
    assert [c.justify for c in table.columns[:3]] == ["left", "left", "right"]
    text = render(table)
    assert "t" in text and "78/20/2 (2/8/90)" in text


def test_speed_tables_ratio_per_traffic_and_forward_only_when_timed() -> None:
    suite = SpeedSuite(batch_size=256, repeats=5, threads=2)
    suite.costs = [
        DefenseCost("undefended", "id_test", 10.0, 1.0),
        DefenseCost("undefended", "noise", 12.0, 1.0),
        DefenseCost("dnf", "id_test", 25.04, 2.504),
        DefenseCost("dnf", "noise", 18.0, None),
    ]
    [cost] = speed_tables(suite)
    assert [c.header for c in cost.columns] == ["defense", "id_test", "noise"]
    assert cells(cost) == [["undefended", "10.0 (×1.00)", "12.0 (×1.00)"], ["dnf", "25.0 (×2.50)", "18.0"]]
    assert "batch 256, 2 thr." in str(cost.title)
    suite.forward = [
        {
            "defense": "dnf",
            "traffic": "noise",
            "all_ms": 3.0,
            "dynamic_ms": 1.5,
            "speedup": 2.0,
            "exit_hist": [0.9, 0.1],
        }
    ]
    _, fwd = speed_tables(suite)
    assert cells(fwd) == [["dnf", "noise", "3.00", "1.50", "2.00", "90/10"]]


def test_timing_table_has_a_latency_column_per_exit_seen() -> None:
    def mode(name: str, by_exit: dict[int, dict[str, float]], cpu: float | None) -> ModeTiming:
        return ModeTiming(
            mode=name,
            early=ExitInference(0.9, 0.5, 10, 10),
            exit_index=ExitInference(0.75, 0.4, 10, 10),
            latency_by_exit=by_exit,
            images_per_s=12_345.6,
            server_cpu_ms_per_1k=cpu,
            p50_ms_batch=1.0,
            errors=0,
        )

    rep = TimingReport(
        modes=[
            mode("dynamic", {0: {"p50_ms": 0.5}, 2: {"p50_ms": 1.25}}, 80.4),
            mode("full", {1: {"p50_ms": 2}}, None),
        ],
        queries=600,
        exit_hist=[300, 100, 200],
        batch=64,
        concurrency=4,
        requests=100,
        threads=1,
        workers=2,
        seed=0,
    )
    table = timing_table(rep)
    headers = [c.header for c in table.columns]
    assert headers[5:8] == ["exit 0 p50 ms", "exit 1 p50 ms", "exit 2 p50 ms"]
    dynamic, full = cells(table)
    assert dynamic == ["dynamic", "90.0%", "50.0%", "75.0%", "40.0%", "0.50", "—", "1.25", "12,346", "80"]
    assert full[5:] == ["—", "2.00", "—", "12,346", "—"]


def test_keys_table_and_profile_lines_from_a_real_ledger(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    store = KeyStore(path, create=True)
    try:
        alice, secret = store.add("alice", budget=1_000)
        store.add("bob", output_mode="topk", top_k=3, admin=True)
        store.charge(alice.key_id, 250)
        keys = store.list_keys()
        alice = store.get(alice.key_id)
    finally:
        store.close()
    table = keys_table(keys, path)
    assert str(path) in str(table.title)
    rows = {row[1]: row for row in cells(table)}
    assert rows["alice"][2:7] == ["1,000", "250", "750", "soft", ""]
    assert rows["bob"][2:7] == ["∞", "0", "∞", "top3", "yes"]
    assert secret not in render(table)

    assert key_profile_lines(alice, None) == [
        f"key {alice.key_id} ('alice'): used 250, left 750",
        "no query profile yet",
    ]
    stored = {
        "profile": {
            "queries": 1_200,
            "exit_hist": [0.5, 0.25, 0.25],
            "entropy": {"mean": 0.1234, "std": 0.05},
            "confidence": {"mean": 0.9, "std": 0.01},
        },
        "monitor": "exit-sprt",
        "flagged_at": 1_100,
        "updated_at": "2025-01-01T00:00:00+00:00",
    }
    lines = key_profile_lines(alice, stored)
    assert lines[1] == (
        "profile: 1,200 queries; exits (%) 50.0/25.0/25.0; entropy 0.123 ± 0.050; confidence 0.900 ± 0.010"
    )
    assert lines[2] == "monitor exit-sprt: flagged at query 1,100 (updated 2025-01-01T00:00:00+00:00)"
    assert key_profile_lines(alice, {**stored, "flagged_at": None})[2].startswith("monitor exit-sprt: not flagged")
    assert len(key_profile_lines(alice, {**stored, "monitor": None})) == 2
