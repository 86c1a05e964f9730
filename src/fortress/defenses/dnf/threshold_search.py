"""Search DNF's exit thresholds with SMAC3 Bayesian optimisation (paper App. H, "Exit Threshold Selection").

The paper (App. H, Steps 1–2) picks the per-exit confidence thresholds ``r = (r_0, …, r_N)`` in
``[0.85, 1]`` with SMAC3 so that a clone extracted through a **third data set** — one neither the
defender's training data nor the attacker's pool — is as poor as possible on the target task's
validation set. Here the search also keeps the defence's utility: a threshold vector is feasible
only if the defended accuracy on ID validation data is at least the victim's minus a tolerance.

Thresholds act after training, so nothing is retrained per trial: :class:`ExitTable` runs
:meth:`~fortress.exits.network.EarlyExitNet.forward_all` **once** on the query and validation sets
and then answers any threshold vector in closed form (first exit whose max-softmax reaches its
threshold, Alg. 2), vectorised over rows and over many threshold vectors at once.

The quick surrogate attack (``objective="clone"``, the default) is a Knockoff-style transfer:
a fixed, seeded small clone trained for a few epochs on the defended soft answers to the third
set, scored by its accuracy on ID validation data. It is what App. H prescribes (the clone's
accuracy on the target validation set), it reacts to *what* the answers teach (a wrong but
confident early-exit answer and a flat one teach differently), and it costs 2–3 CPU-seconds a
trial (two 5-epoch LeNet-5-half clones on 2,797 images). It ranks thresholds as a real attack
does: on the LeNet-5/MNIST fixture (seed 0), surrogate 48.2 % / 17.8 % / 13.8 % for thresholds
1/1/1, the paper's 0.92/0.94/0.96 and the searched 0.990/0.861/0.996, against 71.1 % / 16.2 % /
10.7 % for a 5k-query Knockoff from ``patches``. ``objective="agreement"`` is a cheaper proxy:
the share of third-set queries whose defended top-1 equals the victim's (how much of the
victim's labelling leaks); it ignores the soft probabilities an attacker trains on (Spearman 0.54
with the surrogate over 50 trials), so it is offered for very large searches only.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from fortress.defenses.dnf.smac_order import ordered_acquisition_maximizer
from fortress.device import device_of
from fortress.errors import ConfigError, InvalidInput
from fortress.exits.network import EarlyExitNet, default_thresholds
from fortress.models import create_model
from fortress.tensors import check_labels

__all__ = [
    "ExitTable",
    "ThresholdSearchConfig",
    "ThresholdSearchResult",
    "ThresholdTrial",
    "default_query_set",
    "search_thresholds",
]

log = logging.getLogger(__name__)

Objective = Literal["clone", "agreement"]
#: What a three-way search (:mod:`fortress.defenses.dnf.pareto_search`) picks from its Pareto front.
GOALS: tuple[str, ...] = ("protection", "efficiency", "pareto")
#: Seed of the proxy-photo crops in the default third set: never the attacker's ``patches`` crops
#: (seed 0) nor the defender's OOD-training crops (drawn with the OOD seed, 0 by default).
QUERY_PATCH_SEED = 30_000
TRIALS_FILE = "threshold_trials.jsonl"
#: Threshold vectors every search evaluates first (the baseline and the all-``high`` vector), so
#: the smallest trial budget SMAC3 accepts.
START_CONFIGS = 2


@dataclass(frozen=True)
class ThresholdSearchConfig:
    """Settings of the threshold search (paper App. H).

    Attributes:
        n_trials: threshold vectors SMAC3 evaluates, at least 2: the paper defaults and the
            all-``high`` vector are always among them, so the result is never worse than the
            defaults on the objective.
        low: lower end of every threshold's search range (paper: 0.85).
        high: upper end (paper: 1.0).
        tolerance: utility constraint; defended ID-validation accuracy must be at least the victim's
            minus this fraction (0.005 = half a point).
        objective: ``"clone"`` (surrogate Knockoff clone accuracy) or ``"agreement"`` (top-1 leak).
        clone: surrogate clone architecture (model registry name).
        clone_epochs: surrogate training epochs.
        clone_lr: surrogate Adam learning rate.
        clone_repeats: surrogate clones (seeds ``seed, seed+1, …``) whose accuracies are averaged: one
            short transfer is noisy (±0.05 between seeds on the LeNet-5 fixture), the mean less so.
        patches: proxy-photo crops added to the default third set (besides ``digits28``).
        seed: seeds SMAC3 and the surrogate clone.
        goal: ``None`` (default): the single-objective search above. ``"protection"``,
            ``"efficiency"`` or ``"pareto"``: the three-way search (surrogate clone accuracy, ID
            compute per query, utility loss; :func:`~fortress.defenses.dnf.pareto_search.search_pareto`)
            and which point of its Pareto front to apply.
    """

    n_trials: int = 50
    low: float = 0.85
    high: float = 1.0
    tolerance: float = 0.005
    objective: Objective = "clone"
    clone: str = "lenet5-half"
    clone_epochs: int = 5
    clone_lr: float = 2e-3
    clone_repeats: int = 2
    patches: int = 1000
    seed: int = 0
    goal: str | None = None

    def __post_init__(self) -> None:
        if self.goal is not None and self.goal not in GOALS:
            raise ConfigError(f"unknown threshold-search objective {self.goal!r}; valid: {', '.join(GOALS)}")
        if self.n_trials < START_CONFIGS:
            raise ConfigError(
                f"threshold search n_trials must be >= {START_CONFIGS}, got {self.n_trials} (the search always "
                "evaluates the default thresholds and the all-high vector first)"
            )
        if not (0.0 <= self.low < self.high <= 1.0):
            raise ConfigError(
                f"threshold bounds must satisfy 0 <= low < high <= 1, got low={self.low}, high={self.high}"
            )
        if not (0.0 <= self.tolerance <= 1.0):
            raise ConfigError(f"threshold search tolerance must be in [0, 1], got {self.tolerance}")
        if self.objective not in ("clone", "agreement"):
            raise ConfigError(f"threshold search objective must be 'clone' or 'agreement', got {self.objective!r}")
        if self.clone_epochs < 1 or self.clone_lr <= 0 or self.clone_repeats < 1 or self.patches < 0:
            raise ConfigError(
                f"invalid surrogate settings: clone_epochs={self.clone_epochs}, clone_lr={self.clone_lr}, "
                f"clone_repeats={self.clone_repeats}, patches={self.patches}"
            )


@dataclass(frozen=True)
class ExitTable:
    """Every exit's softmax on a fixed set, so any threshold vector is answered without the network.

    Attributes:
        probs: ``(E, N, K)`` softmax of every exit (last = final exit), in depth order.

    Example:
        >>> from fortress.models import create_model
        >>> net = EarlyExitNet(create_model("lenet5"), head_kind="plain")
        >>> table = ExitTable.build(net, torch.rand(5, 1, 28, 28))
        >>> table.exits(torch.tensor([[0.9, 0.9, 0.9], [2.0, 2.0, 2.0]])).shape
        torch.Size([2, 5])
    """

    probs: Tensor

    @classmethod
    @torch.no_grad()
    def build(cls, net: EarlyExitNet, x: Tensor, *, batch_size: int = 2048) -> ExitTable:
        """Run :meth:`EarlyExitNet.forward_all` once over ``x`` (in batches) and keep the softmax rows."""
        net.eval()
        dev = device_of(net)  # computed on the network's device, kept on x's
        parts = [
            torch.softmax(net.forward_all(x[i : i + batch_size].to(dev)).logits, dim=2).to(x.device)
            for i in range(0, len(x), batch_size)
        ]
        return cls(torch.cat(parts, dim=1))

    def exits(self, thresholds: Tensor) -> Tensor:
        """Exit per row for one ``(E-1,)`` or many ``(T, E-1)`` threshold vectors: ``(N,)`` or ``(T, N)``."""
        e = self.probs.shape[0]
        thr = thresholds.to(torch.float32)
        one = thr.dim() == 1
        thr = thr.view(-1, e - 1)
        conf = self.probs[:-1].amax(dim=2)  # (E-1, N)
        passed = conf.unsqueeze(0) >= thr.unsqueeze(2)  # (T, E-1, N)
        idx = torch.arange(e - 1).view(1, -1, 1).expand_as(passed)
        first = torch.where(passed, idx, torch.full_like(idx, e - 1)).amin(dim=1)  # (T, N)
        return first[0] if one else first

    def answers(self, thresholds: Tensor) -> Tensor:
        """Defended probability rows ``(N, K)`` under one threshold vector ``(E-1,)``."""
        ex = self.exits(thresholds)
        return self.probs[ex, torch.arange(self.probs.shape[1])]


@dataclass(frozen=True)
class ThresholdTrial:
    """One evaluated threshold vector.

    Attributes:
        trial: 0-based order of evaluation (``-1``: the paper-default reference, outside the search).
        thresholds: the per-head thresholds.
        cost: what SMAC3 minimised (the objective if feasible, else ``1 + shortfall``).
        feasible: the utility constraint held.
        val_acc: defended accuracy on ID validation data.
        surrogate: the objective's value (surrogate clone accuracy or top-1 agreement).
        agreement: share of third-set answers whose top-1 equals the victim's.
        query_exit_hist: share of third-set queries per exit.
        wall_s: seconds spent on this trial.
    """

    trial: int
    thresholds: list[float]
    cost: float
    feasible: bool
    val_acc: float
    surrogate: float
    agreement: float
    query_exit_hist: list[float]
    wall_s: float


@dataclass(frozen=True)
class ThresholdSearchResult:
    """What :func:`search_thresholds` found.

    Attributes:
        best: the lowest-cost feasible trial (ties: higher utility, then earlier).
        baseline: the paper-default thresholds evaluated with the same objective.
        trials: every SMAC3 trial in evaluation order.
        victim_val_acc: the victim's ID-validation accuracy (the constraint's reference).
        trials_path: the JSONL record of the trials (``None`` without an output directory).
        wall_s: seconds for the whole search.
    """

    best: ThresholdTrial
    baseline: ThresholdTrial
    trials: list[ThresholdTrial]
    victim_val_acc: float
    config: ThresholdSearchConfig
    trials_path: Path | None = None
    wall_s: float = 0.0
    extras: dict[str, Any] = field(default_factory=dict)


def default_query_set(
    config: ThresholdSearchConfig | None = None, image_shape: tuple[int, int, int] = (1, 28, 28)
) -> Tensor:
    """The defender's third data set: ``digits28`` plus fresh proxy-photo crops (paper App. H, Step 1).

    Disjoint from the ID splits and from the attacker pools (``mnist-attacker``; ``patches`` at
    seed 0): the defender does not know the attacker's data. Drawn at ``image_shape``; the grey
    ``digits28`` are left out for colour victims.
    """
    from fortress.data.defaults import fitted_options
    from fortress.data.registry import load_dataset

    cfg = config or ThresholdSearchConfig()
    parts = [load_dataset("digits28", **fitted_options("digits28", image_shape)).x] if image_shape[0] == 1 else []
    if cfg.patches:
        opts = fitted_options("patches", image_shape)
        parts.append(load_dataset("patches", n=cfg.patches, seed=QUERY_PATCH_SEED, **opts).x)
    if not parts:
        raise ConfigError(f"no default query set for {image_shape} images with patches=0; pass query=<your images>")
    return torch.cat(parts)


class _Surrogate:
    """The quick surrogate attack: a seeded Knockoff-style transfer on the defended soft answers."""

    def __init__(self, x_query: Tensor, x_eval: Tensor, y_eval: Tensor, num_classes: int, cfg: ThresholdSearchConfig):
        c, h = int(x_query.shape[1]), int(x_query.shape[2])
        self.clone = create_model(cfg.clone, num_classes=num_classes, in_channels=c, image_size=h)
        self.inits: list[dict[str, Tensor]] = []
        for r in range(cfg.clone_repeats):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed + r)
                fresh = create_model(cfg.clone, num_classes=num_classes, in_channels=c, image_size=h)
            self.inits.append({k: v.clone() for k, v in fresh.state_dict().items()})
        self.x_query, self.x_eval, self.y_eval, self.cfg = x_query, x_eval, y_eval, cfg

    def clone_accuracy(self, answers: Tensor) -> float:
        """Mean ID-validation accuracy of the clone trained on ``answers`` from each fixed initialisation."""
        return sum(self._one(answers, r) for r in range(self.cfg.clone_repeats)) / self.cfg.clone_repeats

    def _one(self, answers: Tensor, repeat: int, batch_size: int = 64) -> float:
        self.clone.load_state_dict(self.inits[repeat])
        opt = torch.optim.Adam(self.clone.parameters(), lr=self.cfg.clone_lr)
        gen = torch.Generator().manual_seed(self.cfg.seed + repeat)
        n = self.x_query.shape[0]
        self.clone.train()
        for _ in range(self.cfg.clone_epochs):
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n - 1, batch_size):
                idx = perm[i : i + batch_size]
                loss = -(answers[idx] * F.log_softmax(self.clone(self.x_query[idx]), dim=1)).sum(1).mean()
                opt.zero_grad(set_to_none=True)
                torch.autograd.backward(loss)
                opt.step()
        self.clone.eval()
        with torch.no_grad():
            return float((self.clone(self.x_eval).argmax(1) == self.y_eval).float().mean())


def _check_inputs(x: Tensor, y: Tensor, what: str) -> None:
    if x.dim() != 4 or y.dim() != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise InvalidInput(
            f"{what} must be images (N, C, H, W) with N labels, got {tuple(x.shape)} and {tuple(y.shape)}"
        )


def search_thresholds(
    net: EarlyExitNet,
    val: tuple[Tensor, Tensor],
    *,
    config: ThresholdSearchConfig | None = None,
    query: Tensor | None = None,
    baseline: Sequence[float] | None = None,
    dataset: str | None = "mnist",
    out_dir: Path | None = None,
) -> ThresholdSearchResult:
    """Search per-exit thresholds with SMAC3 to minimise a surrogate clone's accuracy (paper App. H).

    The network's thresholds are left unchanged; apply ``result.best.thresholds`` to use them.

    Args:
        net: a trained early-exit network (e.g. ``DNF.net``).
        val: labelled ID validation data ``(x, y)``: the utility constraint and the clone's score.
        config: search settings (default :class:`ThresholdSearchConfig`).
        query: the third data set (default :func:`default_query_set`).
        baseline: reference thresholds (default: the paper's for ``dataset``, App. D).
        dataset: picks the paper defaults when ``baseline`` is not given.
        out_dir: where SMAC3's run directory (``smac/``) and the trial record (``threshold_trials.jsonl``) go.

    Returns:
        The best feasible trial, the baseline under the same objective, and every trial.

    Example:
        >>> res = search_thresholds(dnf.net, (val.x, val.targets), config=ThresholdSearchConfig(n_trials=20))
        >>> dnf.set_thresholds(res.best.thresholds)  # doctest: +SKIP
    """
    from ConfigSpace import Configuration, ConfigurationSpace, Float
    from smac import HyperparameterOptimizationFacade, Scenario

    cfg = config or ThresholdSearchConfig()
    x_val, y_val = val
    y_val = check_labels(y_val, len(x_val), net.num_classes, name="validation labels")
    _check_inputs(x_val, y_val, "validation data")
    x_query = default_query_set(cfg, net.backbone.input_shape) if query is None else query
    heads = net.num_exits - 1
    base = [float(t) for t in (default_thresholds(heads, dataset) if baseline is None else baseline)]
    if len(base) != heads:
        raise ConfigError(f"baseline needs {heads} thresholds (one per head), got {base}")
    t_start = time.perf_counter()
    val_table, query_table = ExitTable.build(net, x_val), ExitTable.build(net, x_query)
    with torch.no_grad():
        dev = device_of(net)  # the backbone answers on its device; the tables and labels stay on the CPU
        victim_val_acc = float((net.backbone(x_val.to(dev)).argmax(1).cpu() == y_val.cpu()).float().mean())
        victim_query = net.backbone(x_query.to(dev)).argmax(1).to(x_query.device)
    surrogate = _Surrogate(x_query, x_val, y_val, net.num_classes, cfg)

    def evaluate(thresholds: Sequence[float], trial: int) -> ThresholdTrial:
        t0 = time.perf_counter()
        thr = torch.tensor([float(t) for t in thresholds], dtype=torch.float32)
        val_acc = float((val_table.answers(thr).argmax(1) == y_val).float().mean())
        answers = query_table.answers(thr)
        agreement = float((answers.argmax(1) == victim_query).float().mean())
        hist = torch.bincount(query_table.exits(thr), minlength=net.num_exits).float() / x_query.shape[0]
        shortfall = (victim_val_acc - cfg.tolerance) - val_acc
        feasible = shortfall <= 1e-9
        value = agreement if cfg.objective == "agreement" else surrogate.clone_accuracy(answers)
        return ThresholdTrial(
            trial=trial,
            thresholds=thr.tolist(),
            cost=value if feasible else 1.0 + shortfall,
            feasible=feasible,
            val_acc=val_acc,
            surrogate=value,
            agreement=agreement,
            query_exit_hist=hist.tolist(),
            wall_s=time.perf_counter() - t0,
        )

    names = [f"r{i}" for i in range(heads)]
    clip = [min(max(t, cfg.low), cfg.high) for t in base]
    space = ConfigurationSpace(seed=cfg.seed)
    space.add([Float(n, (cfg.low, cfg.high), default=c) for n, c in zip(names, clip, strict=True)])
    trials: list[ThresholdTrial] = []

    def target(config: Configuration, seed: int = 0) -> float:
        rec = evaluate([float(config[n]) for n in names], len(trials))
        trials.append(rec)
        log.info("threshold trial %d: %s cost %.4f (val acc %.4f)", rec.trial, rec.thresholds, rec.cost, rec.val_acc)
        return rec.cost

    with tempfile.TemporaryDirectory() as tmp:
        smac_dir = (Path(out_dir) if out_dir is not None else Path(tmp)) / "smac"
        scenario = Scenario(
            space,
            name="thresholds",
            output_directory=smac_dir,
            deterministic=True,
            n_trials=cfg.n_trials,
            seed=cfg.seed,
        )
        starts = [dict(zip(names, clip, strict=True)), dict.fromkeys(names, cfg.high)]  # START_CONFIGS
        design = HyperparameterOptimizationFacade.get_initial_design(
            scenario,
            n_configs=max(0, min(cfg.n_trials // 4, 10 * heads) - len(starts)),
            additional_configs=[Configuration(space, values=v) for v in starts],
        )
        smac = HyperparameterOptimizationFacade(
            scenario,
            target,
            initial_design=design,
            acquisition_maximizer=ordered_acquisition_maximizer(scenario),  # same seed, same trials in any process
            logging_level=False,
            overwrite=True,
        )
        smac.optimize()
    baseline_trial = evaluate(base, -1)
    feasible = [t for t in trials if t.feasible] or trials
    best = min(feasible, key=lambda t: (t.cost, -t.val_acc, t.trial))
    path = None
    if out_dir is not None:
        path = Path(out_dir) / TRIALS_FILE
        lines = [json.dumps({"kind": "baseline", **asdict(baseline_trial)})]
        lines += [json.dumps({"kind": "trial", **asdict(t)}) for t in trials]
        lines.append(
            json.dumps({"kind": "best", **asdict(best), "victim_val_acc": victim_val_acc, "config": asdict(cfg)})
        )
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ThresholdSearchResult(
        best=best,
        baseline=baseline_trial,
        trials=trials,
        victim_val_acc=victim_val_acc,
        config=cfg,
        trials_path=path,
        wall_s=time.perf_counter() - t_start,
    )
