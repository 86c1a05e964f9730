"""Compute counted, not timed: FLOPs per query of every defense and of every DNF exit.

Wall-clock ratios on a shared CPU move with the load; floating-point operations do not. Counts come
from PyTorch's own :class:`torch.utils.flop_counter.FlopCounterMode` (convolutions, matrix products
and their kin; element-wise work such as activations and the softmax of an exit decision is not
counted), so they measure the network arithmetic a query costs, the quantity early exits save
(paper §4.1, §5.6 "inference efficiency").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from torch import Tensor

from fortress.defenses.base import Defense
from fortress.exits.flops import count_flops, exit_flops

__all__ = ["DefenseFlops", "ExitFlops", "count_flops", "defense_flops", "exit_flops"]


@dataclass(frozen=True)
class DefenseFlops:
    """FLOPs one defense spends per query of one kind of traffic.

    Attributes:
        defense: defense name.
        traffic: traffic name (``id_test``, ``dfme_synthetic``, ``noise``).
        mflops_per_query: mega-FLOPs per query (total counted over the traffic / queries).
        ratio: over undefended's on the same traffic (``None`` without an undefended entry).
    """

    defense: str
    traffic: str
    mflops_per_query: float
    ratio: float | None


@dataclass(frozen=True)
class ExitFlops:
    """What a query leaving at each exit of an early-exit net costs, and where each traffic leaves.

    Attributes:
        defense: defense name.
        mflops: mega-FLOPs of one query answered at exit ``j`` (the stages up to it, and every head
            evaluated on the way), per exit in depth order (last: the final exit).
        ratio: ``mflops`` over the undefended victim's mega-FLOPs per query.
        exit_hist: traffic name → share of its queries leaving at each exit.
    """

    defense: str
    mflops: list[float]
    ratio: list[float]
    exit_hist: dict[str, list[float]]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def defense_flops(
    defenses: Mapping[str, Defense], traffic: Mapping[str, Tensor], *, batch_size: int = 256
) -> list[DefenseFlops]:
    """FLOPs per query of ``defense.respond`` for every defense on every traffic (ratios against ``"undefended"``).

    Each traffic is answered in batches of ``batch_size`` rows, as :func:`~fortress.bench.speed.bench_speed`
    times it; the total is divided by the number of queries.
    """
    out: list[DefenseFlops] = []
    for tname, x in traffic.items():
        per: dict[str, float] = {}
        for name, d in defenses.items():
            total = sum(count_flops(d.respond, x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size))
            per[name] = total / 1e6 / max(1, x.shape[0])
        base = per.get("undefended")
        out += [DefenseFlops(n, tname, v, None if not base else v / base) for n, v in per.items()]
    return out
