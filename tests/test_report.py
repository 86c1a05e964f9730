"""`fortress report`: tables and plots made from hand-written records, checked against values computed here."""

from __future__ import annotations

import csv
import dataclasses
import statistics
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fortress.bench.records import ResultRecord, append_record
from fortress.bench.report import make_report, mean_std
from fortress.cli import app
from fortress.errors import ArtifactError

# clone accuracy per (defense, attack, budget) over seeds 0, 1, 2
CLONE = {
    ("undefended", "dfme", 1000): [0.80, 0.84, 0.86],
    ("undefended", "dfme", 4000): [0.90, 0.92, 0.91],
    ("dnf", "dfme", 1000): [0.20, 0.25, 0.18],
    ("dnf", "dfme", 4000): [0.30, 0.22, 0.26],
    ("undefended", "knockoff", 500): [0.70, 0.72, 0.74],
    ("dnf", "knockoff", 500): [0.40, 0.50, 0.45],
}
DEFENDED = {"undefended": 0.97, "dnf": 0.955}
ID_TIME = {"undefended": 0.10, "dnf": 0.05}  # seconds per 1,000 ID queries
ATTACK_TIME = {"undefended": 0.12, "dnf": 0.03}
HIST_ID = [0.1, 0.1, 0.2, 0.6]


def _hist_attack(seed: int) -> list[float]:
    return [0.5 + 0.1 * seed, 0.1, 0.1, 0.3 - 0.1 * seed]


def _records() -> list[ResultRecord]:
    out = []
    for (defense, attack, budget), accs in CLONE.items():
        for seed, acc in enumerate(accs):
            out.append(
                ResultRecord(
                    defense=defense,
                    attack=attack,
                    dataset="mnist",
                    victim_arch="lenet5",
                    clone_arch="lenet5",
                    budget=budget,
                    queries_used=budget,
                    seed=seed,
                    victim_acc=0.97,
                    defended_acc=DEFENDED[defense],
                    clone_acc=acc,
                    clone_fidelity=acc,
                    exit_hist_id=HIST_ID if defense == "dnf" else [],
                    exit_hist_attack=_hist_attack(seed) if defense == "dnf" else [],
                    defense_s_per_1k_queries=ATTACK_TIME[defense],
                    config={"attack": {"name": attack, "output_mode": "soft", "budget": budget}},
                    extra={"id_s_per_1k_queries": ID_TIME[defense]},
                )
            )
    return out


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    for rec in _records():
        append_record(tmp_path / "results.jsonl", rec)
    return tmp_path


def _pm(values: list[float]) -> str:
    return f"{100 * statistics.fmean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def test_clone_table_holds_mean_and_std_over_seeds(run_dir: Path) -> None:
    rep = make_report(run_dir)
    md = rep.tables["clone_accuracy"][0].read_text()
    assert "| defense | dfme soft @1k | dfme soft @4k | knockoff soft @500 | utility Δ pp | setting |" in md
    for defense in ("undefended", "dnf"):
        row = next(line for line in md.splitlines() if line.startswith(f"| {defense} |"))
        cells = [c.strip() for c in row.strip("|").split("|")][1:4]
        assert cells == [
            _pm(CLONE[(defense, "dfme", 1000)]),
            _pm(CLONE[(defense, "dfme", 4000)]),
            _pm(CLONE[(defense, "knockoff", 500)]),
        ]
    assert md.index("| undefended |") < md.index("| dnf |")  # the reference row first
    with rep.tables["clone_accuracy"][1].open() as fh:
        rows = list(csv.DictReader(fh))
    dnf = next(r for r in rows if r["defense"] == "dnf")
    assert float(dnf["dfme soft @4k mean"]) == pytest.approx(100 * statistics.fmean(CLONE[("dnf", "dfme", 4000)]))
    assert float(dnf["dfme soft @4k std"]) == pytest.approx(
        100 * statistics.stdev(CLONE[("dnf", "dfme", 4000)]), abs=1e-3
    )
    assert dnf["dfme soft @4k n"] == "3"


