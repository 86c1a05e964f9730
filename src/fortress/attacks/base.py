"""The Attack contract: an attack sees only an :class:`~fortress.oracle.Oracle` and trains a clone.

``Attack(oracle, *, budget, seed, ...paper defaults)``; ``attack.run(clone, pool=None, ...)``
returns an :class:`AttackResult`. Evaluation (clone accuracy and fidelity at checkpoints) uses an
:class:`EvalSet` whose victim labels were computed off-budget by the caller, so evaluating never
spends a query.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fortress.errors import ConfigError
from fortress.models.train import predict_logits
from fortress.oracle import Oracle, OutputMode
from fortress.tensors import check_labels

__all__ = ["Attack", "AttackResult", "Checkpoint", "EvalSet", "ProgressFn"]

#: ``progress(queries_used, budget)`` — called by attacks as they spend queries.
ProgressFn = Callable[[int, int], None]


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
        extras: attack-specific facts (e.g. label histogram of the queries).
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


class Attack(ABC):
    """Base class of every extraction attack.

    Args:
        oracle: the only access to the victim.
        budget: queries this attack may spend (it never spends more).
        seed: seeds every random choice of the attack.

    Attributes:
        name: registry name.
        output_modes: oracle output modes the attack works with.
    """

    name: ClassVar[str] = "attack"
    output_modes: ClassVar[tuple[OutputMode, ...]] = (OutputMode.SOFT,)

    def __init__(self, oracle: Oracle, *, budget: int, seed: int = 0) -> None:
        if budget < 1:
            raise ConfigError(f"budget must be a positive number of queries, got {budget}")
        if oracle.output_mode not in self.output_modes:
            modes = ", ".join(m.value for m in self.output_modes)
            raise ConfigError(
                f"attack {self.name!r} needs an oracle in output mode {modes}, got {oracle.output_mode.value!r}"
            )
        self.oracle = oracle
        self.budget = int(budget)
        self.seed = int(seed)
        self._start_queries = 0
        self._t0 = 0.0
        self._checkpoints: list[Checkpoint] = []

    # -- helpers shared by every attack ---------------------------------------------------------
    @property
    def queries_used(self) -> int:
        """Queries this attack has charged so far."""
        return self.oracle.queries_used - self._start_queries

    @property
    def queries_left(self) -> int:
        """Queries this attack may still spend."""
        return self.budget - self.queries_used

    def _begin(self) -> None:
        self._start_queries = self.oracle.queries_used
        self._t0 = time.perf_counter()
        self._checkpoints = []
        torch.manual_seed(self.seed)

    def _checkpoint(self, clone: nn.Module, eval_set: EvalSet | None) -> Checkpoint | None:
        if eval_set is None:
            return None
        acc, fid = eval_set.score(clone)
        cp = Checkpoint(self.queries_used, acc, fid, time.perf_counter() - self._t0)
        self._checkpoints.append(cp)
        return cp

    def _finish(self, clone: nn.Module, eval_set: EvalSet | None, **extras: Any) -> AttackResult:
        clone.eval()
        acc: float | None = None
        fid: float | None = None
        if eval_set is not None:
            last = self._checkpoints[-1] if self._checkpoints else None
            if last is None or last.queries != self.queries_used:
                self._checkpoint(clone, eval_set)
            acc, fid = self._checkpoints[-1].clone_acc, self._checkpoints[-1].clone_fidelity
        return AttackResult(
            clone=clone,
            queries_used=self.queries_used,
            wall_s=time.perf_counter() - self._t0,
            checkpoints=list(self._checkpoints),
            clone_acc=acc,
            clone_fidelity=fid,
            extras=dict(extras),
        )

    def _require_pool(self, pool: Tensor | None, *, who: str, min_rows: int = 1, what: str = "") -> Tensor:
        """Check an attacker pool: present, images of the oracle's shape, at least ``min_rows`` of them.

        Args:
            pool: the pool given to :meth:`run`.
            who: what needs it, for the message ("knockoff", "jbda", ...).
            min_rows: fewest images the attack needs.
            what: the setting behind ``min_rows`` for the message (e.g. ``"seed_size=150"``).

        Raises:
            ConfigError: naming the missing pool, the bad shape or the shortfall.
        """
        if pool is None:
            raise ConfigError(f"{who} needs an attacker pool of images (pool=None was given)")
        shape = tuple(self.oracle.input_shape)
        if pool.dim() != 4 or tuple(pool.shape[1:]) != shape:
            raise ConfigError(
                f"pool images have shape {tuple(pool.shape[1:])}, expected the oracle's input shape {shape} (C, H, W)"
            )
        if pool.shape[0] < min_rows:
            if not what:
                raise ConfigError("the attacker pool is empty")
            raise ConfigError(f"the pool holds {pool.shape[0]} images, fewer than {what}")
        return pool

    def hparams(self) -> dict[str, Any]:
        """The hyper-parameters of this attack (recorded next to results)."""
        return {"budget": self.budget, "seed": self.seed}

    @abstractmethod
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
            pool: attacker-side unlabelled images, for attacks that need them.
            eval_set: scored at checkpoints (never charged to the budget).
            eval_every: queries between checkpoints (``None``: attack default).
            progress: called as ``progress(queries_used, budget)``.
        """
