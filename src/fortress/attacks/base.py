"""The Attack contract and the scaffold every attack is written on.

``Attack(oracle, *, budget, seed, ...paper defaults)``; ``attack.run(clone, pool=None, ...)``
returns an :class:`AttackResult`. Evaluation (clone accuracy and fidelity at checkpoints) uses an
:class:`EvalSet` whose victim labels were computed off-budget by the caller, so evaluating never
spends a query.

An attack is one file and one registration (``ATTACKS.add`` in ``fortress/attacks/__init__.py``).
It declares its hyper-parameters as fields with :func:`~fortress.attacks.hparams.hp` (they become
the keyword-only constructor arguments, are checked and are recorded by :meth:`Attack.hparams`),
the pool it needs and its checkpoint cadence, and writes only its extraction step,
:meth:`Attack._extract`. :meth:`Attack.run` is the template around it: validate the inputs, seed,
hand ``_extract`` an :class:`AttackRun` (queries that are counted, reported as progress and
histogrammed by label; checkpoints on the declared cadence), then build the result::

    class NoiseFit(Attack):
        \"\"\"Fit the clone to the victim's answers on uniform noise (a data-free baseline).\"\"\"

        name = "noise-fit"
        output_modes = (OutputMode.SOFT, OutputMode.HARD)
        epochs: int = hp(default=5, ge=1)

        def _extract(self, run: AttackRun) -> dict[str, Any]:
            x = torch.rand((self.budget, *self.oracle.input_shape), generator=run.rng)
            y = run.query_batches(x, 64)
            train_clone(run.clone, x, y, epochs=self.epochs, batch_size=64, lr=1e-3, generator=run.rng)
            return {}
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import time
from abc import ABCMeta, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, cast, dataclass_transform

import torch
from torch import Tensor, nn

from fortress.attacks.hparams import hp, plain, settle
from fortress.errors import ConfigError
from fortress.models.train import predict_logits
from fortress.oracle import Oracle, OutputMode
from fortress.tensors import check_labels

__all__ = [
    "Attack",
    "AttackResult",
    "AttackRun",
    "Cadence",
    "Checkpoint",
    "EvalSet",
    "PoolKind",
    "ProgressFn",
    "count_labels",
]

log = logging.getLogger(__name__)

#: ``progress(queries_used, budget)`` — called as an attack spends queries (see :data:`Cadence`).
ProgressFn = Callable[[int, int], None]

#: How an attack reports progress and when its checkpoints are scored (at
#: :meth:`AttackRun.step_done`; a final checkpoint is always scored at the end):
#:
#: * ``"budget"``: the attack works in steps of a few oracle calls each; every step boundary
#:   reports progress, and a checkpoint is scored at the first boundary past every ``eval_every``
#:   queries (default: a tenth of the budget);
#: * ``"round"``: progress after every oracle call; a checkpoint after every training round, or with
#:   ``eval_every`` once that many queries have passed since the last one;
#: * ``"end"``: progress after every oracle call; one checkpoint, after the run (``eval_every`` is ignored).
Cadence = Literal["budget", "round", "end"]


class PoolKind(enum.Enum):
    """The attacker images an attack needs (the value is how error messages name them)."""

    NONE = "no images (data-free)"
    ID_SEEDS = "a pool of in-distribution seed images"
    NATURAL = "a pool of natural images"


@dataclass(frozen=True)
class EvalSet:
    """Labelled data to score a clone on (never sent to the oracle).

    Attributes:
        x: images ``(N, C, H, W)`` in [0, 1].
        y: true labels ``(N,)``.
        victim_labels: the undefended victim's top-1 on ``x`` (for fidelity), or ``None``.
    """

    x: Tensor
    y: Tensor
    victim_labels: Tensor | None = None

    def __post_init__(self) -> None:  # the label contract: (N,) or (N, 1) integers, flattened, never broadcast
        object.__setattr__(self, "y", check_labels(self.y, len(self.x), name="EvalSet labels"))
        if self.victim_labels is not None:
            object.__setattr__(
                self, "victim_labels", check_labels(self.victim_labels, len(self.x), name="victim_labels")
            )

    def score(self, clone: nn.Module) -> tuple[float, float | None]:
        """Return ``(accuracy, fidelity)`` of ``clone`` on this set (fidelity ``None`` without victim labels)."""
        logits = predict_logits(clone, self.x)
        check_labels(self.y, num_classes=logits.shape[1], name="EvalSet labels")
        if self.victim_labels is not None:
            check_labels(self.victim_labels, num_classes=logits.shape[1], name="victim_labels")
        pred = logits.argmax(1)
        acc = float((pred == self.y).float().mean())
        fid = None if self.victim_labels is None else float((pred == self.victim_labels).float().mean())
        return acc, fid


@dataclass(frozen=True)
class Checkpoint:
    """Clone quality after ``queries`` queries."""

    queries: int
    clone_acc: float
    clone_fidelity: float | None
    wall_s: float


@dataclass
class AttackResult:
    """What an attack produced.

    Attributes:
        clone: the trained clone (eval mode).
        queries_used: queries charged to the oracle by this attack.
        wall_s: wall time of the attack.
        checkpoints: clone quality over the run (budget curve), when an eval set was given.
        clone_acc: final clone accuracy on the eval set (``None`` without one).
        clone_fidelity: final agreement with the victim's labels (``None`` without them).
        extras: attack-specific facts; every attack reports ``label_hist`` (the victim's top-1
            counts over the answers it counted, see :meth:`AttackRun.query`).
    """

    clone: nn.Module
    queries_used: int
    wall_s: float
    checkpoints: list[Checkpoint] = field(default_factory=list)
    clone_acc: float | None = None
    clone_fidelity: float | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def best_clone_acc(self) -> float | None:
        """Best checkpoint accuracy (what DFME's paper reports; optimistic for the attacker)."""
        accs = [c.clone_acc for c in self.checkpoints]
        return max(accs) if accs else self.clone_acc


def count_labels(hist: Tensor, answers: Tensor) -> None:
    """Add the top-1 labels of oracle rows ``(B, K)`` (any output mode) to ``hist`` ``(K,)`` in place."""
    hist += torch.bincount(answers.argmax(dim=1).cpu(), minlength=hist.numel())


class AttackRun:
    """One run of an attack: what :meth:`Attack._extract` works with.

    Made by :meth:`Attack.run` once the inputs are valid. Making it seeds torch's global generator
    and :attr:`rng` with the attack's seed and starts the clock and the query count.

    Attributes:
        attack: the attack being run.
        clone: the module trained and scored at checkpoints (an attack may swap in a wrapper
            around the given clone and swap it back before returning).
        pool: the attacker's images ``(N, C, H, W)`` (``N = 0`` for an attack that uses none).
        rng: CPU generator seeded with the attack's seed: the attack's random draws come from it
            (reproducible on any device); computation runs on :attr:`device`.
        device: where the clone's parameters live.
        label_hist: victim top-1 counts ``(K,)`` over the answers counted so far.
        checkpoints: the checkpoints scored so far.
    """

    def __init__(
        self,
        attack: Attack,
        clone: nn.Module,
        pool: Tensor,
        *,
        eval_set: EvalSet | None,
        eval_every: int | None,
        progress: ProgressFn | None,
    ) -> None:
        self.attack = attack
        self.clone = clone
        self.pool = pool
        self.eval_set = eval_set
        self.checkpoints: list[Checkpoint] = []
        self.label_hist = torch.zeros(attack.oracle.num_classes, dtype=torch.int64)
        self._progress = progress
        self._every = eval_every  # "round" cadence: queries between checkpoints (None: every round)
        self._last: int | None = None  # "round" cadence: queries at the last checkpoint
        self._step = eval_every if eval_every is not None else max(1, attack.budget // 10)  # "budget" cadence
        self._due = self._step  # "budget" cadence: the next multiple of the step to pass
        if eval_every is not None and attack.cadence == "end":
            log.info("%s scores its clone once, after the run: eval_every=%d is ignored", attack.name, eval_every)
        param = next(iter(clone.parameters()), None)
        self.device = torch.device("cpu") if param is None else param.device
        self._start = attack.oracle.queries_used
        self._t0 = time.perf_counter()
        torch.manual_seed(attack.seed)
        self.rng = torch.Generator().manual_seed(attack.seed)

    @property
    def queries_used(self) -> int:
        """Queries this run has charged so far."""
        return self.attack.oracle.queries_used - self._start

    @property
    def queries_left(self) -> int:
        """Queries this run may still spend."""
        return self.attack.budget - self.queries_used

    def query(self, x: Tensor, *, count: bool = True) -> Tensor:
        """The oracle's answers ``(B, K)`` to ``x`` ``(B, C, H, W)``, on ``x``'s device.

        Charges ``B`` queries, reports progress (unless the attack reports it per step, see
        :data:`Cadence`), and (with ``count``) adds the answers' top-1 labels to :attr:`label_hist`.

        Raises:
            BudgetExceeded: the batch would pass the oracle's budget (nothing is charged).
        """
        answers = self.attack.oracle.query(x).to(x.device)
        if count:
            count_labels(self.label_hist, answers)
        if self.attack.cadence != "budget":
            self._report()
        return answers

    def query_batches(self, x: Tensor, batch_size: int) -> Tensor:
        """:meth:`query` ``x`` in oracle calls of at most ``batch_size`` rows; the answers ``(N, K)`` in order."""
        return torch.cat([self.query(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])

    def _report(self) -> None:
        if self._progress is not None:
            self._progress(self.queries_used, self.attack.budget)

    def step_done(self) -> None:
        """End of a step or training round: report progress and score a checkpoint, as the :data:`Cadence` says."""
        used = self.queries_used
        if self.attack.cadence == "end":
            return
        if self.attack.cadence == "budget":
            self._report()
            if used < self._due:
                return
            self._due = (used // self._step + 1) * self._step
        else:
            if self._every is not None and self._last is not None and used - self._last < self._every:
                return
            self._last = used
        self.checkpoint()

    def checkpoint(self) -> None:
        """Score :attr:`clone` on the eval set now (nothing without one; never charged to the budget)."""
        if self.eval_set is None:
            return
        acc, fid = self.eval_set.score(self.clone)
        self.checkpoints.append(Checkpoint(self.queries_used, acc, fid, time.perf_counter() - self._t0))
        log.info("%s %d queries: clone acc %.4f", self.attack.name, self.queries_used, acc)

    def finish(self, extras: dict[str, Any]) -> AttackResult:
        """The result: :attr:`clone` in eval mode, scored once more unless the last checkpoint is current."""
        self.clone.eval()
        if self.eval_set is not None and (not self.checkpoints or self.checkpoints[-1].queries != self.queries_used):
            self.checkpoint()
        last = self.checkpoints[-1] if self.checkpoints else None
        return AttackResult(
            clone=self.clone,
            queries_used=self.queries_used,
            wall_s=time.perf_counter() - self._t0,
            checkpoints=list(self.checkpoints),
            clone_acc=None if last is None else last.clone_acc,
            clone_fidelity=None if last is None else last.clone_fidelity,
            extras={**extras, "label_hist": self.label_hist.tolist()},
        )


@dataclass_transform(kw_only_default=True, field_specifiers=(hp, dataclasses.field))
class _AttackMeta(ABCMeta):
    """Makes every attack class a dataclass of its hyper-parameters (keyword-only, identity equality)."""

    def __new__(mcs, name: str, bases: tuple[type, ...], namespace: dict[str, Any], **kwargs: Any) -> _AttackMeta:
        cls = super().__new__(mcs, name, bases, namespace, **kwargs)
        dataclasses.dataclass(kw_only=True, eq=False)(cast(type, cls))  # in place: the same class object
        return cls


class Attack(metaclass=_AttackMeta):
    """Base class of every extraction attack.

    Args:
        oracle: the only access to the victim.
        budget: queries this attack may spend (it never spends more).
        seed: seeds every random choice of the attack.

    Attributes:
        name: registry name.
        output_modes: oracle output modes the attack works with.
        pool_kind: the attacker images :meth:`run` needs.
        default_pool: the data set a benchmark loads as the pool when its config names none.
        cadence: when checkpoints are scored (:data:`Cadence`).
    """

    name: ClassVar[str] = "attack"
    output_modes: ClassVar[tuple[OutputMode, ...]] = (OutputMode.SOFT,)
    pool_kind: ClassVar[PoolKind] = PoolKind.NONE
    default_pool: ClassVar[str | None] = None
    cadence: ClassVar[Cadence] = "end"

    oracle: Oracle = field(kw_only=False, repr=False)
    budget: int
    seed: int = hp(default=0)

    def __post_init__(self) -> None:
        settle(self)
        if self.budget < 1:
            raise ConfigError(f"budget must be a positive number of queries, got {self.budget}")
        if self.oracle.output_mode not in self.output_modes:
            modes = ", ".join(m.value for m in self.output_modes)
            raise ConfigError(
                f"attack {self.name!r} needs an oracle in output mode {modes}, got {self.oracle.output_mode.value!r}"
            )
        self._validate()

    def _validate(self) -> None:
        """Check the settings against each other and the oracle, derive values from them (a hook).

        Runs after every field passed its declared checks; raises :class:`ConfigError`.
        """

    def hparams(self) -> dict[str, Any]:
        """The hyper-parameters of this attack (recorded next to results): every constructor argument but the oracle."""
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "oracle"}

    # -- the template ---------------------------------------------------------------------------
    def run(
        self,
        clone: nn.Module,
        pool: Tensor | None = None,
        *,
        eval_set: EvalSet | None = None,
        eval_every: int | None = None,
        progress: ProgressFn | None = None,
    ) -> AttackResult:
        """Train ``clone`` from oracle answers.

        Args:
            clone: the clone network (trained in place), taking [0, 1] images of the oracle's shape.
            pool: attacker-side unlabelled images ``(N, C, H, W)`` in [0, 1], for attacks that need
                them (:attr:`pool_kind`; ignored by the others).
            eval_set: scored at checkpoints (never charged to the budget).
            eval_every: queries between checkpoints (``None``: the attack's :data:`Cadence` default).
            progress: called as ``progress(queries_used, budget)`` after every oracle call (every
                step for the ``"budget"`` :data:`Cadence`).

        Raises:
            ConfigError: a bad ``eval_every``; a missing, misshapen or too small pool; a clone the
                attack cannot train.
            BudgetExceeded: the oracle's own budget is smaller than this attack's.
        """
        if eval_every is not None and eval_every < 1:
            raise ConfigError(f"eval_every must be >= 1 query or None, got {eval_every}")
        images = self._check_pool(pool)
        self._check_clone(clone)
        run = AttackRun(self, clone, images, eval_set=eval_set, eval_every=eval_every, progress=progress)
        return run.finish(self._extract(run))

    @abstractmethod
    def _extract(self, run: AttackRun) -> dict[str, Any]:
        """The attack itself: train ``run.clone`` from ``run.query`` answers; return the result's extras."""

    def _check_clone(self, clone: nn.Module) -> None:
        """Refuse a clone the attack cannot train (raise ConfigError); called before any query."""

    def uses_pool(self) -> bool:
        """Whether :meth:`run` needs a pool (a pool given to an attack that uses none is ignored)."""
        return self.pool_kind is not PoolKind.NONE

    def _pool_minimum(self) -> tuple[int, str]:
        """Fewest pool images a run needs, and the setting behind the number for the message."""
        return 1, ""

    def _check_pool(self, pool: Tensor | None) -> Tensor:
        """The pool to use: present, images of the oracle's shape, at least :meth:`_pool_minimum` of them.

        Raises:
            ConfigError: naming the missing pool, the bad shape or the shortfall.
        """
        shape = tuple(self.oracle.input_shape)
        if not self.uses_pool():
            if pool is not None:
                log.info("%s uses no pool: the %d given images are ignored", self.name, pool.shape[0])
            return torch.empty(0, *shape)
        if pool is None:
            raise ConfigError(f"{self.name} needs {self.pool_kind.value} (pool=None was given)")
        if pool.dim() != 4 or tuple(pool.shape[1:]) != shape:
            raise ConfigError(
                f"pool images have shape {tuple(pool.shape[1:])}, expected the oracle's input shape {shape} (C, H, W)"
            )
        rows, what = self._pool_minimum()
        if pool.shape[0] < rows:
            if not what:
                raise ConfigError("the attacker pool is empty")
            raise ConfigError(f"the pool holds {pool.shape[0]} images, fewer than {what}")
        return pool
