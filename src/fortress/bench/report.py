"""``fortress report DIR``: the paper's tables and plots, made from the result records alone.

Tables (each as Markdown and CSV, one section per data set × victim architecture):

* ``clone_accuracy`` — clone accuracy (%) per defense × attack (output mode, budget, and the clone
  architecture where it is not the victim's), mean ± std over seeds (paper Tables 1, 2, 7, 17), with
  each defense's utility change and its setting beside it (a perturbation defense matched to a
  utility, or at the paper's ℓ1 budget); ⚠ marks a defense that loses more than 0.5 points;
* ``protection`` — each defense's clone accuracy as a fraction of the undefended clone's at the same
  attack and budget, the lowest per column marked, next to the defense's utility change: the paper's
  claims ("lowest clone accuracy", "utility kept") checked at a glance;
* ``worst_variant`` — for grids that name each attack's query strategy and attacker variant: each
  defense's worst variant per strategy, the highest mean clone accuracy over the variants
  (ModelGuard's side-by-side table, :mod:`fortress.bench.variants`), every variant's mean beside it;
* ``utility`` — defended ID accuracy (%) and its change against the victim (paper Table 4);
* ``timing`` — the defense's seconds per 1,000 queries on ID test and attack traffic, and the ratio to
  ``undefended`` (paper Table 11);
* ``exits`` — the exit distribution (%) of ID test queries and of each attack's queries (paper Table 12);
* ``training_seeds`` — for a defense built with several training seeds (a grid's ``train_seeds``):
  clone accuracy per training seed (mean over attack seeds), their mean, std, median and worst, the
  worst over the median, and the worst utility change: how much the protection depends on the luck
  of one training run.

Plots: ``clone_vs_budget.png`` (clone accuracy against query budget per defense), ``tradeoff.png``
(defended utility vs clone accuracy) and ``exits-<...>.png`` (exit histograms, ID vs attack).

The std is the sample standard deviation over seeds (0 with one seed). A defense built with several
training seeds pools every (attack seed, training seed) run in the other tables.
"""

from __future__ import annotations

import csv
import dataclasses
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fortress.bench.plots import Series, plot_clone_vs_budget, plot_exit_distribution, plot_tradeoff
from fortress.bench.records import ResultRecord, read_records
from fortress.bench.variants import worst_variants
from fortress.errors import ArtifactError, FortressError

__all__ = ["Report", "Stat", "make_report", "mean_std", "write_report"]

Section = tuple[str, str]  # (dataset, victim_arch)
Column = tuple[str, str, int, str]  # (attack, output mode, budget, clone arch or "" for the victim's)


@dataclass(frozen=True)
class Stat:
    """Mean, sample std and count of a list of values."""

    mean: float
    std: float
    n: int

    def pct(self, *, show_n: bool = False) -> str:
        """``"12.34 ± 0.56"`` in percent (values are fractions)."""
        text = f"{100 * self.mean:.2f} ± {100 * self.std:.2f}"
        return f"{text} (n={self.n})" if show_n else text


def mean_std(values: Iterable[float]) -> Stat:
    """Mean and sample standard deviation (0 for a single value).

    Example:
        >>> mean_std([0.1, 0.3]).pct()
        '20.00 ± 14.14'
    """
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_std needs at least one value")
    return Stat(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals))


@dataclass
class Report:
    """The files :func:`make_report` wrote.

    Attributes:
        out: the report directory.
        markdown: ``report.md`` (every table).
        tables: table name → ``(markdown path, csv path)``.
        plots: every PNG written.
        records: number of records read.
    """

    out: Path
    markdown: Path
    tables: dict[str, tuple[Path, Path]] = field(default_factory=dict)
    plots: list[Path] = field(default_factory=list)
    records: int = 0


# -- record fields --------------------------------------------------------------------------------


def _mode(r: ResultRecord) -> str:
    attack = r.config.get("attack")
    return str(attack.get("output_mode", "soft")) if isinstance(attack, dict) else "soft"


def _section(r: ResultRecord) -> Section:
    return (r.dataset, r.victim_arch)


def _clone(r: ResultRecord) -> str:
    """The clone architecture where it differs from the victim's, else ``""``."""
    return "" if not r.clone_arch or r.clone_arch == r.victim_arch else r.clone_arch


def _column(r: ResultRecord) -> Column:
    return (r.attack, _mode(r), r.budget, _clone(r))


def _attack_label(attack: str, mode: str, clone: str) -> str:
    return f"{attack} ({mode})" + (f", clone {clone}" if clone else "")


