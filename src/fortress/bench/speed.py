"""Side-by-side timing of early-exit inference: ``forward_dynamic`` vs ``forward_all``.

Timings on a shared CPU are noisy, so the two paths are timed interleaved (A, B, A, B, …) on the
same batches in one run, and the ratio of their medians is reported — never an absolute time alone.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from fortress.exits.network import EarlyExitNet

__all__ = ["SpeedReport", "compare_forward_speed"]


@dataclass(frozen=True)
class SpeedReport:
    """Medians (ms per batch) of both paths and the speed-up ``all_ms / dynamic_ms`` (> 1: dynamic is faster)."""

    batch_size: int
    repeats: int
    all_ms: float
    dynamic_ms: float
    speedup: float
    exit_hist: list[float]
    threads: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


@torch.no_grad()
def compare_forward_speed(
    net: EarlyExitNet, x: Tensor, *, batch_size: int = 256, repeats: int = 30, warmup: int = 5
) -> SpeedReport:
    """Time ``forward_all`` and ``forward_dynamic`` interleaved on batches of ``x``.

    Args:
        net: the early-exit network (eval mode).
        x: images; consecutive batches of ``batch_size`` rows are cycled through.
        batch_size: rows per call.
        repeats: timed calls per path.
        warmup: untimed calls per path first.
    """
    net.eval()
    batches = [x[i : i + batch_size] for i in range(0, x.shape[0] - batch_size + 1, batch_size)] or [x]
    t_all: list[float] = []
    t_dyn: list[float] = []
    for r in range(warmup + repeats):
        xb = batches[r % len(batches)]
        order = (0, 1) if r % 2 == 0 else (1, 0)  # alternate which path runs first
        for which in order:
            t0 = time.perf_counter()
            if which == 0:
                net.forward_all(xb)
            else:
                net.forward_dynamic(xb)
            dt = time.perf_counter() - t0
            if r >= warmup:
                (t_all if which == 0 else t_dyn).append(dt)
    exits = torch.cat([net.forward_dynamic(b)[1] for b in batches])
    hist = (torch.bincount(exits, minlength=net.num_exits).float() / exits.numel()).tolist()
    a, d = statistics.median(t_all), statistics.median(t_dyn)
    return SpeedReport(batch_size, repeats, 1e3 * a, 1e3 * d, a / d, hist, torch.get_num_threads())