def test_utility_timing_and_exit_tables(run_dir: Path) -> None:
    rep = make_report(run_dir)
    util = rep.tables["utility"][0].read_text()
    assert "| dnf | 95.50 ± 0.00 | 97.00 | -1.50 |" in util
    timing = rep.tables["timing"][0].read_text()
    # ms per 1k and the ratio to undefended on the same traffic (ID: 50/100; dfme: 30/120)
    assert "| dnf | 50.0 ± 0.0 (×0.50) | 30.0 ± 0.0 (×0.25) | 30.0 ± 0.0 (×0.25) |" in timing
    exits = rep.tables["exits"][0].read_text()
    assert "| ID test | 10.00 | 10.00 | 20.00 | 60.00 |" in exits
    # attack histograms averaged over seeds 0..2: exit 0 = 0.5, 0.6, 0.7 → 60 %, last = 0.3, 0.2, 0.1 → 20 %
    assert "| dfme soft @4k | 60.00 | 10.00 | 10.00 | 20.00 |" in exits
    assert "undefended" not in exits  # no exits, no row


def test_plots_and_combined_markdown(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    out = tmp_path_factory.mktemp("rep")
    rep = make_report(run_dir / "results.jsonl", out)
    names = {p.name for p in rep.plots}
    assert names == {"clone_vs_budget.png", "tradeoff.png", "exits-dnf-mnist-lenet5.png"}
    for p in rep.plots:
        assert p.parent == out and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    doc = rep.markdown.read_text()
    for title in ("Clone accuracy", "Defended utility", "per 1,000 queries", "Exit distribution", "![tradeoff]"):
        assert title in doc
    assert rep.records == sum(len(v) for v in CLONE.values())


def test_report_cli_prints_the_clone_table(run_dir: Path) -> None:
    res = CliRunner().invoke(app, ["report", str(run_dir)])
    assert res.exit_code == 0, res.output
    assert _pm(CLONE[("dnf", "knockoff", 500)]) in res.output and "clone_vs_budget.png" in res.output
    res = CliRunner().invoke(app, ["report", str(run_dir / "missing")])
    assert res.exit_code == 1 and "not found" in res.output


def test_mean_std_and_empty_input(tmp_path: Path) -> None:
    s = mean_std([0.5])
    assert (s.mean, s.std, s.n) == (0.5, 0.0, 1)
    assert mean_std([0.1, 0.3]).pct() == "20.00 ± 14.14"
    (tmp_path / "results.jsonl").write_text("")
    with pytest.raises(ArtifactError, match="no result records"):
        make_report(tmp_path)


def test_clone_architectures_are_separate_columns(run_dir: Path) -> None:
    """Paper Table 7 shape: the same attack against two clone architectures is two columns, not
    one column with both architectures' runs counted as seeds."""
    half = {"undefended": [0.60, 0.64, 0.62], "dnf": [0.10, 0.12, 0.14]}
    for defense, accs in half.items():
        for seed, acc in enumerate(accs):
            twin = next(
                r for r in _records() if (r.defense, r.attack, r.budget, r.seed) == (defense, "dfme", 1000, seed)
            )
            append_record(run_dir / "results.jsonl", dataclasses.replace(twin, clone_arch="lenet5-half", clone_acc=acc))
    md = make_report(run_dir).tables["clone_accuracy"][0].read_text()
    header = next(line for line in md.splitlines() if line.startswith("| defense |"))
    assert "dfme soft @1k |" in header and "dfme soft @1k → lenet5-half |" in header
    cols = [c.strip() for c in header.strip("|").split("|")]
    for defense in ("undefended", "dnf"):
        row = next(line for line in md.splitlines() if line.startswith(f"| {defense} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[cols.index("dfme soft @1k")] == _pm(CLONE[(defense, "dfme", 1000)])
        assert cells[cols.index("dfme soft @1k → lenet5-half")] == _pm(half[defense])


def test_protection_table_gives_ratios_to_undefended_and_marks_the_lowest(run_dir: Path) -> None:
    rep = make_report(run_dir)
    md = rep.tables["protection"][0].read_text()
    dnf = next(line for line in md.splitlines() if line.startswith("| dnf |"))
    cells = [c.strip() for c in dnf.strip("|").split("|")]
    assert cells[1] == f"{100 * (DEFENDED['dnf'] - 0.97):+.2f} ⚠"  # loses more than 0.5 points: marked
    ratio = statistics.fmean(CLONE[("dnf", "dfme", 4000)]) / statistics.fmean(CLONE[("undefended", "dfme", 4000)])
    assert f"**{ratio:.2f}× ({100 * statistics.fmean(CLONE[('dnf', 'dfme', 4000)]):.1f})**" in cells
    undefended = next(line for line in md.splitlines() if line.startswith("| undefended |"))
    assert "1.00×" in undefended and "**" not in undefended and "✓" not in undefended
    # dnf loses 1.5 points of utility here: lowest overall, but not among the defenses that keep utility
    assert not any(c.endswith("✓") for c in cells)
    with rep.tables["protection"][1].open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["defense"] == "dnf" and r["column"] == "dfme soft @4k"]
    assert float(rows[0]["x_undefended"]) == pytest.approx(ratio)
    assert rows[0]["lowest"] == "True" and rows[0]["lowest_keeping_utility"] == "False"


def test_protection_marks_the_lowest_defense_that_keeps_utility(run_dir: Path) -> None:
    """A defense that wrecks utility may clone-proof the model; ✓ marks the best one that does not."""
    recs = _records()
    wreck = [
        dataclasses.replace(r, defense="wreck", defended_acc=0.0, clone_acc=0.01)
        for r in recs
        if r.defense == "undefended"
    ]
    keep = [dataclasses.replace(r, defense="dnf", defended_acc=0.968) for r in recs if r.defense == "dnf"]
    path = run_dir / "other" / "results.jsonl"
    for r in [r for r in recs if r.defense == "undefended"] + wreck + keep:
        append_record(path, r)
    md = make_report(path.parent).tables["protection"][0].read_text()
    dnf = next(line for line in md.splitlines() if line.startswith("| dnf |"))
    wrecked = next(line for line in md.splitlines() if line.startswith("| wreck |"))
    assert wrecked.count("**") == 2 * 3 and "✓" not in wrecked  # lowest in every column, utility gone
    assert dnf.count("✓") == 3 and "**" not in dnf


def test_matched_and_paper_budget_settings_sit_beside_the_clone_accuracy(run_dir: Path) -> None:
    base = next(r for r in _records() if r.defense == "undefended")
    matched = {"parameter": "epsilon", "value": 0.40625, "target": {"max_drop": 0.5, "measure": "accuracy"}}
    for label, extra, defended in (("randp-l1", {}, 0.2), ("randp-matched", {"utility_match": matched}, 0.967)):
        eps = 1.0 if not extra else 0.40625
        cfg = {**base.config, "defense": {"epsilon": eps}, "cell": {"defense": {"name": "randp"}}}
        append_record(
            run_dir / "results.jsonl",
            dataclasses.replace(base, defense=label, defended_acc=defended, config={**cfg, **extra}),
        )
    md = make_report(run_dir).tables["clone_accuracy"][0].read_text()
    l1 = next(line for line in md.splitlines() if line.startswith("| randp-l1 |"))
    assert l1.endswith("| -77.00 ⚠ | paper budget ℓ1 = 1 |")
    fair = next(line for line in md.splitlines() if line.startswith("| randp-matched |"))
    assert fair.endswith("| -0.30 | matched utility (≤ 0.5 pp lost): epsilon = 0.406 |")
    util = make_report(run_dir).tables["utility"][0].read_text()
    assert "| randp-l1 | 20.00 ± 0.00 | 97.00 | -77.00 | ⚠ no | paper budget ℓ1 = 1 |" in util
    # the headline table compares at matched utility: the ℓ1 row of a defense that also ran matched is named below it
    headline = make_report(run_dir).tables["protection"][0].read_text()
    assert "| randp-matched |" in headline and "| randp-l1 |" not in headline
    assert "shown in the clone accuracy table only: randp-l1." in headline


def test_an_attack_run_with_two_pools_gets_two_columns(run_dir: Path) -> None:
    for rec in _records():
        if rec.attack == "knockoff":
            append_record(
                run_dir / "results.jsonl",
                dataclasses.replace(rec, clone_acc=0.01, config={**rec.config, "pool": "mnist"}),
            )
    md = make_report(run_dir).tables["clone_accuracy"][0].read_text()
    header = next(line for line in md.splitlines() if line.startswith("| defense |"))
    assert "knockoff[mnist] soft @500" in header and "knockoff[None] soft @500" in header
    row = next(line for line in md.splitlines() if line.startswith("| dnf |"))
    assert "1.00 ± 0.00" in row  # the digit-pool runs are not averaged with the others


def test_training_seed_table_gives_the_spread_over_builds(tmp_path: Path) -> None:
    """Clone accuracy per training seed (mean over attack seeds), mean, std, median, worst, worst/median."""
    per_seed = {0: [0.10, 0.14], 1: [0.20, 0.18], 2: [0.50, 0.46], 3: [0.12, 0.16]}
    base = _records()[0]
    for tseed, accs in per_seed.items():
        for aseed, acc in enumerate(accs):
            rec = dataclasses.replace(
                base,
                defense="dnf",
                seed=aseed,
                clone_acc=acc,
                defended_acc=0.97 - 0.001 * tseed,
                extra={**base.extra, "defense_seed": tseed},
            )
            append_record(tmp_path / "results.jsonl", rec)
    for aseed in (0, 1):  # the undefended victim has no training seed: no spread row
        append_record(tmp_path / "results.jsonl", dataclasses.replace(base, seed=aseed, extra={"defense_seed": None}))
    rep = make_report(tmp_path)
    md = rep.tables["training_seeds"][0].read_text()
    means = [statistics.fmean(v) for v in per_seed.values()]
    med = statistics.median(means)
    row = next(line for line in md.splitlines() if line.startswith("| dnf "))
    assert "0: 12.0 · 1: 19.0 · 2: 48.0 · 3: 14.0" in row
    assert _pm(means) in row and f"{100 * med:.2f}" in row and f"{100 * max(means):.2f}" in row
    assert f"| {max(means) / med:.2f} |" in row and "| -0.30 |" in row  # worst utility: seed 3, -0.3 pp
    assert not any(line.startswith("| undefended ") for line in md.splitlines())
    with rep.tables["training_seeds"][1].open() as fh:
        (csv_row,) = list(csv.DictReader(fh))
    assert csv_row["train_seeds"] == "4" and float(csv_row["worst_over_median"]) == pytest.approx(max(means) / med)
    # the other tables pool every (attack seed, training seed) run of a label
    clone_md = rep.tables["clone_accuracy"][0].read_text()
    assert _pm([a for v in per_seed.values() for a in v]) in clone_md


def test_training_seed_of_records_without_it_comes_from_their_cell(tmp_path: Path) -> None:
    base = _records()[0]
    for tseed, acc in ((0, 0.1), (1, 0.3)):
        params = {} if tseed == 0 else {"train": {"seed": 1}, "ood": {"seed": 1}}
        cell = {"defense": {"name": "dnf", "label": None, "params": params}}
        append_record(
            tmp_path / "results.jsonl",
            dataclasses.replace(base, defense="dnf", clone_acc=acc, config={**base.config, "cell": cell}, extra={}),
        )
    md = make_report(tmp_path).tables["training_seeds"][0].read_text()
    assert "0: 10.0 · 1: 30.0" in md


def test_one_build_per_defense_gives_no_spread_rows(run_dir: Path) -> None:
    md = make_report(run_dir).tables["training_seeds"][0].read_text()
    assert "built with one training seed" in md


# clone accuracy per (defense, strategy, variant) over seeds 0, 1, 2
VARIANTS = {
    ("undefended", "knockoff-random", "naive"): [0.80, 0.82, 0.84],
    ("undefended", "knockoff-random", "top-1"): [0.70, 0.72, 0.74],
    ("mad", "knockoff-random", "naive"): [0.30, 0.32, 0.34],
    ("mad", "knockoff-random", "D-DAE"): [0.50, 0.40, 0.60],
    ("mad", "knockoff-random", "top-1"): [0.01, 0.02, 0.03],
    ("mad", "jbda-tr", "naive"): [0.20, 0.20, 0.20],
}


def _variant_records() -> list[ResultRecord]:
    out = []
    for (defense, strategy, variant), accs in VARIANTS.items():
        for seed, acc in enumerate(accs):
            name = "jbda" if strategy == "jbda-tr" else "knockoff"
            cell = {"strategy": strategy, "variant": variant, "attack": {"name": name}}
            out.append(
                ResultRecord(
                    defense=defense,
                    attack=f"{strategy}/{variant}",
                    dataset="mnist",
                    victim_arch="lenet5",
                    clone_arch="lenet5",
                    budget=3000,
                    queries_used=3000,
                    seed=seed,
                    victim_acc=0.97,
                    defended_acc=0.97 if defense == "undefended" else 0.966,
                    clone_acc=acc,
                    clone_fidelity=acc,
                    config={"attack": {"name": name, "output_mode": "soft"}, "cell": cell},
                )
            )
    # a record of an attack the grid gave no strategy or variant: not in the table
    out.append(dataclasses.replace(out[0], attack="dfme", clone_acc=0.99, config={"attack": {"name": "dfme"}}))
    return out


def _write(path: Path, records: list[ResultRecord]) -> Path:
    for r in records:
        append_record(path, r)
    return path.parent


def test_worst_variant_table_takes_the_highest_mean_over_variants_per_defense_and_strategy(tmp_path: Path) -> None:
    rep = make_report(_write(tmp_path / "results.jsonl", _variant_records()))
    md_path, csv_path = rep.tables["worst_variant"]
    with csv_path.open() as fh:
        rows = {(r["defense"], r["strategy"]): r for r in csv.DictReader(fh)}
    assert set(rows) == {("undefended", "knockoff-random"), ("mad", "knockoff-random"), ("mad", "jbda-tr")}
    mad = rows[("mad", "knockoff-random")]
    assert mad["worst_variant"] == "D-DAE" and int(mad["variants"]) == 3
    assert float(mad["worst_clone_acc"]) == pytest.approx(50.0)
    assert float(mad["worst_clone_acc_std"]) == pytest.approx(100 * statistics.stdev([0.5, 0.4, 0.6]))
    assert float(mad["utility_delta_pp"]) == pytest.approx(-0.4)
    assert rows[("undefended", "knockoff-random")]["worst_variant"] == "naive"
    assert rows[("mad", "jbda-tr")]["worst_variant"] == "naive" and int(rows[("mad", "jbda-tr")]["variants"]) == 1
    md = md_path.read_text()
    assert "| mad | -0.40 | 20.00 ± 0.00 (naive) | naive 20.0 |" in md  # jbda-tr sorts before knockoff-random
    assert "50.00 ± 10.00 (D-DAE) | naive 32.0 · D-DAE 50.0 · top-1 2.0 |" in md
    assert "dfme" not in md


def test_worst_variant_table_says_when_no_record_names_a_variant(tmp_path: Path) -> None:
    rep = make_report(_write(tmp_path / "results.jsonl", _records()))
    assert "No record names a query strategy" in rep.tables["worst_variant"][0].read_text()
    assert "Worst attacker variant" not in rep.markdown.read_text()  # an empty table stays out of report.md


def test_worst_variant_table_names_the_runs_of_a_variant_with_fewer_seeds(tmp_path: Path) -> None:
    recs = [r for r in _variant_records() if not (r.defense == "mad" and r.attack.endswith("D-DAE") and r.seed > 0)]
    md = make_report(_write(tmp_path / "results.jsonl", recs)).tables["worst_variant"][0].read_text()
    assert "50.00 ± 0.00 (D-DAE, n=1)" in md and "82.00 ± 2.00 (naive) |" in md
