"""Each defense's worst attacker variant: ModelGuard's side-by-side table (Tang et al., USENIX Security 2024).

A grid names an attack's query strategy and attacker variant (``strategy`` and ``variant`` of an
:class:`~fortress.bench.grid.AttackSpec`, e.g. Knockoff-random × naive, top-1, smoothing, D-DAE).
A defense is as strong as the variant that extracts the most from it, so for every defense and
strategy (at one output mode, budget and clone architecture) this table gives the highest mean clone
accuracy over the variants that ran against it, names that variant, and lists every variant's mean.
Records without a strategy or variant are not in it.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fortress.bench.records import ResultRecord

__all__ = ["WorstVariant", "variant_of", "worst_variants"]


def variant_of(r: ResultRecord) -> tuple[str, str] | None:
    """The ``(strategy, variant)`` a grid named for the record's attack (``None``: it named none)."""
    cell = r.config.get("cell")
    if not isinstance(cell, dict) or (cell.get("strategy") is None and cell.get("variant") is None):
        return None
    attack = cell.get("attack")
    name = str(attack.get("name")) if isinstance(attack, dict) else r.attack
    return str(cell.get("strategy") or name), str(cell.get("variant") or "naive")


@dataclass(frozen=True)
class WorstVariant:
    """One defense against one query strategy: its worst variant and every variant's mean clone accuracy.

    Attributes:
        dataset, victim_arch, defense: the section and the row.
        strategy, output_mode, budget, clone_arch: the column (``clone_arch``: ``""`` for the victim's).
        variants: variant → (mean clone accuracy over seeds, sample std, runs), in the grid's order.
    """

    dataset: str
    victim_arch: str
    defense: str
    strategy: str
    output_mode: str
    budget: int
    clone_arch: str
    variants: dict[str, tuple[float, float, int]]

    @property
    def worst(self) -> str:
        """The variant with the highest mean clone accuracy (the first one listed on a tie)."""
        return max(self.variants, key=lambda v: self.variants[v][0])


def _mode(r: ResultRecord) -> str:
    attack = r.config.get("attack")
    return str(attack.get("output_mode", "soft")) if isinstance(attack, dict) else "soft"


def worst_variants(records: Sequence[ResultRecord]) -> list[WorstVariant]:
    """Group records by defense × strategy (mode, budget, clone) and summarise their variants.

    Example:
        >>> worst_variants([])
        []
    """
    acc: dict[tuple[Any, ...], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        sv = variant_of(r)
        if sv is None or r.clone_acc is None:
            continue
        clone = "" if not r.clone_arch or r.clone_arch == r.victim_arch else r.clone_arch
        key = (r.dataset, r.victim_arch, r.defense, sv[0], _mode(r), r.budget, clone)
        acc[key][sv[1]].append(float(r.clone_acc))
    out: list[WorstVariant] = []
    for key, per in acc.items():
        stats = {
            v: (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0, len(xs)) for v, xs in per.items()
        }
        out.append(WorstVariant(*key, variants=stats))
    return out
