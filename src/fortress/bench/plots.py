"""Plots made from result records (PNG, matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from fortress.bench.records import ResultRecord

__all__ = ["plot_clone_vs_budget", "plot_exit_distribution", "plot_exit_histograms", "plot_tradeoff"]


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


#: One line of a clone-accuracy plot: ``(label, budgets, means, stds)`` (accuracies as fractions).
Series = tuple[str, Sequence[float], Sequence[float], Sequence[float]]


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_clone_vs_budget(panels: Mapping[str, Sequence[Series]], path: Path) -> Path | None:
    """Clone accuracy against query budget, one line per defense and one panel per attack (paper Fig. 2).

    Args:
        panels: panel title (attack, output mode, victim) → series; error bars are the std over seeds.
        path: PNG to write.

    Returns:
        ``path``, or ``None`` when there is nothing to draw.
    """
    panels = {k: v for k, v in panels.items() if v}
    if not panels:
        return None
    n = len(panels)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = list(dict.fromkeys(label for series in panels.values() for label, *_ in series))
    color = {label: cycle[i % len(cycle)] for i, label in enumerate(labels)}  # one colour per defense everywhere
    for ax, (title, series) in zip(axes.flat, panels.items(), strict=False):
        for label, xs, means, stds in series:
            ax.errorbar(
                list(xs),
                [100 * m for m in means],
                yerr=[100 * s for s in stds],
                marker="o",
                capsize=3,
                label=label,
                color=color[label],
            )
        if max((max(xs) / max(min(xs), 1) for _, xs, _, _ in series if xs), default=1) >= 10:
            ax.set_xscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("queries")
        ax.set_ylabel("clone accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    return _save(fig, path)


def plot_tradeoff(
    points: Sequence[tuple[str, str, float, float, float]], path: Path, *, title: str | None = None
) -> Path | None:
    """Utility against protection: defended ID accuracy (x) vs clone accuracy (y), one point per defense × attack.

    Args:
        points: ``(defense, attack, defended_acc, clone_acc_mean, clone_acc_std)``, accuracies as fractions.
            Lower-right is best: the defense keeps its accuracy and the clone learns little.
        path: PNG to write.
        title: figure title.
    """
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    attacks = list(dict.fromkeys(p[1] for p in points))
    markers = "osD^vP*X<>"
    for i, attack in enumerate(attacks):
        pts = [p for p in points if p[1] == attack]
        ax.errorbar(
            [100 * p[2] for p in pts],
            [100 * p[3] for p in pts],
            yerr=[100 * p[4] for p in pts],
            fmt=markers[i % len(markers)],
            capsize=3,
            label=attack,
        )
        for p in pts:
            ax.annotate(p[0], (100 * p[2], 100 * p[3]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("defended ID accuracy (%)  → better utility")
    ax.set_ylabel("clone accuracy (%)  ↓ better protection")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "utility–protection trade-off", fontsize=10)
    return _save(fig, path)


def plot_exit_distribution(series: Sequence[tuple[str, Sequence[float]]], path: Path, *, title: str) -> Path | None:
    """Exit distribution of ID queries vs each attack's queries as grouped bars (paper Table 12).

    Args:
        series: ``(label, fraction per exit)``; the first is usually ``"ID test"``.
        path: PNG to write.
        title: figure title.
    """
    series = [(label, hist) for label, hist in series if hist]
    if not series:
        return None
    n_exits = max(len(h) for _, h in series)
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(series)
    for k, (label, hist) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(hist))]
        ax.bar(xs, [100 * h for h in hist], width=width, label=label)
    ax.set_xticks(range(n_exits))
    ax.set_xticklabels([f"exit {i}" + (" (final)" if i == n_exits - 1 else "") for i in range(n_exits)])
    ax.set_ylabel("queries (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)
