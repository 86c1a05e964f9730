"""DNF + monitor + response as one in-process defense: the closed loop, with one key or many (Sybil).

:class:`Monitored` answers like the server does with monitoring on: the wrapped defense answers
the batch, the per-key monitor and the population detector see it under the key the batch was sent
with, and a flagged key's answer is replaced by the response. Which key sends a batch is the
attacker's choice, modelled by :class:`KeyPlan`: one key, ``N`` keys in turn (round-robin, one
batch each), or ``N`` keys one after the other (bursts of ``budget / N`` queries). Every flag is
recorded (key, detector, the attacker's query index at which it fired) so a result says who was
caught when.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import torch
from torch import Tensor

from fortress.defenses import DNF, Defense
from fortress.defenses.base import DefenseOutput
from fortress.errors import ConfigError
from fortress.monitor.base import Monitor, Response
from fortress.monitor.benign import IMAGE_SHIFTS
from fortress.monitor.dadd import DADD, DADDCalibration
from fortress.monitor.exit_sprt import ExitCalibration
from fortress.monitor.misinform import Misinformation, relabel
from fortress.monitor.population import PopulationDrift
from fortress.monitor.step import Step, StepCalibration, WindowSteps, calibrate_step

__all__ = [
    "LOOP_MONITORS",
    "LOOP_RESPONSES",
    "KeyPlan",
    "LoopCalibration",
    "LoopConfig",
    "Monitored",
    "closed_loop",
    "find_dadd",
    "find_member",
    "first_exit_probs",
    "loop_calibration",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeyPlan:
    """How an attacker spreads its queries over keys.

    Attributes:
        keys: number of keys (1: a single account).
        mode: ``"round-robin"`` (each batch from the next key with budget left, split over the
            following keys where it passes that key's ``per_key``) or ``"bursts"`` (each key spends
            ``per_key`` queries, then the next key starts), as :class:`fortress.bench.sybil.SybilOracle`.
        per_key: each key's query budget (once all are spent, the next key in turn takes the rest).
        created_at: creation time of every key (seconds; all in one window: the Sybil case).
    """

    keys: int = 1
    mode: Literal["round-robin", "bursts"] = "round-robin"
    per_key: int = 100
    created_at: float = 0.0

    def __post_init__(self) -> None:
        if self.keys < 1 or self.per_key < 1 or self.mode not in ("round-robin", "bursts"):
            raise ConfigError(f"need keys >= 1, per_key >= 1, mode round-robin|bursts; got {self}")

    def split(self, n: int, used: list[int], turn: int) -> tuple[list[tuple[int, int, int]], int]:
        """A batch of ``n`` as ``(key, start, stop)`` pieces, given each key's queries so far; and the next turn."""
        pieces = []
        done = 0
        while done < n:
            if self.mode == "bursts":
                k = next((i for i in range(self.keys) if used[i] < self.per_key), self.keys - 1)
            else:
                k = next(
                    ((turn + j) % self.keys for j in range(self.keys) if used[(turn + j) % self.keys] < self.per_key),
                    turn % self.keys,
                )
                turn = k + 1
            room = self.per_key - used[k] if used[k] < self.per_key else n - done
            m = min(room, n - done)
            pieces.append((k, done, done + m))
            used[k] += m
            done += m
        return pieces, turn


@dataclass
class _Log:
    flags: list[dict[str, Any]] = field(default_factory=list)
    flagged: set[str] = field(default_factory=set)
    queries: int = 0
    batches: int = 0
    degraded: int = 0
    used: list[int] = field(default_factory=list)
    turn: int = 0


