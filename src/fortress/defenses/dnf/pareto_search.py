"""Three-way threshold search: protection, compute on benign traffic and utility, traded with SMAC3.

The single-objective search (:func:`~fortress.defenses.dnf.threshold_search.search_thresholds`,
paper App. H) only minimises what a surrogate attack extracts. Thresholds also decide what benign
users pay: an ID query that leaves at an early exit skips the later stages (paper §5.6, Table 11).
Here SMAC3's multi-objective optimisation (ParEGO scalarisation in the hyper-parameter optimisation
facade) minimises three objectives at once over the same threshold space:

* ``surrogate`` — the quick surrogate attack's clone accuracy (as in the single-objective search);
* ``id_compute`` — FLOPs per ID validation query, as a fraction of the undefended victim's
  (:func:`fortress.bench.flops.exit_flops`: every exit's cost, weighted by where the queries leave);
* ``utility_loss`` — the victim's ID validation accuracy minus the defended one.

Every threshold vector is answered in closed form from one :class:`ExitTable` per data set. Trials
whose utility loss exceeds the budget are infeasible (their first two objectives are reported as
``1 + shortfall``, so they never enter the front). The non-dominated feasible trials form the
Pareto front, written as JSON lines (``threshold_pareto.jsonl``; drawn by
:func:`fortress.bench.threshold_plot.plot_pareto`); one point is picked:

* ``protection`` — the lowest surrogate clone accuracy (ties: less compute);
* ``efficiency`` — the least ID compute among front points that protect no worse than the paper's
  default thresholds (falls back to ``protection`` when none does);
* ``pareto`` — the front point nearest the utopia point, each objective scaled to [0, 1] over the front.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from fortress.defenses.dnf.smac_order import ordered_acquisition_maximizer
from fortress.defenses.dnf.threshold_search import (
    GOALS,
    ExitTable,
    ThresholdSearchConfig,
    _check_inputs,
    _Surrogate,
    default_query_set,
)
from fortress.errors import ConfigError
from fortress.exits.flops import count_flops, exit_flops
from fortress.exits.network import EarlyExitNet, default_thresholds
from fortress.tensors import check_labels

__all__ = ["GOALS", "ParetoResult", "ParetoTrial", "pick", "search_pareto"]

log = logging.getLogger(__name__)

Goal = Literal["protection", "efficiency", "pareto"]
OBJECTIVES = ("surrogate", "id_compute", "utility_loss")
PARETO_FILE = "threshold_pareto.jsonl"


@dataclass(frozen=True)
class ParetoTrial:
    """One threshold vector and its three objectives.

    Attributes:
        trial: evaluation order (``-1``: the paper-default reference).
        thresholds: per-head thresholds.
        surrogate: surrogate clone accuracy on ID validation data.
        id_compute: FLOPs per ID validation query over the undefended victim's.
        utility_loss: victim ID validation accuracy minus the defended one (fraction, not points).
        val_acc: defended ID validation accuracy.
        feasible: ``utility_loss`` is within the budget.
        id_exit_hist: share of ID validation queries per exit.
        query_exit_hist: share of the third set's queries per exit.
    """

    trial: int
    thresholds: list[float]
    surrogate: float
    id_compute: float
    utility_loss: float
    val_acc: float
    feasible: bool
    id_exit_hist: list[float]
    query_exit_hist: list[float]


@dataclass(frozen=True)
class ParetoResult:
    """What :func:`search_pareto` found.

    Attributes:
        chosen: the trial picked by ``goal``.
        goal: how it was picked.
        front: the non-dominated feasible trials (sorted by surrogate).
        baseline: the paper-default thresholds under the same objectives.
        trials: every trial in evaluation order.
        victim_val_acc: the victim's ID validation accuracy.
        front_path: the JSONL record (``None`` without an output directory).
        wall_s: seconds for the whole search.
    """

    chosen: ParetoTrial
    goal: str
    front: list[ParetoTrial]
    baseline: ParetoTrial
    trials: list[ParetoTrial]
    victim_val_acc: float
    front_path: Path | None = None
    wall_s: float = 0.0


def _dominates(a: ParetoTrial, b: ParetoTrial) -> bool:
    va, vb = [getattr(a, k) for k in OBJECTIVES], [getattr(b, k) for k in OBJECTIVES]
    return all(x <= y for x, y in zip(va, vb, strict=True)) and any(x < y for x, y in zip(va, vb, strict=True))


def pareto_front(trials: Sequence[ParetoTrial]) -> list[ParetoTrial]:
    """The feasible trials no other feasible trial dominates (duplicates kept once), by surrogate."""
    feas = [t for t in trials if t.feasible]
    front: list[ParetoTrial] = []
    seen: set[tuple[float, ...]] = set()
    for t in feas:
        key = tuple(getattr(t, k) for k in OBJECTIVES)
        if key in seen or any(_dominates(o, t) for o in feas):
            continue
        seen.add(key)
        front.append(t)
    return sorted(front, key=lambda t: (t.surrogate, t.id_compute, t.trial))


def pick(front: Sequence[ParetoTrial], goal: str, baseline: ParetoTrial) -> ParetoTrial:
    """One point of ``front`` by ``goal`` (``protection``, ``efficiency`` or ``pareto``; module docstring).

    Raises:
        ConfigError: an unknown goal or an empty front.
    """
    if goal not in GOALS:
        raise ConfigError(f"unknown threshold-search objective {goal!r}; valid: {', '.join(GOALS)}")
    if not front:
        raise ConfigError("the threshold search found no thresholds within the utility budget")
    protection = min(front, key=lambda t: (t.surrogate, t.id_compute, t.trial))
    if goal == "protection":
        return protection
    if goal == "efficiency":
        safe = [t for t in front if t.surrogate <= baseline.surrogate + 1e-9]
        return min(safe, key=lambda t: (t.id_compute, t.surrogate, t.trial)) if safe else protection
    lo = {k: min(getattr(t, k) for t in front) for k in OBJECTIVES}
    span = {k: (max(getattr(t, k) for t in front) - lo[k]) or 1.0 for k in OBJECTIVES}
    return min(front, key=lambda t: (sum(((getattr(t, k) - lo[k]) / span[k]) ** 2 for k in OBJECTIVES), t.trial))


def search_pareto(
    net: EarlyExitNet,
    val: tuple[Tensor, Tensor],
    *,
    goal: str = "pareto",
    max_utility_drop: float = 0.5,
    config: ThresholdSearchConfig | None = None,
    query: Tensor | None = None,
    dataset: str | None = "mnist",
    out_dir: Path | None = None,
) -> ParetoResult:
    """Search per-exit thresholds for the three-way trade-off and pick one point of the Pareto front.

    The network's thresholds are left unchanged; apply ``result.chosen.thresholds`` to use them.

    Args:
        net: a trained early-exit network (e.g. ``DNF.net``).
        val: labelled ID validation data ``(x, y)``: utility, ID compute and the clone's score.
        goal: ``protection``, ``efficiency`` or ``pareto`` (module docstring).
        max_utility_drop: the utility budget in points of ID validation accuracy.
        config: trial budget, threshold range, surrogate settings and seed (its ``tolerance`` is
            replaced by the budget).
        query: the third data set of the surrogate attack (default :func:`default_query_set`).
        dataset: picks the paper-default reference thresholds.
        out_dir: where SMAC3's run directory and ``threshold_pareto.jsonl`` go.

    Raises:
        ConfigError: an unknown goal, a budget outside [0, 100], or no feasible thresholds.
        InvalidInput: the validation data break the label contract.
    """
    from ConfigSpace import Configuration, ConfigurationSpace, Float
    from smac import HyperparameterOptimizationFacade, Scenario
    from smac.multi_objective.parego import ParEGO

    if goal not in GOALS:
        raise ConfigError(f"unknown threshold-search objective {goal!r}; valid: {', '.join(GOALS)}")
    if not 0.0 <= max_utility_drop <= 100.0:
        raise ConfigError(f"max_utility_drop (points of ID accuracy) must be in [0, 100], got {max_utility_drop}")
    cfg = config or ThresholdSearchConfig()
    x_val, y_val = val
    y_val = check_labels(y_val, len(x_val), net.num_classes, name="validation labels")
    _check_inputs(x_val, y_val, "validation data")
    x_query = default_query_set(cfg, net.backbone.input_shape) if query is None else query
    heads = net.num_exits - 1
    t_start = time.perf_counter()
    val_table, query_table = ExitTable.build(net, x_val), ExitTable.build(net, x_query)
    with torch.no_grad():
        victim_val_acc = float((net.backbone(x_val).argmax(1) == y_val).float().mean())
    undefended = count_flops(net.backbone, x_val[:1]) / 1e6
    cost = torch.tensor(exit_flops(net)) / undefended  # (E,) per exit, over the undefended victim
    surrogate = _Surrogate(x_query, x_val, y_val, net.num_classes, cfg)
    budget = max_utility_drop / 100.0

    def evaluate(thresholds: Sequence[float], trial: int) -> ParetoTrial:
        thr = torch.tensor([float(t) for t in thresholds], dtype=torch.float32)
        val_acc = float((val_table.answers(thr).argmax(1) == y_val).float().mean())
        id_exits = val_table.exits(thr)
        q_hist = torch.bincount(query_table.exits(thr), minlength=net.num_exits).float() / x_query.shape[0]
        id_hist = torch.bincount(id_exits, minlength=net.num_exits).float() / x_val.shape[0]
        return ParetoTrial(
            trial=trial,
            thresholds=thr.tolist(),
            surrogate=surrogate.clone_accuracy(query_table.answers(thr)),
            id_compute=float(cost[id_exits].mean()),
            utility_loss=victim_val_acc - val_acc,
            val_acc=val_acc,
            feasible=victim_val_acc - val_acc <= budget + 1e-9,
            id_exit_hist=id_hist.tolist(),
            query_exit_hist=q_hist.tolist(),
        )

    names = [f"r{i}" for i in range(heads)]
    base = [float(t) for t in default_thresholds(heads, dataset)]
    clip = [min(max(t, cfg.low), cfg.high) for t in base]
    space = ConfigurationSpace(seed=cfg.seed)
    space.add([Float(n, (cfg.low, cfg.high), default=c) for n, c in zip(names, clip, strict=True)])
    trials: list[ParetoTrial] = []

    def target(config: Configuration, seed: int = 0) -> dict[str, float]:
        rec = evaluate([float(config[n]) for n in names], len(trials))
        trials.append(rec)
        short = max(0.0, rec.utility_loss - budget)
        log.info(
            "pareto trial %d: %s surrogate %.4f compute %.3f", rec.trial, rec.thresholds, rec.surrogate, rec.id_compute
        )
        return {
            "surrogate": rec.surrogate if rec.feasible else 1.0 + short,
            "id_compute": rec.id_compute if rec.feasible else 1.0 + short,
            "utility_loss": rec.utility_loss,
        }

    with tempfile.TemporaryDirectory() as tmp:
        scenario = Scenario(
            space,
            name="thresholds-pareto",
            objectives=list(OBJECTIVES),
            output_directory=(Path(out_dir) if out_dir is not None else Path(tmp)) / "smac-pareto",
            deterministic=True,
            n_trials=cfg.n_trials,
            seed=cfg.seed,
        )
        starts = [dict(zip(names, clip, strict=True)), dict.fromkeys(names, cfg.high), dict.fromkeys(names, cfg.low)]
        design = HyperparameterOptimizationFacade.get_initial_design(
            scenario,
            n_configs=max(0, min(cfg.n_trials // 4, 10 * heads) - len(starts)),
            additional_configs=[Configuration(space, values=v) for v in starts],
        )
        smac = HyperparameterOptimizationFacade(
            scenario,
            target,  # SMAC3 takes a dict of costs, one per objective
            initial_design=design,
            multi_objective_algorithm=ParEGO(scenario, seed=cfg.seed),
            acquisition_maximizer=ordered_acquisition_maximizer(scenario),
            logging_level=False,
            overwrite=True,
        )
        smac.optimize()
    baseline = evaluate(base, -1)
    front = pareto_front(trials)
    chosen = pick(front, goal, baseline)
    front_path = None
    if out_dir is not None:
        front_path = Path(out_dir) / PARETO_FILE
        keys = {id(t) for t in front}
        lines = [json.dumps({"kind": "baseline", **asdict(baseline)})]
        lines += [json.dumps({"kind": "trial", "on_front": id(t) in keys, **asdict(t)}) for t in trials]
        lines.append(json.dumps({"kind": "chosen", "goal": goal, "victim_val_acc": victim_val_acc, **asdict(chosen)}))
        front_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ParetoResult(
        chosen=chosen,
        goal=goal,
        front=front,
        baseline=baseline,
        trials=trials,
        victim_val_acc=victim_val_acc,
        front_path=front_path,
        wall_s=time.perf_counter() - t_start,
    )
