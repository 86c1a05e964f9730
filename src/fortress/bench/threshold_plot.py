"""Plot a DNF threshold search (paper App. H): cost per trial with the incumbent, and the trade-off."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from fortress.errors import ArtifactError

__all__ = ["plot_pareto", "plot_threshold_search"]


def _read(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise ArtifactError(f"threshold trial record not found: {path}")
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not a JSON-lines trial record: {exc}") from exc


def plot_threshold_search(trials_path: Path, out: Path | None = None) -> Path:
    """Draw the trials written by :func:`~fortress.defenses.dnf.threshold_search.search_thresholds`.

    Left: each trial's cost and the running incumbent (lowest cost so far). Right: defended
    ID-validation accuracy against the surrogate objective for every feasible trial, with the
    paper-default thresholds and the chosen thresholds marked.

    Args:
        trials_path: the ``threshold_trials.jsonl`` record.
        out: the PNG to write (default: ``threshold_search.png`` beside the record).

    Returns:
        The PNG's path.
    """
    rows = _read(Path(trials_path))
    trials = [r for r in rows if r.get("kind") == "trial"]
    base = next((r for r in rows if r.get("kind") == "baseline"), None)
    best = next((r for r in rows if r.get("kind") == "best"), None)
    if not trials:
        raise ArtifactError(f"{trials_path} holds no trials")
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    costs = [float(r["cost"]) for r in trials]
    running = [min(costs[: i + 1]) for i in range(len(costs))]
    ax0.plot(range(len(costs)), costs, "o", ms=4, alpha=0.6, label="trial cost")
    ax0.step(range(len(costs)), running, where="post", color="C3", label="incumbent")
    if base is not None:
        ax0.axhline(float(base["cost"]), color="k", ls="--", lw=1, label="paper defaults")
    ax0.set_xlabel("trial")
    ax0.set_ylabel("cost (surrogate clone acc.; > 1: infeasible)")
    ax0.legend()
    feas = [r for r in trials if r["feasible"]]
    ax1.scatter(
        [100 * r["surrogate"] for r in feas], [100 * r["val_acc"] for r in feas], s=14, alpha=0.6, label="trials"
    )
    for rec, style, label in ((base, "k*", "paper defaults"), (best, "r^", "searched")):
        if rec is not None:
            thr = ", ".join(f"{t:.3f}" for t in rec["thresholds"])
            ax1.plot(100 * rec["surrogate"], 100 * rec["val_acc"], style, ms=12, label=f"{label} [{thr}]")
    if best is not None and "victim_val_acc" in best:
        floor = 100 * (best["victim_val_acc"] - best["config"]["tolerance"])
        ax1.axhline(floor, color="C3", ls=":", lw=1, label="utility floor")
    ax1.set_xlabel("surrogate objective on the third data set (%)")
    ax1.set_ylabel("defended ID-validation accuracy (%)")
    ax1.legend(fontsize=8)
    fig.suptitle("DNF exit-threshold search (SMAC3)")
    fig.tight_layout()
    path = Path(out) if out is not None else Path(trials_path).with_name("threshold_search.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_pareto(front_path: Path, out: Path | None = None) -> Path:
    """Draw the three-way threshold search written by :func:`~fortress.defenses.dnf.pareto_search.search_pareto`.

    Surrogate clone accuracy against ID compute (× undefended) for every feasible trial, coloured by
    the utility loss; the Pareto front, the paper-default thresholds and the chosen point are marked.

    Args:
        front_path: the ``threshold_pareto.jsonl`` record.
        out: the PNG to write (default: ``threshold_pareto.png`` beside the record).

    Returns:
        The PNG's path.

    Raises:
        ArtifactError: the record is missing, not JSON lines, or holds no trials.
    """
    rows = _read(Path(front_path))
    trials = [r for r in rows if r.get("kind") == "trial"]
    if not trials:
        raise ArtifactError(f"{front_path} holds no trials")
    feas = [r for r in trials if r["feasible"]]
    front = sorted((r for r in trials if r.get("on_front")), key=lambda r: float(r["id_compute"]))
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    sc = ax.scatter(
        [float(r["id_compute"]) for r in feas],
        [100 * float(r["surrogate"]) for r in feas],
        c=[100 * float(r["utility_loss"]) for r in feas],
        cmap="viridis",
        s=16,
        alpha=0.7,
        label="feasible trials",
    )
    fig.colorbar(sc, ax=ax, label="utility loss (points)")
    ax.plot(
        [float(r["id_compute"]) for r in front],
        [100 * float(r["surrogate"]) for r in front],
        "o",
        mfc="none",
        mec="C3",
        ms=9,
        label="Pareto front",
    )
    for kind, marker, label in (("baseline", "s", "paper defaults"), ("chosen", "*", "chosen")):
        r = next((x for x in rows if x.get("kind") == kind), None)
        if r is not None:
            ax.plot(float(r["id_compute"]), 100 * float(r["surrogate"]), marker, color="k", ms=11, label=label)
    ax.set_xlabel("ID compute per query (× undefended FLOPs)")
    ax.set_ylabel("surrogate clone accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(out) if out is not None else Path(front_path).with_name("threshold_pareto.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