class Monitored(Defense):
    """A defense answered through per-key monitoring, a population detector and a response.

    Args:
        defense: the defense that answers (DNF for ``degrade-exit0``).
        monitor: per-key detector (``None``: none).
        population: detector across keys created in a window (``None``: none); it is fed the
            ``dadd`` features of ``monitor`` (a :class:`DADD` or a union holding one).
        population_step: ``step`` over all keys of the window as one stream
            (:class:`~fortress.monitor.step.WindowSteps`; ``None``: none): JBDA spread over keys
            sends a parent on one key and its step on another. Its contributing keys are flagged
            (``population-step``).
        response: what flagged keys get: ``degrade-exit0`` (DNF's first exit), ``degrade-label``
            (top-1 one-hot rows), ``misinform`` (relabelled by the derangement the server would use,
            :meth:`Misinformation.for_defense <fortress.monitor.misinform.Misinformation.for_defense>`),
            ``misinform-id`` (only the answers from a later exit than the first relabelled so) or
            ``log`` (answers unchanged, flags recorded).
        plan: which key sends each batch.

    Raises:
        ConfigError: an unsupported response, or ``degrade-exit0`` without a DNF.
    """

    name: ClassVar[str] = "monitored"

    def __init__(
        self,
        defense: Defense,
        *,
        monitor: Monitor | None,
        population: PopulationDrift | None = None,
        response: Response = Response.DEGRADE_EXIT0,
        plan: KeyPlan | None = None,
        population_step: WindowSteps | None = None,
    ) -> None:
        super().__init__(defense.victim)
        if response.value not in LOOP_RESPONSES:
            raise ConfigError(f"the closed loop supports {', '.join(LOOP_RESPONSES)}, got {response.value!r}")
        if response is Response.DEGRADE_EXIT0 and not isinstance(defense, DNF):
            raise ConfigError(f"degrade-exit0 needs a DNF defense, got {defense.name!r}")
        self.defense = defense
        self.monitor = monitor
        self.population = population
        self.population_step = population_step
        self.response = response
        self.misinform = Misinformation.for_defense(defense) if response.relabels else None
        self.exit0 = first_exit_probs(defense) if response is Response.DEGRADE_EXIT0 else None
        self.plan = plan or KeyPlan()
        self.dadd = find_dadd(monitor)
        if population is not None and self.dadd is None:
            raise ConfigError("the population detector pools dadd features: the monitor must include 'dadd'")
        self.log = _Log(used=[0] * self.plan.keys)

    @property
    def num_exits(self) -> int | None:
        return self.defense.num_exits

    def modules(self) -> list[torch.nn.Module]:
        return self.defense.modules()

    def hparams(self) -> dict[str, Any]:
        return {
            "defense": self.defense.hparams(),
            "monitor": None if self.monitor is None else self.monitor.name,
            "population": self.population is not None,
            "population_step": self.population_step is not None,
            "response": self.response.value,
            "plan": {"keys": self.plan.keys, "mode": self.plan.mode, "per_key": self.plan.per_key},
        }

    def records(self) -> dict[str, Any]:
        """Who was flagged at which query, and how many answers were degraded."""
        return {
            "flags": list(self.log.flags),
            "keys_flagged": len(self.log.flagged),
            "keys": self.plan.keys,
            "queries": self.log.queries,
            "degraded_answers": self.log.degraded,
        }

    def _who(self, key: str) -> str:
        """The detector that flagged ``key``: the monitor's name, or its flagging members' (``exit-sprt+dadd``)."""
        assert self.monitor is not None
        members = getattr(self.monitor, "members", None)
        if not members:
            return self.monitor.name
        return "+".join(m.name for m in members if m.verdict(key).flagged) or self.monitor.name

    def first_flag(self) -> int | None:
        """The attacker's query index at which the first key was flagged (``None``: none was)."""
        return min((int(f["query"]) for f in self.log.flags), default=None)

    def _flag(self, key: str, by: str, at: int) -> None:
        if key not in self.log.flagged:
            self.log.flagged.add(key)
            self.log.flags.append({"key": key, "by": by, "query": at})
            log.info("key %s flagged by %s at query %d", key, by, at)

    def _respond(self, x: Tensor) -> DefenseOutput:
        out = self.defense.respond(x)
        pieces, self.log.turn = self.plan.split(int(x.shape[0]), self.log.used, self.log.turn)
        self.log.batches += 1
        probs = out.probs.clone()
        for k, start, stop in pieces:
            probs[start:stop] = self._piece(f"key-{k}", x[start:stop], out.probs[start:stop], out.exits, start, stop)
        return DefenseOutput(probs, out.exits)

    def _piece(self, key: str, x: Tensor, probs: Tensor, all_exits: Tensor | None, start: int, stop: int) -> Tensor:
        """Monitor one key's share of a batch; return its answers (the response's for a flagged key)."""
        exits = None if all_exits is None else all_exits[start:stop]
        before = self.log.queries
        n = int(x.shape[0])
        self.log.queries += n
        if self.monitor is not None:
            v = self.monitor.observe(key, x, probs, exits)
            if v.flagged and v.flagged_at is not None:
                # the key's own query index → the attacker's (the key's count before this piece is v.queries - n)
                self._flag(key, self._who(key), before + v.flagged_at - (v.queries - n))
        if self.population is not None and self.dadd is not None:
            feats = self.dadd.featurize(x, probs)
            flag = self.population.add(key, self.plan.created_at, feats, probs.argmax(1), exits)
            if flag is not None:
                for k in flag.contributing:
                    self._flag(k, "population", self.log.queries)
        if self.population_step is not None:
            self._window_steps(key, x, probs)
        if key not in self.log.flagged or self.response is Response.LOG:
            return probs
        self.log.degraded += n
        if self.response is Response.DEGRADE_LABEL:
            return torch.nn.functional.one_hot(probs.argmax(1), probs.shape[1]).to(probs.dtype)
        if self.misinform is not None:
            return relabel(self.misinform, self.response, probs, exits)
        assert self.exit0 is not None
        return self.exit0(x)

    def _window_steps(self, key: str, x: Tensor, probs: Tensor) -> None:
        """Feed the piece to the window-wide ``step``; flag its contributing keys."""
        assert self.population_step is not None
        for k in self.population_step.add(key, self.plan.created_at, x, probs):
            self._flag(k, "population-step", self.log.queries)


