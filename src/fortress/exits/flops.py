"""FLOPs of a forward pass and of a query answered at each exit, counted by PyTorch's
:class:`torch.utils.flop_counter.FlopCounterMode` (convolutions, matrix products and their kin;
element-wise work such as activations and the exit decision's softmax is not counted)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from fortress.exits.network import EarlyExitNet

__all__ = ["count_flops", "exit_flops"]


def count_flops(fn: Any, *args: Any) -> int:
    """FLOPs ``fn(*args)`` performs, counted by :class:`FlopCounterMode` (no gradients recorded)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args)
    return int(counter.get_total_flops())


@torch.no_grad()
def exit_flops(net: EarlyExitNet) -> list[float]:
    """Mega-FLOPs of one query answered at each exit of ``net`` (depth order; last: the final exit).

    A query leaving at head ``j`` ran the stages up to that head and heads ``0..j`` (each decided
    whether it could leave); one reaching the final exit ran every stage, every head and the final
    classifier — what :meth:`EarlyExitNet.forward_dynamic` does for it.
    """
    net.eval()
    x = torch.zeros(1, *net.backbone.input_shape)
    stage_of_head = list(net.exit_after)
    costs: list[float] = []
    with FlopCounterMode(display=False) as counter:
        h = net.backbone.preprocess(x)
        for k, stage in enumerate(net.backbone.stages):
            h = stage(h)
            for j, s in enumerate(stage_of_head):
                if s == k:
                    net.heads[j](h)
                    costs.append(counter.get_total_flops() / 1e6)
        net.final_head(h)
        costs.append(counter.get_total_flops() / 1e6)
    return costs
