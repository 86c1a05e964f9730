"""Side-by-side timings: every defense's per-query cost against ``undefended``, and early-exit
inference ``forward_dynamic`` vs ``forward_all`` (paper Table 11, §5.6 "inference efficiency").

Timings on a shared CPU are noisy, so the things compared are timed interleaved (A, B, A, B, …) on the
same batches in one run, and the ratio of their medians is reported — never an absolute time alone.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fortress.bench.flops import DefenseFlops, ExitFlops, count_flops, defense_flops, exit_flops
from fortress.data.spec import DataSpec
from fortress.defenses.base import Defense
from fortress.exits.network import EarlyExitNet

__all__ = [
    "DefenseCost",
    "SpeedReport",
    "SpeedSuite",
    "bench_speed",
    "compare_defense_costs",
    "compare_forward_speed",
    "speed_traffic",
]

log = logging.getLogger(__name__)


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
    exits = torch.cat([net.forward_dynamic(x[i : i + batch_size])[1] for i in range(0, x.shape[0], batch_size)])
    hist = (torch.bincount(exits, minlength=net.num_exits).float() / exits.numel()).tolist()
    a, d = statistics.median(t_all), statistics.median(t_dyn)
    return SpeedReport(batch_size, repeats, 1e3 * a, 1e3 * d, a / d, hist, torch.get_num_threads())


@dataclass(frozen=True)
class DefenseCost:
    """Median time one defense takes to answer a batch of one kind of traffic.

    Attributes:
        defense: defense name.
        traffic: traffic name (``id_test``, ``dfme_synthetic``, ``noise``).
        ms_per_1k: median milliseconds per 1,000 queries.
        ratio: ``ms_per_1k`` over undefended's on the same traffic (``None`` without an undefended entry).
    """

    defense: str
    traffic: str
    ms_per_1k: float
    ratio: float | None


@dataclass
class SpeedSuite:
    """Everything ``fortress bench-speed`` measured in one run.

    Attributes:
        batch_size: rows per timed call.
        repeats: timed calls per defense and traffic.
        threads: torch threads.
        costs: per-query cost of every defense on every traffic, with its ratio to undefended.
        forward: ``forward_all`` vs ``forward_dynamic`` per traffic, for each defense with an early-exit net.
        flops: FLOPs per query of every defense on every traffic, with its ratio to undefended
            (counted by :mod:`torch.utils.flop_counter`, independent of machine load).
        exits: per early-exit defense, FLOPs of a query answered at each exit and each traffic's exit shares.
        skipped: defense name → why it was not timed.
        device: where it ran (:func:`fortress.device.device_facts`).
    """

    batch_size: int
    repeats: int
    threads: int
    costs: list[DefenseCost] = field(default_factory=list)
    forward: list[dict[str, Any]] = field(default_factory=list)
    flops: list[DefenseFlops] = field(default_factory=list)
    exits: list[ExitFlops] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    device: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def speed_traffic(
    input_shape: tuple[int, int, int], n: int, *, seed: int = 0, id_images: Tensor | None = None
) -> dict[str, Tensor]:
    """The traffic the speed benchmark times: ID test images, DFME-style synthetic queries and noise.

    ID images are ``id_images`` (the victim's ID test split; absent: no ID entry); synthetic queries
    come from a randomly initialised DFME generator (what DFME sends early on); noise is uniform.
    """
    from fortress.data.embedded import noise_images
    from fortress.generative.dfme import DFMEGenerator, to_unit

    c, h, _ = input_shape
    out: dict[str, Tensor] = {}
    if id_images is not None:
        out["id_test"] = id_images[:n]
    torch.manual_seed(seed)
    gen = DFMEGenerator(nz=256, ngf=16, out_channels=c, image_size=h).eval()
    with torch.no_grad():
        out["dfme_synthetic"] = to_unit(gen(torch.randn(n, 256, generator=torch.Generator().manual_seed(seed))))
    out["noise"] = noise_images(n, input_shape, seed=seed).x
    return out


@torch.no_grad()
def compare_defense_costs(
    defenses: Mapping[str, Defense],
    traffic: Mapping[str, Tensor],
    *,
    batch_size: int = 256,
    repeats: int = 20,
    warmup: int = 3,
) -> list[DefenseCost]:
    """Time ``defense.respond`` for every defense on every traffic, round-robin in one run.

    Each repeat runs every defense once on the same batch, in a rotated order, so load changes on a
    shared machine hit all defenses alike; costs are medians, ratios are against ``"undefended"``.
    """
    names = list(defenses)
    out: list[DefenseCost] = []
    for tname, x in traffic.items():
        batches = [x[i : i + batch_size] for i in range(0, x.shape[0] - batch_size + 1, batch_size)] or [x]
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(warmup + repeats):
            xb = batches[r % len(batches)]
            k = r % len(names)
            for name in names[k:] + names[:k]:
                t0 = time.perf_counter()
                defenses[name].respond(xb)
                if xb.is_cuda:  # the GPU's queued work belongs to this call's time
                    torch.cuda.synchronize(xb.device)
                if r >= warmup:
                    times[name].append((time.perf_counter() - t0) / xb.shape[0])
        med = {n: 1e6 * statistics.median(v) for n, v in times.items()}
        base = med.get("undefended")
        out += [DefenseCost(n, tname, med[n], None if base is None else med[n] / base) for n in names]
    return out


def bench_speed(
    target: Path,
    *,
    defenses: Sequence[str] | None = None,
    batch_size: int = 256,
    repeats: int = 20,
    n: int = 1024,
    data: DataSpec | None = None,
    device: str = "cpu",
) -> SpeedSuite:
    """``fortress bench-speed``: every registered defense's per-query cost as a ratio to undefended, and
    ``forward_dynamic`` vs ``forward_all`` on ID and attack traffic, side by side in one run.

    Args:
        target: a saved DNF (its victim is the victim of every other defense) or a saved victim (then
            ``dnf`` is skipped: it must be trained first with ``fortress protect``).
        defenses: defense names to time (default: every registered one). Each is built from its
            default parameters (:func:`fortress.bench.build.build_defense`); one that cannot be is
            skipped with the reason.
        batch_size: rows per timed call.
        repeats: timed calls per defense and traffic.
        n: images per traffic kind.
        data: the ID data (default: the spec the saved victim remembers, else the embedded digits);
            resolved and checked against the victim before anything is timed.
        device: where every defense answers (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``).
    """
    from fortress.bench.build import BuildContext, build_defense
    from fortress.bench.pipeline import data_for
    from fortress.defenses import DEFENSES, DNF, load_defense
    from fortress.device import device_facts, resolve_device
    from fortress.errors import FortressError

    dev = resolve_device(device)
    loaded = load_defense(Path(target)).to(dev)
    victim = loaded.victim
    resolved = data_for(victim, data)
    suite = SpeedSuite(
        batch_size=batch_size, repeats=repeats, threads=torch.get_num_threads(), device=device_facts(dev)
    )
    built: dict[str, Defense] = {}
    for name in defenses or DEFENSES.names():
        if name == loaded.name:
            built[name] = loaded
        elif name == "dnf":
            suite.skipped[name] = "needs a trained DNF: pass a directory made by `fortress protect`"
        else:
            try:
                built[name] = build_defense(name, victim, {}, BuildContext(data=resolved.spec))
            except (FortressError, TypeError, NotImplementedError) as exc:
                suite.skipped[name] = f"cannot be built from default parameters: {exc}"
    if "undefended" in built:  # first, so the ratios read against it
        built = {"undefended": built["undefended"], **{k: v for k, v in built.items() if k != "undefended"}}
    traffic = {k: v.to(dev) for k, v in speed_traffic(victim.input_shape, n, id_images=resolved.test.x).items()}
    suite.costs = compare_defense_costs(built, traffic, batch_size=batch_size, repeats=repeats)
    suite.flops = defense_flops(built, traffic, batch_size=batch_size)
    base = count_flops(victim, torch.zeros(1, *victim.input_shape)) / 1e6
    for name, d in built.items():
        if isinstance(d, DNF):
            hists: dict[str, list[float]] = {}
            for tname, x in traffic.items():
                rep = compare_forward_speed(d.net, x, batch_size=batch_size, repeats=repeats)
                suite.forward.append({"defense": name, "traffic": tname, **rep.as_dict()})
                hists[tname] = rep.exit_hist
            per_exit = exit_flops(d.net)
            suite.exits.append(ExitFlops(name, per_exit, [v / base for v in per_exit], hists))
    return suite
