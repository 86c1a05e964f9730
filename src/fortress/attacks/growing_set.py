"""The loop of attacks that grow a labelled set in rounds from a pool (JBDA, ActiveThief).

Query a seeded random draw of pool images; then, every round, train the clone on the whole
labelled set, score a checkpoint (the ``"round"`` cadence), and query the images the attack picks
next (:meth:`GrowingSetAttack._grow`: synthetic points near the clone's boundaries for JBDA, pool
images chosen by active learning for ActiveThief) until it picks none.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from typing import Any

import torch
from torch import Tensor

from fortress.attacks.answers import top1_rows
from fortress.attacks.base import Attack, AttackRun
from fortress.attacks.common import train_clone
from fortress.attacks.hparams import hp
from fortress.oracle import OutputMode

__all__ = ["GrowingSetAttack"]

log = logging.getLogger(__name__)


class GrowingSetAttack(Attack):
    """Base of the attacks that alternate clone training and growing the labelled set.

    Each training uses soft cross-entropy on the oracle's rows (probabilities, renormalised top-k
    rows or one-hot rows) with Adam at ``lr`` for :meth:`_epochs` epochs, from the clone's initial
    weights when ``retrain_from_scratch``; the clone is trained once more on the final set.

    Args:
        lr: Adam learning rate of the clone.
        batch_size: training mini-batch size.
        retrain_from_scratch: reset the clone to its initial weights before each training.
        top1: train on the top-1 label of every answer only (one-hot rows): the attacker's counter
            to defenses that distort the rest of the row.
    """

    output_modes = (OutputMode.SOFT, OutputMode.HARD, OutputMode.TOPK)
    cadence = "round"

    lr: float = hp(default=1e-3, gt=0)
    batch_size: int = hp(default=64, ge=1)
    retrain_from_scratch: bool = hp(default=True)
    top1: bool = hp(default=False)

    @abstractmethod
    def _epochs(self) -> int:
        """Training epochs per round."""

    @abstractmethod
    def _seed_count(self) -> int:
        """Pool images in the seed set."""

    @abstractmethod
    def _grow(self, run: AttackRun, x: Tensor, y: Tensor, round_index: int) -> Tensor | None:
        """The images to query next (``None``: stop).

        Args:
            run: the run (its clone was just trained on ``x``).
            x: the labelled set ``(N, C, H, W)``.
            y: the oracle's answers on it ``(N, K)``.
            round_index: growing rounds done so far.
        """

    def _seeded(self, run: AttackRun, indices: Tensor) -> None:
        """Told which pool rows form the seed set (a hook for attacks that track pool rows)."""

    def _answers(self, run: AttackRun, x: Tensor) -> Tensor:
        """The oracle's rows for ``x`` as the clone trains on them (top-1 only with ``top1``)."""
        answers = run.query(x)
        return top1_rows(answers) if self.top1 else answers

    def _extract(self, run: AttackRun) -> dict[str, Any]:
        """Seed set, then rounds of training and growing.

        Extras of the result: ``rounds`` (growing rounds done), ``round_sizes`` (labelled-set size
        at each training), ``label_hist`` (oracle top-1 counts over the queries) and
        ``train_loss`` (last epoch's loss of each training).
        """
        clone = run.clone
        init_state = {k: v.detach().clone() for k, v in clone.state_dict().items()}
        first = torch.randperm(run.pool.shape[0], generator=run.rng)[: self._seed_count()]
        self._seeded(run, first)
        x = run.pool[first]
        y = self._answers(run, x)
        sizes: list[int] = []
        losses: list[float] = []
        while True:
            if self.retrain_from_scratch:
                clone.load_state_dict(init_state)
            train = train_clone(
                clone, x, y, epochs=self._epochs(), batch_size=self.batch_size, lr=self.lr, generator=run.rng
            )
            losses.append(train[-1])
            sizes.append(int(x.shape[0]))
            run.step_done()
            new = self._grow(run, x, y, len(sizes) - 1)
            if new is None:
                break
            x, y = torch.cat([x, new]), torch.cat([y, self._answers(run, new)])
            log.debug("%s round %d: %d labelled, %d queries used", self.name, len(sizes), x.shape[0], run.queries_used)
        return {"rounds": len(sizes) - 1, "round_sizes": sizes, "train_loss": losses}
