"""FLOPs per query and per exit (``fortress.bench.flops``), checked against what forward_dynamic runs."""

from __future__ import annotations

import itertools

import pytest
import torch

from fortress.bench.flops import count_flops, defense_flops, exit_flops
from fortress.defenses import DNF
from fortress.defenses.undefended import Undefended
from fortress.models import create_model


@pytest.mark.parametrize("arch", ["lenet5", "resnet14-s"])
def test_exit_costs_grow_with_depth_and_end_above_the_victim(arch: str) -> None:
    torch.manual_seed(0)
    victim = create_model(arch)
    net = DNF(victim, seed=0).net
    costs = exit_flops(net)
    base = count_flops(victim, torch.zeros(1, 1, 28, 28)) / 1e6
    assert len(costs) == net.num_exits
    assert all(a < b for a, b in itertools.pairwise(costs))
    assert costs[-1] > base > costs[0]
    if arch == "resnet14-s":  # stages 0-1 hold about 13 % of the FLOPs (models/resnet_s.py)
        assert 0.10 < costs[1] / base < 0.20


def test_defense_flops_follow_the_exit_each_query_takes() -> None:
    torch.manual_seed(0)
    victim = create_model("lenet5")
    dnf = DNF(victim, seed=0)
    costs = exit_flops(dnf.net)
    x = torch.rand(40, 1, 28, 28)
    und = Undefended(victim)
    for thr, expect in ((0.0, costs[0]), (2.0, costs[-1])):
        dnf.set_thresholds([thr] * (dnf.num_exits - 1))
        rows = defense_flops({"undefended": und, "dnf": dnf}, {"noise": x}, batch_size=16)
        by = {r.defense: r for r in rows}
        assert by["undefended"].ratio == 1.0
        assert by["dnf"].mflops_per_query == pytest.approx(expect, rel=1e-6)
        assert by["dnf"].ratio == pytest.approx(expect / by["undefended"].mflops_per_query, rel=1e-6)
    # a mix: the mean of the per-exit costs weighted by where the rows left
    dnf.set_thresholds([0.5] * (dnf.num_exits - 1))
    _, exits = dnf.net.forward_dynamic(x)
    mixed = sum(costs[int(e)] for e in exits) / len(exits)
    [row] = [r for r in defense_flops({"dnf": dnf}, {"noise": x}) if r.defense == "dnf"]
    assert row.mflops_per_query == pytest.approx(mixed, rel=1e-6) and row.ratio is None