def _budget(b: int) -> str:
    for unit, div in (("M", 1_000_000), ("k", 1_000)):
        if b >= div and b % (div // 10) == 0:
            v = b / div
            return f"{v:g}{unit}"
    return str(b)


def _col_name(c: Column) -> str:
    return f"{c[0]} {c[1]} @{_budget(c[2])}" + (f" → {c[3]}" if c[3] else "")


def _ordered(values: Iterable[str], first: str = "undefended") -> list[str]:
    seen = list(dict.fromkeys(values))
    return sorted(seen, key=lambda v: (v != first, seen.index(v)))


# -- tables ---------------------------------------------------------------------------------------


@dataclass
class _Table:
    name: str
    title: str
    md: list[str] = field(default_factory=list)
    csv_header: list[str] = field(default_factory=list)
    csv_rows: list[list[Any]] = field(default_factory=list)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def _by_section(records: Sequence[ResultRecord]) -> dict[Section, list[ResultRecord]]:
    groups: dict[Section, list[ResultRecord]] = defaultdict(list)
    for r in records:
        groups[_section(r)].append(r)
    return dict(sorted(groups.items()))


def _pivot(
    records: Sequence[ResultRecord], col: Callable[[ResultRecord], Any], value: Callable[[ResultRecord], float | None]
) -> dict[tuple[str, Any], Stat]:
    acc: dict[tuple[str, Any], list[float]] = defaultdict(list)
    for r in records:
        v = value(r)
        if v is not None:
            acc[(r.defense, col(r))].append(v)
    return {k: mean_std(v) for k, v in acc.items()}


#: A defense "keeps utility" when its defended ID accuracy is within this many points of the victim's
#: (the paper's bar for DNF, and the threshold search's default tolerance).
UTILITY_TOLERANCE_PP = 0.5
#: Defenses whose strength is an output-space ℓ1 budget ``epsilon`` (the paper's setting: 1.0).
_L1_BUDGET = frozenset({"randp", "mad", "mad-argmax", "grad2"})


def _registry_name(r: ResultRecord) -> str:
    cell = r.config.get("cell")
    defense = cell.get("defense") if isinstance(cell, dict) else None
    return str(defense.get("name", r.defense)) if isinstance(defense, dict) else r.defense


def _setting(r: ResultRecord) -> str:
    """How a perturbation defense's strength was set: matched to a utility, or the paper's ℓ1 budget."""
    match = r.config.get("utility_match")
    if isinstance(match, dict):
        target = match.get("target", {})
        what = "top-1 kept" if target.get("measure") == "top1" else f"≤ {target.get('max_drop', 0.5):g} pp lost"
        return f"matched utility ({what}): {match.get('parameter')} = {float(match.get('value', 0.0)):.3g}"
    hp = r.config.get("defense")
    if isinstance(hp, dict) and _registry_name(r) in _L1_BUDGET and "epsilon" in hp:
        return f"paper budget ℓ1 = {float(hp['epsilon']):g}"
    return ""


def _utility_delta(recs: Sequence[ResultRecord], defense: str) -> float:
    """Mean defended − victim ID accuracy of ``defense``, in percentage points."""
    return 100 * statistics.fmean(r.defended_acc - r.victim_acc for r in recs if r.defense == defense)


def _delta_text(delta: float) -> str:
    return f"{delta:+.2f}" + (" ⚠" if delta < -UTILITY_TOLERANCE_PP else "")


def _clone_table(records: Sequence[ResultRecord]) -> _Table:
    t = _Table(
        "clone_accuracy",
        "Clone accuracy (%), mean ± std over seeds; the defense's utility change on ID test data (pp; "
        f"⚠: loses more than {UTILITY_TOLERANCE_PP} pp) and its setting beside it",
    )
    all_cols: list[Column] = sorted({_column(r) for r in records})
    t.csv_header = ["dataset", "victim_arch", "defense"]
    for c in all_cols:
        t.csv_header += [f"{_col_name(c)} mean", f"{_col_name(c)} std", f"{_col_name(c)} n"]
    t.csv_header += ["utility_delta_pp", "loses_utility", "setting"]
    for (dataset, arch), recs in _by_section(records).items():
        cols = sorted({_column(r) for r in recs})
        stats = _pivot(recs, _column, lambda r: r.clone_acc)
        n_max = max((s.n for s in stats.values()), default=0)
        rows: list[list[str]] = []
        for d in _ordered(r.defense for r in recs):
            row = [d]
            csv_row: list[Any] = [dataset, arch, d]
            for c in all_cols:
                s = stats.get((d, c))
                if c in cols:
                    row.append("—" if s is None else s.pct(show_n=s.n != n_max))
                csv_row += ["", "", ""] if s is None else [round(100 * s.mean, 4), round(100 * s.std, 4), s.n]
            delta = _utility_delta(recs, d)
            setting = next((x for x in (_setting(r) for r in recs if r.defense == d) if x), "")
            row += [_delta_text(delta), setting]
            csv_row += [round(delta, 4), delta < -UTILITY_TOLERANCE_PP, setting]
            rows.append(row)
            t.csv_rows.append(csv_row)
        t.md += [f"### {dataset}, victim {arch} ({n_max} seeds)", ""]
        t.md += [*_md_table(["defense", *(_col_name(c) for c in cols), "utility Δ pp", "setting"], rows), ""]
    return t


def _lowest(stats: dict[tuple[str, Any], Stat], col: Column, among: set[str]) -> float | None:
    """The lowest mean in column ``col`` among the defenses ``among`` (``undefended`` excluded)."""
    vals = [s.mean for (d, c), s in stats.items() if c == col and d != "undefended" and d in among]
    return min(vals, default=None)


def _protection_table(records: Sequence[ResultRecord]) -> _Table:
    t = _Table(
        "protection",
        "Protection: clone accuracy as a fraction of the undefended clone's (× undefended, lower is better) "
        f"and the defense's utility change (pp; ⚠: loses more than {UTILITY_TOLERANCE_PP} pp). **Bold**: lowest in "
        f"its column; ✓: lowest among the defenses that keep utility (within {UTILITY_TOLERANCE_PP} pp of the victim)",
    )
    t.csv_header = [
        "dataset",
        "victim_arch",
        "defense",
        "utility_delta_pp",
        "column",
        "clone_acc",
        "x_undefended",
        "lowest",
        "lowest_keeping_utility",
    ]
    for (dataset, arch), recs in _by_section(records).items():
        cols = sorted({_column(r) for r in recs})
        stats = _pivot(recs, _column, lambda r: r.clone_acc)
        delta = {
            d: 100 * statistics.fmean(r.defended_acc - r.victim_acc for r in recs if r.defense == d)
            for d in {r.defense for r in recs}
        }
        hidden = _paper_budget_rows_with_a_matched_twin(recs)
        for d in hidden:
            del delta[d]
        keeps = {d for d, v in delta.items() if v >= -UTILITY_TOLERANCE_PP}

        best = {c: _lowest(stats, c, set(delta)) for c in cols}
        best_kept = {c: _lowest(stats, c, keeps) for c in cols}
        rows: list[list[str]] = []
        for d in _ordered(r.defense for r in recs if r.defense not in hidden):
            row = [d, _delta_text(delta[d])]
            for c in cols:
                s, base = stats.get((d, c)), stats.get(("undefended", c))
                if s is None or base is None or base.mean <= 0:
                    row.append("—")
                    continue
                ratio = s.mean / base.mean
                is_best = d != "undefended" and s.mean == best[c]
                is_kept = d != "undefended" and d in keeps and s.mean == best_kept[c]
                text = f"{ratio:.2f}× ({100 * s.mean:.1f})"
                row.append((f"**{text}**" if is_best else text) + (" ✓" if is_kept else ""))
                t.csv_rows.append([dataset, arch, d, delta[d], _col_name(c), 100 * s.mean, ratio, is_best, is_kept])
            rows.append(row)
        t.md += [f"### {dataset}, victim {arch}", ""]
        t.md += [*_md_table(["defense", "utility Δ pp", *(_col_name(c) for c in cols)], rows), ""]
        if hidden:
            names = ", ".join(sorted(hidden))
            t.md += [f"Set to the paper's ℓ1 budget and shown in the clone accuracy table only: {names}.", ""]
    return t


def _worst_variant_table(records: Sequence[ResultRecord]) -> _Table:
    t = _Table(
        "worst_variant",
        "Worst attacker variant: for each defense and query strategy, the highest clone accuracy (%, mean ± std "
        "over seeds; n: runs, where fewer than the most in the section) over the attacker variants that ran "
        "against it, that variant's name, and every variant's mean; the defense's utility change (pp) beside it",
    )
    t.csv_header = [
        "dataset",
        "victim_arch",
        "defense",
        "strategy",
        "output_mode",
        "budget",
        "clone_arch",
        "worst_variant",
        "worst_clone_acc",
        "worst_clone_acc_std",
        "variants",
        "per_variant",
        "utility_delta_pp",
    ]
    found = worst_variants(records)
    for (dataset, arch), recs in _by_section(records).items():
        mine = [w for w in found if (w.dataset, w.victim_arch) == (dataset, arch)]
        if not mine:
            continue
        cols = sorted({(w.strategy, w.output_mode, w.budget, w.clone_arch) for w in mine})
        table = {(w.defense, (w.strategy, w.output_mode, w.budget, w.clone_arch)): w for w in mine}
        n_max = max(n for w in mine for _, _, n in w.variants.values())
        rows: list[list[str]] = []
        for d in _ordered(w.defense for w in mine):
            delta = _utility_delta(recs, d)
            row = [d, _delta_text(delta)]
            for c in cols:
                w = table.get((d, c))
                if w is None:
                    row += ["—", "—"]
                    continue
                mean, std, n = w.variants[w.worst]
                runs = "" if n == n_max else f", n={n}"
                row.append(f"{100 * mean:.2f} ± {100 * std:.2f} ({w.worst}{runs})")
                row.append(" · ".join(f"{v} {100 * m:.1f}" for v, (m, _, _) in w.variants.items()))
                per = ";".join(f"{v}:{100 * m:.4f}" for v, (m, _, _) in w.variants.items())
                t.csv_rows.append(
                    [
                        dataset,
                        arch,
                        d,
                        *c,
                        w.worst,
                        round(100 * mean, 4),
                        round(100 * std, 4),
                        len(w.variants),
                        per,
                        round(delta, 4),
                    ]
                )
            rows.append(row)
        header = ["defense", "utility Δ pp"]
        for strategy, mode, budget, clone in cols:
            name = f"{strategy} ({mode}) @{_budget(budget)}" + (f" → {clone}" if clone else "")
            header += [f"{name}: worst variant", f"{name}: every variant"]
        t.md += [f"### {dataset}, victim {arch}", "", *_md_table(header, rows), ""]
    if not t.csv_rows:
        t.md += ["No record names a query strategy and attacker variant (a grid's `strategy` / `variant`).", ""]
    return t


def _loop_table(records: Sequence[ResultRecord]) -> _Table:
    t = _Table(
        "closed_loop",
        "Closed loop: DNF + monitor + response rows (a grid defense with a `monitor` table). Per attack: the "
        "clone accuracy (%, mean over seeds) against the row, against undefended and against the plain DNF row "
        "with the same build where the grid has one; keys flagged of keys used; the attacker's query index of "
        "the first flag (median over seeds; — : never); whether a benign key replaying the ID test split was "
        "flagged",
    )
    t.csv_header = [
        "dataset",
        "victim_arch",
        "defense",
        "attack",
        "output_mode",
        "budget",
        "clone_arch",
        "monitor",
        "keys",
        "clone_acc",
        "undefended_clone_acc",
        "dnf_clone_acc",
        "ratio_to_undefended",
        "keys_flagged_mean",
        "first_flag_median",
        "runs_flagged",
        "runs",
        "benign_test_key_flagged",
    ]
    for (dataset, arch), recs in _by_section(records).items():
        loops = [r for r in recs if isinstance(r.extra.get("monitor"), dict)]
        if not loops:
            continue
        artifacts = {r.config.get("defense_artifact") for r in loops}
        plain = {
            r.defense
            for r in recs
            if r.config.get("defense_artifact") in artifacts and not isinstance(r.extra.get("monitor"), dict)
        }
        rows: list[list[str]] = []
        for d in _ordered(r.defense for r in loops):
            mine = [r for r in loops if r.defense == d]
            spec = (mine[0].config.get("cell") or {}).get("defense", {}).get("monitor") or {}
            for col in sorted({_column(r) for r in mine}):
                runs = [r for r in mine if _column(r) == col and r.clone_acc is not None]
                if not runs:
                    continue
                acc = statistics.fmean(float(r.clone_acc or 0.0) for r in runs)
                same = [r for r in recs if _column(r) == col and r.clone_acc is not None]
                und = [float(r.clone_acc or 0.0) for r in same if r.defense == "undefended"]
                base = [float(r.clone_acc or 0.0) for r in same if r.defense in plain]
                und_m = statistics.fmean(und) if und else None
                base_m = statistics.fmean(base) if base else None
                mons = [r.extra["monitor"] for r in runs]
                firsts = [m["first_flag"] for m in mons if m.get("first_flag") is not None]
                first = statistics.median(firsts) if firsts else None
                flagged = statistics.fmean(m.get("keys_flagged", 0) for m in mons)
                keys = int(mons[0].get("keys", 1))
                benign = sum(1 for m in mons if (m.get("id_test") or {}).get("flagged_at") is not None)
                ratio = None if not und_m else acc / und_m
                rows.append(
                    [
                        d,
                        _col_name(col),
                        str(spec.get("monitor", "")),
                        f"{flagged:.1f} / {keys}",
                        "—" if first is None else f"{first:,.0f}",
                        f"{100 * acc:.2f}",
                        "—" if base_m is None else f"{100 * base_m:.2f}",
                        "—" if und_m is None else f"{100 * und_m:.2f}",
                        "—" if ratio is None else f"{ratio:.2f}×",
                        f"{benign} / {len(runs)}",
                    ]
                )
                t.csv_rows.append(
                    [
                        dataset,
                        arch,
                        d,
                        *col,
                        spec.get("monitor", ""),
                        keys,
                        round(100 * acc, 4),
                        None if und_m is None else round(100 * und_m, 4),
                        None if base_m is None else round(100 * base_m, 4),
                        None if ratio is None else round(ratio, 4),
                        round(flagged, 4),
                        first,
                        len(firsts),
                        len(runs),
                        benign,
                    ]
                )
        header = [
            "defense",
            "attack",
            "monitor",
            "keys flagged",
            "first flag (query)",
            "clone acc %",
            "plain DNF %",
            "undefended %",
            "÷ undefended",
            "benign test key flagged",
        ]
        t.md += [f"### {dataset}, victim {arch}", "", *_md_table(header, rows), ""]
    return t


def _paper_budget_rows_with_a_matched_twin(recs: Sequence[ResultRecord]) -> set[str]:
    """Defenses at the paper's ℓ1 budget whose registry name also runs at a matched utility in ``recs``.

    The headline table compares defenses at the utility they keep; the ℓ1 = 1.0 setting, where RandP
    and P-poison flip every top-1, stays in the clone accuracy table, labelled.
    """
    matched = {_registry_name(r) for r in recs if isinstance(r.config.get("utility_match"), dict)}
    return {r.defense for r in recs if _registry_name(r) in matched and _setting(r).startswith("paper budget")}


def _utility_table(records: Sequence[ResultRecord]) -> _Table:
    t = _Table("utility", "Defended utility: ID test accuracy (%) of the defense's answers (paper Table 4)")
    t.csv_header = [
        "dataset",
        "victim_arch",
        "defense",
        "defended_acc mean",
        "defended_acc std",
        "victim_acc",
        "delta",
        "setting",
    ]
    for (dataset, arch), recs in _by_section(records).items():
        rows: list[list[str]] = []
        for d in _ordered(r.defense for r in recs):
            mine = [r for r in recs if r.defense == d]
            acc = mean_std(r.defended_acc for r in mine)
            victim = statistics.fmean(r.victim_acc for r in mine)
            delta = acc.mean - victim
            setting = next((x for x in (_setting(r) for r in mine) if x), "")
            kept = "✓" if 100 * delta >= -UTILITY_TOLERANCE_PP else "⚠ no"
            rows.append([d, acc.pct(), f"{100 * victim:.2f}", f"{100 * delta:+.2f}", kept, setting])
            t.csv_rows.append([dataset, arch, d, 100 * acc.mean, 100 * acc.std, 100 * victim, 100 * delta, setting])
        t.md += [f"### {dataset}, victim {arch}", ""]
        header = ["defense", "defended acc %", "victim acc %", "Δ pp", f"within {UTILITY_TOLERANCE_PP} pp", "setting"]
        t.md += [*_md_table(header, rows), ""]
    return t


def _id_time(r: ResultRecord) -> float | None:
    v = r.extra.get("id_s_per_1k_queries")
    return float(v) if isinstance(v, int | float) else None


def _timing_table(records: Sequence[ResultRecord]) -> _Table:
    t = _Table(
        "timing",
        "Defense time per 1,000 queries (ms), ID test traffic and each attack's traffic (paper Table 11); "
        "× = ratio to undefended",
    )
    t.csv_header = ["dataset", "victim_arch", "defense", "traffic", "ms_per_1k mean", "ms_per_1k std", "x_undefended"]
    for (dataset, arch), recs in _by_section(records).items():
        traffic = ["ID test", *dict.fromkeys(f"{r.attack} {_mode(r)}" for r in recs)]

        def traffic_of(r: ResultRecord, which: str) -> float | None:
            if which == "ID test":
                return _id_time(r)
            return r.defense_s_per_1k_queries if f"{r.attack} {_mode(r)}" == which else None

        stats = {w: _pivot(recs, lambda _r: 0, lambda r, w=w: traffic_of(r, w)) for w in traffic}  # type: ignore[misc]
        rows: list[list[str]] = []
        for d in _ordered(r.defense for r in recs):
            row = [d]
            for w in traffic:
                s = stats[w].get((d, 0))
                base = stats[w].get(("undefended", 0))
                ratio = None if s is None or base is None or base.mean <= 0 else s.mean / base.mean
                row.append(
                    "—"
                    if s is None
                    else f"{1e3 * s.mean:.1f} ± {1e3 * s.std:.1f}" + (f" (×{ratio:.2f})" if ratio else "")
                )
                if s is not None:
                    t.csv_rows.append([dataset, arch, d, w, 1e3 * s.mean, 1e3 * s.std, ratio])
            rows.append(row)
        t.md += [f"### {dataset}, victim {arch}", ""]
        t.md += [*_md_table(["defense", *traffic], rows), ""]
    return t


def _mean_hist(hists: Sequence[Sequence[float]]) -> list[float]:
    n = max(len(h) for h in hists)
    return [statistics.fmean(h[i] for h in hists if len(h) == n) for i in range(n)]


def _exit_series(recs: Sequence[ResultRecord]) -> list[tuple[str, list[float]]]:
    """ID histogram and one per attack (output mode, budget), averaged over seeds."""
    series = [("ID test", _mean_hist([r.exit_hist_id for r in recs if r.exit_hist_id]))]
    by_col: dict[Column, list[list[float]]] = defaultdict(list)
    for r in recs:
        if r.exit_hist_attack:
            by_col[_column(r)].append(r.exit_hist_attack)
    series += [(_col_name(c), _mean_hist(h)) for c, h in sorted(by_col.items())]
    return series


def _exit_groups(records: Sequence[ResultRecord]) -> dict[tuple[str, str, str], list[ResultRecord]]:
    groups: dict[tuple[str, str, str], list[ResultRecord]] = defaultdict(list)
    for r in records:
        if r.exit_hist_attack and r.exit_hist_id:
            groups[(r.dataset, r.victim_arch, r.defense)].append(r)
    return dict(sorted(groups.items()))


def _train_seed(r: ResultRecord) -> int | None:
    """The training seed of the record's defense build (records made before it was recorded: from the cell)."""
    if "defense_seed" in r.extra:
        v = r.extra["defense_seed"]
        return v if isinstance(v, int) else None
    cell = r.config.get("cell")
    defense = cell.get("defense") if isinstance(cell, dict) else None
    if not isinstance(defense, dict):
        return None
    from fortress.bench.build import training_seed

    try:
        return training_seed(str(defense.get("name")), dict(defense.get("params") or {}))
    except FortressError:  # a defense no longer registered, or parameters no longer valid
        return None


def _seed_spread_rows(recs: Sequence[ResultRecord]) -> list[tuple[str, Column, dict[int, float], float]]:
    """(defense, column, clone accuracy per training seed, worst utility change) where seeds vary."""
    rows: list[tuple[str, Column, dict[int, float], float]] = []
    for d in _ordered(r.defense for r in recs):
        mine = [(r, _train_seed(r)) for r in recs if r.defense == d]
        if len({s for _, s in mine if s is not None}) < 2:
            continue
        for c in sorted({_column(r) for r, _ in mine}):
            per: dict[int, list[float]] = defaultdict(list)
            util: dict[int, list[float]] = defaultdict(list)
            for r, s in mine:
                if s is not None and _column(r) == c and r.clone_acc is not None:
                    per[s].append(r.clone_acc)
                    util[s].append(r.defended_acc - r.victim_acc)
            if per:
                worst_util = min(statistics.fmean(v) for v in util.values())
                rows.append((d, c, {s: statistics.fmean(v) for s, v in sorted(per.items())}, worst_util))
    return rows


def _seed_table(records: Sequence[ResultRecord]) -> _Table:
    t = _Table(
        "training_seeds",
        "Spread over the defense's training seeds: clone accuracy (%) per training seed (mean over attack "
        "seeds), their mean ± std, median and worst (highest), worst ÷ median, and the worst utility change (pp)",
    )
    t.csv_header = [
        "dataset",
        "victim_arch",
        "defense",
        "column",
        "train_seeds",
        "per_seed",
        "mean",
        "std",
        "median",
        "worst",
        "worst_over_median",
        "worst_utility_delta_pp",
    ]
    for (dataset, arch), recs in _by_section(records).items():
        rows: list[list[str]] = []
        for d, c, per, worst_util in _seed_spread_rows(recs):
            vals = list(per.values())
            st, med, worst = mean_std(vals), statistics.median(vals), max(vals)
            ratio = worst / med if med > 0 else float("inf")
            seeds = " · ".join(f"{s}: {100 * v:.1f}" for s, v in per.items())
            rows.append(
                [
                    d,
                    _col_name(c),
                    seeds,
                    st.pct(),
                    f"{100 * med:.2f}",
                    f"{100 * worst:.2f}",
                    f"{ratio:.2f}",
                    f"{100 * worst_util:+.2f}",
                ]
            )
            per_csv = ";".join(f"{s}:{100 * v:.4f}" for s, v in per.items())
            summary = [100 * st.mean, 100 * st.std, 100 * med, 100 * worst, ratio, 100 * worst_util]
            t.csv_rows.append([dataset, arch, d, _col_name(c), len(per), per_csv, *summary])
        if rows:
            header = ["defense", "attack", "per training seed", "mean ± std", "median", "worst", "worst ÷ median"]
            t.md += [f"### {dataset}, victim {arch}", ""]
            t.md += [*_md_table([*header, "utility Δ worst pp"], rows), ""]
    if not t.csv_rows:
        t.md += ["Every defense in these records was built with one training seed.", ""]
    return t


def _exit_table(records: Sequence[ResultRecord]) -> _Table:
    t = _Table("exits", "Exit distribution (%) of ID test queries and attack queries (paper Table 12)")
    groups = _exit_groups(records)
    n_max = max((len(r.exit_hist_id) for g in groups.values() for r in g), default=0)
    t.csv_header = ["dataset", "victim_arch", "defense", "traffic", *(f"exit{i}" for i in range(n_max))]
    for (dataset, arch, defense), recs in groups.items():
        series = _exit_series(recs)
        n = max(len(h) for _, h in series)
        rows = [[label, *(f"{100 * v:.2f}" for v in hist)] for label, hist in series]
        t.csv_rows += [[dataset, arch, defense, label, *(100 * v for v in hist)] for label, hist in series]
        t.md += [f"### {defense} on {dataset}, victim {arch}", ""]
        t.md += [*_md_table(["traffic", *(f"exit {i}" for i in range(n))], rows), ""]
    if not groups:
        t.md += ["No defense in these records routes queries through exits.", ""]
    return t


# -- plots ----------------------------------------------------------------------------------------


def _checkpoint_series(recs: Sequence[ResultRecord]) -> tuple[list[float], list[float], list[float]] | None:
    """Clone accuracy at the query counts every seed evaluated (``eval_every``), mean and std over seeds."""
    curves = [{c["queries"]: c["clone_acc"] for c in r.checkpoints if c.get("clone_acc") is not None} for r in recs]
    common = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    if len(common) < 2:
        return None
    stats = [mean_std(c[q] for c in curves) for q in common]
    return [float(q) for q in common], [s.mean for s in stats], [s.std for s in stats]


def _by_attack(records: Sequence[ResultRecord]) -> dict[tuple[str, str, str, str, str], list[ResultRecord]]:
    """Records per (dataset, victim arch, attack, output mode, clone arch or ""), in sorted order."""
    groups: dict[tuple[str, str, str, str, str], list[ResultRecord]] = defaultdict(list)
    for r in records:
        groups[(r.dataset, r.victim_arch, r.attack, _mode(r), _clone(r))].append(r)
    return dict(sorted(groups.items()))


def _budget_panels(records: Sequence[ResultRecord]) -> dict[str, list[Series]]:
    panels: dict[str, list[Series]] = {}
    for (dataset, arch, attack, mode, clone), recs in _by_attack(records).items():
        series: list[Series] = []
        for d in _ordered(r.defense for r in recs):
            mine = [r for r in recs if r.defense == d and r.clone_acc is not None]
            budgets = sorted({r.budget for r in mine})
            curve = _checkpoint_series(mine) if len(budgets) == 1 else None
            if curve is not None:
                series.append((d, *curve))
                continue
            stats = [mean_std(r.clone_acc for r in mine if r.budget == b and r.clone_acc is not None) for b in budgets]
            series.append((d, [float(b) for b in budgets], [s.mean for s in stats], [s.std for s in stats]))
        panels[f"{_attack_label(attack, mode, clone)} — {dataset}, {arch}"] = series
    return panels


def _tradeoff_points(records: Sequence[ResultRecord]) -> list[tuple[str, str, float, float, float]]:
    """One point per defense × attack (output mode) at that attack's largest budget."""
    points: list[tuple[str, str, float, float, float]] = []
    for (dataset, arch, attack, mode, clone_arch), recs in _by_attack(records).items():
        top = max(r.budget for r in recs)
        for d in _ordered(r.defense for r in recs):
            mine = [r for r in recs if r.defense == d and r.budget == top and r.clone_acc is not None]
            if mine:
                clone = mean_std(r.clone_acc for r in mine if r.clone_acc is not None)
                util = statistics.fmean(r.defended_acc for r in mine)
                label = f"{attack} {mode} @{_budget(top)}" + (f" → {clone_arch}" if clone_arch else "")
                if len({_section(r) for r in records}) > 1:
                    label += f" ({dataset}, {arch})"
                points.append((d, label, util, clone.mean, clone.std))
    return points


def _slug(*parts: str) -> str:
    return "-".join("".join(ch if ch.isalnum() else "_" for ch in p) for p in parts)


def _name_pools(records: Sequence[ResultRecord]) -> list[ResultRecord]:
    """Records of an attack run with several pools (Knockoff on photos and on digits) get the pool in their name."""
    pools: dict[str, set[str]] = defaultdict(set)
    for r in records:
        pools[r.attack].add(str(r.config.get("pool")))
    return [
        dataclasses.replace(r, attack=f"{r.attack}[{r.config.get('pool')}]") if len(pools[r.attack]) > 1 else r
        for r in records
    ]


# -- entry points ---------------------------------------------------------------------------------


def write_report(records: Sequence[ResultRecord], out: Path, *, title: str = "fortress benchmark") -> Report:
    """Write every table (Markdown + CSV) and plot made from ``records`` into ``out``.

    Raises:
        ArtifactError: ``records`` is empty.
    """
    if not records:
        raise ArtifactError("no result records to report on")
    records = _name_pools(records)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tables = [
        _clone_table(records),
        _protection_table(records),
        _worst_variant_table(records),
        _loop_table(records),
        _utility_table(records),
        _timing_table(records),
        _exit_table(records),
        _seed_table(records),
    ]
    report = Report(out=out, markdown=out / "report.md", records=len(records))
    doc = [f"# {title}", "", f"{len(records)} result records.", ""]
    for t in tables:
        md_path, csv_path = out / f"{t.name}.md", out / f"{t.name}.csv"
        body = [f"## {t.title}", "", *t.md]
        md_path.write_text("\n".join(body) + "\n", encoding="utf-8")
        with csv_path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(t.csv_header)
            writer.writerows(t.csv_rows)
        report.tables[t.name] = (md_path, csv_path)
        if t.csv_rows:  # a table with nothing to show keeps its files but stays out of report.md
            doc += body
    plots = [
        plot_clone_vs_budget(_budget_panels(records), out / "clone_vs_budget.png"),
        plot_tradeoff(_tradeoff_points(records), out / "tradeoff.png"),
    ]
    for (dataset, arch, defense), recs in _exit_groups(records).items():
        plots.append(
            plot_exit_distribution(
                _exit_series(recs),
                out / f"exits-{_slug(defense, dataset, arch)}.png",
                title=f"{defense}: where queries exit ({dataset}, {arch})",
            )
        )
    report.plots = [p for p in plots if p is not None]
    doc += ["## Plots", "", *(f"![{p.stem}]({p.name})" for p in report.plots), ""]
    report.markdown.write_text("\n".join(doc), encoding="utf-8")
    return report


def make_report(run_dir: Path, out: Path | None = None) -> Report:
    """Read ``run_dir/results.jsonl`` and write the report into ``out`` (default ``run_dir/report``).

    Example:
        >>> make_report(Path("/tmp/bench-quick")).markdown  # doctest: +SKIP
        PosixPath('/tmp/bench-quick/report/report.md')
    """
    run_dir = Path(run_dir)
    results = run_dir / "results.jsonl" if run_dir.is_dir() else run_dir
    records = read_records(results)
    name = run_dir.name if run_dir.is_dir() else run_dir.parent.name
    return write_report(
        records, out if out is not None else results.parent / "report", title=f"fortress benchmark: {name}"
    )
