"""Plots made from result records (PNG, matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from fortress.bench.records import ResultRecord

__all__ = ["plot_exit_histograms"]


def plot_exit_histograms(records: Sequence[ResultRecord], path: Path, *, title: str | None = None) -> Path | None:
    """Bar chart of the exit distribution of ID test queries vs each attack's queries (paper Table 12).

    Only records with exit histograms (defenses with exits) are drawn; returns ``None`` if none has one.
    """
    recs = [r for r in records if r.exit_hist_attack]
    if not recs:
        return None
    n_exits = len(recs[0].exit_hist_id or recs[0].exit_hist_attack)
    series: list[tuple[str, list[float]]] = [("ID test", recs[0].exit_hist_id)]
    seen: set[str] = set()
    for r in recs:
        label = f"{r.attack} queries (seed {r.seed})"
        if label not in seen:
            series.append((label, r.exit_hist_attack))
            seen.add(label)
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(series)
    for k, (label, hist) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(n_exits)]
        ax.bar(xs, [100 * h for h in hist], width=width, label=label)
    ax.set_xticks(range(n_exits))
    ax.set_xticklabels([f"exit {i}" + (" (final)" if i == n_exits - 1 else "") for i in range(n_exits)])
    ax.set_ylabel("queries (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title or f"{recs[0].defense}: where queries exit ({recs[0].dataset}, {recs[0].victim_arch})")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
