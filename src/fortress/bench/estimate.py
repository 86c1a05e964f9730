"""``fortress bench GRID --dry-run``: the cells of a grid and what they will cost, before running any.

Wall time is estimated from short measured probes on the chosen device, never from tables of past
runs, so the figure follows the machine, the device and the grid's own parameters:

* **attacks** — each distinct attack (name, parameters, clone, victim, data, output mode) runs
  against an untrained, undefended copy of its victim at two small budgets ``b1 < b2``; the time
  is read as linear in the queries used. Every integer parameter named ``*epochs`` is set to 1 in
  those runs, and run once more at 2 per parameter and budget, so that its cost per epoch (a fixed
  part and a part per query, e.g. DFMS-HL's DCGAN pre-training and its warm-up training) is
  measured too: ``t(b, E) = t(b, 1) + Σ_i (E_i - 1) (g_i + h_i b)``;
* **defenses** — each distinct defense is built without training on the untrained victim and
  its answering time per query is measured on a batch of 256 images; a cell adds the difference
  to the undefended answer, times the budget, to its attack's time;
* **builds** — a victim's training from the time of a few training steps (times the steps of
  its recipe); a fitted defense from one epoch on a few batches (times the epochs and the data);
  DNF from a few steps of its DCGAN and of its exit-head training and one shortened trial of its
  threshold search; a utility match from the time of one pass over the validation split per step.

The total is a simulation of the executor: ``workers`` tasks at once, builds before the cells that
need them, cells in grid order (the local executor runs one task at a time). Nothing is written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.table import Table

from fortress.bench.grid import Cell, DefenseSpec, GridConfig, expand_grid
from fortress.config import AttackConfig, VictimConfig
from fortress.device import resolve_device
from fortress.errors import ConfigError

__all__ = ["BuildEstimate", "CellEstimate", "GridEstimate", "estimate_grid", "estimate_tables", "simulate_wall"]

log = logging.getLogger(__name__)

_TIMING_BATCH = 256


@dataclass(frozen=True)
class BuildEstimate:
    """One artifact build (a victim or a defense on it) and its estimated seconds."""

    key: str
    what: str
    seconds: float
    needs: str | None = None


@dataclass(frozen=True)
class CellEstimate:
    """One cell: its estimated seconds (attack + defense answers + evaluation and setup)."""

    cell: Cell
    seconds: float
    attack_s: float
    defense_s: float
    other_s: float


@dataclass
class GridEstimate:
    """A dry run's result: every cell and build with its estimate, and the simulated wall time.

    Attributes:
        grid: the grid's name.
        device: the device the probes ran on.
        workers: tasks at once in the simulated executor.
        cells: per-cell estimates in grid order.
        builds: per-build estimates (victims first).
        wall_s: the simulated wall time of the whole grid.
        probe_s: how long the probes took.
    """

    grid: str
    device: str
    workers: int
    cells: list[CellEstimate] = field(default_factory=list)
    builds: list[BuildEstimate] = field(default_factory=list)
    wall_s: float = 0.0
    probe_s: float = 0.0

    @property
    def work_s(self) -> float:
        """Seconds of work in all (builds and cells), as if one task ran at a time."""
        return sum(c.seconds for c in self.cells) + sum(b.seconds for b in self.builds)

    def summary(self) -> str:
        """One line: cells, work, wall time with the workers, probe time."""
        unit = "GPU" if self.device.startswith("cuda") else "device"
        return (
            f"grid {self.grid!r}: {len(self.cells)} cells, {len(self.builds)} builds on {self.device}; "
            f"about {_human(self.work_s)} of work ({self.work_s / 3600:.1f} {unit}-hours), about "
            f"{_human(self.wall_s)} of wall time with {self.workers} task(s) at once "
            f"(probes took {self.probe_s:.0f} s)"
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (cells by key and description)."""
        return {
            "grid": self.grid,
            "device": self.device,
            "workers": self.workers,
            "wall_s": self.wall_s,
            "work_s": self.work_s,
            "probe_s": self.probe_s,
            "builds": [dataclasses.asdict(b) for b in self.builds],
            "cells": [
                {"key": c.cell.key, "cell": c.cell.describe(), "seconds": c.seconds, "attack_s": c.attack_s}
                for c in self.cells
            ],
        }