def first_exit_probs(defense: Defense) -> Callable[[Tensor], Tensor]:
    """A function answering images with DNF's first exit (the ``degrade-exit0`` response).

    Raises:
        ConfigError: ``defense`` is not a DNF.
    """
    if not isinstance(defense, DNF):
        raise ConfigError(f"the degrade-exit0 response needs a DNF defense, got {defense.name!r}")

    def answer(x: Tensor) -> Tensor:
        with torch.inference_mode():
            return torch.softmax(defense.net.forward_all(x).mean_logits[0], dim=1)

    return answer


M = TypeVar("M", bound=Monitor)


def find_member(monitor: Monitor | None, cls: type[M]) -> M | None:
    """``monitor`` itself when it is a ``cls``, its first ``cls`` member when it is a union, else ``None``."""
    if isinstance(monitor, cls):
        return monitor
    return next((m for m in getattr(monitor, "members", []) if isinstance(m, cls)), None)


def find_dadd(monitor: Monitor | None) -> DADD | None:
    """``monitor`` itself when it is ``dadd``, its ``dadd`` member when it is a union, else ``None``."""
    return find_member(monitor, DADD)


#: Bumped when :func:`loop_calibration` computes something else, so calibrations cached by an
#: earlier procedure (``artifacts/<dnf>/monitor-<hash>/``) are not read back. 2: exit-sprt over the
#: benign scenarios, with the benign early share. 3: step's cross-key window threshold.
CALIBRATION_VERSION = 3

#: Per-key monitors a closed loop may combine (``+``-joined in :attr:`LoopConfig.monitor`).
LOOP_MONITORS = ("exit-sprt", "dadd", "step", "prada")

#: Responses a closed loop applies to flagged keys (the server's others, ``alert`` and
#: ``throttle``, change nothing an in-process attacker's clone could learn from).
LOOP_RESPONSES = ("degrade-exit0", "degrade-label", "misinform", "misinform-id", "log")


