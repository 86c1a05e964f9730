"""Console tables made from library results alone: result records, defense cost, the exit-timing
channel and the API-key ledger.

Each function takes what a library call returned and gives a :class:`rich.table.Table` (or lines of
text); printing is left to the caller, so the CLI prints them and tests render them to text. The
Markdown/CSV tables of a run's report are :mod:`fortress.bench.report`'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

if TYPE_CHECKING:
    from fortress.bench.flops import ExitFlops
    from fortress.bench.records import ResultRecord
    from fortress.bench.speed import SpeedSuite
    from fortress.bench.timing import TimingReport
    from fortress.serve.keys import ApiKey

__all__ = [
    "exit_hist",
    "key_profile_lines",
    "keys_table",
    "percent",
    "records_table",
    "speed_tables",
    "timing_table",
]

#: Shown for a figure that was not measured.
MISSING = "—"

RECORD_COLUMNS = (
    "defense",
    "attack",
    "seed",
    "budget",
    "queries",
    "clone acc %",
    "best %",
    "fidelity %",
    "defended acc %",
    "exits: attack % (ID %)",
)


def percent(v: float | None) -> str:
    """A fraction in [0, 1] as a percentage with two decimals (``0.9712`` → ``"97.12"``); ``None`` → ``—``."""
    return MISSING if v is None else f"{100 * v:.2f}"


def exit_hist(h: Sequence[float]) -> str:
    """An exit histogram (fractions per exit) as whole percentages: ``[0.8, 0.15, 0.05]`` → ``"80/15/5"``."""
    return "/".join(f"{100 * v:.0f}" for v in h) if h else MISSING


def records_table(records: Sequence[ResultRecord], title: str) -> Table:
    """One row per result record: clone accuracy (final and best), fidelity, defended accuracy, exits."""
    table = Table(title=title)
    for col in RECORD_COLUMNS:
        table.add_column(col, justify="left" if col in ("defense", "attack") else "right")
    for r in records:
        exits = MISSING if not r.exit_hist_attack else f"{exit_hist(r.exit_hist_attack)} ({exit_hist(r.exit_hist_id)})"
        table.add_row(
            r.defense,
            r.attack,
            str(r.seed),
            f"{r.budget:,}",
            f"{r.queries_used:,}",
            percent(r.clone_acc),
            percent(r.clone_acc_best),
            percent(r.clone_fidelity),
            percent(r.defended_acc),
            exits,
        )
    return table


def speed_tables(suite: SpeedSuite) -> list[Table]:
    """Defense cost per 1,000 queries by traffic (× undefended), then forward_all vs forward_dynamic if timed."""
    traffic = list(dict.fromkeys(c.traffic for c in suite.costs))
    cost = Table(
        title=f"defense cost, ms per 1,000 queries (× undefended) · batch {suite.batch_size}, {suite.threads} thr."
    )
    for col in ("defense", *traffic):
        cost.add_column(col, justify="left" if col == "defense" else "right")
    for name in dict.fromkeys(c.defense for c in suite.costs):
        cells = {c.traffic: c for c in suite.costs if c.defense == name}
        ratio = {t: "" if cells[t].ratio is None else f" (×{cells[t].ratio:.2f})" for t in traffic}
        cost.add_row(name, *(f"{cells[t].ms_per_1k:.1f}{ratio[t]}" for t in traffic))
    tables = [cost]
    if suite.flops:
        tables.append(_flops_table(suite))
    tables += [_exit_table(e) for e in suite.exits]
    if not suite.forward:
        return tables
    fwd = Table(title="forward_all vs forward_dynamic (median ms per batch; speed-up > 1: dynamic is faster)")
    for col in ("defense", "traffic", "all ms", "dynamic ms", "speed-up", "exits %"):
        fwd.add_column(col, justify="left" if col in ("defense", "traffic") else "right")
    for f in suite.forward:
        fwd.add_row(
            f["defense"],
            f["traffic"],
            f"{f['all_ms']:.2f}",
            f"{f['dynamic_ms']:.2f}",
            f"{f['speedup']:.2f}",
            exit_hist(f["exit_hist"]),
        )
    return [*tables, fwd]


def _flops_table(suite: SpeedSuite) -> Table:
    traffic = list(dict.fromkeys(c.traffic for c in suite.flops))
    table = Table(title="defense compute, MFLOPs per query (× undefended) · torch.utils.flop_counter")
    for col in ("defense", *traffic):
        table.add_column(col, justify="left" if col == "defense" else "right")
    for name in dict.fromkeys(c.defense for c in suite.flops):
        cells = {c.traffic: c for c in suite.flops if c.defense == name}
        ratio = {t: "" if cells[t].ratio is None else f" (×{cells[t].ratio:.2f})" for t in traffic}
        table.add_row(name, *(f"{cells[t].mflops_per_query:.3f}{ratio[t]}" for t in traffic))
    return table


def _exit_table(e: ExitFlops) -> Table:
    table = Table(title=f"{e.defense}: MFLOPs of a query answered at each exit (× undefended), % of traffic there")
    for col in ("exit", "MFLOPs", *e.exit_hist):
        table.add_column(col, justify="right")
    for j, (mf, r) in enumerate(zip(e.mflops, e.ratio, strict=True)):
        table.add_row(str(j), f"{mf:.3f} (×{r:.2f})", *(f"{100 * h[j]:.1f}" for h in e.exit_hist.values()))
    return table


def timing_table(rep: TimingReport) -> Table:
    """Per compute mode: how well response time reveals the exit (vs chance), latency per exit, throughput."""
    exits = sorted({e for m in rep.modes for e in m.latency_by_exit})
    table = Table(title=f"exit inference from latency · {rep.queries} queries, exits {rep.exit_hist}")
    cols = ["mode", "exit 0? acc", "chance", "exit acc", "chance"]
    cols += [f"exit {e} p50 ms" for e in exits] + ["img/s", "CPU ms/1k img"]
    for col in cols:
        table.add_column(col, justify="left" if col == "mode" else "right")
    for m in rep.modes:
        cpu = MISSING if m.server_cpu_ms_per_1k is None else f"{m.server_cpu_ms_per_1k:.0f}"
        table.add_row(
            m.mode,
            f"{m.early.accuracy:.1%}",
            f"{m.early.chance:.1%}",
            f"{m.exit_index.accuracy:.1%}",
            f"{m.exit_index.chance:.1%}",
            *(f"{m.latency_by_exit[e]['p50_ms']:.2f}" if e in m.latency_by_exit else MISSING for e in exits),
            f"{m.images_per_s:,.0f}",
            cpu,
        )
    return table


def _quota(n: int | None) -> str:
    return "∞" if n is None else f"{n:,}"


def keys_table(keys: Sequence[ApiKey], path: Path) -> Table:
    """The key ledger at ``path``: budgets, usage, output modes and dates (never a secret or its hash)."""
    table = Table(title=f"API keys in {path}")
    for col in ("id", "name", "budget", "used", "left", "output", "admin", "created", "revoked"):
        table.add_column(col, justify="right" if col in ("budget", "used", "left") else "left")
    for k in keys:
        table.add_row(
            k.key_id,
            k.name,
            _quota(k.budget),
            f"{k.used:,}",
            _quota(k.budget_left),
            k.output_mode.value if k.output_mode.value != "topk" else f"top{k.top_k}",
            "yes" if k.admin else "",
            k.created_at,
            k.revoked_at or "",
        )
    return table


def key_profile_lines(key: ApiKey, stored: Mapping[str, Any] | None) -> list[str]:
    """A key's usage and, once it has queried, its query profile and monitor state, as lines of text.

    Args:
        key: the key's ledger record.
        stored: what :meth:`fortress.monitor.ProfileStore.load` returned for it (``None``: no profile yet).
    """
    lines = [f"key {key.key_id} ({key.name!r}): used {key.used:,}, left {_quota(key.budget_left)}"]
    if stored is None:
        return [*lines, "no query profile yet"]
    p = stored["profile"]
    hist = "/".join(f"{100 * h:.1f}" for h in p["exit_hist"]) or "-"
    lines.append(
        f"profile: {p['queries']:,} queries; exits (%) {hist}; entropy {p['entropy']['mean']:.3f} "
        f"± {p['entropy']['std']:.3f}; confidence {p['confidence']['mean']:.3f} ± {p['confidence']['std']:.3f}"
    )
    if stored["monitor"] is not None:
        flag = f"flagged at query {stored['flagged_at']:,}" if stored["flagged_at"] is not None else "not flagged"
        lines.append(f"monitor {stored['monitor']}: {flag} (updated {stored['updated_at']})")
    return lines