def _human(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds ``fn`` takes: wall-clock on a GPU; on the CPU with one torch thread, this thread's CPU
    time (the co-running load of :class:`_CoRunners` slows it as other tasks would, without being
    counted, and waiting for other processes' turns is not counted either)."""
    _sync(device)
    clock = time.thread_time if device.type == "cpu" and torch.get_num_threads() == 1 else time.perf_counter
    t0 = clock()
    fn()
    _sync(device)
    return clock() - t0


# -- probes ---------------------------------------------------------------------------------------


class _CoRunners:
    """``n`` background threads training a copy of the victim on random images while the probes run.

    With ``workers`` tasks at once on a CPU, every task shares caches and memory bandwidth with the
    others; the probes run beside ``workers - 1`` such tasks so that their times include that cost.
    Torch releases the GIL inside its kernels, so the threads run side by side.
    """

    def __init__(self, n: int, make_model: Callable[[], Any], shape: tuple[int, ...]) -> None:
        import threading

        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(make_model, shape), daemon=True) for _ in range(n)]

    def _run(self, make_model: Callable[[], Any], shape: tuple[int, ...]) -> None:
        torch.set_num_threads(1)
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        x = torch.rand((64, *shape))
        while not self._stop.is_set():
            loss = model(x).logsumexp(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def __enter__(self) -> _CoRunners:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


class _Prober:
    """Runs and caches the probes of one grid on one device."""

    def __init__(self, grid: GridConfig, device: torch.device) -> None:
        self.grid = grid
        self.device = device
        self._victims: dict[str, Any] = {}
        self._defense_s: dict[str, float] = {}
        self._attack_models: dict[str, Callable[[int], float]] = {}
        self._eval_s: dict[str, float] = {}
        self._dnf_train_s: dict[str, float] = {}

    # the untrained victim and its data
    def victim(self, v: VictimConfig) -> tuple[Any, Any]:
        from fortress.bench.pipeline import id_data
        from fortress.models import create_model

        key = json.dumps(dataclasses.asdict(v), sort_keys=True, default=str)
        if key not in self._victims:
            data = id_data(v.spec)
            c, h, _ = data.image_shape
            torch.manual_seed(0)
            model = create_model(v.arch, num_classes=data.num_classes, in_channels=c, image_size=h).to(self.device)
            self._victims[key] = (model.eval(), data)
        out: tuple[Any, Any] = self._victims[key]
        return out

    def victim_build_s(self, v: VictimConfig) -> float:
        """Training steps of the victim's recipe times the measured time of one step, plus its evaluation."""
        from fortress.models import predict_logits, train_classifier

        model, data = self.victim(v)
        probe = _copy(model)
        recipe = dataclasses.replace(v.train_recipe(), epochs=1, schedule="constant", milestones=None)
        bs = recipe.batch_size
        n = data.train.x.shape[0]
        k = min(n, 4 * bs)
        opts = recipe.as_kwargs()
        x, y = data.train.x, data.train.targets
        train_classifier(probe, x[:bs], y[:bs], **opts)  # warm-up
        s = _timed(lambda: train_classifier(probe, x[:k], y[:k], **opts), self.device)
        per_step = s / math.ceil(k / bs)
        test = _timed(lambda: predict_logits(model, data.test.x), self.device)
        return float(per_step * v.epochs * math.ceil(n / bs) + test)

    # answering cost of a defense
    def defense_s_per_query(self, v: VictimConfig, spec: DefenseSpec) -> float:
        key = json.dumps([dataclasses.asdict(v), spec.name, spec.params], sort_keys=True, default=str)
        if key not in self._defense_s:
            model, _ = self.victim(v)
            defense = _untrained_defense(spec, model)
            x = torch.rand((_TIMING_BATCH, *model.input_shape), generator=torch.Generator().manual_seed(0))
            x = x.to(self.device)
            with torch.no_grad():
                defense.respond(x)
                reps = 3
                s = _timed(lambda: [defense.respond(x) for _ in range(reps)], self.device)
            self._defense_s[key] = s / (reps * _TIMING_BATCH)
        return self._defense_s[key]

    def eval_s(self, v: VictimConfig, clone: str) -> float:
        """Seconds of one clone evaluation on the ID test split."""
        from fortress.models import create_model, predict_logits

        key = f"{v.arch}|{v.spec.text()}|{clone}"
        if key not in self._eval_s:
            model, data = self.victim(v)
            c, h, _ = model.input_shape
            net = create_model(clone, num_classes=model.num_classes, in_channels=c, image_size=h).to(self.device)
            self._eval_s[key] = _timed(lambda: predict_logits(net, data.test.x), self.device)
        return self._eval_s[key]

    # an attack's time as a function of its budget
    def attack_model(self, v: VictimConfig, a: AttackConfig, max_budget: int) -> Callable[[int], float]:
        key = json.dumps([dataclasses.asdict(v), a.name, a.params, a.clone, a.pool, a.output_mode], default=str)
        if key not in self._attack_models:
            self._attack_models[key] = self._probe_attack(v, a, max_budget)
        return self._attack_models[key]

    def _run_attack(self, v: VictimConfig, a: AttackConfig, budget: int, params: dict[str, Any]) -> tuple[int, float]:
        from fortress.attacks import ATTACKS
        from fortress.bench.pipeline import attack_pool
        from fortress.data.defaults import load_pool
        from fortress.defenses import Undefended
        from fortress.models import create_model
        from fortress.oracle import LocalOracle

        model, data = self.victim(v)
        c, h, _ = model.input_shape
        pool_name = attack_pool(a, data, model.input_shape)
        pool = None if pool_name is None else load_pool(pool_name, model.input_shape, data).x
        oracle = LocalOracle(Undefended(model), budget=budget, output_mode=a.output_mode)
        attack = ATTACKS.get(a.name)(oracle, budget=budget, seed=0, **params)
        torch.manual_seed(0)
        clone = create_model(a.clone, num_classes=model.num_classes, in_channels=c, image_size=h).to(self.device)
        holder: list[Any] = []
        s = _timed(lambda: holder.append(attack.run(clone, pool)), self.device)
        return max(1, int(holder[0].queries_used)), s

    def _probe_attack(self, v: VictimConfig, a: AttackConfig, max_budget: int) -> Callable[[int], float]:
        from fortress.attacks import ATTACKS

        full = dict(a.params)
        model, _ = self.victim(v)
        from fortress.defenses import Undefended
        from fortress.oracle import LocalOracle

        shown = ATTACKS.get(a.name)(LocalOracle(Undefended(model), budget=max_budget), budget=max_budget, **full)
        hp = shown.hparams()
        epochs = {k: int(val) for k, val in hp.items() if k.endswith("epochs") and isinstance(val, int) and val > 1}
        ones = {**full, **{k: 1 for k in epochs}}
        b1 = min(max_budget, 20_000, max(2048, max_budget // 100))
        while True:  # the smallest probe budget the attack accepts (e.g. one DFME iteration)
            try:
                self._run_attack(v, a, b1, ones)  # warm-up: a process's first runs pay one-off costs
                q1, t1 = self._run_attack(v, a, b1, ones)
                break
            except ConfigError:
                if b1 >= max_budget:
                    raise
                b1 = min(max_budget, 2 * b1)
        b2 = min(max_budget, 2 * b1)
        if b2 <= b1:  # a small budget: measured as it is, with its epochs
            _, s = self._run_attack(v, a, max_budget, full)
            return lambda budget: s * budget / max_budget
        q2, t2 = self._run_attack(v, a, b2, ones)
        slope = max(0.0, (t2 - t1) / max(1, q2 - q1))
        base = max(0.0, t1 - slope * q1)
        per_epoch: list[tuple[int, float, float]] = []
        for k, e in epochs.items():
            twos = {**ones, k: 2}
            d1 = max(0.0, self._run_attack(v, a, b1, twos)[1] - t1)
            d2 = max(0.0, self._run_attack(v, a, b2, twos)[1] - t2)
            h = max(0.0, (d2 - d1) / max(1, q2 - q1))
            per_epoch.append((e, max(0.0, d1 - h * q1), h))

        def seconds(budget: int) -> float:
            return base + slope * budget + sum((e - 1) * (g + h * budget) for e, g, h in per_epoch)

        return seconds

    # a defense's build
    def defense_build_s(self, v: VictimConfig, spec: DefenseSpec) -> float:
        from fortress.bench.build import _fit_config, _split, _utility_target
        from fortress.defenses import DEFENSES

        model, data = self.victim(v)
        if spec.name == "dnf":
            return self._dnf_build_s(v, spec)
        if spec.name == "undefended":
            return 0.0
        ctor, fit = _split(spec.params)
        cls = DEFENSES.get(spec.name)
        total = 0.0
        defense = cls(_copy(model), **ctor).to(self.device)
        if fit is not None:
            cfg = _fit_config(cls, fit, spec.name)
            total += self._fit_s(defense, cfg, data)
        target = _utility_target(spec.name, spec.params)
        if target is not None:
            x = data.val.x.to(self.device)
            with torch.no_grad():
                one = _timed(lambda: defense.respond(x), self.device)
            total += one * (target.steps + 2)
        return total

    def _fit_s(self, defense: Any, cfg: Any, data: Any) -> float:
        from fortress.bench.pipeline import defender_data

        full = defender_data(data)
        epochs = int(getattr(cfg, "epochs", 1))
        bs = int(getattr(cfg, "batch_size", 128))
        n = full.x_train.shape[0]
        k = min(n, 3 * bs)
        sub = dataclasses.replace(full, x_train=full.x_train[:k], y_train=full.y_train[:k])
        one = dataclasses.replace(cfg, epochs=1)
        s = _timed(lambda: defense.fit(sub, one), self.device)
        return s * epochs * n / k

    def _dnf_build_s(self, v: VictimConfig, spec: DefenseSpec) -> float:
        from fortress.bench.build import _protect_config
        from fortress.bench.pipeline import defender_data
        from fortress.defenses.dnf.threshold_search import _Surrogate, default_query_set

        model, data = self.victim(v)
        cfg = _protect_config(spec.params)
        parts = [dataclasses.asdict(v), dataclasses.asdict(cfg.ood), dataclasses.asdict(cfg.train)]
        key = json.dumps(parts, default=str)
        if key not in self._dnf_train_s:
            self._dnf_train_s[key] = self._dnf_train(v, cfg)
        total = self._dnf_train_s[key]
        if cfg.search is not None:
            sc = cfg.search
            full = defender_data(data)
            query = default_query_set(sc, model.input_shape)
            short = dataclasses.replace(sc, clone_epochs=1, clone_repeats=1)
            sur = _Surrogate(query, full.x_val, full.y_val, model.num_classes, short)
            answers = torch.softmax(torch.randn(query.shape[0], model.num_classes), dim=1)
            s = _timed(lambda: sur.clone_accuracy(answers), self.device)
            total += s * sc.clone_epochs * sc.clone_repeats * sc.n_trials
        return total

    def _dnf_train(self, v: VictimConfig, cfg: Any) -> float:
        """Seconds of DNF's DCGAN and exit-head training (the part a threshold search does not change)."""
        from fortress.bench.pipeline import defender_data
        from fortress.defenses.dnf.training import train_dnf
        from fortress.generative.dcgan import train_dcgan
        from fortress.generative.ood import NoiseOOD

        model, data = self.victim(v)
        total = 0.0
        if "dcgan" in cfg.ood.kind:
            bs, steps = 64, 3
            imgs = torch.rand((bs * steps, *model.input_shape), generator=torch.Generator().manual_seed(0))
            s = _timed(lambda: train_dcgan(imgs, epochs=1, ngf=cfg.ood.dcgan_ngf, device=self.device), self.device)
            total += s / steps * cfg.ood.dcgan_epochs * (cfg.ood.proxy_size // bs)
        dnf = _untrained_defense(DefenseSpec("dnf", params={"head_kind": cfg.head_kind}), _copy(model))
        tr = cfg.train
        full = defender_data(data)
        n = full.x_train.shape[0]
        k = min(n, 3 * tr.batch_size)
        one = dataclasses.replace(tr, epochs=1)
        ood = NoiseOOD(model.input_shape)
        s = _timed(lambda: train_dnf(dnf.net, full.x_train[:k], full.y_train[:k], ood, config=one), self.device)
        return float(total + s / math.ceil(k / tr.batch_size) * tr.epochs * math.ceil(n / tr.batch_size))


def _copy(model: Any) -> Any:
    import copy

    return copy.deepcopy(model)


def _untrained_defense(spec: DefenseSpec, model: Any) -> Any:
    """The defense built without training (its answering cost does not depend on its weights)."""
    from fortress.bench.build import _protect_config, _split
    from fortress.defenses import DEFENSES, DNF, Undefended

    if spec.name == "undefended":
        return Undefended(model)
    if spec.name == "dnf":
        cfg = _protect_config(spec.params)
        dnf = DNF(model, head_kind=cfg.head_kind, hidden=cfg.hidden, thresholds=cfg.thresholds)
        return dnf.to(next(model.parameters()).device)
    ctor, _ = _split(spec.params)
    return DEFENSES.get(spec.name)(model, **ctor).to(next(model.parameters()).device)


# -- the grid -------------------------------------------------------------------------------------


def simulate_wall(builds: Sequence[BuildEstimate], cells: Sequence[tuple[str, float]], workers: int) -> float:
    """Wall time of running ``builds`` and ``cells`` with ``workers`` tasks at once.

    Builds are submitted first (a defense after its victim); cells in order, at most ``workers``
    in flight, each after its build (``cells`` holds ``(build key, seconds)``). A free worker takes
    the earliest submitted task that is ready.
    """
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    done: dict[str, float] = {}
    free = [0.0] * workers
    for b in builds:  # builds get the workers first, as submitted (a defense after its victim)
        i = min(range(workers), key=lambda j: free[j])
        start = max(free[i], done.get(b.needs, 0.0) if b.needs else 0.0)
        free[i] = start + b.seconds
        done[b.key] = free[i]
    in_flight: list[float] = []
    cell_ends: list[float] = []
    for key, seconds in cells:
        submit = 0.0
        if len(in_flight) >= workers:  # the driver submits the next cell when one finishes
            in_flight.sort()
            submit = in_flight.pop(0)
        i = min(range(workers), key=lambda j: free[j])
        start = max(free[i], done.get(key, 0.0), submit)
        free[i] = start + seconds
        in_flight.append(free[i])
        cell_ends.append(free[i])
    return max([*free, *cell_ends, 0.0])


def estimate_grid(
    grid: GridConfig,
    *,
    device: str = "cpu",
    workers: int = 1,
    threads: int = 1,
    cells: Sequence[Cell] | None = None,
) -> GridEstimate:
    """Estimate the wall time of ``grid`` (or of ``cells`` of it) from short probes on ``device``.

    Args:
        grid: the grid.
        device: where the probes (and the grid) run.
        workers: tasks at once (Ray: the CPUs or GPU slots; local: 1).
        threads: torch threads during the probes (as each task will have).
        cells: a subset of the grid's cells to estimate (default: all).

    Returns:
        The :class:`GridEstimate`.

    Raises:
        ConfigError: an unavailable device or bad ``workers``.
    """
    dev = resolve_device(device)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    v0 = grid.victims[0]
    shape = (1, 28, 28)
    try:
        from fortress.bench.pipeline import id_data
        from fortress.models import create_model

        data = id_data(grid.victim_data(v0))
        shape = data.image_shape

        def make() -> Any:
            return create_model(v0.arch, num_classes=data.num_classes, in_channels=shape[0], image_size=shape[1])

        co = _CoRunners(workers - 1 if dev.type == "cpu" and threads == 1 else 0, make, shape)
        with co:
            return _estimate(grid, dev, workers, todo=list(cells) if cells is not None else expand_grid(grid), t0=t0)
    finally:
        torch.set_num_threads(before)


def _estimate(grid: GridConfig, dev: torch.device, workers: int, *, todo: list[Cell], t0: float) -> GridEstimate:
    """:func:`estimate_grid`'s work, with threads and co-runners set up."""
    prober = _Prober(grid, dev)
    est = GridEstimate(grid=grid.name, device=str(dev), workers=workers)
    builds: dict[str, BuildEstimate] = {}
    for c in todo:
        if c.victim_key not in builds:
            s = prober.victim_build_s(c.victim)
            builds[c.victim_key] = BuildEstimate(c.victim_key, f"victim {c.victim.arch}", s)
        if c.defense_key not in builds:
            s = prober.defense_build_s(c.victim, c.defense)
            what = f"{c.defense.display} on {c.victim.arch}"
            builds[c.defense_key] = BuildEstimate(c.defense_key, what, s, c.victim_key)
    budgets: dict[str, int] = {}
    for c in todo:
        k = _attack_key(c)
        budgets[k] = max(budgets.get(k, 0), c.attack.budget)
    base = DefenseSpec("undefended")
    for c in todo:
        model = prober.attack_model(c.victim, c.attack, budgets[_attack_key(c)])
        attack_s = model(c.attack.budget)
        extra = prober.defense_s_per_query(c.victim, c.defense) - prober.defense_s_per_query(c.victim, base)
        defense_s = max(0.0, extra) * c.attack.budget
        evals = 1 + (0 if c.eval_every is None else c.attack.budget // c.eval_every)
        _, data = prober.victim(c.victim)
        n_test = data.test.x.shape[0]
        other = evals * prober.eval_s(c.victim, c.attack.clone) + 3 * n_test * prober.defense_s_per_query(
            c.victim, c.defense
        )
        est.cells.append(CellEstimate(c, attack_s + defense_s + other, attack_s, defense_s, other))
    est.builds = list(builds.values())
    est.wall_s = simulate_wall(est.builds, [(c.cell.defense_key, c.seconds) for c in est.cells], workers)
    est.probe_s = time.perf_counter() - t0
    return est


def _attack_key(c: Cell) -> str:
    a = c.attack
    return json.dumps([c.victim_key, a.name, a.params, a.clone, a.pool, a.output_mode], sort_keys=True, default=str)


def estimate_tables(est: GridEstimate) -> list[Table]:
    """The dry run as tables: every cell with its estimate, and every build."""
    cells = Table(title=f"{est.grid}: {len(est.cells)} cells (estimated seconds on {est.device})")
    for col in ("#", "cell", "attack s", "defense s", "other s", "total"):
        cells.add_column(col, justify="left" if col == "cell" else "right")
    for i, c in enumerate(est.cells, 1):
        cells.add_row(
            str(i), c.cell.describe(), f"{c.attack_s:.0f}", f"{c.defense_s:.0f}", f"{c.other_s:.0f}", _human(c.seconds)
        )
    builds = Table(title="builds (estimated)")
    builds.add_column("build")
    builds.add_column("seconds", justify="right")
    for b in est.builds:
        builds.add_row(b.what, _human(b.seconds))
    return [cells, builds]