@dataclass(frozen=True)
class LoopConfig:
    """DNF + monitor + response as a grid defense row: the ``monitor`` table of a ``[[defenses]]`` entry.

    The DNF is built as the row's ``params`` say (the same build, and the same cached artifact, as a
    plain ``dnf`` row with equal ``params``); the monitors are calibrated on the defender's own data
    once per build (:func:`loop_calibration`) and each cell attacks a fresh :class:`Monitored` with
    every key unflagged.

    Attributes:
        monitor: per-key monitors, ``+``-joined from :data:`LOOP_MONITORS` (``exit-sprt``, ``dadd``
            and ``step`` are calibrated on held-out ID images; ``prada`` has its fixed δ = 0.9).
        response: what a flagged key gets (one of :data:`LOOP_RESPONSES`).
        keys: keys the attacker spreads its budget over (the budget split evenly: ``ceil(budget / keys)``
            per key); ``1``: a single account.
        mode: ``round-robin`` (each batch from the next key) or ``bursts`` (one key after the other).
        population: also run the detector across keys created in one window (``None``: when ``keys > 1``).
        alpha: target false-positive rate of the calibrated monitors (share of benign keys flagged
            within the calibration horizon).
        seed: seeds the calibration's simulated benign streams.

    Example:
        >>> LoopConfig(monitor="exit-sprt+dadd", keys=100).with_population
        True
    """

    monitor: str = "exit-sprt+dadd"
    response: str = "degrade-exit0"
    keys: int = 1
    mode: Literal["round-robin", "bursts"] = "round-robin"
    population: bool | None = None
    alpha: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        members = self.members
        bad = [m for m in members if m not in LOOP_MONITORS]
        if not members or bad or len(set(members)) != len(members):
            raise ConfigError(
                f"monitor {self.monitor!r}: name distinct monitors from {', '.join(LOOP_MONITORS)} joined by '+'"
            )
        if self.response not in LOOP_RESPONSES:
            raise ConfigError(f"response must be one of {', '.join(LOOP_RESPONSES)}, got {self.response!r}")
        if self.keys < 1 or self.mode not in ("round-robin", "bursts"):
            raise ConfigError(f"need keys >= 1 and mode round-robin|bursts; got keys={self.keys}, mode={self.mode!r}")
        if self.with_population and "dadd" not in members:
            raise ConfigError("the population detector pools dadd features: the monitor must include 'dadd'")
        if not 0.0 < self.alpha < 1.0:
            raise ConfigError(f"alpha must lie in (0, 1), got {self.alpha}")

    @property
    def members(self) -> list[str]:
        """The per-key monitors' names."""
        return [m.strip() for m in self.monitor.split("+") if m.strip()]

    @property
    def with_population(self) -> bool:
        """Whether the detector across keys runs."""
        return self.keys > 1 if self.population is None else self.population

    def calibration_fields(self) -> dict[str, Any]:
        """What the calibration depends on (its cache key; ``version`` changes with the calibration procedure)."""
        return {"alpha": self.alpha, "seed": self.seed, "version": CALIBRATION_VERSION}


@dataclass(frozen=True)
class LoopCalibration:
    """The calibrations a closed loop reads: ``exit-sprt``'s and ``dadd``'s always (the population
    detector uses both), ``step``'s when the monitor includes it."""

    exit_sprt: ExitCalibration
    dadd: DADDCalibration
    step: StepCalibration | None = None


