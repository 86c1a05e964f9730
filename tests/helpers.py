"""Shared test builders (imported by the test modules; pytest puts this folder on ``sys.path``)."""

from __future__ import annotations

import torch

from fortress.defenses import DNF
from fortress.exits.heads import ExitHead
from fortress.models import create_model


def sharpen_heads(dnf: DNF, factor: float = 20.0) -> DNF:
    """Scale every exit head's encoder so that random heads answer confidently: queries leave at every exit."""
    with torch.no_grad():
        for h in dnf.net.heads:
            assert isinstance(h, ExitHead)
            h.encoder.weight.mul_(factor)
    return dnf


def sharp_random_dnf() -> DNF:
    """An untrained LeNet-5 (seed 0) DNF with sharpened heads and thresholds 0.5/0.7/0.9."""
    torch.manual_seed(0)
    return sharpen_heads(DNF(create_model("lenet5").eval(), thresholds=[0.5, 0.7, 0.9], seed=0))


def spend_over_budget(rows: int, budget: int) -> int:
    """Query ``rows`` images from a fresh LocalOracle with ``budget`` (for worker processes); return queries used."""
    from fortress.defenses import Undefended
    from fortress.oracle import LocalOracle

    torch.set_num_threads(1)
    torch.manual_seed(0)
    oracle = LocalOracle(Undefended(create_model("lenet5").eval()), budget=budget)
    oracle.query(torch.rand(rows, 1, 28, 28))
    return oracle.queries_used


def blob_images(n: int, seed: int) -> torch.Tensor:
    """``(n, 1, 28, 28)`` dark images with a bright 8×8 square at a seeded place (an ID-like family
    for a random LeNet-5; ``1 - blob_images(...)`` is another domain)."""
    g = torch.Generator().manual_seed(seed)
    x = 0.05 * torch.rand(n, 1, 28, 28, generator=g)
    r = torch.randint(2, 18, (n, 2), generator=g)
    rows = torch.arange(28).view(1, 28) - r[:, :1]  # (n, 28): offset of each row from the square's top
    cols = torch.arange(28).view(1, 28) - r[:, 1:]
    inside = ((rows >= 0) & (rows < 8)).view(n, 1, 28, 1) & ((cols >= 0) & (cols < 8)).view(n, 1, 1, 28)
    return torch.where(inside, torch.tensor(0.9), x)