def loop_calibration(
    dnf: DNF, x_train: Tensor, x_val: Tensor, cfg: LoopConfig, directory: Path | None = None
) -> LoopCalibration:
    """The monitors of ``cfg`` calibrated on the defender's data, read from ``directory`` when saved there.

    ``exit-sprt``: on ``x_val``'s exits, its threshold holding in every benign scenario (each
    realistic shift × all classes or one; 10,000-query horizon, 1,000 simulations each); ``dadd``: its
    reference on ``x_train``, its threshold on 100 simulated benign streams per shift and class mix
    of ``x_val`` (:func:`fortress.monitor.calibrate.dadd_from_defense`); ``step`` (when ``cfg``
    names it): 100 simulated benign streams per shift and class mix of ``x_val``
    (:func:`fortress.monitor.step.calibrate_step`). All at ``cfg.alpha``. Written to ``directory``
    (``cal.exit-sprt.json``, ``cal.dadd.json``, ``cal.step.json``) when given, each as soon as it
    is computed; a later call with the same directory reads them back.
    """
    from fortress.monitor.calibrate import dadd_from_defense
    from fortress.monitor.exit_sprt import calibrate_from_defense

    def cached(name: str, load: Callable[[Path], Any], make: Callable[[], Any]) -> Any:
        path = None if directory is None else Path(directory) / f"cal.{name}.json"
        if path is not None and path.is_file():
            return load(path)
        made = make()
        if path is not None:
            _save_atomic(made, path)
        return made

    ecal = cached(
        "exit-sprt",
        ExitCalibration.load,
        lambda: calibrate_from_defense(
            dnf, x_val, alpha=cfg.alpha, horizon=10_000, simulations=1000, seed=cfg.seed, shifts=IMAGE_SHIFTS
        ),
    )
    dcal = cached(
        "dadd",
        DADDCalibration.load,
        lambda: dadd_from_defense(dnf, x_train, x_val, streams=100, alpha=cfg.alpha, seed=cfg.seed),
    )
    scal = None
    if "step" in cfg.members:
        scal = cached(
            "step",
            StepCalibration.load,
            lambda: calibrate_step(lambda x: dnf.respond(x).probs, x_val, alpha=cfg.alpha, seed=cfg.seed),
        )
    return LoopCalibration(ecal, dcal, scal)


def _save_atomic(cal: ExitCalibration | DADDCalibration | StepCalibration, path: Path) -> None:
    """Save a calibration so a concurrent reader sees the whole file or none."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    cal.save(tmp)
    os.replace(tmp, path)


def closed_loop(
    dnf: DNF, cfg: LoopConfig, calibrations: LoopCalibration, budget: int, *, population_min_queries: int = 500
) -> Monitored:
    """A fresh :class:`Monitored` (every key unflagged) for an attacker spending ``budget`` queries as ``cfg`` says.

    ``population_min_queries``: pooled queries of a window before the detector across keys tests it
    (as ``fortress serve --population-min-queries``).

    Raises:
        ConfigError: ``budget < 1``, or ``step`` in the monitor without its calibration.
    """
    from fortress.monitor.exit_sprt import ExitSPRT
    from fortress.monitor.prada import Prada
    from fortress.monitor.tap import PenultimateTap
    from fortress.monitor.union import AnyOf

    if budget < 1:
        raise ConfigError(f"budget must be >= 1, got {budget}")
    ecal, dcal, scal = calibrations.exit_sprt, calibrations.dadd, calibrations.step
    if "step" in cfg.members and scal is None:
        raise ConfigError("the monitor includes 'step' but the calibrations hold none")

    def step() -> Monitor:
        assert scal is not None  # checked above
        return Step(scal)

    make: dict[str, Callable[[], Monitor]] = {
        "exit-sprt": lambda: ExitSPRT(ecal),
        "dadd": lambda: DADD(dcal, features=PenultimateTap(dnf)),
        "step": step,
        "prada": Prada,
    }
    members = [make[m]() for m in cfg.members]
    monitor = members[0] if len(members) == 1 else AnyOf(members)
    population = None
    if cfg.with_population:
        population = PopulationDrift(
            dcal, id_early_share=ecal.early_share, num_exits=dnf.num_exits, min_queries=population_min_queries
        )
    return Monitored(
        dnf,
        monitor=monitor,
        population=population,
        population_step=WindowSteps(scal) if cfg.with_population and scal is not None else None,
        response=Response(cfg.response),
        plan=KeyPlan(keys=cfg.keys, mode=cfg.mode, per_key=-(-budget // cfg.keys)),
    )
